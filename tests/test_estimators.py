"""Tests of the forward-gradient estimators in fwdgrad/estimators.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad
from fwdgrad import estimators


def _params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"dense": {"kernel": jax.random.normal(k1, (5, 3)), "bias": jax.random.normal(k2, (3,))},
          "scale": jax.random.normal(k3, ())}


def _loss(p):
  x = jnp.linspace(-1.0, 1.0, 10).reshape(2, 5)
  h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["scale"]
  return jnp.sum(h ** 2) + 0.1 * jnp.sum(p["dense"]["kernel"] ** 4)


def _quadratic_problem():
  a = jax.random.normal(jax.random.key(3), (6, 6))
  hessian = a @ a.T + jnp.eye(6)
  b = jnp.arange(6.0)
  loss = lambda p: 0.5 * p["w"] @ hessian @ p["w"] - b @ p["w"] + jnp.sum(p["v"] ** 2)
  return loss, {"w": jnp.ones(6), "v": jnp.full((2, 2), 0.5)}


@pytest.mark.parametrize("distribution", estimators.DISTRIBUTIONS)
def test_jvp_single_direction_is_directional_derivative_times_direction(distribution):
  params, key = _params(), jax.random.key(7)
  loss, grads = fwdgrad.jvp_grad(_loss, params, key, distribution=distribution)
  z = fwdgrad.sample_direction(estimators.direction_key(key, 0), params, distribution)
  true_grad = jax.grad(_loss)(params)
  slope = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(true_grad), jax.tree.leaves(z)))
  chex.assert_trees_all_close(grads, jax.tree.map(lambda v: slope * v, z), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, _loss(params), rtol=1e-6)


def test_directions_are_regenerated_per_leaf_from_the_key():
  params = _params()
  z = fwdgrad.sample_direction(jax.random.key(1), params)
  leaves = jax.tree.leaves(z)
  # Different leaves get different streams, and the draw is a pure function of the key.
  assert not np.allclose(leaves[0][:3], leaves[1][:3])
  chex.assert_trees_all_equal(z, fwdgrad.sample_direction(jax.random.key(1), params))
  radem = fwdgrad.sample_direction(jax.random.key(1), params, "rademacher")
  assert set(np.unique(np.concatenate([np.ravel(l) for l in jax.tree.leaves(radem)]))) == {-1, 1}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["jvp", "spsa"])
def test_mean_of_many_directions_approaches_the_gradient(estimator):
  """Probabilistic: the mean of N single-direction estimates is within 5 standard errors."""
  params = _params()
  true_grad = jax.flatten_util.ravel_pytree(jax.grad(_loss)(params))[0]
  num = 4000

  def one(key):
    if estimator == "jvp":
      g = fwdgrad.jvp_grad(_loss, params, key)[1]
    else:
      g = fwdgrad.spsa_grad(_loss, params, key, epsilon=1e-3)[1]
    return jax.flatten_util.ravel_pytree(g)[0]

  samples = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(11), num))
  mean = samples.mean(0)
  stderr = samples.std(0) / np.sqrt(num)
  assert np.all(np.abs(mean - true_grad) <= 5 * stderr + 1e-3), (mean, true_grad, stderr)


def test_num_directions_averages_the_single_direction_estimates():
  params, key = _params(), jax.random.key(5)
  _, grads = fwdgrad.jvp_grad(_loss, params, key, num_directions=4)
  singles = []
  for i in range(4):
    z = fwdgrad.sample_direction(estimators.direction_key(key, i), params)
    slope = jax.jvp(_loss, (params,), (z,))[1]
    singles.append(jax.tree.map(lambda v: slope * v / 4, z))
  expected = jax.tree.map(lambda *xs: sum(xs), *singles)
  chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_central_spsa_equals_jvp_on_a_quadratic(distribution):
  loss, params = _quadratic_problem()
  key = jax.random.key(2)
  # On a quadratic the central difference is exact, whatever the step.
  _, spsa = fwdgrad.spsa_grad(loss, params, key, num_directions=3, epsilon=0.5,
                              distribution=distribution)
  _, jvp = fwdgrad.jvp_grad(loss, params, key, num_directions=3, distribution=distribution)
  chex.assert_trees_all_close(spsa, jvp, rtol=1e-4, atol=1e-4)


def test_spsa_loss_is_the_mean_of_the_perturbed_losses():
  loss, params = _quadratic_problem()
  key, eps = jax.random.key(4), 0.1
  value, _ = fwdgrad.spsa_grad(loss, params, key, num_directions=2, epsilon=eps)
  expected = 0.0
  for i in range(2):
    z = fwdgrad.sample_direction(estimators.direction_key(key, i), params)
    plus = loss(jax.tree.map(lambda p, v: p + eps * v, params, z))
    minus = loss(jax.tree.map(lambda p, v: p - eps * v, params, z))
    expected += 0.25 * (plus + minus)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_sign_spsa_values_are_in_the_range_of_z():
  params, key = _params(), jax.random.key(9)
  _, grads = fwdgrad.spsa_grad(_loss, params, key, num_directions=1, sign=True)
  z = fwdgrad.sample_direction(estimators.direction_key(key, 0), params)
  # One direction: the estimate is exactly +z or -z (never scaled by the loss).
  flat_g = jax.flatten_util.ravel_pytree(grads)[0]
  flat_z = jax.flatten_util.ravel_pytree(z)[0]
  assert np.allclose(flat_g, flat_z) or np.allclose(flat_g, -flat_z)
  _, grads3 = fwdgrad.spsa_grad(_loss, params, key, num_directions=3, sign=True,
                                distribution="rademacher")
  values = np.unique(np.asarray(jax.flatten_util.ravel_pytree(grads3)[0]))
  assert set(np.round(values * 3).astype(int)) <= {-3, -1, 1, 3}


def test_sign_spsa_is_invariant_to_the_scale_of_the_loss():
  params, key = _params(), jax.random.key(3)
  g1 = fwdgrad.spsa_grad(_loss, params, key, num_directions=3, sign=True)[1]
  g2 = fwdgrad.spsa_grad(lambda p: 1e4 * _loss(p), params, key, num_directions=3, sign=True)[1]
  chex.assert_trees_all_equal(g1, g2)


@pytest.mark.parametrize("estimator", ["jvp", "spsa"])
def test_same_key_is_bit_identical_and_other_key_differs(estimator):
  params = _params()
  fn = fwdgrad.jvp_grad if estimator == "jvp" else fwdgrad.spsa_grad
  a = fn(_loss, params, jax.random.key(1), num_directions=3)
  b = fn(_loss, params, jax.random.key(1), num_directions=3)
  c = fn(_loss, params, jax.random.key(2), num_directions=3)
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(jax.jit(lambda p: fn(_loss, p, jax.random.key(1), num_directions=3))
                              (params), jax.jit(lambda p: fn(_loss, p, jax.random.key(1),
                                                             num_directions=3))(params))
  assert not np.allclose(a[1]["dense"]["kernel"], c[1]["dense"]["kernel"])


def test_directions_are_not_all_held_at_once():
  """The m directions are visited in a loop: compiled temp memory does not grow with m."""
  params = {"w": jnp.ones((256, 256))}
  loss = lambda p: jnp.sum(jnp.tanh(p["w"]) ** 2)

  def temp_bytes(m):
    fn = jax.jit(lambda p, k: fwdgrad.spsa_grad(loss, p, k, num_directions=m))
    return fn.lower(params, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes

  # Up to 8 directions are unrolled, more run in a loop: compare loops of 9 and 16 iterations.
  assert temp_bytes(16) <= temp_bytes(9) + 4096
  assert temp_bytes(16) < 8 * 256 * 256 * 4  # Under half of what 16 directions would take.
  # Unrolled, each call builds its perturbed point inside: no parameter-sized copy at all (in a
  # loop, XLA copies the loop-invariant parameters that go into the call once).
  assert temp_bytes(3) < 256 * 256 * 4 // 4


def test_custom_sampler_and_bfloat16_params():
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  ones = lambda key, shape, dtype: jnp.ones(shape, dtype)
  loss, grads = fwdgrad.jvp_grad(lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2), params,
                                 jax.random.key(0), distribution=ones)
  assert grads["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grads["w"], np.float32), 6.0)


def test_bad_arguments_are_clear_errors():
  params = _params()
  with pytest.raises(ValueError, match="num_directions"):
    fwdgrad.spsa_grad(_loss, params, jax.random.key(0), num_directions=0)
  with pytest.raises(ValueError, match="distribution"):
    fwdgrad.jvp_grad(_loss, params, jax.random.key(0), distribution="cauchy")
  with pytest.raises(ValueError, match="floating-point"):
    fwdgrad.jvp_grad(lambda p: 0.0, {"steps": jnp.array(3)}, jax.random.key(0))
  with pytest.raises(ValueError, match="nothing to perturb"):
    fwdgrad.spsa_grad(lambda p: 0.0, {}, jax.random.key(0))


@pytest.mark.parametrize("distribution", ["fast_gaussian", "fast_rademacher", "irwin_hall"])
def test_counter_samplers_are_zero_mean_unit_variance_and_independent(distribution):
  sampler = estimators.get_sampler(distribution)
  n = 400_000
  z = np.asarray(sampler(jax.random.key(0), (n,), jnp.float32), np.float64)
  # Five standard errors: the mean's is 1/sqrt(n), the variance's sqrt((kurtosis - 1) / n).
  assert abs(z.mean()) < 5 / np.sqrt(n)
  assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
  # Neighbouring elements, other keys (fold_in of one key, as for leaves and directions) and a
  # reshaped draw of the same key are uncorrelated / consistent.
  assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 / np.sqrt(n)
  other = np.asarray(sampler(jax.random.fold_in(jax.random.key(0), 1), (n,), jnp.float32))
  assert abs(np.corrcoef(z, other)[0, 1]) < 5 / np.sqrt(n)
  np.testing.assert_array_equal(
      np.asarray(sampler(jax.random.key(0), (n // 400, 400), jnp.float32)).ravel(), z)


def test_counter_sampler_shapes_of_their_laws():
  key = jax.random.key(5)
  n = 400_000
  gauss = np.asarray(estimators.get_sampler("fast_gaussian")(key, (n,), jnp.float32))
  # Tail and kurtosis of N(0, 1): P(|z| > 2) = 0.0455; E z^4 = 3.
  assert abs(np.mean(np.abs(gauss) > 2) - 0.0455) < 0.002
  assert abs(np.mean(gauss.astype(np.float64) ** 4) - 3) < 0.1
  hall = np.asarray(estimators.get_sampler("irwin_hall")(key, (n,), jnp.float32))
  assert np.abs(hall).max() <= 510 / np.sqrt(4 * (256**2 - 1) / 12) + 1e-6  # 3.45
  assert abs(np.mean(hall.astype(np.float64) ** 4) - 2.7) < 0.1
  signs = np.asarray(estimators.get_sampler("fast_rademacher")(key, (1000,), jnp.bfloat16))
  assert set(np.unique(signs.astype(np.float32))) == {-1.0, 1.0}


def test_counter_bits_are_uniform_bytes():
  bits = np.asarray(estimators.counter_bits(jax.random.key(2), (256 * 1024,)))
  for shift in (0, 8, 16, 24):
    counts = np.bincount((bits >> shift) & 255, minlength=256)
    chi2 = np.sum((counts - 1024.0) ** 2 / 1024.0)
    assert chi2 < 400  # 255 degrees of freedom: mean 255, std 22.6.
  # Raw uint32 keys work too, and give the same words as the typed key with the same data.
  raw = jax.random.key_data(jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(estimators.counter_bits(raw, (10,))), bits[:10])
