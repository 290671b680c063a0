"""Training at inference memory: SPSA steps that perturb and update the parameters in place.

:func:`fwdgrad.spsa_grad` returns a gradient pytree, so a step built on it holds the parameters, the
estimate and a perturbed copy at once. The fused step never forms a gradient: like MeZO it walks
the parameters along each direction and back, and the direction is regenerated from its key every
time it is needed instead of being stored,

.. math::

   w \\leftarrow w + \\epsilon z_i,\\; L_i^+ = f(w),\\quad
   w \\leftarrow w - 2\\epsilon z_i,\\; L_i^- = f(w),\\quad
   w \\leftarrow w + \\epsilon z_i,\\qquad
   c_i = \\frac{L_i^+ - L_i^-}{2\\epsilon} \\text{ or } \\mathrm{sign}(L_i^+ - L_i^-),

and once every direction has been probed at the same point,

.. math::

   w \\leftarrow w - \\frac{\\eta}{m} \\sum_{i=1}^{m} c_i z_i,

applied one direction at a time. This is :func:`fwdgrad.spsa_grad` followed by SGD with the same
key, direction for direction. Under :func:`jax.jit` with the parameters donated every assignment
above is an in-place update of the donated buffers, so the step's footprint is the parameters, the
activations of one forward call and the scratch of generating ``z``. With the default sampler
(``"irwin_hall"``, or ``"fast_gaussian"`` / ``"fast_rademacher"``; see
:func:`fwdgrad.estimators.counter_bits`) XLA generates ``z`` inside the walk itself and that scratch
is nothing: an MLP 784-512-512-10 at batch 32 trains at 1.001x (m = 1) and 1.006x (m = 3) the
memory of inference (``benchmarks/run.py``). JAX's threefry (``"gaussian"``) keeps about four times
the largest leaf on CPU (two ``uint32`` arrays of the output's size in a rolled loop);
``block_size`` bounds that by generating and applying ``z`` in blocks (:func:`blockwise_sampler`).

Floating point: :math:`(w + \\epsilon z) - 2\\epsilon z + \\epsilon z` is not exactly :math:`w`; each
walk leaves a rounding error of a few units in the last place per element, and :math:`L^-` is
evaluated at a point that differs from :math:`w - \\epsilon z` by as much. Restoring exactly would
need a copy of :math:`w`, which is the memory this step exists to save; MeZO makes the same trade.
The error is deterministic (the same key gives a bit-identical step), orders of magnitude below the
update :math:`\\eta c z`, and does not grow with training beyond a random walk of ulps. The last
direction's way back and its update are one assignment, :math:`w \\leftarrow w + (\\epsilon -
\\eta c_m / m) z_m`, which saves one regeneration.

References:
  Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO), NeurIPS 2023.
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024 (sign-m-SPSA, Def. 3 and 4).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from fwdgrad import estimators

PyTree = Any


def blockwise_sampler(distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
                      block_size: int = 65536) -> estimators.Sampler:
  """A sampler that draws a leaf in flat blocks of ``block_size`` elements, one key per block.

  .. math::

     z[jB : (j+1)B] = \\mathrm{sampler}(\\mathrm{fold\\_in}(key, j), (B,)),

  the last block as long as what is left. The law is the same as the wrapped sampler's (i.i.d.
  entries); the values differ. On CPU JAX generates threefry bits in a rolled loop whose state is
  two ``uint32`` arrays the size of the output plus their copies, about four times the leaf: for
  a model whose largest leaf holds most of its parameters, that scratch, not the parameters,
  decides the memory of a training step. Drawing in blocks bounds it by four blocks, and
  :func:`fused_spsa_step` with ``block_size=B`` walks the parameters block by block with exactly
  these values, so ``spsa_grad(..., distribution=blockwise_sampler(d, B))`` is its reference.

  Args:
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.
    block_size: elements per block, a positive Python int.

  Returns:
    A ``sampler(key, shape, dtype)`` usable wherever a ``distribution`` is accepted.

  Examples:
    >>> sampler = blockwise_sampler("rademacher", 1 << 16)
    >>> loss, grads = fwdgrad.spsa_grad(f, params, key, distribution=sampler)
  """
  sampler = estimators.get_sampler(distribution)
  block_size = _check_block_size(block_size)

  def sample(key, shape, dtype):
    size = math.prod(shape)
    full, tail = divmod(size, block_size)
    parts = []
    if full:
      blocks = jax.lax.map(
          lambda j: sampler(jax.random.fold_in(key, j), (block_size,), dtype),
          jnp.arange(full, dtype=jnp.uint32))
      parts.append(blocks.reshape(-1))
    if tail:
      parts.append(sampler(jax.random.fold_in(key, full), (tail,), dtype))
    return jnp.concatenate(parts).reshape(shape)

  return sample


def packed_rademacher(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Rademacher (±1) entries, 32 of them from each random ``uint32`` word.

  A sampler (``distribution=packed_rademacher`` wherever one is accepted). On CPU drawing the
  random bits dominates the time of an SPSA step; ``jax.random.rademacher`` and
  ``jax.random.normal`` spend a 32-bit word on every entry, this one a bit: element ``k`` is bit
  ``k mod 32`` of word ``k // 32``. The entries are i.i.d., zero-mean and of unit variance, so
  the estimators stay unbiased; the values differ from ``"rademacher"``'s.

  Args:
    key: PRNG key.
    shape: output shape.
    dtype: float dtype of the output.

  Returns:
    An array of ``shape`` with entries in ``{-1, +1}``.
  """
  size = math.prod(shape)
  words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
  signs = bits.reshape(-1)[:size].astype(dtype) * 2 - 1
  return signs.reshape(shape)


def _check_block_size(block_size):
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive Python int or None, got {block_size!r}.")
  return block_size


def _walk_leaf(leaf, key, alpha, sampler, block_size):
  """``leaf + alpha * z``; with ``block_size``, block by block in place (see blockwise_sampler)."""
  if block_size is None:
    return (leaf + alpha * sampler(key, leaf.shape, leaf.dtype)).astype(leaf.dtype)
  flat = leaf.reshape(-1)
  full, tail = divmod(flat.size, block_size)

  def body(j, flat):
    start = j * block_size
    block = jax.lax.dynamic_slice(flat, (start,), (block_size,))
    z = sampler(jax.random.fold_in(key, j.astype(jnp.uint32)), (block_size,), leaf.dtype)
    return jax.lax.dynamic_update_slice(flat, (block + alpha * z).astype(leaf.dtype), (start,))

  if full:
    flat = jax.lax.fori_loop(0, full, body, flat)
  if tail:
    start = full * block_size
    z = sampler(jax.random.fold_in(key, full), (tail,), leaf.dtype)
    flat = flat.at[start:].set((flat[start:] + alpha * z).astype(leaf.dtype))
  return flat.reshape(leaf.shape)


def _walk(leaves, key, alpha, sampler, block_size, after):
  """``leaf + alpha * z_leaf`` for every leaf, ``z`` regenerated from the key once ``after`` is."""
  key = estimators.fresh_key(key, after)
  return [
      _walk_leaf(leaf, jax.random.fold_in(key, index), alpha, sampler, block_size)
      for index, leaf in enumerate(leaves)
  ]


def fused_spsa_step(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    learning_rate: Union[float, jax.Array],
    num_directions: int = 1,
    epsilon: float = 1e-3,
    distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
    sign: bool = False,
    block_size: Optional[int] = None,
):
  """One SGD step on the SPSA (or sign-m-SPSA) estimate, without a gradient pytree.

  Equal, up to floating-point rounding (see the module docstring), to::

    loss, grads = fwdgrad.spsa_grad(loss_fn, params, key, num_directions=num_directions,
                                    epsilon=epsilon, distribution=distribution, sign=sign)
    params = jax.tree.map(lambda w, g: w - learning_rate * g, params, grads)

  Args:
    loss_fn: scalar float objective ``f(params)``; called ``2 m`` times, never differentiated;
      a pure, deterministic function of the params (same batch and dropout key in every call).
    params: pytree of float arrays. Donate it (``jax.jit(..., donate_argnums=...)``, or use
      :func:`make_fused_train_step`) so the updates happen in place.
    key: PRNG key of this step; direction ``i`` is ``fold_in(key, i)`` as in
      :func:`fwdgrad.estimators.direction_key`.
    learning_rate: ``η``, a float or a traced scalar (a schedule's value).
    num_directions: ``m``, a Python int.
    epsilon: perturbation size ``ε``.
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.
    sign: sign-m-SPSA, ``c_i = sign(L+ - L-)``.
    block_size: ``None`` draws each leaf's direction whole, as :func:`fwdgrad.spsa_grad` does with
      ``distribution``. An int walks every leaf in flat blocks of that many elements, in place,
      with the directions of :func:`blockwise_sampler` ``(distribution, block_size)``: the step
      then needs scratch for a block instead of about four times the largest leaf (see there).

  Returns:
    ``(params, loss)``: the updated parameters and the mean over directions of
    ``(L+ + L-) / 2``, the loss :func:`fwdgrad.spsa_grad` reports.

  Examples:
    >>> step = jax.jit(functools.partial(fused_spsa_step, loss_fn, learning_rate=1e-2,
    ...                                  num_directions=3, sign=True), donate_argnums=0)
    >>> for t in range(3):
    ...   params, loss = step(params, jax.random.fold_in(key, t))
  """
  num_directions = estimators._check_num_directions(num_directions)
  estimators._check_params(params)
  sampler = estimators.get_sampler(distribution)
  if block_size is not None:
    _check_block_size(block_size)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  value = lambda leaves: loss_fn(jax.tree_util.tree_unflatten(treedef, leaves))
  step_size = jnp.asarray(learning_rate, jnp.float32) / num_directions

  # The two forward calls of a direction are one call in a loop of two, so that each is compiled
  # apart (see fwdgrad.estimators.call_apart: inlined, XLA merges their constants and Conv4 at
  # m = 1 took 1.31x its two forwards, against 1.01x). A frozen backbone is the exception: inline,
  # XLA computes it once for all 2m calls.
  apart = estimators.frozen_share(value, leaves) < estimators.INLINE_FROZEN_SHARE

  def probe(index, leaves, after):
    """Losses at ``w ± εz_index``; returns the leaves moved to ``w - εz_index``."""
    direction = estimators.direction_key(key, index)
    if apart:
      def half(j, carry):
        leaves, losses = carry
        alpha = jnp.where(j == 0, epsilon, -2.0 * epsilon).astype(jnp.float32)
        leaves = _walk(leaves, direction, alpha, sampler, block_size, losses + after)
        return leaves, losses.at[j].set(jnp.asarray(value(leaves), jnp.float32))

      leaves, losses = jax.lax.fori_loop(0, 2, half, (leaves, jnp.zeros((2,), jnp.float32)))
      loss_plus, loss_minus = losses[0], losses[1]
    else:
      leaves = _walk(leaves, direction, epsilon, sampler, block_size, after)
      loss_plus = value(leaves)
      leaves = _walk(leaves, direction, -2.0 * epsilon, sampler, block_size, loss_plus)
      loss_minus = value(leaves)
    difference = (loss_plus - loss_minus).astype(jnp.float32)
    coefficient = jnp.sign(difference) if sign else difference / (2.0 * epsilon)
    mean_loss = 0.5 * (loss_plus + loss_minus).astype(jnp.float32)
    return leaves, coefficient, mean_loss, loss_minus

  def probe_and_restore(index, carry):
    leaves, coefficients, loss_sum = carry
    leaves, coefficient, mean_loss, loss_minus = probe(index, leaves, loss_sum)
    leaves = _walk(leaves, estimators.direction_key(key, index), epsilon, sampler, block_size,
                   loss_minus)
    return leaves, coefficients.at[index].set(coefficient), loss_sum + mean_loss

  last = num_directions - 1
  coefficients = jnp.zeros((num_directions,), jnp.float32)
  leaves, coefficients, loss_sum = estimators.direction_loop(
      last, probe_and_restore, (leaves, coefficients, jnp.zeros((), jnp.float32)))
  leaves, coefficient, mean_loss, loss_minus = probe(last, leaves, loss_sum)
  # The last direction's way back and its update in one walk.
  leaves = _walk(leaves, estimators.direction_key(key, last), epsilon - step_size * coefficient,
                 sampler, block_size, loss_minus)

  def update(index, leaves):
    return _walk(leaves, estimators.direction_key(key, index), -step_size * coefficients[index],
                 sampler, block_size, coefficient)

  leaves = estimators.direction_loop(last, update, leaves)
  return jax.tree_util.tree_unflatten(treedef, leaves), (loss_sum + mean_loss) / num_directions


def make_fused_train_step(
    loss_fn: Callable[..., jax.Array],
    *,
    learning_rate: Union[float, Callable[[jax.Array], jax.Array]],
    num_directions: int = 1,
    epsilon: float = 1e-3,
    distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
    sign: bool = False,
    block_size: Optional[int] = None,
):
  """A jitted ``step(params, key, step_index, *batch) -> (params, loss)`` that donates ``params``.

  The step key is ``fold_in(key, step_index)``, the schedule of :func:`fwdgrad.forward_gradient`,
  so a run with the optax transform and SGD and a run with this step see the same directions.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> scalar``, a pure, deterministic function of the
      params (the same batch and dropout key in every call).
    learning_rate: ``η`` or a schedule ``step_index -> η`` (an optax schedule).
    num_directions: ``m``, a Python int.
    epsilon: perturbation size ``ε``.
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.
    sign: sign-m-SPSA.
    block_size: see :func:`fused_spsa_step`.

  Returns:
    The jitted step. Its ``params`` argument is donated: do not use the array passed in after the
    call, use the returned one.

  Examples:
    >>> step = make_fused_train_step(loss_fn, learning_rate=1e-2, num_directions=3, sign=True)
    >>> batches = [(x, y)] * 3
    >>> for t, (x, y) in enumerate(batches):
    ...   params, loss = step(params, key, t, x, y)
  """
  estimators._check_num_directions(num_directions)
  estimators.get_sampler(distribution)
  if block_size is not None:
    _check_block_size(block_size)

  def step(params, key, step_index, *batch):
    rate = learning_rate(step_index) if callable(learning_rate) else learning_rate
    return fused_spsa_step(lambda p: loss_fn(p, *batch), params,
                           jax.random.fold_in(key, step_index), learning_rate=rate,
                           num_directions=num_directions, epsilon=epsilon,
                           distribution=distribution, sign=sign, block_size=block_size)

  return jax.jit(step, donate_argnums=0)
