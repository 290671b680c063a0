"""Forward-gradient estimators: gradients from forward calls only.

Both estimators are pure functions shaped like :func:`jax.value_and_grad`: they take the objective,
the parameters and a PRNG key and return ``(loss, grads)`` with ``grads`` shaped like ``params``.

Directions are drawn per leaf from the key and regenerated from it rather than stored: the ``m``
directions are visited one after another inside a :func:`jax.lax.fori_loop`, so a step holds one
direction and one gradient accumulator, never ``m`` copies of the parameters. The same key gives a
bit-identical result.

References:
  Baydin et al., "Gradients without Backpropagation", 2022 (the forward gradient).
  Spall, "Multivariate stochastic approximation using a simultaneous perturbation gradient
  approximation", 1992 (SPSA).
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024 (sign-m-SPSA, Def. 3).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

PyTree = Any
Sampler = Callable[[jax.Array, tuple, Any], jax.Array]

DISTRIBUTIONS = ("gaussian", "rademacher")


def _gaussian(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)


def _rademacher(key, shape, dtype):
  return jax.random.rademacher(key, shape, dtype)


_SAMPLERS = {"gaussian": _gaussian, "rademacher": _rademacher}


def get_sampler(distribution: Union[str, Sampler]) -> Sampler:
  """A ``sampler(key, shape, dtype) -> array`` for a distribution name, or the callable itself.

  Samplers must draw i.i.d. zero-mean, unit-variance entries for the estimators to be unbiased.
  """
  if callable(distribution):
    return distribution
  if distribution not in _SAMPLERS:
    raise ValueError(
        f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS} or a callable "
        "sampler(key, shape, dtype).")
  return _SAMPLERS[distribution]


def _check_num_directions(num_directions) -> int:
  if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
    raise ValueError(f"num_directions must be a positive Python int, got {num_directions!r}.")
  return num_directions


def check_float_leaves(tree: PyTree, name: str = "params", *,
                       empty: str = "there is nothing to perturb",
                       why: str = "forward gradients perturb floating-point leaves only",
                       fn: str = "value_fn") -> None:
  """Raises a ValueError naming the first non-float leaf of ``tree``, or an empty ``tree``."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not leaves:
    raise ValueError(f"{name} has no array leaves: {empty}.")
  for path, leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; {why}. Close "
          f"over integer state in {fn} instead of passing it in {name}.")


def _check_params(params: PyTree) -> None:
  check_float_leaves(params)


def sample_direction(key: jax.Array, params: PyTree, distribution: Union[str, Sampler] = "gaussian"):
  """One random direction shaped like ``params``, each leaf from ``fold_in(key, leaf_index)``.

  Args:
    key: PRNG key of this direction.
    params: pytree of float arrays (only shapes and dtypes are used).
    distribution: ``"gaussian"``, ``"rademacher"`` or a ``sampler(key, shape, dtype)``.

  Returns:
    A pytree like ``params``.
  """
  sampler = get_sampler(distribution)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  directions = [
      sampler(jax.random.fold_in(key, index), jnp.shape(leaf), jnp.result_type(leaf))
      for index, leaf in enumerate(leaves)
  ]
  return jax.tree_util.tree_unflatten(treedef, directions)


def direction_key(key: jax.Array, index) -> jax.Array:
  """The key of direction ``index`` within a step keyed by ``key``."""
  return jax.random.fold_in(key, index)


def _axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
  """``alpha * x + y`` leafwise, in each leaf's dtype."""
  return jax.tree_util.tree_map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def _zeros_like(params: PyTree) -> PyTree:
  return jax.tree_util.tree_map(jnp.zeros_like, params)


def _after(value: jax.Array, params: PyTree) -> PyTree:
  """``params`` unchanged, bit for bit, as values XLA can only compute once ``value`` is known.

  Used for ``w - εz``: it then waits for the forward call at ``w + εz`` to finish, so the two
  perturbed copies of the parameters are never alive together (one copy fewer at the peak of a
  step). Each leaf gets ``-0.0`` added, which leaves every float (zeros' signs included)
  unchanged; the ``-0.0`` is computed from ``value`` (``isfinite`` keeps it a zero for an infinite
  or NaN loss) and XLA does not fold ``x * 0`` for floats, so the dependency survives compilation.
  """
  value = value.astype(jnp.float32)
  negative_zero = -jnp.abs(jnp.where(jnp.isfinite(value), value * 0.0, 0.0))
  return jax.tree_util.tree_map(lambda leaf: leaf + negative_zero.astype(leaf.dtype), params)


def jvp_grad(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    num_directions: int = 1,
    distribution: Union[str, Sampler] = "gaussian",
):
  """Forward gradient with exact directional derivatives from :func:`jax.jvp`.

  .. math::

     g(w) = \\frac{1}{m} \\sum_{i=1}^{m} (\\nabla f(w) \\cdot z_i)\\, z_i,
     \\qquad z_i \\sim \\mathcal{N}(0, I) \\text{ or Rademacher}

  :math:`\\mathbb{E}[g] = \\nabla f(w)` because :math:`\\mathbb{E}[z z^T] = I`.

  Args:
    value_fn: scalar objective ``f(params)``.
    params: pytree of float arrays.
    key: PRNG key; direction ``i`` uses ``fold_in(key, i)``.
    num_directions: ``m``, a Python int.
    distribution: ``"gaussian"``, ``"rademacher"`` or a ``sampler(key, shape, dtype)``.

  Returns:
    ``(loss, grads)``: ``loss = f(params)`` (exact, from the JVP's primal output) and the estimate.

  Examples:
    >>> f = lambda p: jnp.sum(p["w"] ** 2)
    >>> loss, g = fwdgrad.jvp_grad(f, {"w": jnp.ones(3)}, jax.random.key(0), num_directions=4)
  """
  num_directions = _check_num_directions(num_directions)
  _check_params(params)
  sampler = get_sampler(distribution)

  def body(index, carry):
    _, grads = carry
    z = sample_direction(direction_key(key, index), params, sampler)
    loss, slope = jax.jvp(value_fn, (params,), (z,))
    return loss.astype(jnp.float32), _axpy(slope / num_directions, z, grads)

  init = (jnp.zeros((), jnp.float32), _zeros_like(params))
  return jax.lax.fori_loop(0, num_directions, body, init)


def spsa_grad(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    num_directions: int = 1,
    epsilon: float = 1e-3,
    distribution: Union[str, Sampler] = "gaussian",
    sign: bool = False,
):
  """SPSA (two forward calls per direction, central difference), or the paper's sign-m-SPSA.

  .. math::

     \\hat g(w) = \\frac{1}{m} \\sum_{i=1}^{m} c_i z_i, \\qquad
     c_i = \\frac{f(w + \\epsilon z_i) - f(w - \\epsilon z_i)}{2 \\epsilon}
     \\quad\\text{or, with } \\texttt{sign=True},\\quad
     c_i = \\mathrm{sign}(f(w + \\epsilon z_i) - f(w - \\epsilon z_i))

  With ``sign=True`` the estimate has the range of ``z`` (so a static 8-bit format holds it) and is
  invariant to the scale of the loss. On a quadratic the central difference equals the directional
  derivative exactly.

  Args:
    value_fn: scalar objective ``f(params)``; only ever called, never differentiated.
    params: pytree of float arrays.
    key: PRNG key; direction ``i`` uses ``fold_in(key, i)``.
    num_directions: ``m``, a Python int.
    epsilon: perturbation size ``ε``.
    distribution: ``"gaussian"``, ``"rademacher"`` or a ``sampler(key, shape, dtype)``.
    sign: keep only the sign of the loss difference (sign-m-SPSA).

  Returns:
    ``(loss, grads)`` where ``loss`` is the mean over directions of
    ``(f(w + εz) + f(w - εz)) / 2``, which equals ``f(w)`` up to ``O(ε²)``; no extra forward call
    is spent on the unperturbed loss.

  Examples:
    >>> loss, g = fwdgrad.spsa_grad(f, params, jax.random.key(0), num_directions=3, sign=True)
  """
  num_directions = _check_num_directions(num_directions)
  _check_params(params)
  sampler = get_sampler(distribution)

  def body(index, carry):
    loss_sum, grads = carry
    z = sample_direction(direction_key(key, index), params, sampler)
    loss_plus = value_fn(_axpy(epsilon, z, params))
    loss_minus = value_fn(_after(loss_plus, _axpy(-epsilon, z, params)))
    difference = (loss_plus - loss_minus).astype(jnp.float32)
    coefficient = jnp.sign(difference) if sign else difference / (2.0 * epsilon)
    loss_sum = loss_sum + 0.5 * (loss_plus + loss_minus).astype(jnp.float32)
    return loss_sum, _axpy(coefficient / num_directions, z, grads)

  init = (jnp.zeros((), jnp.float32), _zeros_like(params))
  loss_sum, grads = jax.lax.fori_loop(0, num_directions, body, init)
  return loss_sum / num_directions, grads
