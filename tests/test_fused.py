"""Tests for fwdgrad.fused: the in-place SPSA step, block-wise and packed samplers."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from fwdgrad import estimators
from fwdgrad import fused
from fwdgrad import profiling
from problems import dense_problem
from fwdgrad import transform


def _problem():
  return dense_problem((96, 64))


def _reference(loss_fn, params, key, learning_rate, **kwargs):
  loss, grads = estimators.spsa_grad(loss_fn, params, key, **kwargs)
  return jax.tree_util.tree_map(lambda w, g: w - learning_rate * g, params, grads), loss


@pytest.mark.parametrize("num_directions,sign,distribution", [
    (1, False, "gaussian"), (3, False, "gaussian"), (3, True, "rademacher")])
def test_fused_step_equals_spsa_grad_and_sgd(num_directions, sign, distribution):
  params, x, y, loss_fn = _problem()
  value_fn = lambda p: loss_fn(p, x, y)
  key = jax.random.key(7)
  kwargs = dict(num_directions=num_directions, distribution=distribution, sign=sign,
                epsilon=1e-3)
  expected, expected_loss = jax.jit(lambda p: _reference(value_fn, p, key, 0.05, **kwargs))(
      params)
  got, loss = jax.jit(lambda p: fused.fused_spsa_step(value_fn, p, key, learning_rate=0.05,
                                                      **kwargs))(params)
  # The walk w + εz - 2εz differs from w - εz by a few ulps, and the central difference divides
  # that by 2ε; the update itself is ~1e-2, so this tolerance still tells a wrong direction apart.
  chex.assert_trees_all_close(got, expected, atol=2e-5, rtol=0)
  chex.assert_trees_all_close(loss, expected_loss, atol=1e-5, rtol=0)
  moved = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), got, params)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3


def test_block_walk_equals_spsa_grad_with_blockwise_sampler():
  # 1000 does not divide the 200 x 96 kernel: the last block is shorter; the biases are shorter
  # than one block.
  block_size = 1000
  params, x, y, loss_fn = _problem()
  value_fn = lambda p: loss_fn(p, x, y)
  key = jax.random.key(3)
  sampler = fused.blockwise_sampler("gaussian", block_size)
  expected, _ = jax.jit(lambda p: _reference(value_fn, p, key, 0.05, num_directions=2,
                                             distribution=sampler))(params)
  got, _ = jax.jit(lambda p: fused.fused_spsa_step(
      value_fn, p, key, learning_rate=0.05, num_directions=2, distribution="gaussian",
      block_size=block_size))(params)
  chex.assert_trees_all_close(got, expected, atol=2e-5, rtol=0)


def test_blockwise_sampler_layout():
  key = jax.random.key(0)
  sampler = fused.blockwise_sampler("gaussian", 100)
  z = sampler(key, (3, 70), jnp.float32)
  assert z.shape == (3, 70) and z.dtype == jnp.float32
  flat = z.reshape(-1)
  chex.assert_trees_all_close(flat[:100], jax.random.normal(jax.random.fold_in(key, 0), (100,)),
                              atol=0, rtol=0)
  chex.assert_trees_all_close(flat[200:], jax.random.normal(jax.random.fold_in(key, 2), (10,)),
                              atol=0, rtol=0)
  small = sampler(key, (5,), jnp.bfloat16)
  assert small.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="block_size"):
    fused.blockwise_sampler("gaussian", 0)


def test_packed_rademacher_values_and_moments():
  z = fused.packed_rademacher(jax.random.key(0), (300, 301), jnp.float32)
  assert z.shape == (300, 301) and z.dtype == jnp.float32
  assert set(jnp.unique(z).tolist()) == {-1.0, 1.0}
  # Probabilistic: 90,300 fair signs; the mean has standard error 0.0033, the bound is 5 of them.
  assert abs(float(z.mean())) < 0.017
  # Neighbouring bits of one word must not be correlated.
  assert abs(float(jnp.mean(z.reshape(-1)[:-1] * z.reshape(-1)[1:]))) < 0.017
  other = fused.packed_rademacher(jax.random.key(1), (300, 301), jnp.float32)
  assert float(jnp.mean(z == other)) < 0.6


def test_same_key_is_bit_identical_and_keys_matter():
  params, x, y, loss_fn = _problem()
  step = jax.jit(lambda p, k: fused.fused_spsa_step(lambda q: loss_fn(q, x, y), p, k,
                                                    learning_rate=0.1, num_directions=3))
  first, _ = step(params, jax.random.key(1))
  again, _ = step(params, jax.random.key(1))
  other, _ = step(params, jax.random.key(2))
  chex.assert_trees_all_equal(first, again)
  assert not jnp.array_equal(first["Dense_0"]["kernel"], other["Dense_0"]["kernel"])


def test_make_fused_train_step_matches_optax_transform_over_steps():
  params, x, y, loss_fn = _problem()
  key = jax.random.key(11)
  tx = optax.chain(transform.forward_gradient("spsa", key=key, num_directions=2, sign=True),
                   optax.sgd(0.02))
  state = tx.init(params)
  expected = params

  @jax.jit
  def optax_step(p, state):
    updates, state = tx.update(p, state, p, value_fn=lambda q: loss_fn(q, x, y))
    return optax.apply_updates(p, updates), state

  step = fused.make_fused_train_step(loss_fn, learning_rate=0.02, num_directions=2, sign=True)
  got = jax.tree_util.tree_map(jnp.copy, params)
  for t in range(3):
    expected, state = optax_step(expected, state)
    got, loss = step(got, key, t, x, y)
  chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=0)
  assert jnp.isfinite(loss)


def test_schedule_and_convergence():
  target = jnp.linspace(-1.0, 1.0, 20)
  loss_fn = lambda p: jnp.sum((p["w"] - target) ** 2)
  step = fused.make_fused_train_step(lambda p: loss_fn(p), num_directions=3,
                                     learning_rate=optax.constant_schedule(0.02))
  params = {"w": jnp.zeros(20)}
  start = float(loss_fn(params))
  for t in range(200):
    params, _ = step(params, jax.random.key(0), t)
  assert float(loss_fn(params)) < 0.05 * start


class _Wide(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(nn.relu(nn.Dense(512)(x)))


def test_fused_step_runs_at_inference_memory():
  # XLA's buffer assignment is deterministic for a program, so this is not a timing test. The
  # model is big enough that its parameters dominate the footprint of inference.
  model = _Wide()
  x = jax.random.normal(jax.random.key(1), (16, 200))
  y = jnp.arange(16) % 5
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()
  key = jax.random.key(0)
  inference = profiling.step_memory(loss_fn, params, x, y)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Donated buffers that a small program cannot reuse.
    in_place = profiling.step_memory(
        lambda p, k: fused.fused_spsa_step(lambda q: loss_fn(q, x, y), p, k, learning_rate=0.1,
                                           num_directions=3, block_size=1024),
        params, key, donate_argnums=0)
    with_gradient = profiling.step_memory(
        lambda p, k: _reference(lambda q: loss_fn(q, x, y), p, k, 0.1, num_directions=3),
        params, key, donate_argnums=0)
  assert profiling.memory_ratio(in_place, inference) <= 1.2
  assert profiling.memory_ratio(with_gradient, inference) <= 2.2


def test_bad_arguments_raise():
  params, x, y, loss_fn = _problem()
  value_fn = lambda p: loss_fn(p, x, y)
  with pytest.raises(ValueError, match="num_directions"):
    fused.fused_spsa_step(value_fn, params, jax.random.key(0), learning_rate=0.1,
                          num_directions=0)
  with pytest.raises(ValueError, match="block_size"):
    fused.fused_spsa_step(value_fn, params, jax.random.key(0), learning_rate=0.1, block_size=-1)
  with pytest.raises(ValueError, match="distribution"):
    fused.make_fused_train_step(loss_fn, learning_rate=0.1, distribution="cauchy")
  with pytest.raises(ValueError, match="dtype"):
    fused.fused_spsa_step(lambda p: jnp.sum(p), jnp.arange(3), jax.random.key(0),
                          learning_rate=0.1)
