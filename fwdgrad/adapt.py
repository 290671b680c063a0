"""Adaptation modes as a partition of the parameter pytree into trainable and frozen parts.

Adapting a pre-trained model trains a subset of its parameters. Here that subset is a *partition*:

.. math::

   \\theta = \\mathrm{merge}(\\theta_T, \\theta_F), \\qquad
   (\\theta_T, \\theta_F) = \\mathrm{partition}(\\theta, S)

so the estimators (:func:`fwdgrad.jvp_grad`, :func:`fwdgrad.spsa_grad`,
:func:`fwdgrad.forward_gradient`) and the optimizer see only :math:`\\theta_T`. Frozen weights are
never perturbed, never given a gradient and never copied: ``frozen`` holds references to the
original arrays. The loss of the trainable part is ``bind_frozen(loss_fn, frozen)``.

A *selection* ``S`` is a pytree shaped like ``params`` whose leaves say, per parameter leaf:

* ``True``: the whole leaf is trainable;
* ``False``: the whole leaf is frozen;
* a 1-D integer array of flat indices: a *sparse* leaf, of which only those entries are trainable.
  The trainable part holds the gathered values ``w.ravel()[indices]`` (``k`` numbers, not a masked
  full-size leaf) and :func:`merge` scatters them back into the frozen leaf.

The modes of the paper (Sec. 4) build selections by parameter path:

* ``"ft"``: full fine-tuning, every floating-point leaf;
* ``"lp1"`` / ``"lp3"``: linear probing, only the head (a path component named ``"head"``), a 1- or
  3-layer :class:`LinearHead` on top of frozen features;
* ``"dvpt"``: deep visual prompt tuning, the leaves whose path contains ``"prompt"`` (and the head);
* ``"custom"``: the leaves whose ``"/"``-joined path matches a regular expression.

Sparse update (Sec. 3.4) then keeps a fraction ``1 - s`` of the entries of the selected leaves
(``s = 0.9`` freezes 90%), chosen by top-k magnitude, at random, or by a magnitude threshold.

References:
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024, Sec. 3.4 and Sec. 4.
  Jia et al., "Visual Prompt Tuning", ECCV 2022 (deep prompts).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

MODES = ("ft", "lp1", "lp3", "dvpt", "custom")
SPARSE_METHODS = ("topk", "random", "threshold")
HEAD_LAYERS = {"lp1": 1, "lp3": 3}


class LinearHead(nn.Module):
  """A classification head of ``num_layers`` dense layers, the probe of linear probing.

  .. math::

     h_0 = x, \\quad h_{i} = \\sigma(W_i h_{i-1} + b_i) \\;(i < L), \\quad
     \\mathrm{logits} = W_L h_{L-1} + b_L

  ``num_layers=1`` is LP-1 (a linear classifier); ``num_layers=3`` is LP-3, with the activation
  between layers so that the three layers do not collapse into one linear map.

  Attributes:
    num_classes: number of outputs.
    num_layers: number of dense layers, at least 1.
    hidden: width of the hidden layers; ``None`` keeps the input width.
    activation: nonlinearity between layers.
    dense: the dense layer constructor, ``dense(features, name=...)``; pass a quantized layer to
      run the head in fixed point.

  Examples:
    >>> head = LinearHead(num_classes=5, num_layers=3, hidden=128)
    >>> variables = head.init(jax.random.key(0), jnp.zeros((1, 192)))
  """
  num_classes: int
  num_layers: int = 1
  hidden: Optional[int] = None
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dense: Callable[..., nn.Module] = nn.Dense

  @nn.compact
  def __call__(self, x):
    if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or \
        self.num_layers < 1:
      raise ValueError(f"LinearHead.num_layers must be a positive int, got {self.num_layers!r}.")
    hidden = self.hidden if self.hidden is not None else x.shape[-1]
    for index in range(self.num_layers - 1):
      x = self.activation(self.dense(hidden, name=f"dense_{index}")(x))
    return self.dense(self.num_classes, name=f"dense_{self.num_layers - 1}")(x)


class ProbedModel(nn.Module):
  """A feature backbone followed by a head, with parameters under ``"backbone"`` and ``"head"``.

  Puts a :class:`LinearHead` of any depth on a backbone built without its own classifier (for
  example ``get_model("vit_tiny", num_classes=None)``), so that ``"lp1"``/``"lp3"`` select it.

  Attributes:
    backbone: module mapping inputs to ``(batch, features)``; keyword arguments of the call (such
      as ``train``) are passed to it.
    head: module mapping features to logits, e.g. ``LinearHead(num_classes, num_layers=3)``.

  Examples:
    >>> backbone = fwdgrad.models.get_model("conv4", num_classes=None)
    >>> model = ProbedModel(backbone, LinearHead(5, num_layers=3))
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    >>> selection = select_trainable(variables["params"], "lp3")
  """
  backbone: nn.Module
  head: nn.Module

  def __call__(self, inputs, **kwargs):
    return self.head(self.backbone(inputs, **kwargs))


def head_num_layers(mode: str) -> int:
  """Number of head layers of a linear-probing mode: 1 for ``"lp1"``, 3 for ``"lp3"``."""
  if mode not in HEAD_LAYERS:
    raise ValueError(f"{mode!r} is not a linear-probing mode; expected one of "
                     f"{tuple(HEAD_LAYERS)}.")
  return HEAD_LAYERS[mode]


class SparseLeaf(NamedTuple):
  """The frozen part of a sparsely trained leaf.

  Attributes:
    base: the full original leaf (a reference, not a copy); its entries at ``indices`` are stale
      and replaced by the trainable values in :func:`merge`.
    indices: sorted int32 flat indices of the trainable entries.
  """
  base: jax.Array
  indices: jax.Array


def path_name(path) -> str:
  """The ``"/"``-joined name of a key path, e.g. ``"params/head/dense_0/kernel"``."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _is_float(leaf) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def path_mask(params: PyTree, pattern: str) -> PyTree:
  """``True`` for the floating-point leaves whose path matches a regular expression.

  Args:
    params: parameter pytree.
    pattern: regular expression, searched (:func:`re.search`) in each leaf's :func:`path_name`.

  Returns:
    A pytree of Python bools shaped like ``params``.

  Examples:
    >>> mask = path_mask(params, r"(^|/)(block_11|head)/")
  """
  try:
    regex = re.compile(pattern)
  except (re.error, TypeError) as error:
    raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {error}.") from None
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: bool(_is_float(leaf) and regex.search(path_name(path))), params)


def _component_pattern(name: str) -> str:
  return rf"(^|/){re.escape(name)}(/|$)"


def _count_selected(mask: PyTree) -> int:
  return sum(bool(m) for m in jax.tree_util.tree_leaves(mask))


def mode_mask(params: PyTree, mode: str, *, pattern: Optional[str] = None, head: str = "head",
              prompt: str = "prompt", train_head: bool = True) -> PyTree:
  """The whole-leaf trainable mask of an adaptation mode.

  Args:
    params: parameter pytree (the ``"params"`` collection; batch statistics are not parameters).
    mode: one of :data:`MODES`.
    pattern: regular expression of ``"custom"`` (only).
    head: the path component that names the classification head.
    prompt: the substring of a path that marks a prompt parameter (``"dvpt"``).
    train_head: whether ``"dvpt"`` also trains the head.

  Returns:
    A pytree of Python bools shaped like ``params``.

  Raises:
    ValueError: unknown mode, a pattern with a non-custom mode, a linear-probing head whose depth
      does not match ``"lp1"``/``"lp3"``, or a mode that selects no parameter.
  """
  if mode not in MODES:
    raise ValueError(f"unknown adaptation mode {mode!r}; expected one of {MODES}.")
  if (pattern is not None) != (mode == "custom"):
    raise ValueError('pass pattern= exactly when mode="custom" (a regular expression over '
                     f'"/"-joined parameter paths); got mode={mode!r}, pattern={pattern!r}.')
  if mode == "ft":
    mask = jax.tree_util.tree_map(lambda leaf: bool(_is_float(leaf)), params)
  elif mode in HEAD_LAYERS:
    mask = path_mask(params, _component_pattern(head))
    _check_head_depth(params, mode, head)
  elif mode == "dvpt":
    prompts = path_mask(params, re.escape(prompt))
    heads = path_mask(params, _component_pattern(head)) if train_head else prompts
    mask = jax.tree_util.tree_map(lambda a, b: a or b, prompts, heads)
    if not _count_selected(prompts):
      raise ValueError(
          f'mode "dvpt" found no parameter whose path contains {prompt!r}: build the model with '
          "deep visual prompts, or pass prompt= the name its prompt parameters use.")
  else:
    mask = path_mask(params, pattern)
  if not _count_selected(mask):
    what = {"ft": "no floating-point leaf", "custom": f"no path matching {pattern!r}"}.get(
        mode, f"no path with a component named {head!r}")
    raise ValueError(f"adaptation mode {mode!r} selects nothing: params has {what}. Check the "
                     "model's parameter names (fwdgrad.adapt.path_name) or choose another mode.")
  return mask


def _check_head_depth(params, mode, head):
  kernels = [path_name(path) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if jnp.ndim(leaf) >= 2]
  kernels = [name for name in kernels if re.search(_component_pattern(head), name)]
  expected = HEAD_LAYERS[mode]
  if kernels and len(kernels) != expected:
    raise ValueError(
        f'mode {mode!r} trains a {expected}-layer head but the head {head!r} of params has '
        f"{len(kernels)} weight matrices ({kernels}); build the model with "
        f"LinearHead(num_layers={expected}) as its head.")


def _num_kept(size: int, sparsity: float) -> int:
  return max(1, int(round((1.0 - sparsity) * size)))


def check_sparsity(sparsity) -> float:
  """Returns ``sparsity`` as a float, or raises a ValueError unless it lies in ``[0, 1)``."""
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)) or \
      not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity is the frozen fraction of the selected entries and must lie in "
                     f"[0, 1) (0.9 freezes 90%), got {sparsity!r}.")
  return float(sparsity)


def sparse_selection(params: PyTree, mask: PyTree, *, sparsity: float = 0.9,
                     method: str = "topk", key: Optional[jax.Array] = None,
                     threshold: Optional[float] = None) -> PyTree:
  """Chooses the trainable entries of the masked leaves (sparse update).

  Per masked leaf of ``n`` entries, ``"topk"`` keeps the ``k`` largest magnitudes and ``"random"``
  ``k`` entries drawn uniformly without replacement from ``fold_in(key, leaf_index)``, with

  .. math:: k = \\max(1, \\mathrm{round}((1 - s)\\, n)).

  ``"threshold"`` keeps the entries with :math:`|w| > t` across all masked leaves; a leaf with none
  becomes frozen. ``t`` is ``threshold`` when given, otherwise the magnitude below which the
  fraction ``s`` of all masked entries lies (one global cut, so layers with larger weights keep
  more entries).

  The selection depends on the values, so call this eagerly (outside :func:`jax.jit`), once,
  on the pre-trained weights.

  Args:
    params: parameter pytree.
    mask: pytree of bools shaped like ``params`` (e.g. from :func:`mode_mask`).
    sparsity: ``s``, the frozen fraction in ``[0, 1)``; unused when ``threshold`` is given.
    method: one of :data:`SPARSE_METHODS`.
    key: PRNG key, required by ``"random"``.
    threshold: absolute magnitude cut of ``"threshold"``.

  Returns:
    A selection for :func:`partition`: int32 index arrays at masked leaves, ``False`` elsewhere.

  Examples:
    >>> mask = mode_mask(params, "ft")
    >>> selection = sparse_selection(params, mask, sparsity=0.9, method="topk")
    >>> trainable, frozen = partition(params, selection)
  """
  if method not in SPARSE_METHODS:
    raise ValueError(f"unknown sparse method {method!r}; expected one of {SPARSE_METHODS}.")
  sparsity = check_sparsity(sparsity)
  if method == "random" and key is None:
    raise ValueError('sparse method "random" needs key= (a jax.random.key) to draw the mask.')
  if threshold is not None and method != "threshold":
    raise ValueError(f'threshold= is only used by method="threshold", got method={method!r}.')
  leaves, treedef = jax.tree_util.tree_flatten(params)
  masks = treedef.flatten_up_to(mask)
  magnitudes = [np.abs(np.asarray(leaf, np.float32)).ravel() if m else None
                for leaf, m in zip(leaves, masks)]
  if all(m is None for m in magnitudes):
    raise ValueError("the mask selects no leaf: there is nothing to sparsify.")
  if method == "threshold" and threshold is None:
    everything = np.concatenate([m for m in magnitudes if m is not None])
    num_frozen = int(round(sparsity * everything.size))
    threshold = -np.inf if num_frozen == 0 else np.partition(everything, num_frozen - 1)[
        num_frozen - 1]
  selection = []
  for index, magnitude in enumerate(magnitudes):
    if magnitude is None:
      selection.append(False)
      continue
    if method == "topk":
      k = _num_kept(magnitude.size, sparsity)
      indices = np.argpartition(-magnitude, k - 1)[:k]
    elif method == "random":
      k = _num_kept(magnitude.size, sparsity)
      # The k smallest of n i.i.d. uniforms are a uniformly random k-subset.
      uniforms = np.asarray(jax.random.uniform(jax.random.fold_in(key, index), magnitude.shape))
      indices = np.argpartition(uniforms, k - 1)[:k]
    else:
      indices = np.flatnonzero(magnitude > np.float32(threshold))
      if indices.size == 0:
        selection.append(False)
        continue
    selection.append(jnp.asarray(np.sort(indices), jnp.int32))
  if not any(not isinstance(s, bool) for s in selection):
    raise ValueError(f"sparse selection kept no entry (threshold {threshold}); lower the "
                     "threshold or the sparsity.")
  return jax.tree_util.tree_unflatten(treedef, selection)


def select_trainable(params: PyTree, mode: str = "ft", *, pattern: Optional[str] = None,
                     sparsity: float = 0.0, sparse_method: str = "topk",
                     key: Optional[jax.Array] = None, threshold: Optional[float] = None,
                     head: str = "head", prompt: str = "prompt",
                     train_head: bool = True) -> PyTree:
  """The selection of an adaptation mode, optionally made sparse; see :func:`mode_mask`.

  Sparse update applies when ``sparsity > 0`` or a ``threshold`` is given; ``sparsity=0.9`` is the
  paper's 90%-sparse forward-gradient setting.

  Args:
    params, mode, pattern, head, prompt, train_head: as in :func:`mode_mask`.
    sparsity, key, threshold: as in :func:`sparse_selection`.
    sparse_method: the ``method`` of :func:`sparse_selection`.

  Returns:
    A selection for :func:`partition`.

  Examples:
    >>> selection = select_trainable(params, "dvpt")
    >>> selection = select_trainable(params, "ft", sparsity=0.9, sparse_method="random",
    ...                              key=jax.random.key(0))
    >>> trainable, frozen = partition(params, selection)
  """
  sparsity = check_sparsity(sparsity)
  mask = mode_mask(params, mode, pattern=pattern, head=head, prompt=prompt, train_head=train_head)
  if sparsity == 0.0 and threshold is None:
    return mask
  return sparse_selection(params, mask, sparsity=sparsity, method=sparse_method, key=key,
                          threshold=threshold)


def _as_indices(selection_leaf, leaf, name):
  """A leaf's selection as True, False or sorted int32 flat indices."""
  if isinstance(selection_leaf, (bool, np.bool_)):
    return bool(selection_leaf)
  selection_leaf = np.asarray(selection_leaf)
  if selection_leaf.dtype == bool:
    if selection_leaf.ndim == 0:
      return bool(selection_leaf)
    if selection_leaf.shape != jnp.shape(leaf):
      raise ValueError(f"the boolean mask of {name} has shape {selection_leaf.shape}, the leaf "
                       f"{jnp.shape(leaf)}.")
    return jnp.asarray(np.flatnonzero(selection_leaf), jnp.int32)
  if selection_leaf.ndim == 1 and np.issubdtype(selection_leaf.dtype, np.integer):
    if selection_leaf.size and (selection_leaf.min() < 0 or
                                selection_leaf.max() >= np.size(leaf)):
      raise ValueError(f"the indices of {name} must lie in [0, {np.size(leaf)}).")
    if np.unique(selection_leaf).size != selection_leaf.size:
      raise ValueError(f"the indices of {name} repeat an entry.")
    return jnp.asarray(np.sort(selection_leaf), jnp.int32)
  raise ValueError(
      f"the selection of {name} must be a bool, a boolean mask shaped like the leaf or 1-D integer "
      f"flat indices; got {selection_leaf.dtype}{selection_leaf.shape}.")


def partition(params: PyTree, selection: PyTree):
  """Splits ``params`` into ``(trainable, frozen)`` by a selection.

  Both parts keep the structure of ``params`` with ``None`` where a leaf belongs to the other part,
  so jax tree functions and optax skip those places. Sparse leaves are gathered into
  ``trainable`` (their ``k`` values) and kept whole in ``frozen`` as a :class:`SparseLeaf`.

  Call it eagerly (the selection holds Python bools and concrete indices); :func:`merge` is pure
  and jittable.

  Args:
    params: parameter pytree.
    selection: pytree shaped like ``params`` (see the module docstring), e.g. from
      :func:`select_trainable`.

  Returns:
    ``(trainable, frozen)`` with ``merge(trainable, frozen) == params`` exactly.

  Examples:
    >>> trainable, frozen = partition(params, select_trainable(params, "lp1"))
    >>> loss, grads = fwdgrad.spsa_grad(bind_frozen(loss_fn, frozen), trainable, key)
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    selections = treedef.flatten_up_to(selection)
  except (ValueError, TypeError) as error:
    raise ValueError(f"selection must have the structure of params: {error}") from None
  trainable, frozen = [], []
  for (path, leaf), selection_leaf in zip(leaves_with_path, selections):
    chosen = _as_indices(selection_leaf, leaf, path_name(path))
    if chosen is not False and not _is_float(leaf):
      raise ValueError(f"{path_name(path)} has dtype {jnp.result_type(leaf)} and cannot be "
                       "trained; freeze it.")
    if chosen is True:
      trainable.append(leaf)
      frozen.append(None)
    elif chosen is False:
      trainable.append(None)
      frozen.append(leaf)
    else:
      trainable.append(jnp.ravel(leaf)[chosen])
      frozen.append(SparseLeaf(base=leaf, indices=chosen))
  if all(t is None for t in trainable):
    raise ValueError("the selection trains nothing: every leaf is frozen.")
  return (jax.tree_util.tree_unflatten(treedef, trainable),
          jax.tree_util.tree_unflatten(treedef, frozen))


def _is_frozen_leaf(x) -> bool:
  return x is None or isinstance(x, SparseLeaf)


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
  """The full parameters from the two parts of :func:`partition` (its exact inverse).

  .. math:: \\theta = \\theta_F \\text{ with } \\theta_F[I] \\leftarrow \\theta_T \\text{ at each
     sparse leaf (indices } I)

  Pure and jittable; tangents and gradients flow into ``trainable`` only. Frozen leaves are passed
  through as they are; a sparse leaf is rebuilt by one scatter into a new full-size array.

  Args:
    trainable: the trainable part, e.g. after optimizer steps.
    frozen: the frozen part from the same :func:`partition`.

  Returns:
    A pytree shaped like the original ``params``.
  """
  def combine(frozen_leaf, trainable_leaf):
    if isinstance(frozen_leaf, SparseLeaf):
      base = frozen_leaf.base
      flat = jnp.ravel(base).at[frozen_leaf.indices].set(
          jnp.asarray(trainable_leaf, base.dtype), indices_are_sorted=True, unique_indices=True)
      return flat.reshape(jnp.shape(base))
    if frozen_leaf is None:
      return trainable_leaf
    if trainable_leaf is not None:
      raise ValueError("trainable and frozen both hold the same leaf: they do not come from the "
                       "same partition.")
    return frozen_leaf

  try:
    return jax.tree_util.tree_map(combine, frozen, trainable, is_leaf=_is_frozen_leaf)
  except (ValueError, TypeError) as error:
    if "same partition" in str(error):
      raise
    raise ValueError("trainable and frozen do not come from the same partition (their structures "
                     f"differ): {error}") from None


def bind_frozen(fn: Callable[..., Any], frozen: PyTree) -> Callable[..., Any]:
  """``fn(params, *args)`` as a function of the trainable part: ``fn(merge(t, frozen), *args)``.

  Inside a jitted step, bind the frozen part passed in as an argument, so that the weights are
  not baked into the compiled program as constants.

  Examples:
    >>> trainable, frozen = partition(params, select_trainable(params, "dvpt"))
    >>> value_fn = bind_frozen(lambda p: loss_fn(p, batch), frozen)
    >>> tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0), optax.sgd(1e-2))
    >>> state = tx.init(trainable)
    >>> updates, state = tx.update(trainable, state, trainable, value_fn=value_fn)
  """
  def fn_on_trainable(trainable, *args, **kwargs):
    return fn(merge(trainable, frozen), *args, **kwargs)

  return fn_on_trainable


def count_parameters(tree: PyTree) -> int:
  """Number of scalars in the array leaves of ``tree`` (``None`` places count nothing).

  ``count_parameters(trainable)`` is the number of trained values; the indices of sparse leaves in
  ``frozen`` are integers and not counted.
  """
  return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
             if _is_float(leaf))
