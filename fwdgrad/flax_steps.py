"""Forward-gradient steps for Flax's own training objects: Linen ``TrainState`` and NNX.

The optax transforms need ``value_fn`` (the objective as a function of the trained params) at
every update. Flax's helpers do not pass it: ``TrainState.apply_gradients`` drops extra keyword
arguments, and ``nnx.Optimizer.update`` wants gradients and hands the transform pure arrays
that a Module-taking loss cannot read. The two recipes here do the split and merge:

  Linen::

    tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=3), optax.adam(1e-3))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    loss_fn = lambda params: cross_entropy(state.apply_fn({"params": params}, images), labels)
    state = fwdgrad.apply_forward_gradient(state, loss_fn)

  NNX::

    tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, has_aux=True), optax.adam(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    loss = fwdgrad.nnx_update(optimizer, model, loss_fn, images, labels)  # loss_fn(model, x, y)
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import optax

from fwdgrad import objective

PyTree = Any


def apply_forward_gradient(state, value_fn: Callable[[PyTree], jax.Array], **extra_args):
  """One forward-gradient step on a Flax Linen ``TrainState`` (what ``apply_gradients`` does).

  Args:
    state: a ``flax.training.train_state.TrainState`` (or a subclass) whose ``tx`` chains a
      forward-gradient transform (:func:`fwdgrad.forward_gradient`, :func:`fwdgrad.qzo_ff`).
    value_fn: the loss as a pure, deterministic function of ``state.params`` (close over the
      batch, and over ``batch_stats`` and a dropout key fixed for the step).
    **extra_args: more keyword arguments for ``tx.update``.

  Returns:
    The state with ``step + 1``, the new params and the new ``opt_state``; the step's loss is
    ``fwdgrad.step_loss(new_state.opt_state)``.

  Examples:
    >>> from flax.training import train_state
    >>> tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0), optax.adam(1e-3))
    >>> state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> state = fwdgrad.apply_forward_gradient(state, lambda p: loss_fn(p, batch))
  """
  updates, opt_state = state.tx.update(state.params, state.opt_state, state.params,
                                       value_fn=value_fn, **extra_args)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def nnx_value_fn(model, loss_fn: Callable[..., Any], *args, wrt: Any = None,
                 with_state: bool = True, has_aux: bool = False,
                 **kwargs) -> Tuple[Callable[[PyTree], Any], PyTree]:
  """``(value_fn, params)`` for an NNX Module: the objective over the arrays of its ``wrt`` state.

  ``value_fn(params)`` merges ``params`` with the model's other variables as they are now and
  returns ``loss_fn(module, *args, **kwargs)``. Every call starts from the same non-parameter
  state, so every perturbed call of a step sees the same dropout key and the same BatchNorm
  statistics. With ``with_state`` it returns ``(loss, state)``, ``state`` being the pure
  non-parameter state after the call (updated running statistics, advanced RNG counters), for a
  transform built with ``has_aux=True``.

  Args:
    model: an ``nnx.Module``.
    loss_fn: ``loss_fn(module, *args, **kwargs) -> scalar`` (as one writes for ``nnx.grad``), or
      ``-> (loss, aux)`` with ``has_aux``.
    *args, **kwargs: the batch and anything else ``loss_fn`` takes.
    wrt: the filter of trained variables (``nnx.Param`` when None).
    with_state: return the non-parameter state as aux.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``value_fn`` then returns
      ``(loss, (aux, state))`` (``(loss, (aux, None))`` without ``with_state``).

  Returns:
    ``(value_fn, params)`` with ``params`` the pure arrays of the trained variables.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  wrt = nnx.Param if wrt is None else wrt
  graphdef, params, rest = nnx.split(model, wrt, ...)
  # Pure arrays: a merge inside a transform then builds fresh Variables instead of mutating the
  # caller's, which would raise a TraceContextError.
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def value_fn(params):
    module = nnx.merge(graphdef, params, rest)
    out = loss_fn(module, *args, **kwargs)
    loss, aux = objective.split_output(out, has_aux, "loss_fn")
    state = nnx.as_pure(nnx.state(module, nnx.Not(wrt))) if with_state else None
    if has_aux:
      return loss, (aux, state)
    return (loss, state) if with_state else loss

  return value_fn, params


def _without_aux(opt_state: PyTree) -> PyTree:
  """``opt_state`` with every estimator state's aux back to what ``init`` gave (its structure)."""
  return objective.map_estimator_nodes(
      lambda node: node._replace(aux=None if node.aux is None else objective.PendingAux()),
      opt_state)


def nnx_update(optimizer, model, loss_fn: Callable[..., Any], *args,
               update_state: bool = True, has_aux: bool = False, **kwargs):
  """One forward-gradient step of an ``nnx.Optimizer``, with no gradients to pass.

  What ``optimizer.update(model, grads)`` does for backprop: the transform in ``optimizer.tx``
  estimates the gradient of ``loss_fn(model, *args, **kwargs)`` from forward calls, and the model
  and the optimizer are updated in place. Works eagerly, inside ``nnx.jit`` and ``nnx.scan``.

  Non-parameter state (BatchNorm running statistics, dropout RNG counters): with
  ``update_state`` (default) it is taken from the step's first forward call, at ``w + ε z_1``
  under SPSA and QZO-FF (ε-close to the unperturbed statistics) and at ``w`` under jvp; that
  travels as the objective's aux, so **the transform must be built with** ``has_aux=True``. With
  ``update_state=False`` it stays as it is: running statistics never move (evaluate with batch
  statistics, or put BatchNorm in eval mode for training too) and dropout draws the same mask at
  every step.

  Args:
    optimizer: an ``nnx.Optimizer`` over ``model`` whose ``tx`` starts with a forward-gradient
      transform.
    model: the ``nnx.Module`` it trains.
    loss_fn: ``loss_fn(module, *args, **kwargs) -> scalar``, or ``-> (loss, aux)`` with
      ``has_aux``.
    *args, **kwargs: the batch.
    update_state: write back the non-parameter state of the first call (see above).
    has_aux: ``loss_fn`` returns ``(loss, aux)`` (the transform needs ``has_aux=True`` too).

  Returns:
    The step's loss (:func:`fwdgrad.step_loss`), or ``(loss, aux)`` with ``has_aux`` (aux from the
    step's first call).

  Examples:
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 2, rngs=nnx.Rngs(0))
    >>> tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, has_aux=True), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   return fwdgrad.nnx_update(optimizer, model, loss_fn, x, y)
    >>> loss = train_step(model, optimizer, jnp.ones((4, 8)), jnp.zeros((4, 2)))
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  opt_state = nnx.as_pure(optimizer.opt_state)
  nodes = objective.estimator_nodes(opt_state)
  if not nodes:
    raise ValueError("fwdgrad.nnx_update: optimizer.tx holds no forward-gradient transform "
                     "(fwdgrad.forward_gradient, qzo_ff or enhanced_forward_gradient); for "
                     "backprop use optimizer.update(model, grads).")
  transform_aux = nodes[0].aux is not None
  if (update_state or has_aux) and not transform_aux:
    raise ValueError(
        "fwdgrad.nnx_update: build the transform with has_aux=True (e.g. "
        "fwdgrad.forward_gradient(..., has_aux=True)): the model's BatchNorm statistics and RNG "
        "counters (and loss_fn's aux with has_aux) travel as the objective's aux. Or pass "
        "update_state=False to keep them fixed.")
  value_fn, params = nnx_value_fn(model, loss_fn, *args, wrt=optimizer.wrt,
                                  with_state=update_state, has_aux=has_aux, **kwargs)
  if transform_aux and not (update_state or has_aux):
    plain = value_fn
    value_fn = lambda params: (plain(params), None)
  updates, new_opt_state = optimizer.tx.update(params, opt_state, params, value_fn=value_fn)
  nnx.update(model, optax.apply_updates(params, updates))
  aux = objective.step_aux(new_opt_state)
  user_aux, state = aux if has_aux else (None, aux)
  if update_state:
    nnx.update(model, state)
  graph = getattr(optimizer, "graph", None)
  nnx.update(optimizer.opt_state, nnx.state(_without_aux(new_opt_state), graph=graph))
  optimizer.step[...] += 1
  loss = objective.step_loss(new_opt_state)
  return (loss, user_aux) if has_aux else loss
