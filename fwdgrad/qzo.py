"""QZO-FF: the paper's quantized zeroth-order forward-gradient step, in integer arithmetic.

Every quantity that the paper keeps as an integer is a real integer array here: weights ``w_q``
(int16 for 16-bit weights), perturbations ``z_q`` and the gradient ``g_q`` (int8), accumulators
(int32). Only the two forward calls per direction see floats, the dequantized ``Δ_w · w_q±``,
because the model is a float JAX function.

.. math::

   w_q = \\mathrm{clip}(\\mathrm{round}(w / \\Delta_w)), \\quad
   z_q = \\mathrm{clip}(\\mathrm{round}(z / \\Delta_z)), \\quad
   \\Delta_z = z_{max} / 127, \\quad 1_q = \\mathrm{round}(1/\\Delta_z), \\quad
   \\epsilon_q = \\mathrm{round}(\\epsilon / \\Delta_w)

   w_{q,i}^{\\pm} = \\mathrm{clip}\\big(((w_q 1_q \\pm \\epsilon_q z_{q,i}) M_z + 2^{k_z-1})
   \\gg k_z\\big), \\qquad M_z / 2^{k_z} \\approx \\Delta_z

   g_q = \\mathrm{round}\\Big(\\frac{1}{m} \\sum_{i=1}^{m}
   \\mathrm{sign}\\big(L(\\Delta_w w_{q,i}^{+}) - L(\\Delta_w w_{q,i}^{-})\\big)\\, z_{q,i}\\Big)

   w_q \\leftarrow \\mathrm{clip}\\big(w_q - \\mathrm{round}(\\tfrac{\\eta \\Delta_z}{\\Delta_w}
   g_q)\\big), \\qquad \\mathrm{round}(r\\, g_q) = (g_q M_u + 2^{k_u - 1}) \\gg k_u,\\;
   M_u / 2^{k_u} \\approx r

Choices where the paper is silent (all documented in :func:`qzo_ff`):

* The average ``1/m`` is an integer division rounded to nearest (ties away from zero), so ``g_q``
  stays 8-bit with ``z``'s scale, as the paper states.
* Shifts round to nearest (add ``2^(k-1)`` before the arithmetic shift); the update can instead
  round stochastically (add a uniform integer in ``[0, 2^k)``).
* Multipliers are 15-bit (relative error < 2^-14); the requantization is exact in int32
  (:func:`fwdgrad.fixed_point.multiply_shift`).
* ``1_q Δ_z`` is not exactly 1 (36 × 3.5/127 = 0.992), so the perturbed forward calls see weights
  scaled by 0.992, as in the paper's scheme; ``z_max = 127/36`` makes ``Δ_z = 1/36`` and the
  factor 1.
* The integer weights are not duplicated in the state: ``w_q = round(w / Δ_w)`` is read back from
  the float params, which the returned update puts on the grid (exactly up to one float32 ulp, so
  the rounding recovers ``w_q`` exactly).

Keys: step ``t`` uses ``s = fold_in(key, t)``; direction ``i`` uses ``fold_in(s, i)`` (the same
directions as :func:`fwdgrad.spsa_grad`), the sharpness-aware direction ``fold_in(s, m)``,
stochastic rounding ``fold_in(s, m + 1)`` and momentum-guided sampling noise
``fold_in(s, m + 2 + i)``.

References:
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024, Sec. 3.3, 3.4 and App. A.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fwdgrad import enhancements
from fwdgrad import estimators
from fwdgrad import fixed_point
from fwdgrad import objective
from fwdgrad import quant
from fwdgrad import transform

PyTree = Any

QZO_DISTRIBUTIONS = estimators.DISTRIBUTIONS + ("binomial",)
_MAX_ACCUMULATOR = 2 ** 31 - 1


class QZOState(NamedTuple):
  """State of :func:`qzo_ff`.

  Attributes:
    key: the base PRNG key; step ``t`` uses ``fold_in(key, t)``.
    count: number of updates so far (int32).
    loss: mean of ``(L(w+) + L(w-)) / 2`` over the directions of the last step (float32); with
      ``sharpness_radius`` the perturbations are around the ascended point ``w̃``.
    weight_scale: ``Δ_w`` per leaf (float32; per-channel shape with ``axis``), fixed at init from
      the pre-trained weights.
    epsilon_q: ``ε_q = round(ε / Δ_w)`` per leaf (int32, clipped to the weight range).
    previous_directions: the last step's ``m`` perturbations as int8 ``z_q`` stacked on a leading
      axis, for momentum-guided sampling (``m`` bytes per parameter); ``()`` otherwise.
    aux: with ``has_aux``, the aux of the last step's first forward call
      (:func:`fwdgrad.step_aux`); ``None`` otherwise.
  """
  key: chex.PRNGKey
  count: chex.Array
  loss: chex.Array
  weight_scale: PyTree
  epsilon_q: PyTree
  previous_directions: PyTree
  aux: Any = None


class PerturbationFormat(NamedTuple):
  """The static fixed-point format of the perturbations ``z`` (Python numbers, not traced).

  Attributes:
    bits: bits of ``z_q`` (and of ``g_q``).
    z_max: the static range; ``Δ_z = z_max / (2^(bits-1) - 1)``.
    scale: ``Δ_z``.
    one: ``1_q = round(1 / Δ_z)``, the integer that stands for 1.0 in ``z``'s scale.
    multiplier, shift: ``M_z, k_z`` with ``M_z / 2^k_z ≈ Δ_z`` (the requantization to ``Δ_w``).
  """
  bits: int
  z_max: float
  scale: float
  one: int
  multiplier: int
  shift: int


def perturbation_format(bits: int = 8, z_max: float = 3.5) -> PerturbationFormat:
  """The format of ``z``: for 8 bits and ``z_max = 3.5``, ``Δ_z = 0.02756`` and ``1_q = 36``.

  Examples:
    >>> perturbation_format(8, 3.5).one
    36
  """
  bits = quant.check_bits(bits)
  if bits > 16:
    raise ValueError(f"perturbation bits must be at most 16 (z_q is int8 or int16), got {bits}.")
  if not z_max > 0 or not math.isfinite(z_max):
    raise ValueError(f"z_max must be a positive finite float, got {z_max!r}.")
  scale = float(z_max) / quant.qmax(bits)
  one = round(1.0 / scale)
  if one < 1:
    raise ValueError(f"z_max={z_max} with {bits} bits gives Δ_z={scale:.3g} > 2: 1.0 rounds to "
                     "0 in z's format; use a smaller z_max or more bits.")
  multiplier, shift = fixed_point.fixed_point_multiplier(scale)
  return PerturbationFormat(bits, float(z_max), scale, int(one), multiplier, shift)


def quantize_direction(z: PyTree, fmt: PerturbationFormat) -> PyTree:
  """Float perturbations to ``z_q`` (int8 for 8 bits) with the static scale ``Δ_z``."""
  levels = quant.qmax(fmt.bits)
  dtype = quant.integer_dtype(fmt.bits)
  return jax.tree_util.tree_map(
      lambda x: jnp.clip(jnp.round(x / fmt.scale), -levels, levels).astype(dtype), z)


def sample_quantized_direction(key: jax.Array, params: PyTree, fmt: PerturbationFormat,
                               distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION) -> PyTree:
  """``z_q`` for one direction: Rademacher/binomial gives ``±1_q`` exactly, Gaussian is rounded."""
  if distribution in ("rademacher", "binomial", "fast_rademacher"):
    signs = estimators.sample_direction(
        key, params, "rademacher" if distribution == "binomial" else distribution)
    dtype = quant.integer_dtype(fmt.bits)
    return jax.tree_util.tree_map(lambda s: (s * fmt.one).astype(dtype), signs)
  return quantize_direction(estimators.sample_direction(key, params, distribution), fmt)


def integer_weights(params: PyTree, weight_scale: PyTree, bits: int) -> PyTree:
  """``w_q = clip(round(w / Δ_w))`` as int16 (16 bits) / int8 (8 bits) / int32."""
  levels = quant.qmax(bits)
  dtype = quant.integer_dtype(bits)
  return jax.tree_util.tree_map(
      lambda w, s: jnp.clip(jnp.round(w.astype(jnp.float32) / s), -levels, levels).astype(dtype),
      params, weight_scale)


def requantized_perturbation(w_q, coefficient_q, z_q, fmt: PerturbationFormat, bits: int):
  """``clip(((w_q 1_q + c_q z_q) M_z + 2^(k_z-1)) >> k_z)``: one leaf of ``w_q ± ε_q z_q``.

  The int32 accumulator holds ``w_q 1_q + c_q z_q`` in the scale ``Δ_w Δ_z``; the multiply and
  shift bring it back to ``Δ_w`` (the weight scale is kept), and the result saturates at the
  ``bits``-bit range.
  """
  levels = quant.qmax(bits)
  accumulator = (w_q.astype(jnp.int32) * fmt.one
                 + jnp.asarray(coefficient_q, jnp.int32) * z_q.astype(jnp.int32))
  shifted = fixed_point.multiply_shift(accumulator, fmt.multiplier, fmt.shift)
  return jnp.clip(shifted, -levels, levels).astype(w_q.dtype)


class FrozenLeafWarning(UserWarning):
  """A leaf that :func:`qzo_ff` cannot perturb or move at the chosen ε, η, ρ and bit width."""


def _ratio_multipliers(ratio: PyTree):
  """``(M, k)`` pytrees with ``M / 2^k ≈ ratio`` per leaf."""
  treedef = jax.tree_util.tree_structure(ratio)
  pairs = [fixed_point.fixed_point_multiplier_array(r) for r in jax.tree_util.tree_leaves(ratio)]
  return (jax.tree_util.tree_unflatten(treedef, [p[0] for p in pairs]),
          jax.tree_util.tree_unflatten(treedef, [p[1] for p in pairs]))


def _override_scales(scale: PyTree, given: PyTree, params: PyTree) -> PyTree:
  """``given`` where it has a ``Δ_w``, the computed ``scale`` where it has ``None``.

  A given ``Δ_w`` must broadcast against its parameter leaf without growing it (a scalar, or one
  per output channel on the last axis), since ``w_q = round(w / Δ_w)`` keeps the leaf's shape.
  """
  treedef = jax.tree_util.tree_structure(scale)
  try:
    given_leaves = treedef.flatten_up_to(given)
  except (ValueError, TypeError) as error:
    raise ValueError("qzo_ff(weight_scale=...) must have the structure of the params given to "
                     f"init, with None where the rule should choose: {error}") from None
  leaves = []
  names = _names(params)
  for name, computed, chosen, leaf in zip(names, jax.tree_util.tree_leaves(scale), given_leaves,
                                          jax.tree_util.tree_leaves(params)):
    if chosen is None:
      leaves.append(computed)
      continue
    chosen = jnp.asarray(chosen, jnp.float32)
    try:
      fits = np.broadcast_shapes(jnp.shape(chosen), jnp.shape(leaf)) == tuple(jnp.shape(leaf))
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(f"qzo_ff(weight_scale=...): the scale for {name} has shape "
                       f"{jnp.shape(chosen)}, which does not broadcast against the leaf's shape "
                       f"{jnp.shape(leaf)}; give a scalar or one Δ_w per output channel.")
    leaves.append(jax.lax.stop_gradient(chosen))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _names(tree: PyTree) -> list:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _warn_frozen_leaves(params, scale, epsilon_q, fmt, learning_rate, rounding, kernelwise,
                        sharpness_radius, weight_bits) -> None:
  """Warns, naming the leaves, where ε_q, a unit update or the ascent rounds to 0.

  Under ``jit`` (an init inside a compiled step, as the experiment harness does) the check runs
  as a host callback on the concrete values, so a frozen leaf is named there too.
  """
  leaves = jax.tree_util.tree_leaves((params, scale, epsilon_q))
  if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    jax.debug.callback(
        lambda p, s, e: _warn_frozen_leaves(p, s, e, fmt, learning_rate, rounding, kernelwise,
                                            sharpness_radius, weight_bits),
        params, scale, epsilon_q)
    return
  names = _names(params)
  scales = [np.asarray(s, np.float64) for s in jax.tree_util.tree_leaves(scale)]
  eps = [np.asarray(e) for e in jax.tree_util.tree_leaves(epsilon_q)]
  values = [np.asarray(p, np.float64) for p in jax.tree_util.tree_leaves(params)]

  def report(what, fix, frozen):
    if not frozen:
      return
    shown = ", ".join(frozen[:6]) + (f" and {len(frozen) - 6} more" if len(frozen) > 6 else "")
    warnings.warn(f"qzo_ff at {weight_bits} bits: {what} for {len(frozen)} of {len(names)} "
                  f"leaves ({shown}); they will not train. {fix}", FrozenLeafWarning, stacklevel=3)

  report("ε rounds to 0 (ε_q = 0)", "Use an ε of at least half the weight step Δ_w, or more "
         "weight bits.", [n for n, e in zip(names, eps) if np.any(e == 0)])
  rate = learning_rate(0) if callable(learning_rate) else learning_rate
  if rounding == "nearest":
    # The step of a unit direction entry (|z| = 1): round(η 1_q Δ_z ‖·‖ / Δ_w) for kernelwise.
    steps = []
    for value, s in zip(values, scales):
      factor = 1.0
      if kernelwise:
        w_max = float(np.max(s)) * quant.qmax(weight_bits)
        norm = float(np.linalg.norm(value))
        factor = (norm if norm >= fixed_point.NEAR_ZERO * w_max else w_max)
        factor /= math.sqrt(max(value.size, 1))
      steps.append(float(rate) * fmt.one * fmt.scale * factor / np.max(s))
    report(f"the update of a unit direction entry rounds to 0 at η = {float(rate):g}",
           'Use a larger learning rate, rounding="stochastic" (unbiased) or more weight bits.',
           [n for n, step in zip(names, steps) if step < 0.5])
  if sharpness_radius is not None:
    total = sum(v.size for v in values)
    # The largest ascent entry: |u| = z_max of a norm-sqrt(N) direction, in weight steps.
    reach = [sharpness_radius * fmt.z_max / (math.sqrt(max(total, 1)) * np.max(s))
             for s in scales]
    report(f"the sharpness-aware ascent (ρ = {sharpness_radius:g}) rounds to 0 for every entry",
           "Use a larger sharpness_radius or more weight bits.",
           [n for n, r in zip(names, reach) if r < 0.5])


def update_multiplier(learning_rate, weight_scale: PyTree, fmt: PerturbationFormat,
                      factor: Optional[PyTree] = None):
  """``(M_u, k_u)`` per leaf with ``M_u / 2^k_u ≈ η Δ_z / Δ_w`` (times ``factor`` if given).

  Returns:
    Two pytrees of int32 arrays shaped like ``weight_scale``: multipliers and shifts.
  """
  ratio = jax.tree_util.tree_map(
      lambda s: jnp.asarray(learning_rate, jnp.float32) * fmt.scale / s, weight_scale)
  if factor is not None:
    ratio = jax.tree_util.tree_map(jnp.multiply, ratio, factor)
  return _ratio_multipliers(ratio)


def _trees_equal(a: PyTree, b: PyTree) -> jax.Array:
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  equal = [jnp.all(x == y) for x, y in zip(leaves_a, leaves_b)]
  return jnp.all(jnp.stack(equal))


def _dequantized(w_q: PyTree, weight_scale: PyTree, params: PyTree) -> PyTree:
  return jax.tree_util.tree_map(
      lambda q, s, p: (q.astype(jnp.float32) * s).astype(p.dtype), w_q, weight_scale, params)


def qzo_ff(
    learning_rate: Union[float, optax.Schedule],
    *,
    key: Union[int, jax.Array],
    num_directions: int = 3,
    epsilon: float = 1e-3,
    weight_bits: int = 16,
    perturbation_bits: int = 8,
    z_max: float = 3.5,
    distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
    axis: Optional[int] = None,
    scale_method: str = "max",
    rounding: str = "nearest",
    momentum: Optional[enhancements.MomentumGuidedSampling] = None,
    sharpness_radius: Optional[float] = None,
    kernelwise: bool = False,
    weight_scale: Optional[PyTree] = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """The paper's quantized forward-gradient (QZO-FF) step as an optax transformation.

  ``update(updates, state, params, *, value_fn)`` ignores ``updates``, runs sign-m-SPSA on the
  integer weights (see the module docstring for the equations) and returns
  ``Δ_w · w_q_new - params``, so that ``optax.apply_updates`` lands the parameters on
  ``Δ_w · w_q_new`` (to one float32 ulp; ``round(params / Δ_w)`` is exactly ``w_q_new``). The
  learning rate lives here because the update rule is integer: chain nothing after ``qzo_ff``
  except transforms that keep the grid, such as :func:`fwdgrad.masked_update` (frozen entries stay
  on their old grid value). A float optimizer after it would move the weights off the grid.

  ``Δ_w`` is computed at ``init`` from the (pre-trained) parameters and never changes; ``ε_q`` and
  the update multiplier follow from it. It is the paper's fixed-``Δ_w`` scheme, so **a weight can
  never pass its leaf's pre-trained range** ``w_max = Δ_w (2^(b-1) - 1)``: the integers saturate
  there. A leaf that is zero (or below ``2^-15`` of its layer's range), such as a zero-initialised
  bias, gets its layer's range instead, so it trains
  (:func:`fwdgrad.fixed_point.weight_ranges` states the rule). To train a fixed-point model, pass
  the grid its forward reads, ``weight_scale=fwdgrad.models.weight_scales(variables)``, so the
  update and the forward share one grid.

  With 8-bit weights ``Δ_w`` is about 250 times coarser than with 16 bits:
  ``ε_q = round(1e-3 / Δ_w)`` is typically 0 (both forward calls see the same weights,
  ``sign(0) = 0``) and ``round(η Δ_z g_q / Δ_w)`` is 0, so nothing trains: the paper's 8w8a failure.
  ``init`` warns (:class:`FrozenLeafWarning`) naming every leaf whose ``ε_q``, whose update of a
  unit direction entry, or whose sharpness-aware ascent rounds to 0 (when the params are concrete,
  not inside ``jit``).

  Args:
    learning_rate: ``η`` (the paper's ``Δ_η``), a float or an optax schedule of the step count.
    key: PRNG key or int seed, kept in the state.
    num_directions: ``m`` (3 in the paper).
    epsilon: ``ε``, quantized with the weight scale.
    weight_bits: ``b`` of the weights (16; 8 reproduces the failure).
    perturbation_bits: bits of ``z_q`` and ``g_q`` (8).
    z_max: static range of ``z`` (3.5).
    distribution: ``"irwin_hall"`` (default; bounded by 3.45, so never clipped),
      ``"fast_gaussian"`` or ``"gaussian"`` (statically quantized), ``"rademacher"`` or
      ``"fast_rademacher"`` (``z_q = ±1_q``), ``"binomial"`` (the paper's name for the same ±1
      perturbation) or a ``sampler(key, shape, dtype)`` whose float output is quantized.
    axis: ``None`` (one ``Δ_w`` per leaf) or the channel axis (one per channel, for leaves with two
      or more dimensions; vectors such as biases stay per-tensor).
    scale_method: how ``w_max`` is found: ``"max"`` (TF), ``"mse"`` or ``"pow2"``.
    rounding: rounding of the update, ``"nearest"`` or ``"stochastic"`` (unbiased; small updates
      survive in expectation).
    momentum: a :class:`fwdgrad.MomentumGuidedSampling` to draw directions guided by the previous
      step's (kept as int8 in the state), or ``None`` for independent directions.
    sharpness_radius: ``ρ`` of one sharpness-aware ascent step (two more forward calls): the
      estimate is taken at ``w̃ = w ± ρ u/‖u‖`` (whichever side has the higher loss) and applied
      at ``w``. The integer ascent is ``round(u_q ρ / (‖u_q‖ Δ_w))`` per entry, by a multiply and
      shift (:func:`fwdgrad.fixed_point.multiply_shift`).
    kernelwise: kernel-wise normalization: each leaf's step is rescaled to
      ``η ‖w^i‖ g^i / ‖g^i‖`` (one float factor per leaf and step folded into the multiplier);
      a leaf whose ``‖w^i‖`` is zero (below ``2^-15`` of its range) uses its range ``w_max``
      instead, so that it moves.
    weight_scale: the grid to train on: a pytree like the params given to ``init`` whose leaves
      are ``Δ_w`` (a scalar or broadcastable per-channel array) or ``None`` (computed by the rule
      above), e.g. ``fwdgrad.models.weight_scales(variables)``; ``None``: all computed.
    has_aux: ``value_fn`` returns ``(loss, aux)``; the state keeps the aux of the step's first
      forward call (at ``w_q + ε_q z_q,1``), read with :func:`fwdgrad.step_aux`; see
      :func:`fwdgrad.init_with_aux` for a state with the aux's structure from the start.

  ``value_fn`` must return a float32 scalar and be a pure, deterministic function of the params
  (same batch, same dropout key in every call of a step). A NaN or inf loss raises a
  :class:`fwdgrad.NonFiniteLossWarning`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`QZOState`.

  Examples:
    >>> tx = fwdgrad.qzo_ff(1e-3, key=jax.random.key(0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params, value_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)       # on the 16-bit grid
  """
  objective.check_static("qzo_ff", dict(num_directions=num_directions, weight_bits=weight_bits,
                                        perturbation_bits=perturbation_bits, z_max=z_max),
                         ("num_directions", "weight_bits", "perturbation_bits", "z_max"))
  estimators._check_num_directions(num_directions)
  weight_bits = quant.check_bits(weight_bits)
  if weight_bits > 16:
    raise ValueError(f"weight_bits must be at most 16 (the paper's 16w8a), got {weight_bits}.")
  fmt = perturbation_format(perturbation_bits, z_max)
  objective.check_epsilon(epsilon, "qzo_ff")
  if isinstance(distribution, str) and distribution not in QZO_DISTRIBUTIONS:
    raise ValueError(f"unknown distribution {distribution!r}; expected one of "
                     f"{QZO_DISTRIBUTIONS} or a callable sampler(key, shape, dtype).")
  if not isinstance(distribution, str):
    estimators.get_sampler(distribution)
  if rounding not in quant.ROUNDING_MODES:
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {quant.ROUNDING_MODES}.")
  if scale_method == "static":
    raise ValueError('qzo_ff takes Δ_w from the pre-trained params: use scale_method="max", '
                     '"mse" or "pow2", not "static".')
  if sharpness_radius is not None and not sharpness_radius > 0:
    raise ValueError(f"sharpness_radius must be positive or None, got {sharpness_radius!r}.")
  if momentum is not None:
    momentum = enhancements.check_momentum(momentum)
  levels = quant.qmax(weight_bits)
  bound = levels * fmt.one + levels * quant.qmax(fmt.bits)
  if bound > _MAX_ACCUMULATOR:
    raise ValueError(f"{weight_bits}-bit weights with {fmt.bits}-bit perturbations overflow the "
                     f"32-bit accumulator (|w_q 1_q + ε_q z_q| up to {bound}); use fewer bits.")
  base_key = transform.as_key(key)
  m = num_directions
  float_sampler = "rademacher" if distribution == "binomial" else distribution

  def init_fn(params):
    estimators._check_params(params)
    scale = fixed_point.weight_scales(params, weight_bits, axis=axis, scale_method=scale_method)
    if weight_scale is not None:
      scale = _override_scales(scale, weight_scale, params)
    epsilon_q = jax.tree_util.tree_map(
        lambda s: jnp.clip(jnp.round(epsilon / s), 0, levels).astype(jnp.int32), scale)
    _warn_frozen_leaves(params, scale, epsilon_q, fmt, learning_rate, rounding, kernelwise,
                        sharpness_radius, weight_bits)
    previous = ()
    if momentum is not None:
      dtype = quant.integer_dtype(fmt.bits)
      previous = jax.tree_util.tree_map(lambda p: jnp.zeros((m,) + jnp.shape(p), dtype), params)
    return QZOState(key=base_key, count=jnp.zeros((), jnp.int32),
                    loss=jnp.zeros((), jnp.float32), weight_scale=scale, epsilon_q=epsilon_q,
                    previous_directions=previous,
                    aux=objective.PendingAux() if has_aux else None)

  def loss_at(value_fn, point_q, operands, state, params, after):
    """``L`` at the dequantized ``point_q(params, operands)``, one call compiled apart.

    The integer point is built inside the call, so that only the parameters and what is already
    stored (a key, the sharpness-aware centre, stacked directions) go into it: XLA merges nothing
    across the 2m forward calls and writes no perturbed copy of the parameters out in full (see
    fwdgrad.estimators.call_apart).
    """
    fn = objective.checked(value_fn, has_aux)

    def call(inputs):
      params, operands = inputs
      return fn(_dequantized(point_q(params, operands), state.weight_scale, params))
    return estimators.call_apart(call, (params, operands), after=after)

  def perturb(w_q, coefficient_q, z_q):
    return jax.tree_util.tree_map(
        lambda w, c, z: requantized_perturbation(w, c, z, fmt, weight_bits),
        w_q, coefficient_q, z_q)

  def ascend(w_q, u_q, multiplier, shift, sign):
    """``clip(w_q ± round(u_q ρ / (‖u_q‖ Δ_w)))``: the ascent by multiply and shift, per entry.

    (A coefficient of ``z``'s scale, like ``ε_q``, would round ``ρ / (‖u_q‖ Δ_w Δ_z)`` to an
    integer first: 0 for a large model, so the ascent would vanish.)
    """
    def one(w, u, mult, sh):
      step = fixed_point.multiply_shift(u, mult, sh)
      return jnp.clip(w.astype(jnp.int32) + sign * step, -levels, levels).astype(w.dtype)
    return jax.tree_util.tree_map(one, w_q, u_q, multiplier, shift)

  def sharpness_point(value_fn, w_q, state, params, step_key):
    key = estimators.direction_key(step_key, m)
    u_q = sample_quantized_direction(key, params, fmt, float_sampler)
    norm_q = jnp.sqrt(sum(jnp.sum(jnp.square(u.astype(jnp.float32)))
                          for u in jax.tree_util.tree_leaves(u_q)))
    multiplier, shift = _ratio_multipliers(jax.tree_util.tree_map(
        lambda s: sharpness_radius / (s * jnp.maximum(norm_q, 1.0)), state.weight_scale))

    def side(sign):
      def point_q(params, key):
        u_q = sample_quantized_direction(key, params, fmt, float_sampler)
        return ascend(integer_weights(params, state.weight_scale, weight_bits), u_q, multiplier,
                      shift, sign)
      return point_q

    loss_plus, _ = loss_at(value_fn, side(1), key, state, params, after=state.count)
    loss_minus, _ = loss_at(value_fn, side(-1), key, state, params, after=loss_plus)
    ascend_plus = loss_plus >= loss_minus
    w_plus = ascend(w_q, u_q, multiplier, shift, 1)
    w_minus = ascend(w_q, u_q, multiplier, shift, -1)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ascend_plus, a, b), w_plus, w_minus)

  def directions_for_step(state, params, step_key):
    if momentum is None:
      return None
    previous = jax.tree_util.tree_map(lambda z: z.astype(jnp.float32) * fmt.scale,
                                      state.previous_directions)
    floats = enhancements.momentum_guided_directions(
        step_key, previous, state.count, params, num_directions=m, config=momentum,
        distribution=float_sampler)
    # The guided mixture is no longer ±1 even for Rademacher draws: it is quantized statically.
    return quantize_direction(floats, fmt)

  def update_fn(updates, state, params=None, *, value_fn: Callable[..., Any] = None,
                **extra_args):
    del updates, extra_args
    transform.missing_extra_args_error("qzo_ff", params, value_fn)
    step_key = jax.random.fold_in(state.key, state.count)
    def weights_after(after):
      # w_q drawn again from the params for each use rather than stored: an int16 copy fewer.
      return integer_weights(estimators.computed_after(after, params), state.weight_scale,
                             weight_bits)

    center = None
    if sharpness_radius is not None:
      center = sharpness_point(value_fn, integer_weights(params, state.weight_scale, weight_bits),
                               state, params, step_key)
    center_after = (lambda after: center) if center is not None else weights_after
    stacked = directions_for_step(state, params, step_key)
    minus_epsilon = jax.tree_util.tree_map(jnp.negative, state.epsilon_q)

    def direction(index, after):
      """``z_q`` of direction ``index``, drawn again (not stored) once ``after`` is known."""
      if stacked is not None:
        return jax.tree_util.tree_map(lambda z: z[index], stacked)
      return sample_quantized_direction(
          estimators.fresh_key(estimators.direction_key(step_key, index), after), params, fmt,
          float_sampler)

    def perturbed(index, epsilon_q):
      """``point_q`` for ``loss_at``: ``w_q + ε_q z_q`` of direction ``index``."""
      def point_q(params, operands):
        center, stacked, key, after = operands
        w_q = center if center is not None else integer_weights(
            estimators.computed_after(after, params), state.weight_scale, weight_bits)
        if stacked is not None:
          z_q = jax.tree_util.tree_map(lambda z: z[index], stacked)
        else:
          z_q = sample_quantized_direction(key, params, fmt, float_sampler)
        return perturb(w_q, epsilon_q, z_q)
      return point_q

    def operands(index, after):
      return (center, stacked,
              estimators.fresh_key(estimators.direction_key(step_key, index), after), after)

    def probe(index, carry):
      loss_sum, signs, aux = carry
      loss_plus, aux_plus = loss_at(value_fn, perturbed(index, state.epsilon_q),
                                    operands(index, loss_sum), state, params, after=loss_sum)
      loss_minus, _ = loss_at(value_fn, perturbed(index, minus_epsilon),
                              operands(index, loss_plus), state, params, after=loss_plus)
      sign = jnp.sign(loss_plus - loss_minus).astype(jnp.int32)
      # Identical integer weights give identical losses on a chip, but XLA may sum the two calls
      # in different orders (a difference of ~1e-8): force sign(0) = 0 as the hardware would.
      # (Recomputed from its own draw, so that nothing parameter-sized is kept for it.)
      z_q = direction(index, loss_minus)
      same = _trees_equal(perturb(center_after(loss_minus), state.epsilon_q, z_q),
                          perturb(center_after(loss_minus), minus_epsilon, z_q))
      sign = jnp.where(same, 0, sign)
      return (loss_sum + 0.5 * (loss_plus + loss_minus), signs.at[index].set(sign),
              estimators.keep_first(index, aux_plus, aux))

    aux = None
    if has_aux:
      aux = estimators.aux_placeholder(objective.checked(value_fn, True), params)
    loss_sum, signs, aux = estimators.direction_loop(
        m, probe, (jnp.zeros((), jnp.float32), jnp.zeros((m,), jnp.int32), aux))

    # sum_i sign_i z_q,i, with the directions drawn again: int16 holds it for m <= 258 at 8 bits.
    total_dtype = jnp.int16 if m * quant.qmax(fmt.bits) <= 2**15 - 1 else jnp.int32

    def accumulate(index, total):
      z_q = direction(index, signs)
      return jax.tree_util.tree_map(
          lambda t, z: (t.astype(jnp.int32) + signs[index] * z.astype(jnp.int32)).astype(
              total_dtype), total, z_q)

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), total_dtype), params)
    total = estimators.direction_loop(m, accumulate, zeros)
    g_dtype = quant.integer_dtype(fmt.bits)
    g_q = jax.tree_util.tree_map(lambda t: fixed_point.round_divide(t, m).astype(g_dtype), total)

    rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
    w_q = weights_after(signs)
    factor = None
    if kernelwise:
      factor = jax.tree_util.tree_map(
          lambda q, s, g: enhancements.safe_ratio(
              enhancements.floored_norm(q.astype(jnp.float32) * s, jnp.max(s) * levels),
              fmt.scale * jnp.linalg.norm(g.astype(jnp.float32).ravel())),
          w_q, state.weight_scale, g_q)
    multiplier, shift = update_multiplier(rate, state.weight_scale, fmt, factor)
    leaves, treedef = jax.tree_util.tree_flatten(w_q)
    rounding_key = estimators.direction_key(step_key, m + 1)
    new_leaves = []
    for index, (w, g, mult, sh) in enumerate(zip(leaves, treedef.flatten_up_to(g_q),
                                                 treedef.flatten_up_to(multiplier),
                                                 treedef.flatten_up_to(shift))):
      leaf_key = jax.random.fold_in(rounding_key, index) if rounding == "stochastic" else None
      step_q = fixed_point.multiply_shift(g, mult, sh, rounding=rounding, key=leaf_key)
      new_leaves.append(jnp.clip(w.astype(jnp.int32) - step_q, -levels, levels).astype(w.dtype))
    new_w_q = jax.tree_util.tree_unflatten(treedef, new_leaves)
    new_params = _dequantized(new_w_q, state.weight_scale, params)
    new_updates = jax.tree_util.tree_map(lambda new, old: new - old, new_params, params)
    previous = state.previous_directions
    if stacked is not None:
      previous = stacked
    objective.warn_if_nonfinite(loss_sum / m, state.count, "qzo_ff")
    new_state = QZOState(key=state.key, count=optax.safe_increment(state.count),
                         loss=loss_sum / m, weight_scale=state.weight_scale,
                         epsilon_q=state.epsilon_q, previous_directions=previous, aux=aux)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def qzo_integer_weights(params: PyTree, state: QZOState, weight_bits: int = 16) -> PyTree:
  """The integer weights ``w_q`` that ``params`` stand for under ``qzo_ff``'s state (int16).

  Examples:
    >>> opt_state = fwdgrad.qzo_ff(1e-3, key=0).init(params)
    >>> w_q = fwdgrad.qzo.qzo_integer_weights(params, opt_state, 16)   # int16 pytree
  """
  if not isinstance(state, QZOState):
    raise ValueError(f"expected the QZOState of qzo_ff, got {type(state).__name__}; with "
                     "optax.chain pass the element of the chain's state that belongs to qzo_ff.")
  return integer_weights(params, state.weight_scale, quant.check_bits(weight_bits))
