"""Tests of the PyTorch checkpoint import in fwdgrad/models/checkpoints.py.

The state dicts are random but laid out as torchvision's ``resnet18`` and timm's DeiT
``VisionTransformer``; the reference forward passes use ``torch.nn.functional`` only (the tests
that need PyTorch are skipped without it, except under CI=true).
"""

import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwdgrad import models
from fwdgrad.models import checkpoints

HAS_TORCH = importlib.util.find_spec("torch") is not None
# Without PyTorch these tests skip locally; under CI=true they fail (scripts/test.sh installs it).
needs_torch = pytest.mark.skipif(
    not HAS_TORCH and os.environ.get("CI") != "true",
    reason="PyTorch is not installed (pip install torch==2.13.0); it is only needed to read .pth "
    "files and to compute the reference forward passes.")


def _resnet18_state_dict(num_classes=1000, seed=0):
  """A random state dict with torchvision's resnet18 names and shapes."""
  rng = np.random.default_rng(seed)
  state = {}

  def conv(name, cout, cin, k):
    state[name + ".weight"] = rng.normal(0, np.sqrt(2 / (k * k * cin)), (cout, cin, k, k))

  def bn(name, c):
    state[name + ".weight"] = rng.uniform(0.5, 1.5, c)
    state[name + ".bias"] = rng.normal(0, 0.1, c)
    state[name + ".running_mean"] = rng.normal(0, 0.1, c)
    state[name + ".running_var"] = rng.uniform(0.5, 1.5, c)
    state[name + ".num_batches_tracked"] = np.array(100, np.int64)

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  cin = 64
  for stage, width in enumerate((64, 128, 256, 512), start=1):
    for block in range(2):
      prefix = f"layer{stage}.{block}."
      conv(prefix + "conv1", width, cin if block == 0 else width, 3)
      bn(prefix + "bn1", width)
      conv(prefix + "conv2", width, width, 3)
      bn(prefix + "bn2", width)
      if block == 0 and stage > 1:
        conv(prefix + "downsample.0", width, cin, 1)
        bn(prefix + "downsample.1", width)
    cin = width
  state["fc.weight"] = rng.normal(0, 0.05, (num_classes, 512))
  state["fc.bias"] = rng.normal(0, 0.05, num_classes)
  return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state.items()}


def _vit_state_dict(depth=12, image_size=224, num_classes=1000, seed=0, width=192, mlp=768):
  """A random state dict with timm's DeiT-tiny names and shapes."""
  rng = np.random.default_rng(seed)
  tokens = (image_size // 16) ** 2 + 1
  state = {
      "cls_token": rng.normal(0, 1, (1, 1, width)),
      "pos_embed": rng.normal(0, 1, (1, tokens, width)),
      "patch_embed.proj.weight": rng.normal(0, 1 / np.sqrt(3 * 256), (width, 3, 16, 16)),
      "patch_embed.proj.bias": rng.normal(0, 0.1, width),
  }
  def linear(name, out, inp):
    state[name + ".weight"] = rng.normal(0, 1 / np.sqrt(inp), (out, inp))
    state[name + ".bias"] = rng.normal(0, 0.1, out)

  def norm(name):
    state[name + ".weight"] = rng.uniform(0.5, 1.5, width)
    state[name + ".bias"] = rng.normal(0, 0.1, width)

  for i in range(depth):
    norm(f"blocks.{i}.norm1")
    linear(f"blocks.{i}.attn.qkv", 3 * width, width)
    linear(f"blocks.{i}.attn.proj", width, width)
    norm(f"blocks.{i}.norm2")
    linear(f"blocks.{i}.mlp.fc1", mlp, width)
    linear(f"blocks.{i}.mlp.fc2", width, mlp)
  norm("norm")
  linear("head", num_classes, width)
  return {k: v.astype(np.float32) for k, v in state.items()}


def _abstract(model, shape):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


# Key coverage and layout (numpy only) -----------------------------------------------------------

def test_resnet18_key_coverage_and_layout():
  state = _resnet18_state_dict()
  assert len(state) == 122  # torchvision's resnet18().state_dict() has 122 entries.
  variables = checkpoints.resnet18_from_torch(state, _abstract(models.ResNet18(), (1, 224, 224, 3)))
  params, stats = variables["params"], variables["batch_stats"]
  leaves = jax.tree.leaves(variables)
  assert sum(leaf.size for leaf in leaves) == sum(
      v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
  np.testing.assert_array_equal(params["conv1"]["kernel"],
                                state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["layer2_0"]["downsample"]["scale"],
                                state["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(stats["layer4_1"]["conv2"]["var"],
                                state["layer4.1.bn2.running_var"])
  np.testing.assert_array_equal(params["head"]["kernel"], state["fc.weight"].T)


def test_vit_key_coverage_and_layout():
  state = _vit_state_dict()
  assert len(state) == 152  # timm's deit_tiny_patch16_224 state dict.
  variables = checkpoints.vit_from_torch(state, _abstract(models.ViT(), (1, 224, 224, 3)))
  params = variables["params"]
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 5_717_416
  np.testing.assert_array_equal(params["blocks_11"]["attn"]["qkv"]["kernel"],
                                state["blocks.11.attn.qkv.weight"].T)
  np.testing.assert_array_equal(params["blocks_3"]["norm2"]["scale"], state["blocks.3.norm2.weight"])
  np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                state["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["pos_embed"], state["pos_embed"])


def test_vit_prompts_and_new_head_keep_their_values():
  model = models.ViT(num_classes=2, image_size=32, depth=2, num_prompts=3)
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype),
                           _abstract(model, (1, 32, 32, 3)))
  state = _vit_state_dict(depth=2, image_size=32)
  converted = checkpoints.vit_from_torch(state, variables, load_head=False)
  chex.assert_trees_all_equal(converted["params"]["prompts"], variables["params"]["prompts"])
  chex.assert_trees_all_equal(converted["params"]["head"], variables["params"]["head"])
  np.testing.assert_array_equal(converted["params"]["norm"]["bias"], state["norm.bias"])


def test_errors_list_missing_unexpected_and_mismatched_keys():
  template = _abstract(models.ResNet18(), (1, 224, 224, 3))
  state = _resnet18_state_dict()
  del state["layer1.0.conv1.weight"]
  state["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
  state["bn1.running_var"] = np.ones(32, np.float32)
  with pytest.raises(ValueError) as error:
    checkpoints.resnet18_from_torch(state, template)
  message = str(error.value)
  assert "1 missing keys ['layer1.0.conv1.weight']" in message
  assert "1 unexpected keys ['layer5.0.conv1.weight']" in message
  assert "bn1.running_var: checkpoint (32,) vs model (64,)" in message


def test_head_errors_hint_at_load_head():
  state = _resnet18_state_dict()
  five_way = _abstract(models.ResNet18(num_classes=5), (1, 64, 64, 3))
  with pytest.raises(ValueError, match=r"fc.weight: checkpoint \(512, 1000\).*load_head=False"):
    checkpoints.resnet18_from_torch(state, five_way)
  features_only = _abstract(models.ResNet18(num_classes=None), (1, 64, 64, 3))
  with pytest.raises(ValueError, match=r"unexpected keys \['fc.bias', 'fc.weight'\].*no head"):
    checkpoints.resnet18_from_torch(state, features_only)
  variables = checkpoints.resnet18_from_torch(state, features_only, load_head=False)
  assert "head" not in variables["params"]


def test_resize_pos_embed():
  state = _vit_state_dict(depth=1, image_size=224)
  template = _abstract(models.ViT(image_size=64, depth=1), (1, 64, 64, 3))
  with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 197, 192\) vs model"):
    checkpoints.vit_from_torch(state, template)
  variables = checkpoints.vit_from_torch(state, template, resize_pos_embed=True)
  pos_embed = variables["params"]["pos_embed"]
  assert pos_embed.shape == (1, 17, 192)
  np.testing.assert_array_equal(pos_embed[:, 0], state["pos_embed"][:, 0])
  # A constant grid stays constant under resizing.
  state["pos_embed"][:, 1:] = 0.5
  resized = checkpoints.vit_from_torch(state, template, resize_pos_embed=True)
  chex.assert_trees_all_close(resized["params"]["pos_embed"][:, 1:], jnp.full((1, 16, 192), 0.5),
                              atol=1e-5, rtol=0)


def test_safetensors_round_trip_and_file_errors(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = _vit_state_dict(depth=1, image_size=32)
  path = str(tmp_path / "vit.safetensors")
  save_file(state, path)
  loaded = checkpoints.load_state_dict(path)
  chex.assert_trees_all_equal(loaded, state)
  template = _abstract(models.ViT(image_size=32, depth=1), (1, 32, 32, 3))
  variables = checkpoints.import_checkpoint("vit_tiny", path, template)
  np.testing.assert_array_equal(variables["params"]["cls_token"], state["cls_token"])
  with pytest.raises(ValueError, match="does not exist"):
    checkpoints.load_state_dict(str(tmp_path / "missing.safetensors"))
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown checkpoint extension '.npz'"):
    checkpoints.load_state_dict(str(tmp_path / "weights.npz"))
  with pytest.raises(ValueError, match="no checkpoint converter for model 'conv4'"):
    checkpoints.import_checkpoint("conv4", state, template)


# Against PyTorch ---------------------------------------------------------------------------------

def _torch_resnet18(state, images):
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}

  def bn(x, name):
    return F.batch_norm(x, t[name + ".running_mean"], t[name + ".running_var"],
                        t[name + ".weight"], t[name + ".bias"], training=False, eps=1e-5)

  x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
  x = F.relu(bn(F.conv2d(x, t["conv1.weight"], stride=2, padding=3), "bn1"))
  x = F.max_pool2d(x, 3, stride=2, padding=1)
  for stage in range(1, 5):
    for block in range(2):
      prefix = f"layer{stage}.{block}."
      stride = 2 if stage > 1 and block == 0 else 1
      out = F.relu(bn(F.conv2d(x, t[prefix + "conv1.weight"], stride=stride, padding=1),
                      prefix + "bn1"))
      out = bn(F.conv2d(out, t[prefix + "conv2.weight"], padding=1), prefix + "bn2")
      if prefix + "downsample.0.weight" in t:
        x = bn(F.conv2d(x, t[prefix + "downsample.0.weight"], stride=stride),
               prefix + "downsample.1")
      x = F.relu(out + x)
  x = x.mean(dim=(2, 3))
  return F.linear(x, t["fc.weight"], t["fc.bias"]).numpy()


def _torch_vit(state, images, depth, num_heads=3):
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
  x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
  x = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=16)
  x = x.flatten(2).transpose(1, 2)
  batch, width = x.shape[0], x.shape[-1]
  x = torch.cat([t["cls_token"].expand(batch, -1, -1), x], dim=1) + t["pos_embed"]

  def norm(x, name):
    return F.layer_norm(x, (width,), t[name + ".weight"], t[name + ".bias"], eps=1e-6)

  def linear(x, name):
    return F.linear(x, t[name + ".weight"], t[name + ".bias"])

  for i in range(depth):
    tokens = x.shape[1]
    qkv = linear(norm(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv")
    qkv = qkv.reshape(batch, tokens, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
    attention = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    x = x + linear(attention.transpose(1, 2).reshape(batch, tokens, width), f"blocks.{i}.attn.proj")
    hidden = F.gelu(linear(norm(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1"))
    x = x + linear(hidden, f"blocks.{i}.mlp.fc2")
  return linear(norm(x, "norm")[:, 0], "head").numpy()


@needs_torch
def test_converted_resnet18_computes_what_torchvision_computes():
  state = _resnet18_state_dict(num_classes=10)
  images = np.array(jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
  model = models.ResNet18(num_classes=10)
  variables = checkpoints.resnet18_from_torch(state, _abstract(model, (1, 32, 32, 3)))
  ours = jax.jit(model.apply)(variables, images)
  reference = _torch_resnet18(state, images)
  scale = np.abs(reference).max()
  chex.assert_trees_all_close(np.asarray(ours) / scale, reference / scale, atol=1e-4, rtol=0)
  # The fixed-point model computes nearly, but not exactly, the same function.
  fixed = models.ResNet18(num_classes=10, precision="16w8a")
  quantized = jax.jit(fixed.apply)(models.calibrate(fixed, variables, images), images)
  error = np.abs(np.asarray(quantized) - reference).max() / scale
  assert 1e-4 < error < 0.1, error


@needs_torch
def test_converted_vit_computes_what_timm_computes():
  depth = 2
  state = _vit_state_dict(depth=depth, image_size=32, num_classes=10)
  images = np.array(jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
  model = models.ViT(num_classes=10, image_size=32, depth=depth)
  variables = checkpoints.vit_from_torch(state, _abstract(model, (1, 32, 32, 3)))
  ours = jax.jit(model.apply)(variables, images)
  reference = _torch_vit(state, images, depth)
  scale = np.abs(reference).max()
  chex.assert_trees_all_close(np.asarray(ours) / scale, reference / scale, atol=1e-4, rtol=0)


@needs_torch
def test_pth_files_with_wrappers_and_prefixes(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  state = _resnet18_state_dict()
  path = str(tmp_path / "resnet18.pth")
  torch.save({"model": {"module." + k: torch.from_numpy(v) for k, v in state.items()}}, path)
  loaded = checkpoints.load_state_dict(path)
  assert sorted(loaded) == sorted(state)
  np.testing.assert_array_equal(loaded["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
  variables = checkpoints.import_checkpoint(
      "resnet18", path, _abstract(models.ResNet18(), (1, 64, 64, 3)))
  np.testing.assert_array_equal(variables["batch_stats"]["conv1"]["mean"],
                                state["bn1.running_mean"])
