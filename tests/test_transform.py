"""Tests of the optax transform in fwdgrad/transform.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fwdgrad


def _problem():
  target = jnp.array([1.0, -2.0, 0.5, 3.0])
  loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum(p["b"] ** 2)
  return loss, {"w": jnp.zeros(4), "b": jnp.ones(2)}


@pytest.mark.parametrize("estimator,sign", [("jvp", False), ("spsa", False), ("spsa", True)])
@pytest.mark.parametrize("optimizer", [optax.sgd(0.05), optax.adam(0.05)])
def test_composes_in_a_chain_under_jit_and_converges(estimator, sign, optimizer):
  loss, params = _problem()
  tx = optax.chain(fwdgrad.forward_gradient(estimator, key=jax.random.key(0), num_directions=3,
                                            sign=sign), optimizer)
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(params, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  initial = loss(params)
  for _ in range(300):
    params, state = step(params, state)
  assert loss(params) < 0.05 * initial
  assert int(state[0].count) == 300


def test_update_returns_the_estimator_output_for_the_step_key():
  loss, params = _problem()
  key = jax.random.key(3)
  tx = fwdgrad.forward_gradient("spsa", key=key, num_directions=2, epsilon=1e-2)
  state = tx.init(params)
  _, state = tx.update(params, state, params, value_fn=loss)  # step 0
  updates, new_state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params,
                                 value_fn=loss)  # step 1
  expected_loss, expected = fwdgrad.spsa_grad(loss, params, jax.random.fold_in(key, 1),
                                              num_directions=2, epsilon=1e-2)
  chex.assert_trees_all_equal(updates, expected)
  np.testing.assert_allclose(new_state.loss, expected_loss)
  assert int(new_state.count) == 2


def test_incoming_updates_are_ignored():
  loss, params = _problem()
  tx = fwdgrad.forward_gradient("jvp", key=0)
  state = tx.init(params)
  a, _ = tx.update(params, state, params, value_fn=loss)
  b, _ = tx.update(jax.tree.map(lambda x: x + 100.0, params), state, params, value_fn=loss)
  chex.assert_trees_all_equal(a, b)


def test_same_key_same_trajectory():
  loss, params = _problem()

  def run():
    tx = optax.chain(fwdgrad.forward_gradient(key=jax.random.key(1)), optax.sgd(0.1))
    p, s = params, tx.init(params)
    for _ in range(5):
      u, s = tx.update(p, s, p, value_fn=loss)
      p = optax.apply_updates(p, u)
    return p

  chex.assert_trees_all_equal(run(), run())


def test_int_seed_and_raw_key_are_accepted():
  loss, params = _problem()
  for key in (0, jax.random.PRNGKey(0), jax.random.key(0)):
    tx = fwdgrad.forward_gradient(key=key)
    tx.update(params, tx.init(params), params, value_fn=loss)


def test_missing_params_or_value_fn_says_how_to_pass_them():
  loss, params = _problem()
  tx = optax.chain(fwdgrad.forward_gradient(key=0), optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match="value_fn=loss_fn"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state, value_fn=loss)


def test_bad_configuration_is_a_clear_error():
  with pytest.raises(ValueError, match="estimator"):
    fwdgrad.forward_gradient("backprop", key=0)
  with pytest.raises(ValueError, match="sign-m-SPSA"):
    fwdgrad.forward_gradient("jvp", key=0, sign=True)
  with pytest.raises(ValueError, match="num_directions"):
    fwdgrad.forward_gradient(key=0, num_directions=-1)
  with pytest.raises(ValueError, match="distribution"):
    fwdgrad.forward_gradient(key=0, distribution="uniform")
  with pytest.raises(ValueError, match="PRNG key"):
    fwdgrad.forward_gradient(key=jnp.zeros(3))
