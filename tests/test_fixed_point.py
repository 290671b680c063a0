"""Tests of fwdgrad.fixed_point: exact integer rescaling and the fixed_point_weights transform."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fwdgrad import fixed_point


@pytest.mark.parametrize("shift", [0, 1, 7, 15, 16, 17, 20, 26, 31])
def test_multiply_shift_matches_int64_rounding(shift):
  rng = np.random.default_rng(shift)
  multiplier = rng.integers(0, 2 ** 15, 2000)
  bound = 2 ** 31 - 2 ** 16 if shift >= 16 else 2 ** 15
  x = rng.integers(-bound, bound, 2000)
  expected = np.floor_divide(x.astype(np.int64) * multiplier + ((1 << shift) >> 1), 1 << shift)
  got = fixed_point.multiply_shift(jnp.asarray(x, jnp.int32), jnp.asarray(multiplier, jnp.int32),
                                   shift)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_multiply_shift_per_element_shift_and_jit():
  x = jnp.array([1000, -1000, 123456, -7], jnp.int32)
  multiplier = jnp.array([3, 5, 28898, 16384], jnp.int32)
  shift = jnp.array([1, 2, 20, 14], jnp.int32)
  expected = np.floor_divide(np.asarray(x, np.int64) * np.asarray(multiplier)
                             + (1 << np.asarray(shift) >> 1), 1 << np.asarray(shift))
  np.testing.assert_array_equal(np.asarray(jax.jit(fixed_point.multiply_shift)(x, multiplier,
                                                                               shift)), expected)


def test_stochastic_multiply_shift_is_unbiased():
  # 3 * 5 / 8 = 1.875: rounds up with probability 0.875. Probabilistic: 20000 draws, 6 sigma.
  x = jnp.full((20000,), 3, jnp.int32)
  got = fixed_point.multiply_shift(x, 5, 3, rounding="stochastic", key=jax.random.key(0))
  assert set(np.unique(np.asarray(got))) <= {1, 2}
  assert abs(float(jnp.mean(got)) - 1.875) < 6 * np.sqrt(0.875 * 0.125 / 20000)


def test_fixed_point_multiplier_precision():
  for ratio in [3.5 / 127, 1.0, 0.5, 1e-3, 7.3, 1 / 36]:
    multiplier, shift = fixed_point.fixed_point_multiplier(ratio)
    assert 2 ** 14 <= multiplier < 2 ** 15
    assert abs(multiplier / 2 ** shift - ratio) / ratio < 2 ** -14
  ratios = jnp.array([3.5 / 127, 1.0, 1e-3, 7.3, 2.0 ** -5], jnp.float32)
  multiplier, shift = fixed_point.fixed_point_multiplier_array(ratios)
  approx = np.asarray(multiplier) / 2.0 ** np.asarray(shift)
  np.testing.assert_allclose(approx, np.asarray(ratios), rtol=2 ** -14)
  assert fixed_point.fixed_point_multiplier(3.5 / 127) == (28898, 20)


def test_fixed_point_multiplier_array_edge_cases():
  multiplier, shift = fixed_point.fixed_point_multiplier_array(jnp.array([0.0, -1.0, 1e-12]))
  np.testing.assert_array_equal(np.asarray(multiplier), [0, 0, 0])
  assert int(shift.max()) <= 31
  with pytest.raises(ValueError, match="positive finite"):
    fixed_point.fixed_point_multiplier(0.0)


def test_round_divide_rounds_half_away_from_zero():
  x = jnp.array([-7, -6, -5, -4, -1, 0, 1, 4, 5, 6, 7], jnp.int32)
  np.testing.assert_array_equal(np.asarray(fixed_point.round_divide(x, 2)),
                                [-4, -3, -3, -2, -1, 0, 1, 2, 3, 3, 4])
  np.testing.assert_array_equal(np.asarray(fixed_point.round_divide(x, 3)),
                                [-2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2])
  with pytest.raises(ValueError, match="divisor"):
    fixed_point.round_divide(x, 0)


def _quadratic_problem():
  params = {"w": jax.random.normal(jax.random.key(1), (6, 4)), "b": jnp.linspace(-0.5, 0.5, 4)}
  target = jax.tree_util.tree_map(lambda p: 0.7 * p + 0.05, params)
  loss = lambda p: sum(jnp.sum((a - t) ** 2) for a, t in zip(jax.tree_util.tree_leaves(p),
                                                              jax.tree_util.tree_leaves(target)))
  return params, loss


def _assert_on_grid(params, scales, bits):
  for p, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(scales)):
    k = np.round(np.asarray(p) / np.asarray(s))
    assert np.all(np.abs(k) <= 2 ** (bits - 1) - 1)
    # apply_updates adds in float32: on the grid to one ulp, and the integer is exact.
    np.testing.assert_allclose(np.asarray(p), k * np.asarray(s), rtol=0, atol=2e-7 * np.abs(
        np.asarray(p)).max())
    np.testing.assert_allclose(np.asarray(p) / np.asarray(s), k, rtol=0, atol=1e-3)


@pytest.mark.parametrize("rounding,axis", [("nearest", None), ("stochastic", None),
                                           ("nearest", -1)])
def test_adam_steps_stay_on_the_grid(rounding, axis):
  params, loss = _quadratic_problem()
  tx = optax.chain(optax.adam(3e-2),
                   fixed_point.fixed_point_weights(8, rounding=rounding, key=0, axis=axis))
  state = tx.init(params)
  scales = state[1].scale
  if axis is not None:
    assert scales["w"].shape == (1, 4) and scales["b"].shape == ()
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  initial = loss(params)
  for _ in range(40):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    _assert_on_grid(params, scales, 8)
  assert loss(params) < 0.2 * initial
  chex.assert_trees_all_close(state[1].scale, scales, rtol=0, atol=0)  # the scale never changes


def test_nearest_loses_small_updates_and_stochastic_keeps_them_on_average():
  params = {"w": jnp.linspace(-1.0, 1.0, 4001)}
  tiny = {"w": jnp.full((4001,), 0.25 / 127)}          # a quarter of Δ = 1/127
  nearest = fixed_point.fixed_point_weights(8)
  state = nearest.init(params)
  snapped = optax.apply_updates(params, nearest.update({"w": jnp.zeros(4001)}, state, params)[0])
  updates, _ = nearest.update(tiny, state, snapped)
  chex.assert_trees_all_close(updates, {"w": jnp.zeros(4001)}, atol=1e-7)
  stochastic = fixed_point.fixed_point_weights(8, rounding="stochastic", key=jax.random.key(3))
  updates, _ = stochastic.update(tiny, stochastic.init(params), snapped)
  # Probabilistic: each entry moves one step with probability 1/4; mean 0.25 Δ within 6 sigma.
  steps = np.asarray(updates["w"]) * 127
  assert np.all(np.isclose(steps, 0, atol=1e-3) | np.isclose(steps, 1, atol=1e-3))
  assert abs(steps.mean() - 0.25) < 6 * np.sqrt(0.25 * 0.75 / 4001)


def test_clips_to_the_range():
  params = {"w": jnp.array([-1.0, 0.6, 1.0])}
  tx = fixed_point.fixed_point_weights(4)
  state = tx.init(params)
  updates, _ = tx.update({"w": jnp.array([-5.0, 0.0, 5.0])}, state, params)
  chex.assert_trees_all_close(optax.apply_updates(params, updates)["w"],
                              jnp.array([-1.0, 4 / 7, 1.0]), atol=1e-6)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="PRNG key"):
    fixed_point.fixed_point_weights(8, rounding="stochastic")
  with pytest.raises(ValueError, match="unknown rounding"):
    fixed_point.fixed_point_weights(8, rounding="up")
  with pytest.raises(ValueError, match="static"):
    fixed_point.fixed_point_weights(8, scale_method="static")
  tx = fixed_point.fixed_point_weights(8)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))
