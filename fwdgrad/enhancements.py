"""The paper's enhancements of forward-gradient training (Sec. 3.4), composable with the estimators.

Two kinds, composed in two ways:

* Enhancements that change *where the loss is evaluated* are options of the estimator factories
  :func:`enhanced_forward_gradient` (float) and :func:`fwdgrad.qzo_ff` (integer):

  - momentum-guided sampling (:class:`MomentumGuidedSampling`): each direction is drawn around
    the previous step's direction,

    .. math::

       z^{(1)} \\sim \\mathcal{N}(0, \\alpha I),\\quad
       z^{(2)} \\sim \\mathcal{N}(z_t, (1-\\alpha) I),\\quad
       z_{t+1} = \\frac{\\beta z^{(1)} + (1-\\beta) z^{(2)}}{c},\\quad
       c = \\sqrt{\\beta^2\\alpha + (1-\\beta)^2(2-\\alpha)}

    with ``β = 1`` (pure random) for the first ``warmup_steps``. ``c`` is ours
    (``unit_variance=False`` drops it): it keeps unit variance when ``z_t`` has unit variance.
    Without it the recursion's variance settles at ``(β²α + (1-β)²(1-α)) / (1-(1-β)²)`` (1/3 for
    the defaults), which would silently shrink the step. The previous ``m`` directions are kept in
    the state (``m × |w|`` floats here, ``m × |w|`` int8 in ``qzo_ff``), because a guided direction
    cannot be regenerated from a key alone.
  - sharpness-aware perturbation (``sharpness_radius=ρ``): one directional ascent step before the
    estimate, SAM-like,

    .. math::

       \\tilde w = w + \\rho\\, s\\, \\hat u,\\qquad
       s = \\mathrm{sign}\\big(L(w + \\rho \\hat u) - L(w - \\rho \\hat u)\\big),\\qquad
       \\hat u = u / \\lVert u \\rVert

    (``s = +1`` on a tie), the estimate ``ĝ(w̃)`` is computed at ``w̃`` and applied at ``w``. Two
    extra forward calls per step; ``‖u‖`` is the norm over the whole pytree.

* Enhancements that change *the update* are chainable optax transforms:

  - :func:`kernelwise_normalize`: per leaf ``ĝ^i ← ĝ^i ‖w^i‖ / ‖ĝ^i‖``, which for one direction of
    sign-SPSA is the paper's ``sign(ΔL) z^i/‖z^i‖ ‖w^i‖`` (for ``m > 1`` the average is normalized);
  - :func:`masked_update` with :func:`sparse_update_mask`: zero the update outside a fixed mask
    (top-k magnitude, random, threshold). Every weight is still perturbed; only the masked ones
    move. (The true sparse partition, which also perturbs only the trainable subset, is
    ``fwdgrad.adapt``.)

* :func:`binomial_sampler`: centered binomial perturbations scaled to unit variance; one trial is
  the Rademacher (±1) perturbation the paper calls binomial.

Chains::

  optax.chain(enhanced_forward_gradient(key=k, momentum=MomentumGuidedSampling()),
              kernelwise_normalize(), optax.sgd(1e-3), masked_update(mask))
  optax.chain(fwdgrad.qzo_ff(1e-3, key=k, sharpness_radius=0.05, kernelwise=True),
              masked_update(mask))          # keeps the 16-bit grid: frozen entries do not move

References:
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024, Sec. 3.4.
  Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from fwdgrad import estimators
from fwdgrad import fixed_point
from fwdgrad import objective
from fwdgrad import transform

PyTree = Any

MASK_CRITERIA = ("topk", "random", "threshold")


class MomentumGuidedSampling(NamedTuple):
  """Hyperparameters of momentum-guided sampling (the paper gives no values; these are ours).

  Attributes:
    alpha: variance split ``α`` between the fresh part ``N(0, αI)`` and the guided part
      ``N(z_t, (1-α)I)``.
    beta: weight ``β`` of the fresh part after warm-up (``β = 1``: independent directions,
      ``β = 0``: follow the previous direction).
    warmup_steps: steps with ``β = 1`` at the start (pure random, as the paper says).
    unit_variance: divide by ``c`` so that directions keep unit variance (see the module docstring).
  """
  alpha: float = 0.5
  beta: float = 0.5
  warmup_steps: int = 10
  unit_variance: bool = True


def check_momentum(config: MomentumGuidedSampling) -> MomentumGuidedSampling:
  """Validates a :class:`MomentumGuidedSampling` and returns it."""
  if not isinstance(config, MomentumGuidedSampling):
    raise ValueError(f"momentum must be a fwdgrad.MomentumGuidedSampling(alpha, beta, "
                     f"warmup_steps) or None, got {config!r}.")
  if not 0.0 <= config.alpha <= 1.0 or not 0.0 <= config.beta <= 1.0:
    raise ValueError(f"momentum alpha and beta must lie in [0, 1], got alpha={config.alpha}, "
                     f"beta={config.beta}.")
  if not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
    raise ValueError(f"warmup_steps must be a non-negative int, got {config.warmup_steps!r}.")
  if config.alpha == 0.0 and (config.beta == 1.0 or config.warmup_steps > 0):
    raise ValueError("alpha=0 makes the fresh part N(0, alpha I) zero, so beta=1 (and the warm-up)"
                     " would give zero directions; use alpha > 0.")
  return config


def momentum_guided_directions(step_key: jax.Array, previous: PyTree, count, params: PyTree, *,
                               num_directions: int, config: MomentumGuidedSampling,
                               distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION):
  """The ``m`` directions of one step, each guided by the same-index direction of the last step.

  Fresh noise ``ξ1_i`` uses ``fold_in(step_key, i)`` (so during warm-up the directions are exactly
  those of :func:`fwdgrad.spsa_grad`); the guided part's noise ``ξ2_i`` uses
  ``fold_in(step_key, m + 2 + i)``.

  Args:
    step_key: the key of this step.
    previous: the last step's directions, stacked on a leading axis of size ``m`` (zeros at first).
    count: the step count (``β = 1`` while ``count < warmup_steps``).
    params: pytree of float arrays (shapes and dtypes only).
    num_directions: ``m``.
    config: :class:`MomentumGuidedSampling`.
    distribution: distribution of ``ξ1, ξ2`` (unit variance).

  Returns:
    The new directions, stacked like ``previous``.
  """
  alpha, m = config.alpha, num_directions
  beta = jnp.where(count < config.warmup_steps, 1.0, config.beta)
  if config.unit_variance:
    norm = jnp.sqrt(beta ** 2 * alpha + (1.0 - beta) ** 2 * (2.0 - alpha))
  else:
    norm = jnp.ones(())
  fresh = [estimators.sample_direction(estimators.direction_key(step_key, i), params, distribution)
           for i in range(m)]
  noise = [estimators.sample_direction(estimators.direction_key(step_key, m + 2 + i), params,
                                       distribution) for i in range(m)]
  stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
  fresh, noise = stack(fresh), stack(noise)
  return jax.tree_util.tree_map(
      lambda f, n, z: ((beta * math.sqrt(alpha) * f
                        + (1.0 - beta) * (z + math.sqrt(1.0 - alpha) * n)) / norm).astype(f.dtype),
      fresh, noise, previous)


def _global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def floored_norm(w: jax.Array, floor) -> jax.Array:
  """``‖w‖``, or ``floor`` where ``‖w‖`` is below ``2^-15 · floor`` (a zero leaf).

  Kernel-wise normalization scales a leaf's step by its norm, so a zero leaf would never move;
  ``floor`` is its range (the one :func:`fwdgrad.fixed_point.weight_ranges` gives it).
  """
  norm = jnp.linalg.norm(jnp.ravel(w).astype(jnp.float32))
  return jnp.where(norm < fixed_point.NEAR_ZERO * floor, floor, norm)


def safe_ratio(numerator, denominator):
  """``numerator / denominator``, and 0 where the denominator is 0."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, numerator / safe, 0.0)


def sharpness_aware_point(value_fn: Callable[[PyTree], jax.Array], params: PyTree,
                          key: jax.Array, radius: float,
                          distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
                          has_aux: bool = False):
  """One directional ascent step: ``w̃ = w + ρ s u/‖u‖`` towards the higher of two losses.

  Args:
    value_fn: scalar objective, a pure, deterministic function of the params
      (same batch and dropout key in every call).
    params: pytree of float arrays.
    key: key of the direction ``u`` (drawn like :func:`fwdgrad.sample_direction`).
    radius: ``ρ``.
    distribution: distribution of ``u``.
    has_aux: ``value_fn`` returns ``(loss, aux)``; the ascent reads the loss only.

  Returns:
    ``(w̃, s)`` with ``s = +1`` or ``-1`` the side that was chosen.

  Examples:
    >>> w_tilde, side = sharpness_aware_point(loss_fn, params, jax.random.key(0), 0.05)
  """
  checked = objective.checked(value_fn, has_aux)
  value_fn = lambda params: checked(params)[0]
  u = estimators.sample_direction(key, params, distribution)
  step = radius / jnp.maximum(_global_norm(u), jnp.finfo(jnp.float32).tiny)
  plus = jax.tree_util.tree_map(lambda p, d: (p + step * d).astype(p.dtype), params, u)
  minus = jax.tree_util.tree_map(lambda p, d: (p - step * d).astype(p.dtype), params, u)
  loss_plus = value_fn(plus)

  def loss_minus(params):
    # Built inside the call, so that no perturbed copy of the parameters goes into it.
    u = estimators.sample_direction(key, params, distribution)
    return value_fn(jax.tree_util.tree_map(lambda p, d: (p - step * d).astype(p.dtype), params, u))

  ascend_plus = loss_plus >= estimators.call_apart(loss_minus, params, after=loss_plus)
  chosen = jax.tree_util.tree_map(lambda a, b: jnp.where(ascend_plus, a, b), plus, minus)
  return chosen, jnp.where(ascend_plus, 1, -1)


def spsa_grad_with_directions(value_fn: Callable[[PyTree], jax.Array], params: PyTree,
                              directions: PyTree, *, epsilon: float = 1e-3, sign: bool = True,
                              has_aux: bool = False):
  """:func:`fwdgrad.spsa_grad` with given directions (stacked on a leading axis of size ``m``).

  Returns:
    ``(loss, grads)`` (``((loss, aux), grads)`` with ``has_aux``) as :func:`fwdgrad.spsa_grad`.
  """
  objective.check_epsilon(epsilon, "spsa_grad_with_directions")
  m = jax.tree_util.tree_leaves(directions)[0].shape[0]
  fn = objective.checked(value_fn, has_aux)

  def body(index, carry):
    loss_sum, grads, aux = carry
    z = jax.tree_util.tree_map(lambda d: d[index], directions)

    def perturbed(scale):
      def loss_at(operands):
        # The point is built inside the call from what is stored already (see call_apart).
        params, directions = operands
        z = jax.tree_util.tree_map(lambda d: d[index], directions)
        return fn(estimators._axpy(scale, z, params))
      return loss_at

    loss_plus, aux_plus = estimators.call_apart(perturbed(epsilon), (params, directions),
                                                after=loss_sum)
    loss_minus, _ = estimators.call_apart(perturbed(-epsilon), (params, directions),
                                          after=loss_plus)
    difference = loss_plus - loss_minus
    coefficient = jnp.sign(difference) if sign else difference / (2.0 * epsilon)
    grads = jax.tree_util.tree_map(lambda g, d: (g + coefficient / m * d).astype(g.dtype), grads, z)
    return (loss_sum + 0.5 * (loss_plus + loss_minus), grads,
            estimators.keep_first(index, aux_plus, aux))

  aux = estimators.aux_placeholder(fn, params) if has_aux else None
  init = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params), aux)
  loss_sum, grads, aux = jax.lax.fori_loop(0, m, body, init)
  loss = loss_sum / m
  return ((loss, aux) if has_aux else loss), grads


class EnhancedForwardGradientState(NamedTuple):
  """State of :func:`enhanced_forward_gradient`.

  Attributes:
    key: base PRNG key; step ``t`` uses ``fold_in(key, t)``.
    count: number of updates so far (int32).
    loss: the estimator's loss at the last update (at ``w̃`` with sharpness-aware perturbation).
    previous_directions: the last ``m`` directions stacked (momentum-guided sampling), else ``()``.
    aux: with ``has_aux``, the aux of the last step's first call (:func:`fwdgrad.step_aux`).
  """
  key: chex.PRNGKey
  count: chex.Array
  loss: chex.Array
  previous_directions: PyTree
  aux: Any = None


def enhanced_forward_gradient(
    *,
    key: Union[int, jax.Array],
    num_directions: int = 3,
    epsilon: float = 1e-3,
    sign: bool = True,
    distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
    momentum: Optional[MomentumGuidedSampling] = None,
    sharpness_radius: Optional[float] = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """(sign-)m-SPSA with momentum-guided sampling and/or a sharpness-aware perturbation (float).

  With neither option this is ``forward_gradient("spsa", ...)`` exactly (same directions, same
  result). Chain a float optimizer after it, and optionally :func:`kernelwise_normalize` and
  :func:`masked_update`.

  Args:
    key: PRNG key or int seed.
    num_directions: ``m``.
    epsilon: SPSA perturbation size ``ε``.
    sign: sign-m-SPSA (the paper's estimator) when True.
    distribution: ``"gaussian"``, ``"rademacher"``, ``"binomial"`` (= Rademacher) or a sampler.
    momentum: :class:`MomentumGuidedSampling` or ``None``.
    sharpness_radius: ``ρ`` of the ascent step, or ``None``.
    has_aux: ``value_fn`` returns ``(loss, aux)``; the state keeps the first call's aux.

  ``update`` takes ``value_fn``, a float scalar objective and a pure, deterministic function of
  the params (same batch and dropout key in every call).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state, params, *, value_fn)``.

  Examples:
    >>> tx = optax.chain(enhanced_forward_gradient(key=0, sharpness_radius=0.05), optax.sgd(1e-3))
  """
  estimators._check_num_directions(num_directions)
  objective.check_epsilon(epsilon, "enhanced_forward_gradient")
  if distribution == "binomial":
    distribution = "rademacher"
  estimators.get_sampler(distribution)
  if momentum is not None:
    momentum = check_momentum(momentum)
  if sharpness_radius is not None and not sharpness_radius > 0:
    raise ValueError(f"sharpness_radius must be positive or None, got {sharpness_radius!r}.")
  base_key = transform.as_key(key)
  m = num_directions

  def init_fn(params):
    estimators._check_params(params)  # pylint: disable=protected-access
    previous = ()
    if momentum is not None:
      previous = jax.tree_util.tree_map(lambda p: jnp.zeros((m,) + jnp.shape(p), p.dtype), params)
    return EnhancedForwardGradientState(key=base_key, count=jnp.zeros((), jnp.int32),
                                        loss=jnp.zeros((), jnp.float32),
                                        previous_directions=previous,
                                        aux=objective.PendingAux() if has_aux else None)

  def update_fn(updates, state, params=None, *, value_fn: Callable[..., Any] = None,
                **extra_args):
    del updates, extra_args
    transform.missing_extra_args_error("enhanced_forward_gradient", params, value_fn)
    estimators._check_params(params)  # pylint: disable=protected-access
    step_key = jax.random.fold_in(state.key, state.count)
    center = params
    if sharpness_radius is not None:
      center, _ = sharpness_aware_point(value_fn, params, estimators.direction_key(step_key, m),
                                        sharpness_radius, distribution, has_aux=has_aux)
    previous = state.previous_directions
    if momentum is None:
      out, grads = estimators.spsa_grad(value_fn, center, step_key, num_directions=m,
                                        epsilon=epsilon, distribution=distribution, sign=sign,
                                        has_aux=has_aux)
    else:
      previous = momentum_guided_directions(step_key, previous, state.count, params,
                                            num_directions=m, config=momentum,
                                            distribution=distribution)
      out, grads = spsa_grad_with_directions(value_fn, center, previous, epsilon=epsilon,
                                             sign=sign, has_aux=has_aux)
    loss, aux = out if has_aux else (out, None)
    objective.warn_if_nonfinite(loss, state.count, "enhanced_forward_gradient")
    return grads, EnhancedForwardGradientState(
        key=state.key, count=optax.safe_increment(state.count), loss=loss,
        previous_directions=previous, aux=aux)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kernelwise_normalize() -> optax.GradientTransformation:
  """Kernel-wise normalization: each leaf of the update gets the norm of its weights.

  .. math::

     \\hat g(w^i) \\leftarrow \\hat g(w^i) \\frac{\\lVert w^i \\rVert}{\\lVert \\hat g(w^i) \\rVert}

  Put it right after the estimator and before the optimizer (``optax.sgd(η)`` then moves each
  layer by ``η ‖w^i‖``). A zero update leaf stays zero. A zero weight leaf (a zero-initialised
  bias) would never move: it uses its layer's range instead of its norm
  (:func:`fwdgrad.fixed_point.weight_ranges`).

  Examples:
    >>> tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, sign=True),
    ...                  kernelwise_normalize(), optax.sgd(1e-3))
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("kernelwise_normalize.update needs params (the weight norms): call "
                       "tx.update(updates, state, params).")
    def one(u, w, w_max):
      factor = safe_ratio(floored_norm(w, jnp.max(w_max)),
                          jnp.linalg.norm(u.astype(jnp.float32).ravel()))
      return (u * factor).astype(u.dtype)
    ranges = fixed_point.weight_ranges(params)
    return jax.tree_util.tree_map(one, updates, params, ranges), state

  return optax.GradientTransformation(init_fn, update_fn)


def sparse_update_mask(params: PyTree, criterion: str = "topk", *, density: float = 0.1,
                       threshold: Optional[float] = None,
                       key: Optional[jax.Array] = None) -> PyTree:
  """A boolean mask per leaf selecting the weights to update.

  Args:
    params: the (pre-trained) weights.
    criterion: ``"topk"`` (the ``ceil(density · size)`` largest ``|w|`` of each leaf),
      ``"random"`` (that many entries of each leaf chosen uniformly without replacement) or
      ``"threshold"`` (``|w| >= threshold``).
    density: fraction of each leaf to update for ``"topk"`` and ``"random"`` (0.1: 90% frozen).
    threshold: the magnitude for ``"threshold"``.
    key: PRNG key for ``"random"``.

  Returns:
    A pytree of bool arrays shaped like ``params``.
  """
  if criterion not in MASK_CRITERIA:
    raise ValueError(f"unknown criterion {criterion!r}; expected one of {MASK_CRITERIA}.")
  if criterion == "threshold":
    if threshold is None:
      raise ValueError('criterion="threshold" needs threshold=... (a magnitude).')
    return jax.tree_util.tree_map(lambda w: jnp.abs(w) >= threshold, params)
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density must lie in (0, 1], got {density!r}.")
  if criterion == "random" and key is None:
    raise ValueError('criterion="random" needs key=jax.random.key(seed).')
  leaves, treedef = jax.tree_util.tree_flatten(params)
  masks = []
  for index, w in enumerate(leaves):
    size = int(jnp.size(w))
    count = min(size, max(1, math.ceil(density * size)))
    if criterion == "topk":
      score = jnp.abs(w).ravel()
    else:
      score = jax.random.uniform(jax.random.fold_in(transform.as_key(key), index), (size,))
    chosen = jax.lax.top_k(score.astype(jnp.float32), count)[1]
    masks.append(jnp.zeros(size, bool).at[chosen].set(True).reshape(jnp.shape(w)))
  return jax.tree_util.tree_unflatten(treedef, masks)


class MaskedUpdateState(NamedTuple):
  """State of :func:`masked_update`: the boolean mask (one byte per parameter)."""
  mask: PyTree


def masked_update(mask: Union[PyTree, str] = "topk", **mask_kwargs) -> optax.GradientTransformation:
  """Zeroes the update outside a fixed mask: a simple sparse update.

  .. math::

     u \\leftarrow u \\odot \\mathbb{1}[\\mathrm{mask}]

  Args:
    mask: a pytree of bool arrays like the params, or a criterion of :func:`sparse_update_mask`
      (``"topk"``, ``"random"``, ``"threshold"``), computed once at ``init`` from the params.
    **mask_kwargs: ``density``, ``threshold``, ``key`` for :func:`sparse_update_mask`.

  Returns:
    An ``optax.GradientTransformation``. Put it last: entries outside the mask never move (after
    ``qzo_ff`` or ``fixed_point_weights`` they keep their grid value).

  Examples:
    >>> tx = optax.chain(fwdgrad.qzo_ff(1e-3, key=0), masked_update("topk", density=0.1))
  """
  if isinstance(mask, str):
    if mask not in MASK_CRITERIA:
      raise ValueError(f"unknown criterion {mask!r}; expected one of {MASK_CRITERIA} or a mask "
                       "pytree.")
  elif mask_kwargs:
    raise ValueError(f"{sorted(mask_kwargs)} only apply when mask is a criterion name.")

  def init_fn(params):
    if isinstance(mask, str):
      return MaskedUpdateState(sparse_update_mask(params, mask, **mask_kwargs))
    chex.assert_trees_all_equal_shapes(mask, params)
    return MaskedUpdateState(jax.tree_util.tree_map(lambda x: jnp.asarray(x, bool), mask))

  def update_fn(updates, state, params=None):
    del params
    new = jax.tree_util.tree_map(lambda u, k: jnp.where(k, u, jnp.zeros_like(u)), updates,
                                 state.mask)
    return new, state

  return optax.GradientTransformation(init_fn, update_fn)


def binomial_sampler(trials: int = 1) -> estimators.Sampler:
  """Centered binomial perturbations with unit variance: ``(B(n, 1/2) - n/2) / sqrt(n/4)``.

  One trial is Rademacher (±1), the paper's "binomial" perturbation; more trials approach a
  Gaussian while staying on ``n + 1`` levels (cheap to draw from random bits on integer hardware).

  Examples:
    >>> tx = fwdgrad.forward_gradient("spsa", key=0, sign=True, distribution=binomial_sampler(4))
  """
  if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
    raise ValueError(f"trials must be a positive int, got {trials!r}.")

  def sampler(key, shape, dtype):
    flips = jax.random.bernoulli(key, 0.5, (trials,) + tuple(shape))
    counts = jnp.sum(flips, axis=0, dtype=jnp.float32)
    return ((counts - trials / 2.0) / math.sqrt(trials / 4.0)).astype(dtype)

  return sampler
