"""The forward-gradient estimate as an optax gradient transformation.

:func:`forward_gradient` ignores the incoming updates (there is no backward pass to produce them)
and returns an estimate of the gradient built from forward calls of the objective, which optax
passes as the keyword extra argument ``value_fn``. Chain it before any optimizer::

  tx = optax.chain(fwdgrad.forward_gradient("spsa", key=jax.random.key(0), num_directions=3,
                                            sign=True),
                   optax.sgd(1e-2))
  updates, opt_state = tx.update(params, opt_state, params, value_fn=loss_fn)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import optax

from fwdgrad import estimators
from fwdgrad import objective

ESTIMATORS = ("spsa", "jvp")


class ForwardGradientState(NamedTuple):
  """State of :func:`forward_gradient`.

  Attributes:
    key: the base PRNG key; step ``t`` uses ``fold_in(key, t)``.
    count: number of updates so far (int32).
    loss: the loss reported by the estimator at the last update, for logging without an extra
      forward call (see :func:`fwdgrad.spsa_grad` for what it is under SPSA); read it with
      :func:`fwdgrad.step_loss`.
    aux: with ``has_aux``, the objective's aux at the last update (:func:`fwdgrad.step_aux`);
      a leafless ``PendingAux`` after ``init`` (see :func:`fwdgrad.init_with_aux`); ``None``
      without ``has_aux``.
  """
  key: chex.PRNGKey
  count: chex.Array
  loss: chex.Array
  aux: Any = None


def as_key(key: Union[int, jax.Array]) -> jax.Array:
  """A typed PRNG key from an int seed, a raw uint32 key or a typed key."""
  if isinstance(key, int):
    return jax.random.key(key)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
    return jax.random.key(key)  # An int seed, traced (optax.inject_hyperparams makes it one).
  if key.shape == (2,) and key.dtype == jnp.uint32:
    return jax.random.wrap_key_data(key)
  raise ValueError(
      f"key must be a PRNG key (jax.random.key(seed)) or an int seed, got {key.dtype}{key.shape}.")


def missing_extra_args_error(name: str, params, value_fn) -> None:
  """Raises a ValueError explaining how to pass ``params`` and ``value_fn`` to ``update``."""
  missing = [n for n, v in (("params", params), ("value_fn", value_fn)) if v is None]
  if missing:
    raise ValueError(
        f"{name}.update needs {' and '.join(missing)}: the estimate is built by calling the "
        "objective at the current parameters. Call it as "
        "tx.update(grads_or_params, opt_state, params, value_fn=loss_fn), where "
        "loss_fn(params) -> scalar; optax.chain forwards value_fn to every transform. Flax's "
        "TrainState.apply_gradients drops value_fn (use fwdgrad.apply_forward_gradient(state, "
        "loss_fn)), and nnx.Optimizer needs fwdgrad.nnx_update(optimizer, model, loss_fn).")


def forward_gradient(
    estimator: str = "spsa",
    *,
    key: Union[int, jax.Array],
    num_directions: int = 1,
    epsilon: float = 1e-3,
    distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
    sign: bool = False,
    has_aux: bool = False,
    micro_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """A transformation that replaces the incoming updates with a forward-gradient estimate.

  .. math::

     g_t = \\hat\\nabla f(w_t; z_{t,1..m}), \\qquad z_{t,i} \\text{ from } \\mathrm{fold\\_in}(
     \\mathrm{fold\\_in}(key, t), i)

  Args:
    estimator: ``"spsa"`` (two forward calls per direction; what runs on an inference-only chip)
      or ``"jvp"`` (exact directional derivative with :func:`jax.jvp`).
    key: PRNG key (or int seed) kept in the state.
    num_directions: ``m`` directions averaged per step.
    epsilon: SPSA perturbation size (unused by ``"jvp"``).
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.
    sign: sign-m-SPSA (``estimator="spsa"`` only).
    has_aux: ``value_fn`` returns ``(loss, aux)``; the state keeps the aux of the step's first
      call (the unperturbed one under jvp), read with :func:`fwdgrad.step_aux`. The state takes
      the aux's structure at the first update; ``fwdgrad.init_with_aux(tx, params, value_fn)``
      gives it from the start, which ``lax.scan``, a wrapper around the chain
      (``apply_if_finite``, ``MultiSteps``) and a ``jit`` that should compile once need.
    micro_steps: ``k`` consecutive updates share one set of directions. Set it to ``k`` when
      ``optax.MultiSteps(optimizer, k)`` follows, so that the ``k`` micro-batches of a step are
      probed along the same directions and the accumulated estimate is the one of their union
      (exactly so for plain SPSA and jvp; sign-m-SPSA averages the ``k`` signs). Never wrap the
      estimator itself in ``MultiSteps``: it would estimate on the last micro-batch only.

  ``value_fn(params)`` must return a float32 scalar and be a pure, deterministic function of the
  params: every forward call of a step must see the same batch, dropout key and statistics.
  A NaN or inf loss raises a :class:`fwdgrad.NonFiniteLossWarning` (from the host, also under
  ``jit``); ``optax.apply_if_finite`` around the optimizer after it skips such steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params, *,
    value_fn)`` returns the estimate; ``updates`` is ignored and may be ``params`` or zeros.
    :func:`fwdgrad.step_loss` reads the step's loss from the state.

  Examples:
    >>> tx = optax.chain(fwdgrad.forward_gradient("jvp", key=jax.random.key(0)), optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params, value_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}.")
  if sign and estimator != "spsa":
    raise ValueError('sign=True is sign-m-SPSA and needs estimator="spsa".')
  estimators._check_num_directions(num_directions)
  if estimator == "spsa":
    objective.check_epsilon(epsilon, "forward_gradient")
  if not isinstance(micro_steps, jax.Array) and (  # (Traced under inject_hyperparams: fine.)
      isinstance(micro_steps, bool) or not isinstance(micro_steps, int) or micro_steps < 1):
    raise ValueError(f"micro_steps must be a positive int, got {micro_steps!r}.")
  estimators.get_sampler(distribution)
  key = as_key(key)

  def estimate(value_fn, params, step_key):
    if estimator == "jvp":
      return estimators.jvp_grad(value_fn, params, step_key, num_directions=num_directions,
                                 distribution=distribution, has_aux=has_aux)
    return estimators.spsa_grad(value_fn, params, step_key, num_directions=num_directions,
                                epsilon=epsilon, distribution=distribution, sign=sign,
                                has_aux=has_aux)

  def init_fn(params):
    del params
    return ForwardGradientState(key=key, count=jnp.zeros((), jnp.int32),
                                loss=jnp.zeros((), jnp.float32),
                                aux=objective.PendingAux() if has_aux else None)

  def update_fn(updates, state, params=None, *, value_fn: Callable[..., Any] = None,
                **extra_args):
    del updates, extra_args
    missing_extra_args_error("forward_gradient", params, value_fn)
    step_key = jax.random.fold_in(state.key, state.count // jnp.maximum(micro_steps, 1))
    out, grads = estimate(value_fn, params, step_key)
    loss, aux = out if has_aux else (out, None)
    objective.warn_if_nonfinite(loss, state.count, "forward_gradient")
    return grads, ForwardGradientState(key=state.key, count=optax.safe_increment(state.count),
                                       loss=loss, aux=aux)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
