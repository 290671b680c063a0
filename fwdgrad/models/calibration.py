"""Calibration: the static scales of a fixed-point model, fixed once from a calibration set.

An inference engine is given one scale per activation tensor and one per weight tensor (or channel)
before it runs. :func:`calibrate` finds them for a model built at a fixed-point ``precision``:

1. a pass over the calibration inputs with every activation quantizer (:class:`QAct`) observing
   ``max |x|`` (values go through unrounded, weights on their grid);
2. for ``"percentile"`` and ``"mse"``, a second pass that histograms ``|x|`` over ``[0, max]`` in
   2048 bins;
3. per quantizer, the range: the max, the given percentile of ``|x|``, or the clipping range that
   minimises the expected squared error (clipping error plus ``Δ²/12`` rounding error) over the
   histogram; the scale is ``range / (2^(bits-1) - 1)``.

Weight scales come from the layer's params by :func:`fwdgrad.fixed_point.weight_scales`, the rule
that :func:`fwdgrad.qzo_ff` applies (no zero range: a zero bias gets its kernel's range).

The result is the ``"quant"`` collection: ``quant/<layer path>/scale`` per activation quantizer and
``quant/<layer path>/kernel_scale`` per quantized kernel (and ``bias_scale``, the grid of a dense
layer's bias, read where the layer runs its exact integer forward). It lives beside ``params`` in the
variables, so it is saved and restored with them; the model then uses it unchanged in training and
evaluation. Calibrate on the pre-training data, or on the task's support set when the backbone
comes from elsewhere.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fwdgrad.models import layers

PyTree = Any
CALIBRATION_METHODS = ("max", "percentile", "mse")
_MSE_CANDIDATES = 256


_STAT_KEYS = ("amax", "histogram", "kernel_scale", "bias_scale", "levels")


def _map_stats(fn, tree, *others):
  """``fn(own, *others_own)`` at every layer of a nested dict of statistics.

  ``own`` is a layer's own statistics (``amax``, ``histogram``, ``kernel_scale``); its children
  (sub-layers, quantizers) are visited recursively, ``others`` alongside.
  """
  own = {k: v for k, v in tree.items() if k in _STAT_KEYS}
  out = dict(fn(own, *({k: o[k] for k in _STAT_KEYS if k in o} for o in others))) if own else {}
  for key, value in tree.items():
    if key not in _STAT_KEYS:
      out[key] = _map_stats(fn, value, *(o[key] for o in others))
  return out


def _unfrozen(tree):
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  if isinstance(tree, dict):
    return {k: _unfrozen(v) for k, v in tree.items()}
  return tree


def _range_from_histogram(histogram: jax.Array, amax: jax.Array, method: str, percentile: float,
                          levels: float) -> jax.Array:
  """The clipping range of one tensor from its ``|x|`` histogram over ``[0, amax]``."""
  bins = histogram.shape[0]
  counts = histogram.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(counts), 1.0)
  edges = amax * jnp.arange(1, bins + 1, dtype=jnp.float32) / bins  # Upper bin edges.
  if method == "percentile":
    cumulative = jnp.cumsum(counts) / total
    index = jnp.minimum(jnp.searchsorted(cumulative, percentile / 100.0), bins - 1)
    return edges[index]
  centers = edges - 0.5 * amax / bins
  candidates = amax * jnp.arange(1, _MSE_CANDIDATES + 1, dtype=jnp.float32) / _MSE_CANDIDATES

  def error(clip):
    step = clip / levels
    clipped = jnp.square(jnp.maximum(centers - clip, 0.0))
    rounding = jnp.where(centers <= clip, step * step / 12.0, 0.0)
    return jnp.sum(counts * (clipped + rounding))

  return candidates[jnp.argmin(jax.vmap(error)(candidates))]


def calibrate(model: nn.Module, variables: dict, inputs, *, method: str = "max",
              percentile: float = 99.99, batch_size: Optional[int] = 256,
              **apply_kwargs) -> dict:
  """The static scales of ``model`` from calibration ``inputs``; returns variables with ``"quant"``.

  Args:
    model: a model (or layer) built at a fixed-point precision; for ``"float"`` the variables
      come back unchanged.
    variables: its variables (``params``, ``batch_stats``, ...); an existing ``"quant"`` is replaced.
    inputs: calibration inputs, an array with a leading example axis (or a tuple of such arrays
      for a model with several inputs): a few hundred pre-training examples, or the support set.
    method: ``"max"`` (max-abs), ``"percentile"`` (that percentile of ``|x|``) or ``"mse"``
      (the clipping range with the least squared error).
    percentile: for ``method="percentile"``, in (0, 100].
    batch_size: examples per calibration forward call (``None``: all at once).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Returns:
    ``variables`` with a ``"quant"`` collection; pure and jittable (no Python-side statistics).

  Raises:
    ValueError: for an unknown method, a percentile outside (0, 100] or no inputs.

  Examples:
    >>> images = jax.random.uniform(jax.random.key(1), (256, 28, 28, 1))
    >>> model = fwdgrad.models.get_model("conv4", num_classes=5, precision="16w8a")
    >>> variables = model.init(jax.random.key(0), images[:1])
    >>> variables = fwdgrad.models.calibrate(model, variables, images[:256])
  """
  if method not in CALIBRATION_METHODS:
    raise ValueError(f"unknown calibration method {method!r}; expected one of "
                     f"{CALIBRATION_METHODS}.")
  if not 0.0 < percentile <= 100.0:
    raise ValueError(f"percentile must be in (0, 100], got {percentile!r}.")
  arrays = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
  arrays = tuple(jnp.asarray(a) for a in arrays)
  count = arrays[0].shape[0] if arrays[0].ndim else 0
  if count == 0:
    raise ValueError("calibrate needs at least one calibration example (inputs with a leading "
                     "example axis).")
  if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                 or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
  base = {k: v for k, v in _unfrozen(dict(variables)).items()
          if k not in (layers.QUANT, layers.QUANT_STATS)}
  size = count if batch_size is None else min(batch_size, count)
  chunks = [tuple(a[i:i + size] for a in arrays) for i in range(0, count, size)]

  def observe(stats, chunk):
    variables_in = dict(base, **({layers.QUANT_STATS: stats} if stats is not None else {}))
    _, mutated = model.apply(variables_in, *chunk, mutable=[layers.QUANT_STATS], **apply_kwargs)
    return _unfrozen(mutated.get(layers.QUANT_STATS, {}))

  # Pass 1: max |x| per quantizer (and the kernel scales).
  stats = None
  for chunk in chunks:
    new = observe(stats, chunk)
    stats = new if stats is None else jax.tree_util.tree_map(jnp.maximum, stats, new)
  if not stats:
    return dict(base)  # Nothing to calibrate: a float model.

  def reduced_max(node):
    out = {}
    if "amax" in node:
      out["amax"] = jnp.max(node["amax"])
      out["levels"] = jnp.max(node["levels"])
    if "kernel_scale" in node:
      scale = node["kernel_scale"]
      out["kernel_scale"] = jnp.reshape(scale, (-1, scale.shape[-1]))[0]
    if "bias_scale" in node:
      out["bias_scale"] = jnp.reshape(node["bias_scale"], (-1,))[:1]
    return out

  raw, stats = stats, _map_stats(reduced_max, stats)

  if method != "max":
    # Pass 2: histograms of |x| over [0, max]. A scanned (recurrent) layer keeps one entry per
    # step, so the template repeats the overall max along the step axes pass 1 showed.
    def template_node(raw_node, node):
      out = dict(raw_node)
      if "amax" in raw_node:
        shape = jnp.shape(raw_node["amax"])
        out["amax"] = jnp.broadcast_to(node["amax"], shape)
        out["histogram"] = jnp.zeros(shape + (layers.HISTOGRAM_BINS,), jnp.int32)
      return out
    template = _map_stats(template_node, raw, stats)
    totals = None
    for chunk in chunks:
      new = _histograms(observe, template, chunk)
      totals = new if totals is None else jax.tree_util.tree_map(jnp.add, totals, new)
    stats = _map_stats(lambda node, total: dict(node, **total), stats, totals)

  def to_scales(node):
    out = {}
    for key in ("kernel_scale", "bias_scale"):
      if key in node:
        out[key] = node[key]
    if "amax" in node:
      levels_ = node["levels"]
      amax = node["amax"]
      if method == "max":
        top = amax
      else:
        top = _range_from_histogram(node["histogram"], amax, method, percentile, levels_)
      scale = top / levels_
      out["scale"] = jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)
    return out

  return dict(base, **{layers.QUANT: _map_stats(to_scales, stats)})


def _histograms(observe, template, chunk):
  """One pass-2 call: zero histograms in, this chunk's histograms out (steps summed)."""
  def histogram_only(node):
    if "histogram" not in node:
      return {}
    histogram = node["histogram"]
    return {"histogram": jnp.sum(jnp.reshape(histogram, (-1, histogram.shape[-1])), axis=0)}
  return _map_stats(histogram_only, observe(template, chunk))


def weight_scales(variables: dict) -> PyTree:
  """The calibrated weight grids, shaped like ``variables["params"]``, for :func:`fwdgrad.qzo_ff`.

  Each quantized kernel gets its ``Δ_w`` (a scalar, or per output channel with size 1 on the
  other axes), each dense bias its calibrated ``Δ_b`` (the grid its exact integer forward
  reads; the same rule ``qzo_ff`` applies); every other leaf gets ``None`` (the forward does not
  round it, and ``qzo_ff`` gives it a grid by its own rule). Pass the result as ``qzo_ff(..., weight_scale=...)`` so the
  update uses exactly the grid the forward reads.

  Raises:
    ValueError: if ``variables`` have no ``"quant"`` collection (calibrate first).
  """
  if layers.QUANT not in variables:
    raise ValueError("these variables are not calibrated (no 'quant' collection): call "
                     "fwdgrad.models.calibrate(model, variables, inputs) first.")
  scales = _unfrozen(variables[layers.QUANT])

  def place(params, node):
    if not isinstance(params, dict):
      return None
    out = {}
    for name, value in params.items():
      child = node.get(name, {}) if isinstance(node, dict) else {}
      if name == "kernel" and isinstance(node, dict) and "kernel_scale" in node:
        scale = node["kernel_scale"]
        out[name] = (jnp.reshape(scale, (1,) * (jnp.ndim(value) - 1) + (-1,)) if scale.size > 1
                     else jnp.reshape(scale, ()))
      elif name == "bias" and isinstance(node, dict) and "bias_scale" in node:
        out[name] = jnp.reshape(node["bias_scale"], ())
      else:
        out[name] = place(value, child)
    return out

  return place(_unfrozen(variables["params"]), scales)


__all__ = ("CALIBRATION_METHODS", "calibrate", "weight_scales")
