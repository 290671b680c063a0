"""Integer arithmetic for fixed-point training, and an optax transform that keeps weights on a grid.

Fixed-point hardware rescales an integer ``x`` by a real factor ``r`` with an integer multiplier
``M`` and a right shift ``k`` such that ``M / 2^k ≈ r``:

.. math::

   \\mathrm{rescale}(x) = (x \\cdot M + \\rho) \\gg k
   = \\left\\lfloor \\frac{x M + \\rho}{2^k} \\right\\rfloor,
   \\qquad \\rho = 2^{k-1} \\text{ (round to nearest, ties up)} \\text{ or } \\rho \\sim
   \\mathcal{U}\\{0, \\dots, 2^k - 1\\} \\text{ (stochastic rounding)}

:func:`multiply_shift` computes this exactly in int32 without a 64-bit intermediate: ``x`` is split
into a high and a low part so that no partial product overflows, which is what a 32×32→64-bit
multiply-high instruction gives on a DSP. :func:`fixed_point_multiplier` picks ``(M, k)`` with a
15-bit ``M`` (relative error below ``2^-15``).

:func:`fixed_point_weights` is the float-optimizer counterpart: put it at the end of any optax chain
and the parameters stay on a fixed ``b``-bit grid ``Δ · k`` whose scale is taken from the parameters
at ``init`` and never changes.

References:
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024, Sec. 3.3 and App. A.
  Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference", CVPR 2018 (the multiplier-and-shift rescaling).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from fwdgrad import quant
from fwdgrad import transform

PyTree = Any

MULTIPLIER_BITS = 15
_MAX_SHIFT = 31
_SPLIT_BITS = 16


def fixed_point_multiplier(ratio: float, multiplier_bits: int = MULTIPLIER_BITS) -> tuple[int, int]:
  """``(M, k)`` with ``M / 2^k ≈ ratio`` and ``2^(multiplier_bits-1) <= M < 2^multiplier_bits``.

  For a static (Python float) ratio, such as the requantization factor ``Δ_z`` of the perturbation.

  Args:
    ratio: a positive real number.
    multiplier_bits: bits of ``M`` (at most 15 so that :func:`multiply_shift` cannot overflow).

  Returns:
    Python ints ``(M, k)``; the relative error ``|M 2^-k - ratio| / ratio`` is below
    ``2^-(multiplier_bits - 1)``.

  Examples:
    >>> fixed_point_multiplier(3.5 / 127)    # Δ_z of 8-bit z with z_max = 3.5
    (28898, 20)
  """
  if not ratio > 0 or not math.isfinite(ratio):
    raise ValueError(f"a fixed-point multiplier needs a positive finite ratio, got {ratio!r}.")
  if not 2 <= multiplier_bits <= MULTIPLIER_BITS:
    raise ValueError(f"multiplier_bits must be in [2, {MULTIPLIER_BITS}], got {multiplier_bits}.")
  shift = multiplier_bits - 1 - math.floor(math.log2(ratio))
  multiplier = round(ratio * 2.0 ** shift)
  if multiplier == 2 ** multiplier_bits:  # Rounded up to the next power of two.
    multiplier //= 2
    shift -= 1
  if not 0 <= shift <= _MAX_SHIFT:
    raise ValueError(
        f"ratio {ratio!r} needs a shift of {shift}, outside [0, {_MAX_SHIFT}]; it cannot be a "
        "fixed-point multiplier of an int32 value.")
  return int(multiplier), int(shift)


def fixed_point_multiplier_array(ratio: jax.Array, multiplier_bits: int = MULTIPLIER_BITS):
  """Traced :func:`fixed_point_multiplier`: int32 arrays ``(M, k)`` shaped like ``ratio``.

  The shift is clipped to ``[0, 31]``: a ratio below ``2^-(32 - multiplier_bits)`` gets a smaller
  ``M`` (down to 0, meaning the product rounds to zero), a ratio of ``2^multiplier_bits`` or more
  saturates ``M`` at ``2^multiplier_bits - 1``. Non-positive ratios give ``M = 0``.
  """
  ratio = jnp.asarray(ratio, jnp.float32)
  safe = jnp.where(ratio > 0, ratio, 1.0)
  shift = (multiplier_bits - 1) - jnp.floor(jnp.log2(safe))
  shift = jnp.clip(shift, 0, _MAX_SHIFT)
  multiplier = jnp.round(safe * jnp.exp2(shift))
  # float32 log2 can be off by one at exact powers of two: renormalize.
  too_big = multiplier >= 2.0 ** multiplier_bits
  halve = too_big & (shift > 0)
  multiplier = jnp.where(halve, jnp.round(safe * jnp.exp2(shift - 1)), multiplier)
  shift = jnp.where(halve, shift - 1, shift)
  multiplier = jnp.clip(multiplier, 0, 2.0 ** multiplier_bits - 1)
  multiplier = jnp.where(ratio > 0, multiplier, 0.0)
  return multiplier.astype(jnp.int32), shift.astype(jnp.int32)


def multiply_shift(x: jax.Array, multiplier, shift, *, rounding: str = "nearest",
                   key: Optional[jax.Array] = None) -> jax.Array:
  """``floor((x · M + ρ) / 2^k)`` in int32, exactly, for ``|x| < 2^31`` and ``0 <= M < 2^15``.

  .. math::

     x = h \\cdot 2^s + l,\\; 0 \\le l < 2^s, \\qquad
     \\left\\lfloor \\frac{xM + \\rho}{2^k} \\right\\rfloor =
     \\Big( h M + \\rho_h + \\big((l M + \\rho_l) \\gg s\\big) \\Big) \\gg (k - s),
     \\qquad s = \\min(k, 16)

  Every partial product is below ``2^31``, so no 64-bit intermediate is needed. For ``k < 16`` the
  caller must keep ``|x| · M < 2^(31 + k)`` (true for the 8-bit gradients that use it).

  Args:
    x: int32 array (any integer dtype is widened to int32).
    multiplier: ``M``, an int or an int32 array broadcastable to ``x``.
    shift: ``k`` in ``[0, 31]``, an int or an int32 array broadcastable to ``x``.
    rounding: ``"nearest"`` (``ρ = 2^(k-1)``, ties towards +∞) or ``"stochastic"``
      (``ρ`` uniform in ``[0, 2^k)``, so the result is ``x M / 2^k`` rounded up with probability
      equal to the fractional part: unbiased).
    key: PRNG key for stochastic rounding.

  Returns:
    An int32 array shaped like ``x``.
  """
  if rounding not in quant.ROUNDING_MODES:
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {quant.ROUNDING_MODES}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"multiply_shift expects an integer array, got dtype {x.dtype}.")
  x = x.astype(jnp.int32)
  multiplier = jnp.asarray(multiplier, jnp.int32)
  shift = jnp.asarray(shift, jnp.int32)
  shape = jnp.broadcast_shapes(x.shape, multiplier.shape, shift.shape)
  if rounding == "stochastic":
    if key is None:
      raise ValueError('rounding="stochastic" needs a PRNG key: pass key=jax.random.key(seed).')
    bits = jax.random.bits(key, shape, jnp.uint32)
    # The top k of 32 random bits; k = 0 gives 0 (a shift by 32 is undefined, so mask it).
    offset = jnp.where(shift > 0, bits >> (32 - jnp.maximum(shift, 1)).astype(jnp.uint32), 0)
    offset = offset.astype(jnp.int32)
  else:
    offset = jnp.where(shift > 0, jnp.left_shift(1, jnp.maximum(shift - 1, 0)), 0)
  split = jnp.minimum(shift, _SPLIT_BITS)
  low_mask = jnp.left_shift(1, split) - 1
  high, low = jnp.right_shift(x, split), jnp.bitwise_and(x, low_mask)
  offset_high, offset_low = jnp.right_shift(offset, split), jnp.bitwise_and(offset, low_mask)
  low_part = jnp.right_shift(low * multiplier + offset_low, split)
  return jnp.right_shift(high * multiplier + offset_high + low_part, shift - split)


def round_divide(x: jax.Array, divisor: int) -> jax.Array:
  """``x / divisor`` rounded to the nearest integer, ties away from zero, in integer arithmetic.

  .. math::

     \\mathrm{sign}(x) \\left\\lfloor \\frac{|x| + \\lfloor d/2 \\rfloor}{d} \\right\\rfloor
  """
  if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
    raise ValueError(f"divisor must be a positive Python int, got {divisor!r}.")
  x = jnp.asarray(x, jnp.int32)
  return jnp.sign(x) * ((jnp.abs(x) + divisor // 2) // divisor)


class FixedPointWeightsState(NamedTuple):
  """State of :func:`fixed_point_weights`.

  Attributes:
    scale: ``Δ`` per leaf (a scalar, or per-channel with size 1 on the other axes), fixed at init.
    key: PRNG key for stochastic rounding (step ``t`` uses ``fold_in(key, t)``), or an unused key.
    count: number of updates so far (int32).
  """
  scale: PyTree
  key: chex.PRNGKey
  count: chex.Array


def fixed_point_weights(
    bits: int = 16,
    *,
    rounding: str = "nearest",
    key: Optional[Union[int, jax.Array]] = None,
    axis: Optional[int] = None,
    scale_method: str = "max",
) -> optax.GradientTransformation:
  """Changes the updates so that ``params + updates`` lies on a fixed ``bits``-bit grid.

  Put it last in a chain of any float optimizer to train weights that are stored in fixed point:

  .. math::

     u' = \\Delta \\cdot \\mathrm{clip}\\big(\\mathrm{round}((w + u) / \\Delta),\\,
     -(2^{b-1}-1),\\, 2^{b-1}-1\\big) - w

  ``Δ`` is computed from the parameters given to ``init`` (the pre-trained weights) with
  :func:`weight_scales` (which gives a zero leaf the range of its layer, see :func:`weight_ranges`)
  and kept fixed, so the integer weights ``round(w / Δ)`` keep one format for the whole run. An update smaller than ``Δ/2`` is lost with ``"nearest"`` rounding and
  kept in expectation with ``"stochastic"`` rounding (``floor(x/Δ + U[0,1))``, unbiased).

  ``optax.apply_updates`` adds ``u'`` in float32, which can be one ulp off ``Δ·k``; the integer
  ``round(w/Δ)`` is exact and the error never accumulates, because each step targets the grid again.
  Anything chained *after* this transform moves the parameters off the grid.

  Args:
    bits: total bits of the weight format, 2 to 32.
    rounding: ``"nearest"`` or ``"stochastic"`` (needs ``key``).
    key: PRNG key or int seed for stochastic rounding.
    axis: ``None`` for one ``Δ`` per leaf, or the channel axis for per-channel scales (leaves with
      fewer than two dimensions, such as biases, stay per-tensor).
    scale_method: ``"max"``, ``"mse"`` or ``"pow2"`` (see :func:`fwdgrad.compute_scale`).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Examples:
    >>> tx = optax.chain(optax.adam(1e-3), fwdgrad.fixed_point_weights(16))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)      # on the 16-bit grid of the init weights
  """
  bits = quant.check_bits(bits)
  if rounding not in quant.ROUNDING_MODES:
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {quant.ROUNDING_MODES}.")
  if rounding == "stochastic" and key is None:
    raise ValueError('rounding="stochastic" needs a PRNG key: pass key=jax.random.key(seed).')
  if scale_method == "static":
    raise ValueError('fixed_point_weights takes the scale from the params: use scale_method="max", '
                     '"mse" or "pow2", not "static".')
  base_key = transform.as_key(key if key is not None else 0)

  def init_fn(params):
    scale = weight_scales(params, bits, axis=axis, scale_method=scale_method)
    return FixedPointWeightsState(scale=scale, key=base_key, count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("fixed_point_weights.update needs params: call tx.update(updates, state, "
                       "params) so the new weights can be rounded to the grid.")
    step_key = jax.random.fold_in(state.key, state.count)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    update_leaves = treedef.flatten_up_to(updates)
    scale_leaves = treedef.flatten_up_to(state.scale)
    new_updates = []
    for index, (p, u, s) in enumerate(zip(leaves, update_leaves, scale_leaves)):
      target = p + u.astype(p.dtype)
      leaf_key = jax.random.fold_in(step_key, index) if rounding == "stochastic" else None
      snapped = quant.fake_quant(target, bits, scale=s, rounding=rounding, key=leaf_key)
      new_updates.append(snapped - p)
    new_updates = jax.tree_util.tree_unflatten(treedef, new_updates)
    return new_updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


# A leaf (or channel) whose range is below this fraction of its layer's range counts as zero: it
# is smaller than one 16-bit step of the layer's grid, so its own grid could not let it train.
NEAR_ZERO = 2.0 ** -15


def _group_by_parent(params: PyTree):
  """Leaves with their path, grouped by parent (a module's leaves are one group)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  groups: dict = {}
  for index, (path, _) in enumerate(leaves_with_path):
    groups.setdefault(tuple(path[:-1]), []).append(index)
  return leaves_with_path, treedef, groups


def _fan_in(leaves) -> int:
  """The fan-in of a layer: the input size of its largest kernel (1 for a layer of vectors)."""
  kernels = [jnp.shape(leaf) for leaf in leaves if jnp.ndim(leaf) >= 2]
  if not kernels:
    return 1
  shape = max(kernels, key=lambda s: math.prod(s))
  return max(1, math.prod(shape[:-1]))


def _max_abs(leaf, axis: Optional[int]) -> jax.Array:
  leaf = jnp.abs(jnp.asarray(leaf, jnp.float32))
  if axis is None:
    return jnp.max(leaf) if leaf.size else jnp.zeros((), jnp.float32)
  axis = axis % leaf.ndim
  return jnp.max(leaf, axis=tuple(a for a in range(leaf.ndim) if a != axis), keepdims=True)


def weight_ranges(params: PyTree, *, axis: Optional[int] = None, scale_method: str = "max",
                  bits: int = 16) -> PyTree:
  """``w_max`` per leaf (per channel along ``axis``), with no zero range: the grid rule of training.

  A leaf's range is its max-abs (or the ``"mse"`` / ``"pow2"`` range of
  :func:`fwdgrad.compute_scale`). A leaf or channel whose range is zero or below
  :data:`NEAR_ZERO` times its layer's range (a zero-initialised bias, a LayerNorm bias, an all-zero
  new head) would get no usable grid: ``Δ_w`` = 1 and ``ε_q = 0``, so it would never train. It
  takes instead the range of its layer (the largest range among the leaves that share its parent
  in the pytree, e.g. the kernel beside a bias) or, when the whole layer is zero, PyTorch's default
  init bound ``1/sqrt(fan_in)`` (``fan_in`` from the layer's kernel; 1 for a layer of vectors).

  Ranges are fixed from the weights given (the pre-trained ones): training never moves a weight
  past its leaf's range, since the integers saturate there.

  Returns:
    A pytree like ``params`` of float32 ranges, scalars or per-channel (size 1 on other axes).
  """
  leaves_with_path, treedef, groups = _group_by_parent(params)
  out = [None] * len(leaves_with_path)
  for indices in groups.values():
    leaves = [leaves_with_path[i][1] for i in indices]
    raw = [quant.compute_scale(leaf, bits, axis=leaf_axis(leaf, axis), scale_method=scale_method)
           * quant.qmax(bits) for leaf in leaves]
    # compute_scale gives Δ = 1 for an all-zero leaf: read its true max-abs for the zero test.
    true_max = [_max_abs(leaf, leaf_axis(leaf, axis)) for leaf in leaves]
    ranges = [jnp.where(m > 0, r, 0.0) for r, m in zip(raw, true_max)]
    layer = jnp.max(jnp.stack([jnp.max(r) for r in ranges]))
    default = jnp.float32(1.0 / math.sqrt(_fan_in(leaves)))
    fallback = jnp.where(layer > 0, layer, default)
    for i, r in zip(indices, ranges):
      out[i] = jnp.where(r > NEAR_ZERO * layer, r, fallback).astype(jnp.float32)
  return jax.tree_util.tree_unflatten(treedef, out)


def weight_scales(params: PyTree, bits: int, *, axis: Optional[int] = None,
                  scale_method: str = "max") -> PyTree:
  """``Δ_w = w_max / (2^(bits-1) - 1)`` per leaf from :func:`weight_ranges` (no zero range).

  The grid that :func:`fwdgrad.qzo_ff`, :func:`fixed_point_weights` and a calibrated model
  (:func:`fwdgrad.models.calibrate`) all use, so that the forward and the update share one grid.

  Examples:
    >>> fwdgrad.weight_scales({"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}, 8)
    {'bias': Array(0.00787402, dtype=float32), 'kernel': Array(0.00787402, dtype=float32)}
  """
  bits = quant.check_bits(bits)
  if scale_method == "static":
    raise ValueError('weight scales come from the weights: use scale_method="max", "mse" or '
                     '"pow2", not "static".')
  levels = float(quant.qmax(bits))
  return jax.tree_util.tree_map(
      lambda r: jax.lax.stop_gradient(r / levels),
      weight_ranges(params, axis=axis, scale_method=scale_method, bits=bits))


def leaf_axis(leaf, axis: Optional[int]) -> Optional[int]:
  """The per-channel axis for ``leaf``; ``None`` (per-tensor) for scalars and vectors (biases)."""
  if axis is None:
    return None
  ndim = jnp.ndim(leaf)
  if ndim >= 2 and -ndim <= axis < ndim:
    return axis
  return None
