"""Tests of the quantized layers and backbones in fwdgrad/models."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad
from fwdgrad import models
from fwdgrad import quant
from fwdgrad.models import layers

# Small versions of every backbone (the full-size ones are checked with jax.eval_shape only).
SMALL = {
    "conv4": (dict(features=(8, 8, 8, 8)), (2, 28, 28, 1)),
    # Fewer stages than the real networks (compile time grows with depth); full sizes are
    # checked with jax.eval_shape in test_full_size_parameter_counts.
    "resnet12": (dict(widths=(8, 16)), (2, 16, 16, 3)),
    "resnet18": (dict(widths=(8, 16), blocks=(2, 1)), (2, 32, 32, 3)),
    "vit_tiny": (dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                      mlp_features=64, num_prompts=2), (2, 32, 32, 3)),
    "crnn": (dict(conv_features=(8, 8, 8), rnn_features=16), (2, 32, 32)),
}
FEATURES = {"conv4": 8, "resnet12": 16, "resnet18": 16, "vit_tiny": 32, "crnn": 16}


def _inputs(name, seed=1):
  return jax.random.normal(jax.random.key(seed), SMALL[name][1])


def _random_variables(abstract, seed=0):
  """Random values for every leaf of ``abstract`` (from ``jax.eval_shape(model.init, ...)``).

  Filled with numpy rather than by ``model.init``, whose compiled threefry initialisers dominate
  the run time of these tests. Kernels are He/LeCun-scaled (a trained-like scale: ViT's own 0.02
  initialisation makes the residual branches negligible, so precision would hardly matter), and the
  BatchNorm running statistics are away from (0, 1) so that folding is exercised.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(leaf.shape[:-1]))
      gain = 2.0 if len(leaf.shape) == 4 else 1.0
      value = rng.normal(0, np.sqrt(gain / fan_in), leaf.shape)
    elif name.endswith("['var']"):
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif name.endswith("['scale']"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['bias']") or name.endswith("['mean']"):
      value = rng.normal(0, 0.1, leaf.shape)
    else:  # cls_token, pos_embed, prompts.
      value = rng.normal(0, 1.0, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def _variables(name):
  model = models.get_model(name, num_classes=5, **SMALL[name][0])
  return _random_variables(jax.eval_shape(model.init, jax.random.key(0), _inputs(name)))


@functools.lru_cache(maxsize=None)
def _jitted_apply(name, precision, num_classes):
  """One compiled forward pass per configuration, shared by the tests."""
  model = models.get_model(name, num_classes=num_classes, precision=precision, **SMALL[name][0])
  return jax.jit(model.apply)


def _calibrated(name, precision, variables, x, num_classes=5):
  """Fixed-point variables with the static scales of ``x`` (float ones unchanged)."""
  if models.Precision.parse(precision).is_float:
    return variables
  model = models.get_model(name, num_classes=num_classes, precision=precision, **SMALL[name][0])
  return models.calibrate(model, variables, x)


def _apply(name, precision, variables, x, num_classes=5):
  variables = _calibrated(name, precision, variables, x, num_classes)
  return _jitted_apply(name, precision, num_classes)(variables, x)


# Precision ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("float", models.Precision(None, None)),
    ("16w8a", models.Precision(16, 8)),
    ("8w8a", models.Precision(8, 8)),
    ("4w32a", models.Precision(4, 32)),
    ("16W8A", models.Precision(16, 8)),
    ("16w8a-per-channel", models.Precision(16, 8, per_channel=True)),
    ("16w8a-dynamic", models.Precision(16, 8, dynamic=True)),
    ("8w8a-per-channel-dynamic", models.Precision(8, 8, per_channel=True, dynamic=True)),
])
def test_precision_parse(text, expected):
  precision = models.Precision.parse(text)
  assert precision == expected
  assert models.Precision.parse(str(precision)) == precision
  assert models.Precision.parse(precision) is precision


def test_precision_parse_none_is_float():
  assert models.Precision.parse(None).is_float
  assert not models.Precision.parse("16w8a").is_float


@pytest.mark.parametrize("text, message", [
    ("16w", "cannot parse"),
    ("w8a", "cannot parse"),
    ("int8", "cannot parse"),
    ("16w8a8", "cannot parse"),
    ("1w8a", "between 2 and 32"),
    ("16w33a", "between 2 and 32"),
    (16, "must be a string"),
])
def test_precision_parse_errors(text, message):
  with pytest.raises(ValueError, match=message):
    models.Precision.parse(text)


def test_precision_constructor_checks_bits():
  with pytest.raises(ValueError, match="weight_bits"):
    models.Precision(weight_bits=40, activation_bits=8)
  with pytest.raises(ValueError, match="activation_bits"):
    models.Precision(weight_bits=16, activation_bits=1)


def test_get_model_errors():
  with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*conv4.*vit_tiny"):
    models.get_model("resnet50")
  with pytest.raises(ValueError, match="cannot parse precision"):
    models.get_model("conv4", precision="16bit")


# Layers ------------------------------------------------------------------------------------------

def test_qdense_matches_fixed_point_reference():
  x = jax.random.normal(jax.random.key(0), (3, 6))
  layer = models.QDense(4, precision="16w8a")
  variables = _random_variables(jax.eval_shape(layer.init, jax.random.key(1), x))
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  variables = models.calibrate(layer, variables, x)
  scales = variables["quant"]
  # Static scales: the input's max-abs, the kernel's max-abs, the (unrounded-input) output's.
  np.testing.assert_allclose(scales["act_in"]["scale"], np.abs(x).max() / 127, rtol=1e-6)
  np.testing.assert_allclose(scales["kernel_scale"], np.abs(kernel).max() / 32767, rtol=1e-6)
  w_q = fwdgrad.fake_quant(kernel, 16)
  np.testing.assert_allclose(scales["act_out"]["scale"], np.abs(x @ w_q + bias).max() / 127,
                             rtol=1e-5)
  expected = fwdgrad.fake_quant(
      fwdgrad.fake_quant(x, 8, scale=scales["act_in"]["scale"]) @ w_q + bias, 8,
      scale=scales["act_out"]["scale"])
  chex.assert_trees_all_close(layer.apply(variables, x), expected, atol=1e-6, rtol=0)
  float_out = models.QDense(4).apply(variables, x)
  chex.assert_trees_all_close(float_out, x @ kernel + bias, atol=1e-6, rtol=0)


def test_per_channel_weight_scales():
  kernel = jax.random.normal(jax.random.key(0), (5, 3)) * jnp.array([1.0, 10.0, 100.0])
  per_channel = layers.quantize_weight(kernel, "4w8a-per-channel")
  per_tensor = layers.quantize_weight(kernel, "4w8a")
  chex.assert_trees_all_close(per_channel, fwdgrad.fake_quant(kernel, 4, axis=-1), atol=0, rtol=0)
  # The small-valued channel is all zeros with one per-tensor scale but not with per-channel ones.
  assert np.all(np.asarray(per_tensor[:, 0]) == 0)
  assert np.any(np.asarray(per_channel[:, 0]) != 0)


def test_convbn_eval_folds_batchnorm():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  layer = models.ConvBN(4, (3, 3), (2, 2), 1)
  variables = _random_variables(jax.eval_shape(layer.init, jax.random.key(1), x))
  params, stats = variables["params"], variables["batch_stats"]
  out = jax.jit(layer.apply)(variables, x)
  conv = jax.lax.conv_general_dilated(x, params["kernel"], (2, 2), [(1, 1), (1, 1)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  reference = ((conv - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * params["scale"]
               + params["bias"])
  chex.assert_trees_all_close(out, reference, atol=1e-5, rtol=1e-5)


def test_convbn_train_uses_batch_statistics_and_updates_running_averages():
  x = 3.0 + jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  layer = models.ConvBN(3, (3, 3))
  variables = jax.eval_shape(layer.init, jax.random.key(1), x)
  params = _random_variables(variables["params"])
  variables = {"params": params, "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
  out, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_trees_all_close(jnp.mean(out, axis=(0, 1, 2)), params["bias"], atol=1e-5)
  chex.assert_trees_all_close(jnp.std(out, axis=(0, 1, 2)), params["scale"], atol=1e-3)
  conv = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  chex.assert_trees_all_close(updates["batch_stats"]["mean"],
                              0.1 * jnp.mean(conv, axis=(0, 1, 2)), atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(updates["batch_stats"]["var"],
                              0.9 + 0.1 * jnp.var(conv, axis=(0, 1, 2)), atol=1e-4, rtol=1e-4)


# Backbones ---------------------------------------------------------------------------------------

def _num_params(model, shape):
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def _conv_bn(cin, cout, k):
  return k * k * cin * cout + 2 * cout


def test_full_size_parameter_counts():
  # torchvision's resnet18 and timm's deit_tiny_patch16_224 (both with a 1000-way head).
  assert _num_params(models.get_model("resnet18"), (1, 224, 224, 3)) == 11_689_512
  assert _num_params(models.get_model("vit_tiny"), (1, 224, 224, 3)) == 5_717_416
  widths, cin, expected = (64, 160, 320, 640), 3, 0
  for width in widths:
    expected += _conv_bn(cin, width, 3) + 2 * _conv_bn(width, width, 3) + _conv_bn(cin, width, 1)
    cin = width
  resnet12 = _num_params(models.get_model("resnet12"), (1, 84, 84, 3))
  assert resnet12 == expected and 12.3e6 < resnet12 < 12.5e6
  conv4 = _conv_bn(3, 64, 3) + 3 * _conv_bn(64, 64, 3)
  assert _num_params(models.get_model("conv4"), (1, 84, 84, 3)) == conv4
  assert _num_params(models.get_model("conv4", num_classes=5), (1, 84, 84, 3)) == (
      conv4 + 1600 * 5 + 5)
  crnn = _num_params(models.get_model("crnn"), (1, 100, 64))
  gru_input = 64 * (64 // 8)
  expected = (_conv_bn(1, 32, 3) + _conv_bn(32, 64, 3) + _conv_bn(64, 64, 3)
              + 3 * (gru_input * 104 + 104 * 104 + 2 * 104))
  assert crnn == expected and 240e3 < crnn < 260e3


def test_vit_prompt_parameters():
  model = models.get_model("vit_tiny", num_prompts=10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert variables["params"]["prompts"].shape == (12, 10, 192)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  assert [p for p in paths if "prompt" in p] == ["['prompts']"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_with_and_without_head(name):
  variables = _variables(name)
  x = _inputs(name)
  assert _apply(name, "float", variables, x).shape == (2, 5)
  no_head = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "head"}}
  model = models.get_model(name, num_classes=None, **SMALL[name][0])
  features = jax.eval_shape(model.apply, no_head, x)
  expected = FEATURES[name]  # Conv4 at 28x28 flattens 1x1x8.
  assert features.shape == (2, expected)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_16w8a_is_close_to_float_and_different(name):
  variables, x = _variables(name), _inputs(name)
  reference = _apply(name, "float", variables, x)
  quantized = _apply(name, "16w8a", variables, x)
  error = float(jnp.max(jnp.abs(quantized - reference)) / jnp.max(jnp.abs(reference)))
  assert 0 < error < 0.1, error


@pytest.mark.parametrize("name", ["conv4", "vit_tiny"])
def test_8_bit_activations_dominate_the_16w8a_error(name):
  variables, x = _variables(name), _inputs(name)
  reference = _apply(name, "float", variables, x)
  errors = {p: float(jnp.max(jnp.abs(_apply(name, p, variables, x) - reference)))
            for p in ("16w8a", "16w16a")}
  assert errors["16w16a"] < errors["16w8a"] / 5, errors


def test_few_weight_bits_cost_accuracy():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = _random_variables(jax.eval_shape(models.QConv(4).init, jax.random.key(1), x))
  reference = models.QConv(4).apply(variables, x)
  errors = {p: float(jnp.max(jnp.abs(models.QConv(4, precision=p).apply(variables, x) - reference)))
            for p in ("16w32a-dynamic", "3w32a-dynamic")}
  assert 0 < errors["16w32a-dynamic"] < 1e-3 * errors["3w32a-dynamic"], errors


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_outputs_lie_on_the_8_bit_activation_grid(name):
  variables = _calibrated(name, "16w8a", _variables(name), _inputs(name))
  outputs = _apply(name, "16w8a", variables, _inputs(name))
  steps = np.asarray(outputs / variables["quant"]["head"]["act_out"]["scale"])
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
  assert len(np.unique(steps)) > 5  # Not trivially on the grid (all zero or saturated).
  reference = _apply(name, "float", _variables(name), _inputs(name))
  reference_steps = np.asarray(reference / quant.compute_scale(reference, 8))
  assert np.max(np.abs(reference_steps - np.round(reference_steps))) > 0.1


@pytest.mark.parametrize("name", [
    "conv4", "crnn", "vit_tiny",
    pytest.param("resnet12", marks=pytest.mark.slow), pytest.param("resnet18", marks=pytest.mark.slow),
])
def test_jvp_and_grad_run_through_the_quantized_model(name):
  x = _inputs(name)
  variables = _calibrated(name, "16w8a", _variables(name), x)
  model = models.get_model(name, num_classes=5, precision="16w8a", **SMALL[name][0])

  def loss(params):
    return jnp.mean(model.apply({**variables, "params": params}, x) ** 2)

  params = variables["params"]
  rng = np.random.default_rng(3)
  tangent = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
  # One compilation for both: the forward pass is shared.
  (value, derivative), grads = jax.jit(
      lambda p, t: (jax.jvp(loss, (p,), (t,)), jax.grad(loss)(p)))(params, tangent)
  expected = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent)))
  assert np.isfinite(float(value)) and float(jnp.abs(derivative)) > 0
  chex.assert_trees_all_close(derivative, expected, rtol=1e-3, atol=1e-5)


def test_spsa_runs_through_a_quantized_model():
  name = "conv4"
  x = _inputs(name)
  variables = _calibrated(name, "16w8a", _variables(name), x)
  model = models.get_model(name, num_classes=5, precision="16w8a", **SMALL[name][0])

  def loss(params):
    return jnp.mean(model.apply({**variables, "params": params}, x) ** 2)

  value, grads = jax.jit(lambda p, k: fwdgrad.spsa_grad(loss, p, k, num_directions=2, sign=True))(
      variables["params"], jax.random.key(0))
  chex.assert_trees_all_equal_shapes(grads, variables["params"])
  assert np.isfinite(float(value))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["conv4", "resnet12", "resnet18", "crnn"])
def test_train_mode_updates_batch_stats(name):
  variables, x = _variables(name), _inputs(name)
  model = models.get_model(name, num_classes=5, **SMALL[name][0])
  out, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert out.shape == (2, 5)
  chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_vit_prompts_change_the_output_and_get_gradients():
  name = "vit_tiny"
  variables, x = _variables(name), _inputs(name)
  model = models.get_model(name, num_classes=5, **SMALL[name][0])

  def loss(prompts):
    return jnp.sum(model.apply({"params": {**variables["params"], "prompts": prompts}}, x) ** 2)

  prompts = variables["params"]["prompts"]
  loss = jax.jit(loss)
  grads = jax.jit(jax.grad(loss))(prompts)
  # Every layer's prompts influence the output (deep prompts, not only the first layer's).
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in grads)
  noise = jax.random.normal(jax.random.key(5), prompts.shape)
  assert float(jnp.abs(loss(prompts + noise) - loss(prompts))) > 1e-3 * float(loss(prompts))


def test_vit_without_prompts_and_input_checks():
  kwargs = dict(SMALL["vit_tiny"][0], num_prompts=0)
  model = models.get_model("vit_tiny", num_classes=None, **kwargs)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert "prompts" not in variables["params"]
  with pytest.raises(ValueError, match="built for 32x32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="does not divide"):
    jax.eval_shape(models.get_model("vit_tiny", image_size=30, patch_size=8).init,
                   jax.random.key(0), jnp.zeros((1, 30, 30, 3)))


def test_crnn_lstm_and_input_checks():
  model = models.get_model("crnn", num_classes=3, rnn="lstm", conv_features=(4, 4, 4),
                           rnn_features=8, precision="16w8a")
  x = jax.random.normal(jax.random.key(0), (2, 16, 16))
  variables = _random_variables(jax.eval_shape(model.init, jax.random.key(1), x))
  assert variables["params"]["rnn"]["input"]["kernel"].shape == (4 * 2, 4 * 8)
  variables = models.calibrate(model, variables, x)
  out = jax.jit(model.apply)(variables, x)
  assert out.shape == (2, 3) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="unknown rnn"):
    jax.eval_shape(models.get_model("crnn", rnn="transformer").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="too few frames"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 16)))
