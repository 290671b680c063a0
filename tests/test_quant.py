"""Tests of the fixed-point primitives in fwdgrad/quant.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad
from fwdgrad import quant


def _data(shape=(4, 8), seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype) * 2.0


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("scale_method", ["max", "mse", "pow2"])
def test_values_lie_on_the_grid(bits, scale_method):
  x = _data()
  scale = quant.compute_scale(x, bits, scale_method=scale_method)
  y = fwdgrad.fake_quant(x, bits, scale_method=scale_method)
  k = np.asarray(y / scale)
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)
  assert np.abs(k).max() <= quant.qmax(bits) + 1e-3


def test_max_scale_matches_the_paper_definition():
  x = jnp.array([0.5, -2.0, 1.0])
  np.testing.assert_allclose(quant.compute_scale(x, 8), 2.0 / 127, rtol=1e-6)
  # The paper's example: z_max = 3.5 in 8 bits gives Δ_z = 0.0276 and 1.0 -> 36.
  q, scale = fwdgrad.quantize(jnp.array([1.0]), 8, scale_method="static", max_value=3.5)
  np.testing.assert_allclose(scale, 0.0276, atol=5e-5)
  assert int(q[0]) == 36


def test_pow2_scale_is_a_power_of_two_that_covers_the_range():
  x = _data()
  scale = float(quant.compute_scale(x, 8, scale_method="pow2"))
  assert np.log2(scale) == np.round(np.log2(scale))
  assert scale * quant.qmax(8) >= float(jnp.max(jnp.abs(x)))


def test_mse_scale_has_no_larger_error_than_max():
  x = jax.random.laplace(jax.random.key(1), (4096,))
  errors = {m: float(jnp.mean((fwdgrad.fake_quant(x, 4, scale_method=m) - x) ** 2))
            for m in ("max", "mse")}
  assert errors["mse"] < errors["max"]


@pytest.mark.parametrize("bits", [3, 8, 16])
def test_idempotent(bits):
  x = _data()
  scale = quant.compute_scale(x, bits)
  once = fwdgrad.fake_quant(x, bits, scale=scale)
  twice = fwdgrad.fake_quant(once, bits, scale=scale)
  chex.assert_trees_all_close(once, twice, atol=0, rtol=0)


def test_clipping_to_the_range():
  x = jnp.array([-10.0, -3.5, 0.0, 3.5, 10.0])
  y = fwdgrad.fake_quant(x, 8, scale_method="static", max_value=3.5)
  np.testing.assert_allclose(y, [-3.5, -3.5, 0.0, 3.5, 3.5], rtol=1e-6)


def test_straight_through_tangent_passes_inside_and_stops_where_clipped():
  x = jnp.array([-10.0, -1.0, 0.3, 2.0, 10.0])
  f = lambda v: fwdgrad.fake_quant(v, 8, scale_method="static", max_value=3.5)
  _, tangent = jax.jvp(f, (x,), (jnp.full_like(x, 2.0),))
  np.testing.assert_allclose(tangent, [0.0, 2.0, 2.0, 2.0, 0.0])
  grad = jax.grad(lambda v: jnp.sum(f(v) * 3.0))(x)
  np.testing.assert_allclose(grad, [0.0, 3.0, 3.0, 3.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_is_kept(dtype):
  x = _data(dtype=dtype)
  assert fwdgrad.fake_quant(x, 8).dtype == dtype
  _, tangent = jax.jvp(lambda v: fwdgrad.fake_quant(v, 8), (x,), (jnp.ones_like(x),))
  assert tangent.dtype == dtype


def test_jit_equals_no_jit_and_vmap_works():
  x = _data((3, 5, 7))
  f = lambda v: fwdgrad.fake_quant(v, 6, axis=-1, scale_method="mse")
  to_int = lambda v: fwdgrad.quantize(v, 6, axis=-1, scale_method="mse")[0]
  # The integers are identical; XLA may reassociate the float product q * Δ by an ulp.
  chex.assert_trees_all_equal(jax.jit(to_int)(x), to_int(x))
  chex.assert_trees_all_close(jax.jit(f)(x), f(x), atol=0, rtol=1e-6)
  per_row = jax.vmap(lambda v: fwdgrad.fake_quant(v, 6))(x.reshape(3, -1))
  chex.assert_trees_all_close(per_row, jnp.stack([fwdgrad.fake_quant(r, 6) for r in x.reshape(3, -1)]),
                              atol=0, rtol=1e-6)


def test_per_channel_scales_are_one_per_channel():
  x = jnp.stack([jnp.linspace(-1, 1, 5), 100 * jnp.linspace(-1, 1, 5)], axis=1)  # (5, 2)
  scale = quant.compute_scale(x, 8, axis=1)
  assert scale.shape == (1, 2)
  np.testing.assert_allclose(scale[0], [1 / 127, 100 / 127], rtol=1e-6)
  y = fwdgrad.fake_quant(x, 8, axis=1)
  np.testing.assert_allclose(y, x, rtol=1e-2)  # the small channel is not swamped by the large one.


def test_stochastic_rounding_is_unbiased_and_keyed():
  x = jnp.full((20000,), 0.3)
  scale = 1.0
  y = fwdgrad.fake_quant(x, 8, scale=scale, rounding="stochastic", key=jax.random.key(0))
  assert set(np.unique(np.asarray(y))) <= {0.0, 1.0}
  assert abs(float(y.mean()) - 0.3) < 0.02
  again = fwdgrad.fake_quant(x, 8, scale=scale, rounding="stochastic", key=jax.random.key(0))
  chex.assert_trees_all_close(y, again, atol=0, rtol=0)


def test_quantize_gives_integer_arrays_and_dequantize_inverts():
  x = _data()
  for bits, dtype in [(4, jnp.int8), (8, jnp.int8), (12, jnp.int16), (16, jnp.int16),
                      (24, jnp.int32)]:
    q, scale = fwdgrad.quantize(x, bits)
    assert q.dtype == dtype
    chex.assert_trees_all_close(fwdgrad.dequantize(q, scale), fwdgrad.fake_quant(x, bits),
                                atol=1e-6, rtol=1e-6)


def test_all_zero_input_is_safe():
  y = fwdgrad.fake_quant(jnp.zeros(4), 8)
  assert not np.any(np.isnan(np.asarray(y)))


@pytest.mark.parametrize("bits", [1, 33, 0, 8.0, "8", True])
def test_bad_bit_width_is_a_clear_error(bits):
  with pytest.raises(ValueError, match="bits"):
    fwdgrad.fake_quant(jnp.ones(3), bits)


def test_stochastic_without_key_is_a_clear_error():
  with pytest.raises(ValueError, match="key"):
    fwdgrad.fake_quant(jnp.ones(3), 8, rounding="stochastic")


def test_missing_axis_is_a_clear_error():
  with pytest.raises(ValueError, match="axis 2 does not exist"):
    fwdgrad.fake_quant(jnp.ones((3, 4)), 8, axis=2)


def test_other_bad_arguments():
  with pytest.raises(ValueError, match="scale_method"):
    fwdgrad.fake_quant(jnp.ones(3), 8, scale_method="minmax")
  with pytest.raises(ValueError, match="max_value"):
    fwdgrad.fake_quant(jnp.ones(3), 8, scale_method="static")
  with pytest.raises(ValueError, match="rounding"):
    fwdgrad.fake_quant(jnp.ones(3), 8, rounding="up")
  with pytest.raises(ValueError, match="floating-point"):
    fwdgrad.fake_quant(jnp.ones(3, jnp.int32), 8)
  with pytest.raises(ValueError, match="integer"):
    fwdgrad.dequantize(jnp.ones(3), 1.0)
