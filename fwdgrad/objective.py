"""What every forward-gradient entry point asks of the objective, checked where it is called.

An estimator calls ``value_fn(params)`` 2m times (or m JVPs) and never differentiates it, so a
mistake in its output (per-example losses, a ``(loss, aux)`` tuple, an integer count) would
otherwise surface as a broadcasting error deep inside the estimator, or not at all: an integer
objective is a step function and SPSA would run on it silently. The checks below run once, at
trace time, and name the fix. ``value_fn`` must be a pure, deterministic function of the params:
every perturbed call must see the same batch, the same dropout key and the same statistics, or
the loss difference measures the noise instead of the slope.

:func:`step_loss` and :func:`step_aux` read what the last update stored in an optimizer state,
wherever the forward-gradient transform sits in an ``optax.chain`` or wrapper.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

_FIX_SCALAR = ("return one float32 scalar, e.g. jnp.mean(per_example_losses), or "
               "loss.reshape(()) for a single-element array")


class PendingAux(NamedTuple):
  """The ``aux`` of a ``has_aux`` transform's state before its first update (no leaves)."""


class NonFiniteLossWarning(UserWarning):
  """The objective returned NaN or inf during a forward-gradient update."""


def check_loss(loss: Any, fn: str = "value_fn") -> jax.Array:
  """``loss`` as a float32 scalar, or a ValueError that says what ``fn`` returned instead."""
  if isinstance(loss, (tuple, list, dict)):
    raise ValueError(
        f"{fn} returned a {type(loss).__name__}; forward gradients need a scalar loss. If it "
        "returns (loss, aux), pass has_aux=True; otherwise " + _FIX_SCALAR + ".")
  try:
    dtype = jnp.result_type(loss)
  except TypeError as error:
    raise ValueError(f"{fn} returned {type(loss).__name__}, not an array; "
                     + _FIX_SCALAR + ".") from error
  shape = jnp.shape(loss)
  if shape != ():
    raise ValueError(f"{fn} returned an array of shape {shape}; " + _FIX_SCALAR + ".")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{fn} returned a scalar of dtype {dtype}; forward gradients estimate the slope of a float loss, "
        "and an integer or boolean objective (a count, an accuracy) is a step function with "
        "nothing to estimate. Return a float loss such as a mean cross-entropy.")
  return jnp.asarray(loss).astype(jnp.float32)


def split_output(out: Any, has_aux: bool, fn: str = "value_fn") -> Tuple[jax.Array, Any]:
  """``(loss, aux)`` of an objective's output (``aux`` is None without ``has_aux``), checked."""
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError(f"{fn} must return a pair (loss, aux) with has_aux=True, got "
                       f"{type(out).__name__}" + (f" of length {len(out)}" if isinstance(
                           out, (tuple, list)) else "") + ".")
    loss, aux = out
    return check_loss(loss, fn), aux
  return check_loss(out, fn), None


def checked(value_fn: Callable[[PyTree], Any], has_aux: bool = False,
            fn: str = "value_fn") -> Callable[[PyTree], Tuple[jax.Array, Any]]:
  """``params -> (loss, aux)`` from ``value_fn``, its output checked by :func:`split_output`."""
  if not callable(value_fn):
    raise ValueError(f"{fn} must be a function of the params, got {type(value_fn).__name__}.")
  return lambda params: split_output(value_fn(params), has_aux, fn)


def _warn_nonfinite(loss, count, name) -> None:
  loss = np.asarray(loss)
  if not np.all(np.isfinite(loss)):
    warnings.warn(
        f"{name}: the loss is {loss.item()} at update {int(np.asarray(count))}, so the estimate "
        "is not finite. Lower the learning rate (or ε), or wrap the optimizer after the "
        "estimator in optax.apply_if_finite to skip such steps.", NonFiniteLossWarning,
        stacklevel=2)


def warn_if_nonfinite(loss: jax.Array, count: jax.Array, name: str) -> None:
  """A :class:`NonFiniteLossWarning` from the host when ``loss`` is not finite (also under jit).

  The host is called only on a non-finite loss (a ``lax.cond``), so a healthy step costs one
  scalar comparison.
  """
  def report(loss, count):
    jax.debug.callback(_warn_nonfinite, loss, count, name)

  jax.lax.cond(jnp.isfinite(loss), lambda loss, count: None, report, loss, count)


def check_params(tree: PyTree, name: str = "params") -> None:
  """A ValueError when ``tree`` holds optax's ``MaskedNode`` placeholders (see below)."""
  masked = [node for node in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
            if isinstance(node, optax.MaskedNode)]
  if masked:
    raise ValueError(
        f"{name} holds optax.MaskedNode placeholders: the forward-gradient transform runs inside "
        "optax.masked or optax.multi_transform, which hide the masked leaves from value_fn. Put "
        "the estimator outside them: split the params with fwdgrad.partition and train the "
        "trainable part with value_fn = fwdgrad.bind_frozen(loss_fn, frozen), which also keeps "
        "the frozen leaves out of the perturbation (optax.masked after the estimator would pass "
        "the raw estimate to the leaves it masks out).")


def check_static(name: str, values: dict, static: tuple) -> None:
  """A ValueError when one of ``values`` (the Python numbers that fix a transform's shapes or
  formats) arrives as an array, as ``optax.inject_hyperparams`` makes every numeric argument."""
  for arg, value in values.items():
    if isinstance(value, jax.Array):
      raise ValueError(
          f"{name}: {arg} sets the number of forward calls or the integer formats when the "
          f"transform is built, so it cannot be an array; with optax.inject_hyperparams, list "
          f"it in static_args={static!r}.")


def check_epsilon(epsilon, name: str) -> None:
  """A ValueError for a non-positive ``ε`` (a traced one, under inject_hyperparams, passes)."""
  try:
    ok = bool(epsilon > 0)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
    return
  if not ok:
    raise ValueError(f"{name}: epsilon must be positive (the SPSA perturbation size), got "
                     f"{epsilon!r}.")


# Where the loss and aux of a step live: every estimator state has both fields.
def _estimator_states() -> tuple:
  from fwdgrad import enhancements, qzo, transform  # pylint: disable=g-import-not-at-top
  return (transform.ForwardGradientState, qzo.QZOState,
          enhancements.EnhancedForwardGradientState)


def estimator_nodes(opt_state: PyTree) -> list:
  """The forward-gradient states in ``opt_state``, in tree order."""
  states = _estimator_states()
  return [node for node in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda node: isinstance(node, states)) if isinstance(node, states)]


def map_estimator_nodes(fn: Callable[[Any], Any], opt_state: PyTree) -> PyTree:
  """``opt_state`` with every forward-gradient state ``node`` replaced by ``fn(node)``."""
  states = _estimator_states()
  return jax.tree_util.tree_map(lambda node: fn(node) if isinstance(node, states) else node,
                                opt_state, is_leaf=lambda node: isinstance(node, states))


def _find_state(opt_state: PyTree, what: str):
  states = _estimator_states()
  wrapper = getattr(optax, "MultiStepsState", None)

  def is_node(x):
    return isinstance(x, states) or (wrapper is not None and isinstance(x, wrapper))

  for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_node):
    if isinstance(node, states):
      return node
    if wrapper is not None and isinstance(node, wrapper):
      if estimator_nodes(node.inner_opt_state):
        raise ValueError(
            "optax.MultiSteps wraps the forward-gradient transform, which then estimates on the "
            "last micro-batch of each step only. Put MultiSteps after it: optax.chain("
            "fwdgrad.forward_gradient(..., micro_steps=k), optax.MultiSteps(optimizer, k)).")
  raise ValueError(f"{what}: opt_state holds no forward-gradient state (of "
                   "fwdgrad.forward_gradient, fwdgrad.qzo_ff or fwdgrad.enhanced_forward_gradient"
                   "); pass the state that tx.init / tx.update returned.")


def step_loss(opt_state: PyTree) -> jax.Array:
  """The loss the last update measured (float32 scalar), read from an optimizer state.

  It costs no extra forward call: under SPSA it is the mean of ``(f(w + εz) + f(w - εz)) / 2``
  over the step's directions (``f(w)`` up to ``O(ε²)``), under jvp ``f(w)`` itself, both at the
  params *before* the update. Works through ``optax.chain``, ``inject_hyperparams`` and the other
  wrappers; 0 before the first update.

  Examples:
    >>> tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0), optax.sgd(1e-2))
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(params, opt_state, params, value_fn=loss_fn)
    >>> loss = fwdgrad.step_loss(opt_state)
  """
  return _find_state(opt_state, "step_loss").loss


def step_aux(opt_state: PyTree) -> Any:
  """The auxiliary output of the last update's objective (a transform built with ``has_aux``).

  It comes from the first forward call of the step: ``f(w + ε z_1)`` under SPSA and QZO-FF,
  the unperturbed ``f(w)`` under jvp. ``None`` before the first update and without ``has_aux``
  (placeholders of the right shape after :func:`init_with_aux`).
  """
  aux = _find_state(opt_state, "step_aux").aux
  return None if isinstance(aux, PendingAux) else aux


def init_with_aux(tx, params: PyTree, value_fn: Callable[[PyTree], Any]) -> PyTree:
  """``tx.init(params)`` with room for ``value_fn``'s aux in every ``has_aux`` estimator state.

  A ``has_aux`` transform cannot know the aux's structure at ``init`` (optax's ``init`` sees only
  the params), so its state changes structure at the first update. Start from this state where
  that matters: a ``lax.scan`` over updates, ``optax.apply_if_finite`` or ``optax.MultiSteps``
  around the chain (they select between old and new states), or a jitted step that should
  compile once. ``value_fn`` is traced (never run) to find the aux's shapes.

  Examples:
    >>> tx = fwdgrad.forward_gradient("spsa", key=0, has_aux=True)
    >>> value_fn = lambda p: (loss_fn(p), {"logits": model.apply({"params": p}, x)})
    >>> opt_state = fwdgrad.init_with_aux(tx, params, value_fn)
  """
  state = tx.init(params)
  if not any(isinstance(node.aux, PendingAux) for node in estimator_nodes(state)):
    raise ValueError("init_with_aux: tx has no forward-gradient transform built with "
                     "has_aux=True; use tx.init(params).")
  shapes = jax.eval_shape(lambda p: split_output(value_fn(p), True)[1], params)
  def zeros(s):
    if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
      from fwdgrad import estimators  # pylint: disable=g-import-not-at-top
      return estimators._never_value(s)  # pylint: disable=protected-access
    return jnp.zeros(s.shape, s.dtype)

  placeholder = jax.tree_util.tree_map(zeros, shapes)
  return map_estimator_nodes(
      lambda node: node._replace(aux=placeholder) if isinstance(node.aux, PendingAux) else node,
      state)
