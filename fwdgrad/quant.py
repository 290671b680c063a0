"""Signed symmetric fixed-point formats and fake-quantization with a straight-through tangent.

A value ``x`` is represented in ``b`` bits as an integer ``q = round(x / Δ)`` clipped to
``[-(2^(b-1) - 1), 2^(b-1) - 1]``; ``Δ`` is the scale (the value of one integer step).

.. math::

   \\Delta = x_{max} / (2^{b-1} - 1), \\qquad
   \\mathrm{fake\\_quant}(x) = \\Delta \\cdot \\mathrm{clip}(\\mathrm{round}(x / \\Delta))

The range ``x_max`` is chosen by a *scale method*:

* ``"max"``: max-abs of the data (the "TF" method of the paper);
* ``"mse"``: the clipping range that minimises the squared rounding + clipping error, found by a grid
  search over fractions of max-abs;
* ``"static"``: a given ``max_value`` (for example ``z_max = 3.5`` for 8-bit perturbations);
* ``"pow2"``: max-abs rounded up so that ``Δ`` is a power of two (pure Qm.n arithmetic).

Per-channel quantization computes one scale per index along ``axis``.

``fake_quant`` is a :func:`jax.custom_jvp` whose tangent is straight-through inside the range and zero
where the value was clipped, so ``jax.jvp`` (forward gradients) and ``jax.grad`` (the backprop baseline)
both run through it. ``quantize`` / ``dequantize`` give real integer arrays for code that must see them.

References:
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024, Sec. 3.3 and App. A.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float]

SCALE_METHODS = ("max", "mse", "static", "pow2")
ROUNDING_MODES = ("nearest", "stochastic")

# Candidate clipping ranges for the "mse" search, as fractions of max-abs.
_MSE_FRACTIONS = np.linspace(0.2, 1.0, 81)


def check_bits(bits) -> int:
  """Returns ``bits`` as an int, or raises a ValueError naming the allowed range."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise ValueError(
        f"bits must be a Python int between 2 and 32, got {bits!r} of type {type(bits).__name__}.")
  if not 2 <= bits <= 32:
    raise ValueError(f"bits must be between 2 and 32 (signed symmetric fixed point), got {bits}.")
  return int(bits)


def qmax(bits: int) -> int:
  """Largest integer of a signed symmetric ``bits``-bit format: ``2^(bits-1) - 1``."""
  return 2 ** (check_bits(bits) - 1) - 1


def integer_dtype(bits: int):
  """The narrowest of int8 / int16 / int32 that holds a ``bits``-bit value."""
  bits = check_bits(bits)
  if bits <= 8:
    return jnp.int8
  if bits <= 16:
    return jnp.int16
  return jnp.int32


def _check_axis(x: Array, axis: Optional[int]) -> Optional[int]:
  if axis is None:
    return None
  ndim = jnp.ndim(x)
  if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
    raise ValueError(
        f"per-channel axis {axis!r} does not exist for an input of shape {jnp.shape(x)} "
        f"(ndim {ndim}); pass an axis in [{-ndim}, {ndim - 1}] or axis=None for per-tensor.")
  return int(axis) % ndim


def _reduce_axes(x: Array, axis: Optional[int]):
  """Axes to reduce over: all (per-tensor) or all but ``axis`` (per-channel)."""
  if axis is None:
    return None
  return tuple(a for a in range(jnp.ndim(x)) if a != axis)


def _max_abs(x: Array, axis: Optional[int]) -> Array:
  return jnp.max(jnp.abs(x), axis=_reduce_axes(x, axis), keepdims=axis is not None)


def compute_scale(
    x: ArrayLike,
    bits: int,
    *,
    axis: Optional[int] = None,
    scale_method: str = "max",
    max_value: Optional[ArrayLike] = None,
) -> Array:
  """The step size ``Δ`` of a signed symmetric ``bits``-bit format for ``x``.

  Args:
    x: the values to be represented.
    bits: total bits including the sign, 2 to 32.
    axis: ``None`` for one scale per tensor, or the channel axis for one scale per channel (the
      returned scale then keeps ``x``'s rank with size 1 on every other axis, so it broadcasts).
    scale_method: ``"max"``, ``"mse"``, ``"static"`` or ``"pow2"`` (see the module docstring).
    max_value: the range ``x_max`` for ``"static"``.

  Returns:
    ``Δ`` as a float32 array; gradients do not flow through it. An all-zero input gets ``Δ`` = 1
    rather than 0 so that dividing by it is always safe.
  """
  bits = check_bits(bits)
  x = jnp.asarray(x)
  axis = _check_axis(x, axis)
  levels = float(qmax(bits))
  if scale_method == "static":
    if max_value is None:
      raise ValueError('scale_method="static" needs max_value (for example max_value=3.5).')
    x_max = jnp.asarray(max_value, jnp.float32)
  elif max_value is not None:
    raise ValueError(f'max_value is only used with scale_method="static", got {scale_method!r}.')
  elif scale_method == "max":
    x_max = _max_abs(x, axis).astype(jnp.float32)
  elif scale_method == "pow2":
    x_max = _max_abs(x, axis).astype(jnp.float32)
    safe = jnp.where(x_max > 0, x_max, 1.0)
    x_max = jnp.where(x_max > 0, levels * 2.0 ** jnp.ceil(jnp.log2(safe / levels)), 0.0)
  elif scale_method == "mse":
    x_max = _mse_range(x.astype(jnp.float32), levels, axis)
  else:
    raise ValueError(f"unknown scale_method {scale_method!r}; expected one of {SCALE_METHODS}.")
  scale = x_max / levels
  scale = jnp.where(scale > 0, scale, 1.0)
  return jax.lax.stop_gradient(scale)


def _mse_range(x: Array, levels: float, axis: Optional[int]) -> Array:
  """Grid search for the clipping range with the smallest squared quantization error."""
  amax = _max_abs(x, axis)
  reduce_axes = _reduce_axes(x, axis)

  def error(fraction):
    scale = jnp.maximum(amax * fraction / levels, jnp.finfo(jnp.float32).tiny)
    q = jnp.clip(jnp.round(x / scale), -levels, levels) * scale
    return jnp.sum((q - x) ** 2, axis=reduce_axes, keepdims=axis is not None)

  fractions = jnp.asarray(_MSE_FRACTIONS, jnp.float32)
  errors = jax.lax.map(error, fractions)  # One candidate at a time: memory stays O(|x|).
  best = jnp.argmin(errors, axis=0)
  return amax * fractions[best]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _round_clip(stochastic: bool, levels: float, x: Array, scale: Array, noise: Array) -> Array:
  """``clip(round(x/Δ), -L, L)`` as integer-valued floats; ``floor(x/Δ + u)`` if stochastic."""
  scaled = x / scale
  rounded = jnp.floor(scaled + noise) if stochastic else jnp.round(scaled)
  return jnp.clip(rounded, -levels, levels)


@_round_clip.defjvp
def _round_clip_jvp(stochastic, levels, primals, tangents):
  x, scale, noise = primals
  x_dot = tangents[0]
  out = _round_clip(stochastic, levels, x, scale, noise)
  # Straight-through estimator: d(x/Δ)/dx = 1/Δ inside the representable range, 0 where clipped.
  inside = jnp.abs(x / scale) <= levels
  return out, jnp.where(inside, x_dot / scale, jnp.zeros_like(x_dot))


def _check_rounding(rounding: str, key) -> None:
  if rounding not in ROUNDING_MODES:
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDING_MODES}.")
  if rounding == "stochastic" and key is None:
    raise ValueError('rounding="stochastic" needs a PRNG key: pass key=jax.random.key(seed).')


def _integers(x, bits, axis, scale_method, max_value, scale, rounding, key):
  """Shared body of fake_quant and quantize: (integer-valued floats, scale)."""
  bits = check_bits(bits)
  _check_rounding(rounding, key)
  x = jnp.asarray(x)
  axis = _check_axis(x, axis)
  if scale is None:
    scale = compute_scale(x, bits, axis=axis, scale_method=scale_method, max_value=max_value)
  else:
    scale = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  stochastic = rounding == "stochastic"
  if stochastic:
    noise = jax.random.uniform(key, x.shape, compute_dtype)
  else:
    noise = jnp.zeros((), compute_dtype)
  q = _round_clip(stochastic, float(qmax(bits)), x.astype(compute_dtype),
                  scale.astype(compute_dtype), noise)
  return q, scale


def fake_quant(
    x: ArrayLike,
    bits: int,
    *,
    axis: Optional[int] = None,
    scale_method: str = "max",
    max_value: Optional[ArrayLike] = None,
    scale: Optional[ArrayLike] = None,
    rounding: str = "nearest",
    key: Optional[jax.Array] = None,
) -> Array:
  """Rounds ``x`` to a signed symmetric fixed-point grid and returns it in ``x``'s dtype.

  .. math::

     y = \\Delta \\cdot \\mathrm{clip}(\\mathrm{round}(x / \\Delta), -(2^{b-1}-1), 2^{b-1}-1)

  The tangent is straight-through: ``dy = dx`` where ``|x| <= Δ (2^(b-1) - 1)`` and 0 where ``x``
  was clipped. ``jax.jvp``, ``jax.grad``, ``jax.jit`` and ``jax.vmap`` all work through it.

  Args:
    x: a float array.
    bits: total bits including the sign, 2 to 32.
    axis: ``None`` (per-tensor) or the channel axis (per-channel scales).
    scale_method: how ``Δ`` is found when ``scale`` is not given: ``"max"``, ``"mse"``,
      ``"static"`` (with ``max_value``) or ``"pow2"``.
    max_value: the static range for ``scale_method="static"``.
    scale: a precomputed ``Δ`` (scalar, or broadcastable per-channel); overrides ``scale_method``.
    rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (``floor(x/Δ + u)``, ``u ~ U[0,1)``,
      unbiased; needs ``key``).
    key: PRNG key for stochastic rounding.

  Returns:
    An array of ``x``'s shape and dtype whose values lie on the grid ``Δ · k``.

  Examples:
    >>> import jax.numpy as jnp, fwdgrad
    >>> fwdgrad.fake_quant(jnp.array([0.0, 0.3, 1.0]), 4)   # Δ = 1/7
    Array([0.       , 0.2857143, 1.       ], dtype=float32)
    >>> fwdgrad.fake_quant(jnp.array([5.0]), 8, scale_method="static", max_value=3.5)
    Array([3.5], dtype=float32)
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"fake_quant expects a floating-point array, got dtype {x.dtype}.")
  q, scale = _integers(x, bits, axis, scale_method, max_value, scale, rounding, key)
  return (q * scale.astype(q.dtype)).astype(x.dtype)


def quantize(
    x: ArrayLike,
    bits: int,
    *,
    axis: Optional[int] = None,
    scale_method: str = "max",
    max_value: Optional[ArrayLike] = None,
    scale: Optional[ArrayLike] = None,
    rounding: str = "nearest",
    key: Optional[jax.Array] = None,
) -> tuple[Array, Array]:
  """Floats to real integers: returns ``(q, scale)`` with ``x ≈ q * scale``.

  ``q`` is int8 for ``bits <= 8``, int16 for ``bits <= 16`` and int32 otherwise; ``scale`` is
  float32 (a scalar, or per-channel with size 1 on the reduced axes). Arguments are as for
  :func:`fake_quant`. This is not differentiable; use :func:`fake_quant` inside a loss.

  Examples:
    >>> q, scale = fwdgrad.quantize(jnp.array([0.5, -1.0]), 8)
    >>> q
    Array([  64, -127], dtype=int8)
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"quantize expects a floating-point array, got dtype {x.dtype}.")
  q, scale = _integers(x, bits, axis, scale_method, max_value, scale, rounding, key)
  return q.astype(integer_dtype(bits)), scale.astype(jnp.float32)


def dequantize(q: ArrayLike, scale: ArrayLike, dtype=jnp.float32) -> Array:
  """Integers and scale back to floats: ``q * scale`` in ``dtype``."""
  q = jnp.asarray(q)
  if not jnp.issubdtype(q.dtype, jnp.integer):
    raise ValueError(f"dequantize expects an integer array, got dtype {q.dtype}.")
  return (q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)
