"""Tests of fwdgrad.enhancements: momentum-guided sampling, sharpness-aware perturbation,
kernel-wise normalization, sparse update masks, binomial perturbations; and their use in qzo_ff."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fwdgrad import enhancements
from fwdgrad import estimators
from fwdgrad import qzo
from fwdgrad import transform


def _problem(seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {"w": 0.5 * jax.random.normal(keys[0], (6, 5)), "b": 0.1 * jax.random.normal(keys[1],
                                                                                         (5,))}
  target = {"w": jax.random.normal(keys[2], (6, 5)), "b": jax.random.normal(keys[3], (5,))}
  loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
  return params, loss


def _stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def test_warmup_gives_plain_random_directions():
  params, _ = _problem()
  key = jax.random.key(4)
  previous = jax.tree_util.tree_map(lambda p: jnp.ones((3,) + p.shape), params)
  config = enhancements.MomentumGuidedSampling(alpha=0.3, beta=0.2, warmup_steps=5)
  got = enhancements.momentum_guided_directions(key, previous, 4, params, num_directions=3,
                                                config=config)
  expected = _stack([estimators.sample_direction(estimators.direction_key(key, i), params)
                     for i in range(3)])
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)
  after = enhancements.momentum_guided_directions(key, previous, 5, params, num_directions=3,
                                                  config=config)
  assert not np.allclose(np.asarray(after["w"]), np.asarray(expected["w"]))


def test_beta_zero_follows_the_previous_direction():
  params, _ = _problem()
  previous = _stack([estimators.sample_direction(jax.random.key(i), params) for i in range(2)])
  config = enhancements.MomentumGuidedSampling(alpha=1.0, beta=0.0, warmup_steps=0)
  got = enhancements.momentum_guided_directions(jax.random.key(9), previous, 0, params,
                                                num_directions=2, config=config)
  chex.assert_trees_all_close(got, previous, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("unit_variance,variance", [(True, 1.0), (False, 1.0 / 3.0)])
def test_stationary_variance_and_correlation(unit_variance, variance):
  # Probabilistic: 50000 entries, tolerances are many standard errors wide.
  params = {"w": jnp.zeros(50000)}
  config = enhancements.MomentumGuidedSampling(alpha=0.5, beta=0.5, warmup_steps=0,
                                               unit_variance=unit_variance)
  z = {"w": jax.random.normal(jax.random.key(0), (1, 50000))}
  if not unit_variance:
    z = {"w": z["w"] * np.sqrt(variance)}
  for step in range(3):
    new = enhancements.momentum_guided_directions(jax.random.key(step + 1), z, step, params,
                                                  num_directions=1, config=config)
    correlation = np.corrcoef(np.asarray(new["w"][0]), np.asarray(z["w"][0]))[0, 1]
    z = new
  assert abs(float(jnp.var(z["w"])) - variance) < 0.03 * variance
  # corr(z_{t+1}, z_t) = (1 - β) sqrt(Var z_t) / sqrt(Var z_{t+1}) / c, c = 1 without unit_variance.
  expected = 0.5 / np.sqrt(0.5) if unit_variance else 0.5
  assert abs(correlation - expected) < 0.02


def test_enhanced_without_options_is_forward_gradient():
  params, loss = _problem()
  plain = transform.forward_gradient("spsa", key=3, num_directions=3, sign=True)
  enhanced = enhancements.enhanced_forward_gradient(key=3, num_directions=3, sign=True)
  plain_state, enhanced_state = plain.init(params), enhanced.init(params)
  for _ in range(2):
    expected, plain_state = plain.update(params, plain_state, params, value_fn=loss)
    got, enhanced_state = enhanced.update(params, enhanced_state, params, value_fn=loss)
    chex.assert_trees_all_close(got, expected, rtol=0, atol=0)
    params = optax.apply_updates(params, jax.tree_util.tree_map(lambda g: -1e-2 * g, got))


def test_momentum_in_the_transform_keeps_and_follows_directions():
  params, loss = _problem()
  config = enhancements.MomentumGuidedSampling(alpha=1.0, beta=0.0, warmup_steps=1)
  tx = enhancements.enhanced_forward_gradient(key=1, num_directions=2, momentum=config)
  plain = transform.forward_gradient("spsa", key=1, num_directions=2, sign=True)
  state = tx.init(params)
  first, state = tx.update(params, state, params, value_fn=loss)
  # The warm-up step is plain random sampling: the same estimate as forward_gradient.
  chex.assert_trees_all_close(first, plain.update(params, plain.init(params), params,
                                                  value_fn=loss)[0], rtol=1e-6, atol=1e-6)
  kept = state.previous_directions
  assert kept["w"].shape == (2, 6, 5)
  _, state = tx.update(params, state, params, value_fn=loss)
  chex.assert_trees_all_close(state.previous_directions, kept, rtol=1e-6, atol=1e-6)  # β = 0


def test_qzo_momentum_keeps_int8_directions_and_warms_up_like_plain_qzo():
  params, loss = _problem()
  config = enhancements.MomentumGuidedSampling(alpha=1.0, beta=0.0, warmup_steps=1)
  tx, plain = qzo.qzo_ff(1e-2, key=3, momentum=config), qzo.qzo_ff(1e-2, key=3)
  state, plain_state = tx.init(params), plain.init(params)
  updates, state = tx.update(params, state, params, value_fn=loss)
  plain_updates, plain_state = plain.update(params, plain_state, params, value_fn=loss)
  chex.assert_trees_all_equal(  # warm-up: plain random directions, the same integers
      qzo.qzo_integer_weights(optax.apply_updates(params, updates), state),
      qzo.qzo_integer_weights(optax.apply_updates(params, plain_updates), plain_state))
  kept = state.previous_directions
  assert kept["w"].shape == (3, 6, 5) and kept["w"].dtype == jnp.int8
  params = optax.apply_updates(params, updates)
  _, state = tx.update(params, state, params, value_fn=loss)
  chex.assert_trees_all_equal(state.previous_directions, kept)  # β = 0, α = 1: z_{t+1} = z_t


def test_sharpness_aware_point_ascends_by_the_radius():
  params, loss = _problem()
  for seed in range(4):
    point, side = enhancements.sharpness_aware_point(loss, params, jax.random.key(seed), 0.1)
    step = jax.tree_util.tree_map(lambda a, b: a - b, point, params)
    np.testing.assert_allclose(float(optax.tree.norm(step)), 0.1, rtol=1e-4)
    other = jax.tree_util.tree_map(lambda p, s: p - s, params, step)
    assert float(loss(point)) >= float(loss(other))
    assert int(side) in (-1, 1)


def test_sharpness_aware_estimate_is_taken_at_the_ascended_point():
  params, loss = _problem()
  tx = enhancements.enhanced_forward_gradient(key=2, num_directions=3, sharpness_radius=0.2)
  got, state = tx.update(params, tx.init(params), params, value_fn=loss)
  step_key = jax.random.fold_in(transform.as_key(2), 0)
  point, _ = enhancements.sharpness_aware_point(loss, params,
                                                estimators.direction_key(step_key, 3), 0.2)
  expected_loss, expected = estimators.spsa_grad(loss, point, step_key, num_directions=3,
                                                 sign=True)
  chex.assert_trees_all_close(got, expected, rtol=0, atol=0)
  np.testing.assert_allclose(float(state.loss), float(expected_loss), rtol=1e-6)
  assert float(state.loss) > float(loss(params))  # evaluated at the higher-loss neighbour


def _linear_loss(seed=0):
  params, _ = _problem(seed)
  coefficients = jax.tree_util.tree_map(
      lambda p: jnp.cos(jnp.arange(p.size) + 1.0).reshape(p.shape), params)
  return params, lambda p: sum(jnp.sum(c * p[k]) for k, c in coefficients.items())


def test_sharpness_aware_update_is_applied_at_w():
  # On a linear loss the sign estimate does not depend on where it is taken, so a SAM step that
  # is applied at w (not at w̃) equals the plain step.
  params, loss = _linear_loss()
  plain = optax.chain(enhancements.enhanced_forward_gradient(key=5), optax.sgd(1e-2))
  sam = optax.chain(enhancements.enhanced_forward_gradient(key=5, sharpness_radius=0.5),
                    optax.sgd(1e-2))
  expected, _ = plain.update(params, plain.init(params), params, value_fn=loss)
  got, _ = sam.update(params, sam.init(params), params, value_fn=loss)
  chex.assert_trees_all_close(got, expected, rtol=0, atol=0)
  plain_q, sam_q = qzo.qzo_ff(1e-2, key=5), qzo.qzo_ff(1e-2, key=5, sharpness_radius=0.5)
  plain_state, sam_state = plain_q.init(params), sam_q.init(params)
  expected, plain_state = plain_q.update(params, plain_state, params, value_fn=loss)
  got, sam_state = sam_q.update(params, sam_state, params, value_fn=loss)
  chex.assert_trees_all_equal(
      qzo.qzo_integer_weights(optax.apply_updates(params, got), sam_state),
      qzo.qzo_integer_weights(optax.apply_updates(params, expected), plain_state))
  # ... while the reported loss (taken around w̃) differs from the plain one.
  assert float(sam_state.loss) != float(plain_state.loss)


def test_qzo_sharpness_aware_evaluates_at_a_higher_loss():
  params, loss = _problem()
  plain_state = qzo.qzo_ff(1e-3, key=1).init(params)
  _, plain_state = qzo.qzo_ff(1e-3, key=1).update(params, plain_state, params, value_fn=loss)
  sam = qzo.qzo_ff(1e-3, key=1, sharpness_radius=0.3)
  _, sam_state = sam.update(params, sam.init(params), params, value_fn=loss)
  assert float(sam_state.loss) > float(plain_state.loss) + 0.01


def test_kernelwise_normalization_gives_each_leaf_the_weight_norm():
  params, loss = _problem()
  tx = optax.chain(transform.forward_gradient("spsa", key=0, num_directions=1, sign=True),
                   enhancements.kernelwise_normalize())
  got, _ = tx.update(params, tx.init(params), params, value_fn=loss)
  step_key = jax.random.fold_in(transform.as_key(0), 0)
  z = estimators.sample_direction(estimators.direction_key(step_key, 0), params)
  plus = jax.tree_util.tree_map(lambda p, d: p + 1e-3 * d, params, z)
  minus = jax.tree_util.tree_map(lambda p, d: p - 1e-3 * d, params, z)
  sign = jnp.sign(loss(plus) - loss(minus))
  for k in params:  # ĝ(w^i) = sign(ΔL) z^i / ‖z^i‖ ‖w^i‖
    expected = sign * z[k] / jnp.linalg.norm(z[k]) * jnp.linalg.norm(params[k])
    chex.assert_trees_all_close(got[k], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(jnp.linalg.norm(got[k])),
                               float(jnp.linalg.norm(params[k])), rtol=1e-5)
  zero, _ = enhancements.kernelwise_normalize().update({"w": jnp.zeros(3)}, optax.EmptyState(),
                                                       {"w": jnp.ones(3)})
  chex.assert_trees_all_close(zero, {"w": jnp.zeros(3)}, atol=0)


def test_qzo_kernelwise_step_has_norm_eta_times_weight_norm():
  params, loss = _problem()
  tx = qzo.qzo_ff(1e-2, key=0, kernelwise=True)
  # Δ_w from twice the weights, so that no step is clipped at the edge of the range.
  state = tx.init(jax.tree_util.tree_map(lambda p: 2.0 * p, params))
  w_q = qzo.integer_weights(params, state.weight_scale, 16)
  snapped = jax.tree_util.tree_map(lambda q, s: q.astype(jnp.float32) * s, w_q, state.weight_scale)
  updates, _ = tx.update(snapped, state, snapped, value_fn=loss)
  for k in params:  # ‖Δw^i‖ = η ‖w^i‖, up to the rounding of each integer step
    np.testing.assert_allclose(float(jnp.linalg.norm(updates[k])),
                               1e-2 * float(jnp.linalg.norm(snapped[k])), rtol=0.01)


def test_sparse_update_masks():
  params, _ = _problem()
  top = enhancements.sparse_update_mask(params, "topk", density=0.2)
  for k in params:
    chosen, magnitude = np.asarray(top[k]), np.abs(np.asarray(params[k]))
    assert chosen.sum() == int(np.ceil(0.2 * chosen.size))
    assert magnitude[chosen].min() >= magnitude[~chosen].max()
  random_a = enhancements.sparse_update_mask(params, "random", density=0.5, key=jax.random.key(0))
  random_b = enhancements.sparse_update_mask(params, "random", density=0.5, key=jax.random.key(1))
  assert int(random_a["w"].sum()) == 15 and int(random_a["b"].sum()) == 3
  assert not np.array_equal(np.asarray(random_a["w"]), np.asarray(random_b["w"]))
  threshold = enhancements.sparse_update_mask(params, "threshold", threshold=0.3)
  np.testing.assert_array_equal(np.asarray(threshold["w"]), np.abs(np.asarray(params["w"])) >= 0.3)


@pytest.mark.parametrize("use_qzo", [True, False])
def test_masked_update_freezes_exactly_the_masked_entries(use_qzo):
  params, loss = _problem()
  mask = enhancements.sparse_update_mask(params, "topk", density=0.3)
  if use_qzo:
    tx = optax.chain(qzo.qzo_ff(3e-2, key=0), enhancements.masked_update(mask))
    snap = qzo.qzo_ff(3e-2, key=0)
    params = optax.apply_updates(params, snap.update(params, snap.init(params), params,
                                                     value_fn=lambda p: jnp.zeros(()))[0])
  else:
    tx = optax.chain(enhancements.enhanced_forward_gradient(key=0), optax.adam(1e-2),
                     enhancements.masked_update("topk", density=0.3))
  state = tx.init(params)
  start = params
  step = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss))
  for _ in range(5):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  for k in params:
    frozen = ~np.asarray(mask[k])
    np.testing.assert_array_equal(np.asarray(params[k])[frozen], np.asarray(start[k])[frozen])
    assert np.any(np.asarray(params[k])[~frozen] != np.asarray(start[k])[~frozen])
  if use_qzo:  # frozen and trained entries both stay on the 16-bit grid
    scale = state[0].weight_scale
    for k in params:
      scaled = np.asarray(params[k], np.float64) / np.asarray(scale[k], np.float64)
      np.testing.assert_allclose(scaled, np.round(scaled), rtol=0, atol=4e-3)


def test_binomial_sampler():
  one = enhancements.binomial_sampler(1)(jax.random.key(0), (1000,), jnp.float32)
  assert set(np.unique(np.asarray(one))) == {-1.0, 1.0}
  # Probabilistic: 200000 draws; mean and variance within many standard errors.
  four = enhancements.binomial_sampler(4)(jax.random.key(1), (200000,), jnp.float32)
  assert set(np.unique(np.asarray(four))) == {-2.0, -1.0, 0.0, 1.0, 2.0}
  assert abs(float(four.mean())) < 0.02 and abs(float(four.var()) - 1.0) < 0.02
  params, loss = _problem()
  tx = transform.forward_gradient("spsa", key=0, sign=True,
                                  distribution=enhancements.binomial_sampler(3))
  grads, _ = tx.update(params, tx.init(params), params, value_fn=loss)
  assert np.isfinite(np.asarray(grads["w"])).all()


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="MomentumGuidedSampling"):
    enhancements.enhanced_forward_gradient(key=0, momentum=(0.5, 0.5))
  with pytest.raises(ValueError, match="alpha and beta"):
    enhancements.check_momentum(enhancements.MomentumGuidedSampling(alpha=1.5))
  with pytest.raises(ValueError, match="alpha=0"):
    enhancements.check_momentum(enhancements.MomentumGuidedSampling(alpha=0.0))
  with pytest.raises(ValueError, match="sharpness_radius"):
    enhancements.enhanced_forward_gradient(key=0, sharpness_radius=-1.0)
  with pytest.raises(ValueError, match="unknown criterion"):
    enhancements.masked_update("largest")
  with pytest.raises(ValueError, match="needs key"):
    enhancements.sparse_update_mask({"w": jnp.ones(3)}, "random")
  with pytest.raises(ValueError, match="needs threshold"):
    enhancements.sparse_update_mask({"w": jnp.ones(3)}, "threshold")
  with pytest.raises(ValueError, match="trials"):
    enhancements.binomial_sampler(0)
  with pytest.raises(ValueError, match="needs params"):
    enhancements.kernelwise_normalize().update({"w": jnp.ones(3)}, optax.EmptyState())
