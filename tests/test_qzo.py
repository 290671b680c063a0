"""Tests of fwdgrad.qzo: integer QZO-FF against a float-with-rounding reference in numpy."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from fwdgrad import estimators
from fwdgrad import qzo
from fwdgrad import transform


def _problem(seed, shapes):
  keys = jax.random.split(jax.random.key(seed), 2 * len(shapes))
  params = {f"p{i}": 0.3 * jax.random.normal(keys[i], shape) for i, shape in enumerate(shapes)}
  targets = {f"p{i}": 0.3 * jax.random.normal(keys[len(shapes) + i], shape)
             for i, shape in enumerate(shapes)}
  loss_jax = lambda p: sum(jnp.sum((p[k] - targets[k]) ** 2) for k in p)
  loss_np = lambda p: sum(np.sum((p[k] - np.asarray(targets[k], np.float64)) ** 2) for k in p)
  return params, loss_jax, loss_np


def _reference_step(params, state, loss_np, *, learning_rate, num_directions, distribution,
                    weight_bits=16, z_max=3.5, axis=None, check_scale=True):
  """One QZO-FF step written out with numpy floats and explicit rounding (the paper's equations)."""
  levels = 2 ** (weight_bits - 1) - 1
  delta_z = z_max / 127
  one_q = round(1 / delta_z)
  multiplier_z, shift_z = qzo.perturbation_format(8, z_max)[4:]
  assert abs(multiplier_z / 2 ** shift_z - delta_z) / delta_z < 2 ** -14
  names = sorted(params)
  w = {k: np.asarray(params[k], np.float64) for k in names}
  scale = {k: np.asarray(state.weight_scale[k], np.float64) for k in names}
  for k in names if check_scale else ():  # Δ_w comes from the params at init
    if axis is None or w[k].ndim < 2:
      expected_scale = np.abs(np.asarray(params[k], np.float32)).max() / np.float32(levels)
    else:
      reduce = tuple(a for a in range(w[k].ndim) if a != axis % w[k].ndim)
      expected_scale = (np.abs(np.asarray(params[k], np.float32)).max(axis=reduce, keepdims=True)
                        / np.float32(levels))
    np.testing.assert_allclose(scale[k], expected_scale, rtol=1e-6)
  w_q = {k: np.clip(np.round(w[k] / scale[k]), -levels, levels) for k in names}
  eps_q = {k: np.clip(np.round(1e-3 / scale[k]), 0, levels) for k in names}
  for k in names:
    np.testing.assert_array_equal(np.asarray(state.epsilon_q[k]), eps_q[k])

  def requant(acc):  # (acc · M + 2^(k-1)) >> k, exact in float64 for these magnitudes
    return np.clip(np.floor((acc * multiplier_z + 2.0 ** (shift_z - 1)) / 2.0 ** shift_z),
                   -levels, levels)

  step_key = jax.random.fold_in(state.key, state.count)
  total = {k: np.zeros_like(w[k]) for k in names}
  for i in range(num_directions):
    z = estimators.sample_direction(estimators.direction_key(step_key, i), params,
                                    "rademacher" if distribution == "binomial" else distribution)
    if distribution == "gaussian":
      z_q = {k: np.clip(np.round(np.asarray(z[k], np.float64) / delta_z), -127, 127) for k in names}
    else:
      z_q = {k: np.asarray(z[k], np.float64) * one_q for k in names}
    w_plus = {k: requant(w_q[k] * one_q + eps_q[k] * z_q[k]) for k in names}
    w_minus = {k: requant(w_q[k] * one_q - eps_q[k] * z_q[k]) for k in names}
    difference = (loss_np({k: scale[k] * w_plus[k] for k in names})
                  - loss_np({k: scale[k] * w_minus[k] for k in names}))
    for k in names:
      total[k] += np.sign(difference) * z_q[k]
  m = num_directions
  g_q = {k: np.sign(total[k]) * np.floor((np.abs(total[k]) + m // 2) / m) for k in names}
  ratio = {k: learning_rate * delta_z / scale[k] for k in names}
  multiplier, shift = qzo.update_multiplier(learning_rate, state.weight_scale,
                                            qzo.perturbation_format(8, z_max))
  new_w_q = {}
  for k in names:
    mult, sh = np.asarray(multiplier[k], np.float64), np.asarray(shift[k], np.float64)
    np.testing.assert_allclose(mult / 2.0 ** sh, ratio[k], rtol=2 ** -14)
    step = np.floor((g_q[k] * mult + 2.0 ** (sh - 1)) / 2.0 ** sh)
    assert np.all(np.abs(step - ratio[k] * g_q[k]) <= 0.5 + 1e-3 * np.abs(ratio[k] * g_q[k]) + 1e-9)
    new_w_q[k] = np.clip(w_q[k] - step, -levels, levels)
  return new_w_q, g_q


@pytest.mark.parametrize("seed,shapes,num_directions,distribution,learning_rate,axis", [
    (0, [(7, 5), (5,)], 3, "gaussian", 1e-3, None),
    (1, [(4, 3, 2)], 1, "gaussian", 3e-2, None),
    (2, [(6,), (3, 3)], 2, "rademacher", 1e-2, None),
    (3, [(8, 4), (4,)], 4, "binomial", 5e-4, None),
    (4, [(5, 6), (6,)], 3, "gaussian", 1e-2, -1),
])
def test_integers_match_float_reference(seed, shapes, num_directions, distribution, learning_rate,
                                        axis):
  params, loss_jax, loss_np = _problem(seed, shapes)
  tx = qzo.qzo_ff(learning_rate, key=seed, num_directions=num_directions,
                  distribution=distribution, axis=axis)
  state = tx.init(params)
  update = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss_jax))
  for step in range(2):  # the second step starts on the grid
    expected_w_q, _ = _reference_step(params, state, loss_np, learning_rate=learning_rate,
                                      num_directions=num_directions, distribution=distribution,
                                      axis=axis, check_scale=step == 0)
    updates, state = update(params, state)
    params = optax.apply_updates(params, updates)
    w_q = qzo.qzo_integer_weights(params, state, 16)
    for k in params:
      assert w_q[k].dtype == jnp.int16
      np.testing.assert_array_equal(np.asarray(w_q[k]), expected_w_q[k])
      on_grid = np.asarray(state.weight_scale[k], np.float64) * expected_w_q[k]
      np.testing.assert_allclose(np.asarray(params[k]), on_grid, rtol=1e-6, atol=0)


def test_arrays_are_real_integers():
  fmt = qzo.perturbation_format(8, 3.5)
  assert fmt.one == 36 and abs(fmt.scale - 0.02756) < 1e-5
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  scale = {"w": jnp.asarray(1.0 / 32767)}
  w_q = qzo.integer_weights(params, scale, 16)
  z_q = qzo.sample_quantized_direction(jax.random.key(0), params, fmt)
  assert w_q["w"].dtype == jnp.int16 and z_q["w"].dtype == jnp.int8
  assert int(jnp.abs(z_q["w"].astype(jnp.int32)).max()) <= 127
  perturbed = qzo.requantized_perturbation(w_q["w"], 33, z_q["w"], fmt, 16)
  assert perturbed.dtype == jnp.int16
  rademacher = qzo.sample_quantized_direction(jax.random.key(0), params, fmt, "rademacher")
  np.testing.assert_array_equal(np.abs(np.asarray(rademacher["w"])), 36)


def test_requantization_keeps_the_weight_scale():
  w_q = jnp.arange(-32767, 32768, 97, dtype=jnp.int16)
  zero = jnp.zeros_like(w_q, jnp.int8)
  # Δ_z = 1/36 exactly (z_max = 127/36): w_q · 1_q requantizes to w_q itself.
  exact = qzo.perturbation_format(8, 127 / 36)
  np.testing.assert_array_equal(np.asarray(qzo.requantized_perturbation(w_q, 0, zero, exact, 16)),
                                np.asarray(w_q))
  # The paper's z_max = 3.5: 1_q Δ_z = 36 · 3.5/127 = 0.992, the weights shrink by that factor.
  paper = qzo.perturbation_format(8, 3.5)
  got = np.asarray(qzo.requantized_perturbation(w_q, 0, zero, paper, 16), np.float64)
  # Within one step: the 15-bit M_z is Δ_z to 2^-15, and |w_q 1_q Δ_z| reaches 32508.
  np.testing.assert_allclose(got, np.asarray(w_q, np.float64) * 36 * 3.5 / 127, atol=1.0)


def test_weights_never_leave_the_grid_and_clip_at_the_range():
  params, loss_jax, _ = _problem(5, [(10, 3), (3,)])
  tx = qzo.qzo_ff(0.5, key=1, rounding="stochastic")   # a huge rate: weights hit the range
  state = tx.init(params)
  update = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss_jax))
  hit_range = False
  for _ in range(20):
    updates, state = update(params, state)
    params = optax.apply_updates(params, updates)
    for k in params:
      scaled = np.asarray(params[k], np.float64) / np.asarray(state.weight_scale[k], np.float64)
      # float32 apply_updates: one ulp of a 16-bit integer is up to 0.002 of a step.
      np.testing.assert_allclose(scaled, np.round(scaled), rtol=0, atol=4e-3)
      assert np.abs(np.round(scaled)).max() <= 32767
      hit_range |= np.abs(np.round(scaled)).max() == 32767
  assert hit_range


@functools.lru_cache(maxsize=1)
def _digits_problem():
  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x[:1000] / 16.0, jnp.float32), jnp.asarray(y[:1000])
  loss_fn = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      x @ p["w"] + p["b"], y))
  params = {"w": 0.1 * jax.random.normal(jax.random.key(0), (64, 10)), "b": jnp.zeros(10)}
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  for _ in range(30):  # A partially trained start: forward gradients need a good initialization.
    updates, opt_state = optimizer.update(jax.grad(loss_fn)(params), opt_state)
    params = optax.apply_updates(params, updates)
  return params, loss_fn


def _train(tx, params, loss_fn, steps):
  state = tx.init(params)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(params, state, params, value_fn=loss_fn)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, state), None, length=steps)[0]

  return run(params, state)


@pytest.mark.slow
def test_16w8a_reduces_the_loss_on_digits_and_tracks_float_sign_spsa():
  params, loss_fn = _digits_problem()
  initial = float(loss_fn(params))
  trained, state = _train(qzo.qzo_ff(3e-3, key=0), params, loss_fn, 300)
  final = float(loss_fn(trained))
  assert final < 0.9 * initial, (initial, final)
  # The same directions in float (sign-m-SPSA + SGD) end within 1% of the integer run.
  float_tx = optax.chain(transform.forward_gradient("spsa", key=0, num_directions=3, sign=True),
                         optax.sgd(3e-3))
  float_final = float(loss_fn(_train(float_tx, params, loss_fn, 300)[0]))
  assert abs(final - float_final) < 0.01 * initial, (final, float_final)


@pytest.mark.slow
def test_8w8a_does_not_train_epsilon_and_update_round_to_zero():
  params, loss_fn = _digits_problem()
  tx = qzo.qzo_ff(3e-3, key=0, weight_bits=8)
  state = tx.init(params)
  # max|w| = 0.59: Δ_w = 0.59/127 = 4.6e-3 > 2ε, so ε_q = round(1e-3 / Δ_w) = 0.
  chex.assert_trees_all_equal(state.epsilon_q, {"w": jnp.int32(0), "b": jnp.int32(0)})
  snapped = optax.apply_updates(params, tx.update(params, state, params, value_fn=loss_fn)[0])
  trained, state = _train(tx, snapped, loss_fn, 50)
  chex.assert_trees_all_close(trained, snapped, rtol=0, atol=0)
  # With a usable ε (ε_q >= 1) a small rate still rounds every 8-bit update to zero
  # (η Δ_z |g_q| / Δ_w < 1/2), while the same rate moves 16-bit weights (Δ_w 258 times finer).
  trained, state = _train(qzo.qzo_ff(1e-4, key=0, weight_bits=8, epsilon=5e-3), snapped, loss_fn,
                          20)
  assert int(state.epsilon_q["w"]) >= 1
  chex.assert_trees_all_close(trained, snapped, rtol=0, atol=0)
  trained16, _ = _train(qzo.qzo_ff(1e-4, key=0, weight_bits=16, epsilon=5e-3), snapped, loss_fn,
                        20)
  assert not np.array_equal(np.asarray(trained16["w"]), np.asarray(snapped["w"]))


@pytest.mark.slow
def test_stochastic_rounding_trains_where_nearest_rounds_to_zero():
  params, loss_fn = _digits_problem()
  tx = qzo.qzo_ff(2e-6, key=0)                   # η Δ_z / Δ_w ≈ 3e-3: every nearest step is 0
  snapped = optax.apply_updates(params, tx.update(params, tx.init(params), params,
                                                  value_fn=loss_fn)[0])
  nearest, _ = _train(tx, snapped, loss_fn, 20)
  chex.assert_trees_all_close(nearest, snapped, rtol=0, atol=0)
  stochastic, _ = _train(qzo.qzo_ff(2e-6, key=0, rounding="stochastic"), snapped, loss_fn, 20)
  assert not np.array_equal(np.asarray(stochastic["w"]), np.asarray(snapped["w"]))


def test_schedule_jit_and_chain():
  params, loss_jax, _ = _problem(6, [(4, 4)])
  schedule = optax.linear_schedule(1e-2, 0.0, 10)
  tx = optax.chain(qzo.qzo_ff(schedule, key=0))
  state = jax.jit(tx.init)(params)
  updates, state = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss_jax))(params, state)
  params = optax.apply_updates(params, updates)
  assert int(state[0].count) == 1 and np.isfinite(float(state[0].loss))
  # Same key, same integers, with or without jit (the floats may differ by an ulp).
  jitted, jit_state = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss_jax))(params, state)
  eager, eager_state = tx.update(params, state, params, value_fn=loss_jax)
  chex.assert_trees_all_equal(
      qzo.qzo_integer_weights(optax.apply_updates(params, jitted), jit_state[0]),
      qzo.qzo_integer_weights(optax.apply_updates(params, eager), eager_state[0]))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="weight_bits"):
    qzo.qzo_ff(1e-3, key=0, weight_bits=32)
  with pytest.raises(ValueError, match="unknown distribution"):
    qzo.qzo_ff(1e-3, key=0, distribution="uniform")
  with pytest.raises(ValueError, match="overflow"):
    qzo.qzo_ff(1e-3, key=0, weight_bits=16, perturbation_bits=16, z_max=0.5)
  with pytest.raises(ValueError, match="z_max"):
    qzo.qzo_ff(1e-3, key=0, z_max=-1.0)
  with pytest.raises(ValueError, match="static"):
    qzo.qzo_ff(1e-3, key=0, scale_method="static")
  tx = qzo.qzo_ff(1e-3, key=0)
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="QZOState"):
    qzo.qzo_integer_weights(params, optax.EmptyState())
