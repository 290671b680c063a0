"""Import public PyTorch checkpoints: torchvision ResNet18 and timm/DeiT ViT-tiny.

A checkpoint is a flat ``state_dict`` (``{"layer1.0.conv1.weight": tensor, ...}``) read from a
``.safetensors`` file (with the ``safetensors`` package) or a ``.pth``/``.pt``/``.bin`` file (with
``torch.load``; PyTorch is needed only for those and imported only when one is read). Nothing is
downloaded: the files must already be on disk.

The converters fill a given Flax ``variables`` dict (from ``model.init``) leaf by leaf:

* convolution kernels ``(out, in, kh, kw)`` become HWIO ``(kh, kw, in, out)``; linear weights
  ``(out, in)`` are transposed; BatchNorm ``weight``/``bias``/``running_mean``/``running_var``
  become ``scale``/``bias`` in ``params`` and ``mean``/``var`` in ``batch_stats`` (the
  ``num_batches_tracked`` counters are dropped);
* leaves that no checkpoint has (the D-VPT ``prompts``) keep their values from ``variables``, and so
  does the ``head`` with ``load_head=False`` (a new task's classifier; the checkpoint's head is
  then ignored);
* anything else that does not match raises one ValueError listing every missing key, unexpected
  key and shape mismatch.

Examples:
  >>> model = fwdgrad.models.get_model("resnet18", num_classes=5)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  >>> state_dict = load_state_dict("resnet18-f37072fd.safetensors")  # doctest: +SKIP
  >>> variables = resnet18_from_torch(state_dict, variables, load_head=False)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

StateDict = Mapping[str, Any]
Variables = Mapping[str, Any]

# Entries of a state dict that carry no weights.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch.Tensor; avoids importing torch.
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict from a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file into numpy arrays.

  Checkpoints that wrap the state dict (``{"model": ...}`` as DeiT's, ``{"state_dict": ...}``) are
  unwrapped, and the ``module.`` prefix of ``DataParallel`` checkpoints is removed.

  Args:
    path: the file.

  Returns:
    ``{name: np.ndarray}``.

  Raises:
    ValueError: for a missing file, an unknown extension, or missing ``torch``/``safetensors``.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint file {path!r} does not exist; download it beforehand.")
  extension = os.path.splitext(path)[1].lower()
  if extension == ".safetensors":
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise ValueError(
          f"reading {path!r} needs the safetensors package: pip install safetensors.") from error
    state = load_file(path)
  elif extension in (".pth", ".pt", ".bin"):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise ValueError(
          f"reading {path!r} needs PyTorch (pip install torch), or convert the file to "
          ".safetensors.") from error
    state = torch.load(path, map_location="cpu", weights_only=True)
  else:
    raise ValueError(
        f"unknown checkpoint extension {extension!r} of {path!r}; expected .safetensors, .pth, "
        ".pt or .bin.")
  for wrapper in ("model", "state_dict", "model_state"):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__}).")
  return {(k[len("module."):] if k.startswith("module.") else k): _to_numpy(v)
          for k, v in state.items()}


def _conv(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


def _linear(w: np.ndarray) -> np.ndarray:
  return np.transpose(w) if w.ndim == 2 else w


def _copy(w: np.ndarray) -> np.ndarray:
  return w


def _batchnorm_key(module: str, leaf: str) -> str:
  return module + "." + {"scale": "weight", "bias": "bias", "mean": "running_mean",
                         "var": "running_var"}[leaf]


def _resnet18_key(path: tuple[str, ...]) -> tuple[str, Callable]:
  """(torchvision key, transform) of a flattened ``(collection, *module_path, leaf)``."""
  *modules, leaf = path[1:]
  if modules == ["head"]:
    return "fc." + ("weight" if leaf == "kernel" else "bias"), _linear
  if modules == ["conv1"]:
    conv, batchnorm = "conv1", "bn1"
  else:
    block, layer = modules
    match = re.fullmatch(r"layer(\d)_(\d+)", block)
    if match is None:
      raise KeyError(path)
    prefix = f"layer{match.group(1)}.{match.group(2)}."
    if layer == "downsample":
      conv, batchnorm = prefix + "downsample.0", prefix + "downsample.1"
    else:
      conv, batchnorm = prefix + layer, prefix + layer.replace("conv", "bn")
  if leaf == "kernel":
    return conv + ".weight", _conv
  return _batchnorm_key(batchnorm, leaf), _copy


def _vit_key(path: tuple[str, ...]) -> tuple[str, Callable]:
  """(timm key, transform) of a flattened ``(collection, *module_path, leaf)``."""
  *modules, leaf = path[1:]
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf, leaf)
  if not modules:
    return leaf, _copy  # cls_token, pos_embed.
  if modules == ["patch_embed"]:
    return "patch_embed.proj." + torch_leaf, _conv
  names = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", m) for m in modules]
  return ".".join(names) + "." + torch_leaf, _linear if leaf == "kernel" else _copy


def _flatten(variables: Variables) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))


def _is_head(path: tuple[str, ...]) -> bool:
  return len(path) > 1 and path[1] == "head"


def _convert(
    architecture: str,
    state_dict: StateDict,
    variables: Variables,
    key_fn: Callable[[tuple[str, ...]], tuple[str, Callable]],
    head_keys: re.Pattern,
    load_head: bool,
    fix_shape: Optional[Callable[[str, np.ndarray, tuple], np.ndarray]] = None,
) -> dict:
  state = {k: v for k, v in state_dict.items() if not _IGNORED.search(k)}
  flat = _flatten(variables)
  has_head = any(_is_head(path) for path in flat)
  used, missing, mismatched, converted = set(), [], [], {}
  for path, leaf in flat.items():
    keep = any("prompt" in part for part in path) or (_is_head(path) and not load_head)
    if keep:
      converted[path] = leaf
      continue
    try:
      torch_key, transform = key_fn(path)
    except (KeyError, ValueError):
      missing.append("/".join(path) + " (no checkpoint counterpart)")
      continue
    if torch_key not in state:
      missing.append(torch_key)
      continue
    used.add(torch_key)
    value = transform(_to_numpy(state[torch_key]))
    if fix_shape is not None and value.shape != tuple(leaf.shape):
      value = fix_shape(torch_key, value, tuple(leaf.shape))
    if value.shape != tuple(leaf.shape):
      mismatched.append(f"{torch_key}: checkpoint {value.shape} vs model {tuple(leaf.shape)} "
                        f"({'/'.join(path)})")
      continue
    converted[path] = jnp.asarray(value, dtype=leaf.dtype)
  unexpected = sorted(k for k in state if k not in used
                      and not (head_keys.match(k) and not load_head))
  if missing or unexpected or mismatched:
    hints = []
    if load_head and (any(head_keys.match(k) for k in unexpected)
                      or any(head_keys.match(m.split(":")[0]) for m in mismatched)):
      hints.append("the checkpoint's classifier does not fit the model's head: pass "
                   "load_head=False to keep the model's own head (or none, with num_classes=None)")
    if not has_head and load_head and any(head_keys.match(k) for k in state):
      hints.append("the model has no head (num_classes=None)")
    raise ValueError(
        f"cannot import the checkpoint into {architecture}: "
        f"{len(missing)} missing keys {missing}; {len(unexpected)} unexpected keys {unexpected}; "
        f"{len(mismatched)} shape mismatches {mismatched}."
        + (" Hint: " + "; ".join(hints) + "." if hints else ""))
  return flax.traverse_util.unflatten_dict(converted)


def resnet18_from_torch(state_dict: StateDict, variables: Variables, *,
                        load_head: bool = True) -> dict:
  """torchvision ``resnet18`` weights into the variables of :class:`fwdgrad.models.ResNet18`.

  Args:
    state_dict: ``{name: array or torch tensor}`` with torchvision's names (``conv1.weight``,
      ``bn1.running_mean``, ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``,
      ``fc.weight``, ...), e.g. from :func:`load_state_dict`.
    variables: the model's ``{"params", "batch_stats"}`` from ``model.init``; gives the shapes and
      the values of leaves kept (the head with ``load_head=False``).
    load_head: import ``fc`` into ``head`` (needs ``num_classes=1000``); ``False`` ignores ``fc``.

  Returns:
    New variables with the checkpoint's values.

  Raises:
    ValueError: listing every missing key, unexpected key and shape mismatch.
  """
  return _convert("ResNet18", state_dict, variables, _resnet18_key, re.compile(r"fc\."),
                  load_head)


def _resize_pos_embed(key: str, value: np.ndarray, shape: tuple) -> np.ndarray:
  """Bicubic resize of the patch-position grid (the class position is kept) to a new image size."""
  if key != "pos_embed" or value.ndim != 3 or value.shape[-1] != shape[-1]:
    return value
  old, new = int(round(np.sqrt(value.shape[1] - 1))), int(round(np.sqrt(shape[1] - 1)))
  if old * old != value.shape[1] - 1 or new * new != shape[1] - 1:
    return value
  grid = value[0, 1:].reshape(old, old, -1)
  grid = jax.image.resize(jnp.asarray(grid), (new, new, grid.shape[-1]), "bicubic")
  return np.concatenate([value[:, :1], np.asarray(grid).reshape(1, new * new, -1)], axis=1)


def vit_from_torch(state_dict: StateDict, variables: Variables, *, load_head: bool = True,
                   resize_pos_embed: bool = False) -> dict:
  """timm / DeiT ``VisionTransformer`` weights into the variables of :class:`fwdgrad.models.ViT`.

  Args:
    state_dict: ``{name: array or torch tensor}`` with timm's names (``cls_token``, ``pos_embed``,
      ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ``blocks.0.mlp.fc1.weight``,
      ``norm.weight``, ``head.weight``, ...). Distilled DeiT checkpoints (``dist_token``) are not
      supported.
    variables: the model's ``{"params"}`` from ``model.init``; D-VPT ``prompts`` keep their values.
    load_head: import ``head`` (needs the same ``num_classes``); ``False`` keeps the model's head.
    resize_pos_embed: when the model's image size differs from the checkpoint's, resize the
      position-embedding grid bicubically instead of raising.

  Returns:
    New variables with the checkpoint's values.

  Raises:
    ValueError: listing every missing key, unexpected key and shape mismatch.
  """
  return _convert("ViT", state_dict, variables, _vit_key, re.compile(r"head\."), load_head,
                  _resize_pos_embed if resize_pos_embed else None)


# Model name (as in fwdgrad.models.MODELS) -> converter.
CONVERTERS = {"resnet18": resnet18_from_torch, "vit_tiny": vit_from_torch}


def import_checkpoint(name: str, checkpoint, variables: Variables, **kwargs) -> dict:
  """Imports ``checkpoint`` (a path or a state dict) into the variables of model ``name``.

  Args:
    name: ``"resnet18"`` or ``"vit_tiny"``.
    checkpoint: a file path for :func:`load_state_dict`, or a state dict.
    variables: the model's variables from ``model.init``.
    **kwargs: passed to the converter (``load_head``, ``resize_pos_embed``).

  Returns:
    New variables.
  """
  if name not in CONVERTERS:
    raise ValueError(
        f"no checkpoint converter for model {name!r}; expected one of {sorted(CONVERTERS)}.")
  if isinstance(checkpoint, (str, os.PathLike)):
    checkpoint = load_state_dict(checkpoint)
  return CONVERTERS[name](checkpoint, variables, **kwargs)
