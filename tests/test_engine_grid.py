"""The 16w8a simulation against an integer reference written apart from the library's rounding.

The reference below is plain numpy: integer codes ``rint(v / scale)`` clipped to the format, int64
accumulators, the BatchNorm factor and bias on the accumulator, requantization by the next scale.
It reads only the *scales* the model was calibrated with (``variables["quant"]``) and the params;
everything else it computes itself. Each fixed-point quantizer's output must also lie exactly on
the grid of the scale it claims.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fwdgrad
from fwdgrad import enhancements
from fwdgrad import estimators
from fwdgrad import fixed_point
from fwdgrad import models
from fwdgrad import qzo
from fwdgrad.models import layers

A8, W16 = 127, 32767


def _codes(value, scale, levels=A8):
  value = np.asarray(value, np.float64) / np.asarray(scale, np.float64)
  return np.clip(np.rint(value), -levels, levels).astype(np.int64)


def _conv(x, w, stride, pad):
  """NHWC x HWIO cross-correlation, any integer or float dtype, zero padding ``pad``."""
  kh, kw = w.shape[:2]
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]), np.result_type(x, w))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
      out = out + np.einsum("nhwc,co->nhwo", patch, w[i, j])
  return out


def _max_pool(x, window, stride, pad=0):
  if pad:
    low = np.iinfo(np.int64).min
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=low)
  oh, ow = (x.shape[1] - window) // stride + 1, (x.shape[2] - window) // stride + 1
  out = np.full((x.shape[0], oh, ow, x.shape[3]), np.iinfo(np.int64).min, np.int64)
  for i in range(window):
    for j in range(window):
      out = np.maximum(out, x[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :])
  return out


class Engine:
  """A numpy integer engine over a calibrated model's params and scales."""

  def __init__(self, variables):
    self.params = jax.tree_util.tree_map(np.asarray, variables["params"])
    self.stats = jax.tree_util.tree_map(np.asarray, variables.get("batch_stats", {}))
    self.scales = jax.tree_util.tree_map(np.asarray, variables["quant"])

  def node(self, tree, path):
    for name in path.split("/"):
      tree = tree[name]
    return tree

  def scale(self, path):
    return float(self.node(self.scales, path)["scale"])

  def kernel(self, path):
    kernel = self.node(self.params, path)["kernel"]
    scale = self.node(self.scales, path)["kernel_scale"]
    scale = scale.reshape(()) if scale.size == 1 else scale
    return _codes(kernel, scale, W16), np.asarray(scale, np.float64)

  def conv_bn(self, x, x_scale, path, stride, pad, quantize_input=False):
    if quantize_input:
      x, x_scale = _codes(x * x_scale, self.scale(path + "/act_in")), self.scale(path + "/act_in")
    w, w_scale = self.kernel(path)
    acc = _conv(x, w, stride, pad)  # int64: exact
    p, s = self.node(self.params, path), self.node(self.stats, path)
    factor = p["scale"].astype(np.float64) / np.sqrt(s["var"].astype(np.float64) + 1e-5)
    y = acc * (x_scale * w_scale) * factor + (p["bias"] - s["mean"] * factor)
    out_scale = self.scale(path + "/act_out")
    return _codes(y, out_scale), out_scale

  def dense(self, x, x_scale, path, quantize_input=True):
    if quantize_input:
      x_scale_new = self.scale(path + "/act_in")
      x, x_scale = _codes(x * x_scale, x_scale_new), x_scale_new
    w, w_scale = self.kernel(path)
    y = (x @ w) * (x_scale * w_scale)
    if "bias" in self.node(self.params, path):
      y = y + self.node(self.params, path)["bias"]
    out_scale = self.scale(path + "/act_out")
    return _codes(y, out_scale), out_scale


def _close_codes(got, expected, fraction=0.01):
  """Integer codes equal but for float32-vs-int64 ties: off by one on a tiny fraction at most."""
  got, expected = np.asarray(got), np.asarray(expected)
  assert got.shape == expected.shape
  difference = np.abs(got - expected)
  assert difference.max() <= 1, difference.max()
  assert np.mean(difference > 0) <= fraction, np.mean(difference > 0)


def _library_codes(model, variables, x, path):
  out = model.apply(variables, x)
  scale = float(Engine(variables).scale(path))
  steps = np.asarray(out, np.float64) / scale
  np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3)  # On the grid it claims.
  return np.rint(steps).astype(np.int64)


def _on_their_grids(model, variables, x):
  """Every QAct output is a multiple of its scale, within the 8-bit range."""
  _, captured = model.apply(variables, x, capture_intermediates=lambda m, _: isinstance(
      m, layers.QAct), mutable=["intermediates"])
  engine, checked = Engine(variables), 0
  for path, value in jax.tree_util.tree_flatten_with_path(captured["intermediates"])[0]:
    keys = [p.key for p in path if hasattr(p, "key")]
    if "__call__" not in keys:  # (Other methods of a quantizer, such as static_scale.)
      continue
    names = [k for k in keys if k != "__call__"]
    scale = engine.scale("/".join(names))
    steps = np.asarray(value, np.float64) / scale
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3, err_msg="/".join(names))
    assert np.abs(np.rint(steps)).max() <= A8
    checked += 1
  return checked


def _calibrated(model, x, key=0):
  variables = model.init(jax.random.key(key), x[:1])
  variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))
  # Random BatchNorm statistics and affine parameters, so folding is exercised.
  rng = np.random.default_rng(key)
  def randomize(path, leaf):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
    if "mean" in name or "bias" in name:
      return jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32)
    if "scale" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return leaf
  variables = {k: jax.tree_util.tree_map_with_path(randomize, v) for k, v in variables.items()}
  return models.calibrate(model, variables, x)


def test_conv4_16w8a_forward_matches_the_integer_reference():
  model = models.get_model("conv4", num_classes=3, features=(6, 8), precision="16w8a")
  x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
  variables = _calibrated(model, x)
  engine = Engine(variables)
  h, s = _codes(x, engine.scale("act_input")), engine.scale("act_input")
  for i in range(2):
    h, s = engine.conv_bn(h, s, f"block{i}", 1, 1)
    h = _max_pool(np.maximum(h, 0), 2, 2)
  logits, _ = engine.dense(h.reshape(h.shape[0], -1), s, "head", quantize_input=False)
  _close_codes(_library_codes(model, variables, x, "head/act_out"), logits)
  assert _on_their_grids(model, variables, x) == 4


def test_resnet18_16w8a_forward_with_residuals_and_pooling_matches_the_integer_reference():
  model = models.get_model("resnet18", num_classes=3, widths=(4, 8), blocks=(1, 1),
                           precision="16w8a")
  x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
  variables = _calibrated(model, x, key=3)
  engine = Engine(variables)
  h, s = _codes(x, engine.scale("act_input")), engine.scale("act_input")
  h, s = engine.conv_bn(h, s, "conv1", 2, 3)
  h = _max_pool(np.maximum(h, 0), 3, 2, pad=1)
  for name, stride in (("layer1_0", 1), ("layer2_0", 2)):
    y, ys = engine.conv_bn(h, s, f"{name}/conv1", stride, 1)
    y, ys = engine.conv_bn(np.maximum(y, 0), ys, f"{name}/conv2", 1, 1)
    if "downsample" in engine.params[name]:
      shortcut, ss = engine.conv_bn(h, s, f"{name}/downsample", stride, 0)
    else:
      shortcut, ss = h, s
    s = engine.scale(f"{name}/act_sum")
    h = np.maximum(_codes(y * ys + shortcut * ss, s), 0)
  pooled = _codes(np.mean(h * s, axis=(1, 2)), engine.scale("act_pool"))
  logits, _ = engine.dense(pooled, engine.scale("act_pool"), "head", quantize_input=False)
  _close_codes(_library_codes(model, variables, x, "head/act_out"), logits)
  # input, stem, block 1 (two convs, sum), block 2 (two convs, shortcut, sum), pool, head.
  assert _on_their_grids(model, variables, x) == 1 + 1 + 3 + 4 + 1 + 1


def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_vit_block_16w8a_matches_the_integer_reference():
  block = layers.TransformerBlock(num_heads=2, mlp_features=16, precision="16w8a")
  x = fwdgrad.fake_quant(jax.random.normal(jax.random.key(4), (3, 5, 8)), 8)
  variables = _calibrated(block, x, key=5)
  engine = Engine(variables)
  p = engine.params
  x64 = np.asarray(x, np.float64)
  qkv, s_qkv = engine.dense(_layer_norm(x64, p["norm1"]), 1.0, "attn/qkv")
  qkv = qkv.reshape(3, 5, 3, 2, 4)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * s_qkv * s_qkv / math.sqrt(4)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = weights / weights.sum(-1, keepdims=True)
  s_p = engine.scale("attn/act_softmax")
  out = np.einsum("bhqk,bkhd->bqhd", _codes(weights, s_p), v).reshape(3, 5, 8) * s_p * s_qkv
  proj, s_proj = engine.dense(out, 1.0, "attn/proj")
  s1 = engine.scale("act_attn")
  x1 = _codes(x64 + proj * s_proj, s1) * s1
  h, s_h = engine.dense(_layer_norm(x1, p["norm2"]), 1.0, "mlp/fc1")
  h = h * s_h
  gelu = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
  y, s_y = engine.dense(gelu, 1.0, "mlp/fc2")
  expected = _codes(x1 + y * s_y, engine.scale("act_mlp"))
  _close_codes(_library_codes(block, variables, x, "act_mlp"), expected, fraction=0.02)
  assert _on_their_grids(block, variables, x) == 4 * 2 + 1 + 2


@pytest.mark.parametrize("name,kwargs,shape", [
    ("conv4", dict(features=(4, 4)), (6, 12, 12, 1)),
    ("vit_tiny", dict(image_size=8, patch_size=4, width=8, depth=1, num_heads=2,
                      mlp_features=16, num_prompts=2), (6, 8, 8, 3)),
    ("crnn", dict(conv_features=(4,), pool_sizes=((2, 2),), rnn_features=6), (6, 8, 8)),
])
def test_batch_composition_does_not_change_an_example_once_calibrated(name, kwargs, shape):
  x = jax.random.normal(jax.random.key(6), shape)
  for precision, independent in (("16w8a", True), ("16w8a-dynamic", False)):
    model = models.get_model(name, num_classes=3, precision=precision, **kwargs)
    variables = models.calibrate(model, model.init(jax.random.key(7), x[:1]), x)
    apply = jax.jit(model.apply)
    together = apply(variables, x)
    alone = jnp.concatenate([apply(variables, x[i:i + 1]) for i in range(shape[0])])
    # Another batch: the first example next to larger inputs.
    mixed = apply(variables, jnp.concatenate([x[:1], 3.0 * x[1:]]))[:1]
    if independent:
      chex.assert_trees_all_equal(together, alone)
      chex.assert_trees_all_equal(together[:1], mixed)
    else:  # Per-batch scales: an example's output depends on its batch.
      assert float(jnp.max(jnp.abs(together[:1] - mixed))) > 0


def test_uncalibrated_fixed_point_model_names_the_fix():
  model = models.get_model("conv4", num_classes=2, features=(4,), precision="16w8a")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(models.NotCalibratedError, match=r"fwdgrad\.models\.calibrate\(model"):
    model.apply(variables, jnp.zeros((2, 8, 8, 1)))
  # Float models need no calibration and calibrate() leaves them as they are.
  float_model = models.get_model("conv4", num_classes=2, features=(4,))
  assert "quant" not in models.calibrate(float_model, variables, jnp.zeros((2, 8, 8, 1)))


def test_calibration_methods_percentile_and_mse_clip_outliers():
  # 4-bit activations, where clipping the tail pays: Gaussian data and one far outlier.
  layer = models.QDense(4, precision="16w4a")
  x = jax.random.normal(jax.random.key(0), (512, 8)).at[0, 0].set(8.0)
  variables = layer.init(jax.random.key(1), x[:1])
  scales = {method: float(models.calibrate(layer, variables, x, method=method, batch_size=100,
                                           percentile=99.0)["quant"]["act_in"]["scale"])
            for method in ("max", "percentile", "mse")}
  np.testing.assert_allclose(scales["max"], 8.0 / 7, rtol=1e-6)
  np.testing.assert_allclose(scales["percentile"] * 7, np.percentile(np.abs(x), 99.0), rtol=0.02)
  assert scales["mse"] < 0.5 * scales["max"], scales
  # The MSE range beats max-abs on the error it minimises.
  error = lambda s: float(jnp.sum((fwdgrad.fake_quant(x, 4, scale=s) - x) ** 2))
  assert error(scales["mse"]) < error(scales["max"])
  with pytest.raises(ValueError, match="calibration method"):
    models.calibrate(layer, variables, x, method="minmax")


def test_calibrated_scales_save_and_restore_with_the_params(tmp_path):
  from fwdgrad import train_lib  # pylint: disable=g-import-not-at-top
  model = models.get_model("conv4", num_classes=2, features=(4,), precision="16w8a")
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  variables = models.calibrate(model, model.init(jax.random.key(1), x[:1]), x)
  train_lib.save_backbone(str(tmp_path / "backbone"), variables)
  restored = train_lib.load_backbone(str(tmp_path / "backbone"))
  chex.assert_trees_all_equal(restored["quant"], variables["quant"])
  chex.assert_trees_all_equal(model.apply(restored, x), model.apply(variables, x))


# One grid --------------------------------------------------------------------------------------

def _conv_problem(precision):
  model = models.get_model("conv4", num_classes=3, features=(4, 4), precision=precision)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  y = jnp.arange(8) % 3
  variables = dict(_calibrated(model, x))
  params = variables.pop("params")

  def loss(params):
    logits = model.apply({"params": params, **variables}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return model, variables, params, loss


@pytest.mark.parametrize("precision", ["16w8a", "16w8a-per-channel"])
def test_qzo_ff_trains_on_the_grid_the_forward_reads(precision):
  model, variables, params, loss = _conv_problem(precision)
  scales = models.weight_scales({"params": params, **variables})
  tx = fwdgrad.qzo_ff(3e-2, key=0, weight_scale=scales,
                      axis=-1 if "per-channel" in precision else None)
  state = tx.init(params)
  for path in ("block0", "block1", "head"):  # QZO-FF's Δ_w is the forward's, per channel too.
    chex.assert_trees_all_equal(jnp.broadcast_to(state.weight_scale[path]["kernel"],
                                                 jnp.shape(scales[path]["kernel"])),
                                scales[path]["kernel"])
  step = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss))
  start = qzo.qzo_integer_weights(params, state)
  for _ in range(5):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  moved = 0
  for path in ("block0", "block1", "head"):
    kernel = params[path]["kernel"]
    # The forward reads the weights QZO-FF holds, integer for integer: no second rounding.
    codes, _ = fwdgrad.quantize(kernel, 16, scale=scales[path]["kernel"])
    chex.assert_trees_all_equal(codes, qzo.qzo_integer_weights(params, state)[path]["kernel"])
    # (apply_updates adds in float32: params sit within an ulp of Δ_w w_q, far below a step.)
    gap = jnp.abs(fwdgrad.fake_quant(kernel, 16, scale=scales[path]["kernel"]) - kernel)
    assert bool(jnp.all(gap <= 0.01 * scales[path]["kernel"]))
    moved += int(jnp.sum(qzo.qzo_integer_weights(params, state)[path]["kernel"]
                         != start[path]["kernel"]))
  assert moved > 0


def test_weight_scales_of_a_model_match_qzo_ff_by_default():
  _, variables, params, _ = _conv_problem("16w8a")
  state = fwdgrad.qzo_ff(1e-3, key=0).init(params)
  scales = models.weight_scales({"params": params, **variables})
  for path in ("block0", "block1", "head"):
    chex.assert_trees_all_equal(state.weight_scale[path]["kernel"], scales[path]["kernel"])


def test_a_weight_scale_that_does_not_fit_its_leaf_is_refused():
  params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
  fwdgrad.qzo_ff(1e-3, key=0, weight_scale={"dense": {"kernel": jnp.full((3,), 0.1),
                                                     "bias": None}}).init(params)
  for bad in (jnp.full((4,), 0.1), jnp.full((2, 4, 3), 0.1)):  # wrong axis; grows the leaf
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*does not broadcast"):
      fwdgrad.qzo_ff(1e-3, key=0, weight_scale={"dense": {"kernel": bad, "bias": None}}).init(params)


# No silently frozen leaves ---------------------------------------------------------------------

def _bias_problem():
  x = jax.random.normal(jax.random.key(0), (64, 4))
  w = jax.random.normal(jax.random.key(1), (4, 2)) * 0.5
  target = x @ w + jnp.array([0.5, -0.3])
  params = {"dense": {"kernel": w, "bias": jnp.zeros(2)}}

  def loss(p):
    return jnp.mean((x @ p["dense"]["kernel"] + p["dense"]["bias"] - target) ** 2)

  return params, loss


@pytest.mark.parametrize("kernelwise", [False, True])
def test_a_zero_initialised_bias_trains(kernelwise):
  params, loss = _bias_problem()
  tx = fwdgrad.qzo_ff(2e-2, key=0, num_directions=3, kernelwise=kernelwise)
  state = tx.init(params)
  assert int(state.epsilon_q["dense"]["bias"]) > 0
  step = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss))
  start = float(loss(params))
  for _ in range(150):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  bias = params["dense"]["bias"]
  assert float(bias[0]) > 0.1 and float(bias[1]) < -0.05, bias
  assert float(loss(params)) < (0.6 if kernelwise else 0.3) * start


def test_float_kernelwise_moves_a_zero_leaf():
  updates = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  params = {"w": jnp.full((3, 2), 0.5), "b": jnp.zeros(2)}
  out, _ = enhancements.kernelwise_normalize().update(updates, optax.EmptyState(), params)
  np.testing.assert_allclose(float(jnp.linalg.norm(out["b"])), 0.5, rtol=1e-6)  # Layer range.


def test_8w8a_failure_is_named_by_a_warning_and_16w8a_is_quiet():
  _, variables, params, _ = _conv_problem("16w8a")
  with pytest.warns(qzo.FrozenLeafWarning, match=r"ε rounds to 0 .*\['block0'\]\['kernel'\]"):
    fwdgrad.qzo_ff(1e-3, key=0, weight_bits=8, epsilon=1e-3).init(params)
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("error", qzo.FrozenLeafWarning)
    fwdgrad.qzo_ff(1e-2, key=0, weight_bits=16).init(params)
  # Inside jit too (the experiment harness builds its optimizer state in the compiled step).
  with pytest.warns(qzo.FrozenLeafWarning, match=r"ε rounds to 0 .*\['block0'\]\['kernel'\]"):
    jax.block_until_ready(jax.jit(
        fwdgrad.qzo_ff(1e-3, key=0, weight_bits=8, epsilon=1e-3).init)(params))


def test_sharpness_ascent_survives_a_large_model_and_warns_when_it_cannot():
  # 2.9M weights with w_max = 2: ρ/‖u‖ is below one 16-bit step per unit of z, so a coefficient
  # in z's scale, round(ρ / (Δ_w Δ_z ‖u_q‖)), was 0 and the ascent vanished. Per entry it is not.
  c = jax.random.normal(jax.random.key(1), (1700, 1700))
  params = {"w": jnp.linspace(-2.0, 2.0, c.size).reshape(c.shape)}
  loss = lambda p: jnp.sum(p["w"] * c)
  fmt = qzo.perturbation_format()
  scale = 2.0 / W16
  assert round(0.05 / (scale * fmt.scale * fmt.one * math.sqrt(c.size))) == 0
  losses = {}
  for radius in (None, 0.05):
    tx = fwdgrad.qzo_ff(1e-3, key=0, num_directions=1, sharpness_radius=radius)
    state = tx.init(params)
    _, state = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss))(params, state)
    losses[radius] = float(state.loss)
  # The probe is taken at the ascended point: its loss is ρ |c·u| / ‖u‖ higher (here ~ ρ ‖c‖).
  assert losses[0.05] - losses[None] > 0.1 * 0.05 * float(jnp.linalg.norm(c)) / math.sqrt(c.size)
  with pytest.warns(qzo.FrozenLeafWarning, match="sharpness-aware ascent"):
    fwdgrad.qzo_ff(1e-3, key=0, sharpness_radius=1e-6).init(params)


# The QZO-FF step against an integer reference --------------------------------------------------

def _fixed_multiplier(ratio):
  """``(M, k)``: 15-bit ``M`` with ``M / 2^k ≈ ratio`` (an engine's requantization constants)."""
  if ratio <= 0:
    return 0, 0
  shift = min(31, max(0, 14 - math.floor(math.log2(ratio))))
  multiplier = round(ratio * 2 ** shift)
  if multiplier >= 2 ** 15 and shift > 0:
    shift -= 1
    multiplier = round(ratio * 2 ** shift)
  return min(multiplier, 2 ** 15 - 1), shift


def _rescale(x, multiplier, shift):
  """``floor((x M + 2^(k-1)) / 2^k)`` in Python integers (int64 numpy), rounding half up."""
  x = np.asarray(x, np.int64)
  offset = (1 << (shift - 1)) if shift > 0 else 0
  return (x * multiplier + offset) >> shift


def _reference_qzo_step(loss, params, state, *, lr, epsilon, m, fmt, kernelwise=False,
                        radius=None, directions=None):
  """One QZO-FF step in numpy integers; returns the new integer weights."""
  names = list(params)
  scale = {n: float(np.max(state.weight_scale[n])) for n in names}
  w_q = {n: _codes(params[n], scale[n], W16) for n in names}
  dq = lambda tree: {n: jnp.asarray(tree[n].astype(np.float32) * np.float32(scale[n]))
                     for n in names}
  step_key = jax.random.fold_in(state.key, int(state.count))
  z_mult, z_shift = _fixed_multiplier(fmt.scale)
  assert (z_mult, z_shift) == (fmt.multiplier, fmt.shift)

  def draw(index):
    if directions is not None:
      return {n: directions[n][index] for n in names}
    z = estimators.sample_direction(estimators.direction_key(step_key, index), params)
    return {n: _codes(z[n], fmt.scale) for n in names}

  def perturb(center, coefficient, z):
    return {n: np.clip(_rescale(center[n] * fmt.one + coefficient[n] * z[n], z_mult, z_shift),
                       -W16, W16) for n in names}

  center = w_q
  if radius is not None:
    u = draw(m)
    norm = math.sqrt(sum(float(np.sum(u[n].astype(np.float64) ** 2)) for n in names))
    steps = {}
    for n in names:
      mult, shift = _fixed_multiplier(radius / (scale[n] * norm))
      steps[n] = _rescale(u[n], mult, shift)
    plus = {n: np.clip(w_q[n] + steps[n], -W16, W16) for n in names}
    minus = {n: np.clip(w_q[n] - steps[n], -W16, W16) for n in names}
    center = plus if float(loss(dq(plus))) >= float(loss(dq(minus))) else minus
  eps_q = {n: int(np.clip(np.rint(epsilon / scale[n]), 0, W16)) for n in names}
  total = {n: np.zeros_like(w_q[n]) for n in names}
  for i in range(m):
    z = draw(i)
    plus = perturb(center, eps_q, z)
    minus = perturb(center, {n: -eps_q[n] for n in names}, z)
    same = all(np.array_equal(plus[n], minus[n]) for n in names)
    sign = 0 if same else int(np.sign(float(loss(dq(plus))) - float(loss(dq(minus)))))
    for n in names:
      total[n] = total[n] + sign * z[n]
  g = {n: np.sign(total[n]) * ((np.abs(total[n]) + m // 2) // m) for n in names}
  new = {}
  for n in names:
    ratio = lr * fmt.scale / scale[n]
    if kernelwise:
      norm_w = float(np.linalg.norm(w_q[n].astype(np.float32) * np.float32(scale[n])))
      norm_w = norm_w if norm_w >= fixed_point.NEAR_ZERO * scale[n] * W16 else scale[n] * W16
      norm_g = fmt.scale * float(np.linalg.norm(g[n].astype(np.float32)))
      ratio *= norm_w / norm_g if norm_g > 0 else 0.0
    mult, shift = _fixed_multiplier(ratio)
    new[n] = np.clip(w_q[n] - _rescale(g[n], mult, shift), -W16, W16)
  return new


def _step_problem():
  x = jax.random.normal(jax.random.key(3), (32, 6))
  params = {"w": jax.random.normal(jax.random.key(4), (6, 3)) * 0.4,
            "b": jax.random.normal(jax.random.key(5), (3,)) * 0.1}
  labels = jnp.arange(32) % 3

  def loss(p):
    logits = fwdgrad.fake_quant(x, 8) @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return params, loss


@pytest.mark.parametrize("options", [
    {}, {"kernelwise": True}, {"sharpness_radius": 0.05},
    {"momentum": True}, {"sharpness_radius": 0.05, "kernelwise": True},
])
def test_qzo_ff_steps_equal_the_integer_reference(options):
  params, loss = _step_problem()
  m, lr, epsilon = 3, 5e-2, 1e-3
  momentum = fwdgrad.MomentumGuidedSampling(warmup_steps=1) if options.get("momentum") else None
  tx = fwdgrad.qzo_ff(lr, key=7, num_directions=m, epsilon=epsilon, momentum=momentum,
                      sharpness_radius=options.get("sharpness_radius"),
                      kernelwise=options.get("kernelwise", False))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss))
  fmt = qzo.perturbation_format()
  for _ in range(3):
    directions = None
    if momentum is not None:  # The guided mixture (a direction law), rounded here.
      step_key = jax.random.fold_in(state.key, state.count)
      previous = jax.tree_util.tree_map(lambda z: z.astype(jnp.float32) * fmt.scale,
                                        state.previous_directions)
      floats = enhancements.momentum_guided_directions(
          step_key, previous, state.count, params, num_directions=m, config=momentum)
      directions = {n: _codes(floats[n], fmt.scale) for n in params}
    expected = _reference_qzo_step(loss, params, state, lr=lr, epsilon=epsilon, m=m, fmt=fmt,
                                   kernelwise=options.get("kernelwise", False),
                                   radius=options.get("sharpness_radius"), directions=directions)
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    got = qzo.qzo_integer_weights(params, state)
    for n in params:
      np.testing.assert_array_equal(np.asarray(got[n], np.int64), expected[n], err_msg=n)
