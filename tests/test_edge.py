"""The true-integer forward, its IREE modules, and QZO-FF driven by them (fwdgrad.edge)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad
from fwdgrad import models
from fwdgrad import qzo
from fwdgrad.edge import integer
from fwdgrad.edge import runner
from fwdgrad.edge import runtime

from test_train_lib import REPO

FEATURES = (4, 8)


def _calibrated(precision="16w8a", key=0):
  """A Conv4 with random BatchNorm statistics (so folding is exercised), calibrated."""
  model = models.get_model("conv4", num_classes=3, features=FEATURES, precision=precision)
  x = jax.random.normal(jax.random.key(key), (24, 8, 8, 1))
  variables = dict(model.init(jax.random.key(key + 1), x[:1]))
  rng = np.random.default_rng(key)
  stats = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32),
                                 dict(variables["batch_stats"]))
  for name in stats:
    stats[name] = dict(stats[name], mean=jnp.asarray(rng.normal(0, 0.3, stats[name]["mean"].shape),
                                                     jnp.float32))
  params = dict(variables["params"])
  for name in ("block0", "block1"):
    params[name] = dict(params[name], scale=jnp.asarray(rng.uniform(-1.5, 1.5, FEATURES[int(name[-1])]),
                                                        jnp.float32),
                        bias=jnp.asarray(rng.normal(0, 0.3, FEATURES[int(name[-1])]), jnp.float32))
  params["head"] = dict(params["head"], bias=jnp.asarray(rng.normal(0, 0.2, 3), jnp.float32))
  variables = models.calibrate(model, {"params": params, "batch_stats": stats}, x)
  tx = fwdgrad.qzo_ff(1e-2, key=0, weight_scale=models.weight_scales(variables)["head"],
                      weight_bits=models.Precision.parse(precision).weight_bits)
  state = tx.init(params["head"])
  program = integer.conv4_program(model, variables)
  return model, variables, program, state, np.asarray(x)


def _reference_logits(program, variables, x_q):
  """Python-int arithmetic apart from the library: conv, requantization, ReLU, pooling, head."""
  def rescale(acc, multiplier, shift):
    acc = acc.astype(object)
    return np.vectorize(lambda a, m, k: (int(a) * int(m) + (1 << int(k) >> 1)) >> int(k),
                        otypes=[object])(acc, multiplier, shift).astype(np.int64)

  h = x_q.astype(np.int64)
  for kernel, rq in zip(program.kernels, program.requants):
    n, height, width, _ = h.shape
    padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    acc = np.zeros((n, height, width, kernel.shape[-1]), np.int64)
    for i in range(3):
      for j in range(3):
        acc += np.einsum("nhwc,co->nhwo", padded[:, i:i + height, j:j + width],
                         kernel[i, j].astype(np.int64))
    y = rescale(rq.sign * (acc + rq.offset), rq.multiplier, rq.shift)
    y = np.maximum(np.clip(y, -127, 127), 0)
    h = y.reshape(n, height // 2, 2, width // 2, 2, -1).max(axis=(2, 4))
  head = integer.head_codes(program, variables["params"]["head"])
  acc = h.reshape(h.shape[0], -1) @ head["kernel"].astype(np.int64)
  bias = rescale(head["bias"].astype(np.int64), program.head.bias_multiplier,
                 program.head.bias_shift)
  return np.clip(rescale(acc + bias, program.head.multiplier, program.head.shift), -127, 127)


@pytest.mark.parametrize("precision", ["16w8a", "8w8a"])
def test_integer_forward_equals_an_exact_integer_reference(precision):
  _, variables, program, _, x = _calibrated(precision)
  x_q = integer.quantize_inputs(program, x)
  assert x_q.dtype == np.int8 and program.kernels[0].dtype == (np.int16 if precision == "16w8a"
                                                               else np.int8)
  head = integer.head_codes(program, variables["params"]["head"])
  got = np.asarray(integer.logits(program, integer.features(program, x_q), head))
  assert got.dtype == np.int8
  np.testing.assert_array_equal(got, _reference_logits(program, variables, x_q))
  assert any(np.any(rq.sign < 0) for rq in program.requants)  # A negative γ was folded.


def test_the_integer_forward_has_no_float_operation():
  _, variables, program, _, x = _calibrated()
  x_q = integer.quantize_inputs(program, x)
  f = np.asarray(integer.features(program, x_q))
  head = integer.head_codes(program, variables["params"]["head"])
  for text in (runtime.stablehlo(lambda x: integer.features(program, x), [x_q]),
               runtime.stablehlo(lambda f, b, w: integer.logits(program, f, {"bias": b, "kernel": w}),
                                 [f, head["bias"], head["kernel"]])):
    body = text[text.index("func.func"):]
    assert "conv" in body or "dot" in body
    assert not re.search(r"\b(f16|bf16|f32|f64)\b", body), re.findall(r".*\bf32\b.*", body)[:3]


@pytest.mark.parametrize("precision", ["16w8a", "8w8a", "16w8a-per-channel"])
def test_the_simulation_computes_the_engine_codes_bit_for_bit(precision):
  model, variables, program, _, x = _calibrated(precision, key=3)
  # Inside and far beyond the calibration range (saturating codes), and after the head moved.
  for inputs in (x, 4.0 * x[::-1]):
    agreement = integer.simulation_agreement(model, variables, program, inputs)
    assert agreement == {"equal": 1.0, "max_difference": 0}, agreement
  head = variables["params"]["head"]
  moved = dict(variables, params=dict(variables["params"], head=dict(
      head, kernel=head["kernel"] * 0.7, bias=head["bias"] + 0.05)))
  agreement = integer.simulation_agreement(model, moved, program, x)
  assert agreement == {"equal": 1.0, "max_difference": 0}, agreement
  # The straight-through derivative is still there (jvp and grad through the exact forward).
  loss = lambda p: jnp.sum(model.apply(dict(variables, params=p), jnp.asarray(x)) ** 2)
  grads = jax.grad(loss)(variables["params"])
  assert float(jnp.sum(jnp.abs(grads["block0"]["kernel"]))) > 0
  _, tangent = jax.jvp(loss, (variables["params"],), (grads,))
  assert float(tangent) > 0


def test_inputs_the_integer_forward_cannot_take_are_refused():
  model, variables, _, state, _ = _calibrated()
  with pytest.raises(ValueError, match="static precision"):
    integer.conv4_program(models.get_model("conv4", num_classes=3, features=FEATURES),
                          variables)
  with pytest.raises(ValueError, match="not calibrated"):
    integer.conv4_program(model, {k: v for k, v in variables.items() if k != "quant"})
  per_channel = jax.tree_util.tree_map(lambda s: jnp.full((3,), s), state.weight_scale)
  with pytest.raises(ValueError, match="per-tensor"):
    runner.update_constants(state._replace(weight_scale=per_channel), 1e-2)
  with pytest.raises(ValueError, match="unknown IREE backend"):
    runtime.CompiledModule("", "cuda")


def test_numpy_rescaling_matches_the_library_int32_one():
  from fwdgrad import fixed_point  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for multiplier, shift in ((24182, 11), (8495, 31), (31062, 14), (1, 0), (20000, 20)):
    # (Below a shift of 16 the int32 version needs |x| M < 2^(31 + k).)
    bound = 2**30 if shift >= 16 else 2**15
    x = rng.integers(-bound, bound, 4000).astype(np.int32)
    np.testing.assert_array_equal(
        runner.multiply_shift(x, multiplier, shift),
        np.asarray(fixed_point.multiply_shift(jnp.asarray(x), multiplier, shift)))
  np.testing.assert_array_equal(runner.round_divide(np.arange(-10, 11), 3),
                                np.asarray(fixed_point.round_divide(jnp.arange(-10, 11), 3)))


@pytest.mark.parametrize("backend", ["llvm-cpu", "vmvx"])
def test_qzo_ff_on_the_compiled_engine_equals_qzo_ff_in_jax(backend):
  pytest.importorskip("iree.runtime")
  model, variables, program, state, x = _calibrated()
  head_q = {k: np.asarray(v) for k, v in
            qzo.qzo_integer_weights(variables["params"]["head"], state).items()}
  constants = runner.update_constants(state, 1e-2)
  x_q = integer.quantize_inputs(program, x)
  labels = np.arange(x.shape[0], dtype=np.int32) % 3
  modules = runner.compile_modules(program, head_q, x_q.shape[1:], x_q.shape[0], 10,
                                   num_directions=3, fmt=constants.fmt, backend=backend)
  # The engine's integer outputs are the JAX integer forward's, bit for bit.
  f_jax = np.asarray(integer.features(program, x_q))
  f_engine = runner.batched(modules.features, x_q, 10)  # Padded last chunk.
  np.testing.assert_array_equal(f_engine, f_jax)
  np.testing.assert_array_equal(
      runner.batched(modules.logits, f_engine, 10, head_q["bias"], head_q["kernel"]),
      np.asarray(integer.logits(program, f_jax, head_q)))
  key_data = np.asarray(jax.random.key_data(jax.random.key(7)))
  for got, want in zip(modules.directions(key_data, np.int32(3)),
                       runner.direction_fn(head_q, 3, constants.fmt)(jnp.asarray(key_data), 3)):
    np.testing.assert_array_equal(got, np.asarray(want))
  # Steps on the engine with the numpy integer update = fwdgrad.qzo_ff on the same forward.
  steps = 6
  w_q = dict(head_q)
  for t in range(steps):
    w_q, _ = runner.engine_step(modules, w_q, constants, key_data, t, f_engine, labels)
  want, losses, _ = runner.jax_reference(program, head_q, constants.weight_scale, 1e-2, 7, 3,
                                         1e-3, f_jax, labels, steps)
  for k in runner.LEAVES:
    np.testing.assert_array_equal(w_q[k], want[k])
  assert sum(int(np.sum(w_q[k] != head_q[k])) for k in w_q) > 0
  assert losses[-1] < losses[0]


@pytest.mark.slow
def test_the_edge_command_adapts_the_quickstart_model_on_the_engine(tmp_path, monkeypatch, capsys):
  pytest.importorskip("iree.runtime")
  from fwdgrad.edge import __main__ as edge_main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  edge_main.main(["--config", "configs/quickstart.py:tiny", "--workdir", str(tmp_path),
                  "--steps", "4", "--backends", "llvm-cpu"])
  out = capsys.readouterr().out
  assert "| IREE llvm-cpu |" in out and "integer weights equal to JAX: True" in out
  for name in ("features", "losses", "logits", "directions"):
    assert (tmp_path / "llvm-cpu" / f"{name}.vmfb").stat().st_size > 1000
  saved = np.load(tmp_path / "llvm-cpu" / "head_q.npz")
  assert saved["kernel"].dtype == np.int16
  with pytest.raises(SystemExit):
    edge_main.main(["--config", "configs/quickstart.py:tiny", "--workdir", str(tmp_path),
                    "--method", "backprop"])


# ResNet12, the GRU CRNN and the speech embedding: small networks with random BatchNorm statistics
# (and negative γ), so every folding, leaky ReLU, residual sum, pool and gate table is exercised.
BACKBONES = {
    "resnet12": (dict(widths=(4, 8)), (6, 16, 16, 3)),
    "crnn": (dict(conv_features=(4, 8), pool_sizes=((2, 2), (2, 2)), rnn_features=6), (6, 24, 16)),
    "speech_embedding": ({}, (4, 76, 32)),
}


def _calibrated_backbone(name, precision, key=0):
  kwargs, shape = BACKBONES[name]
  model = models.get_model(name, num_classes=4, precision=precision, **kwargs)
  x = jax.random.normal(jax.random.key(key), shape) * 0.5 + (2.0 if name == "speech_embedding"
                                                             else 0.0)
  variables = dict(model.init(jax.random.key(key + 1), x[:1]))
  rng = np.random.default_rng(key)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree.map(
        lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32), variables["batch_stats"])

  def randomize(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):  # BatchNorm γ, some negative.
      return jnp.asarray(rng.uniform(-1.5, 1.5, leaf.shape), jnp.float32)
    if jax.tree_util.keystr(path).endswith("['bias']"):
      return jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32)
    return leaf
  variables["params"] = jax.tree_util.tree_map_with_path(randomize, variables["params"])
  variables = models.calibrate(model, variables, x)
  return model, variables, integer.program(model, variables), np.asarray(x)


@pytest.mark.parametrize("name,precision", [
    ("resnet12", "16w8a"), ("resnet12", "8w8a"), ("crnn", "16w8a"),
    ("speech_embedding", "16w8a")])
def test_every_backbone_simulation_computes_the_engine_codes_bit_for_bit(name, precision):
  model, variables, program, x = _calibrated_backbone(name, precision)
  for inputs in (x, 3.0 * x[::-1]):  # Inside and beyond the calibration range.
    agreement = integer.simulation_agreement(model, variables, program, inputs)
    assert agreement == {"equal": 1.0, "max_difference": 0}, agreement
  # The integer model is the float model up to rounding: its logits follow the float ones.
  float_model = model.clone(precision="float")
  float_logits = np.asarray(float_model.apply(
      {k: v for k, v in variables.items() if k != "quant"}, jnp.asarray(x)))
  engine = np.asarray(integer.logits(program, integer.features(
      program, integer.quantize_inputs(program, x)), integer.head_codes(
          program, variables["params"]["head"])), np.float64) * program.head.logit_scale
  assert np.corrcoef(engine.ravel(), float_logits.ravel())[0, 1] > 0.95
  if name == "speech_embedding":  # (Its derivative is tested in test_speech_embedding.py.)
    return
  # Compiled or op by op, the simulation computes the same codes.
  np.testing.assert_array_equal(np.asarray(model.apply(variables, jnp.asarray(x))),
                                np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x))))
  # The straight-through derivative runs through the exact forward (jvp and grad agree).
  loss = lambda p: jnp.sum(model.apply(dict(variables, params=p), jnp.asarray(x)) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  _, tangent = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(variables["params"], grads)
  norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads))
  assert np.isfinite(float(value)) and norm > 0
  np.testing.assert_allclose(float(tangent), norm, rtol=1e-3)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_integer_forward_has_no_float_operation(name):
  _, _, program, x = _calibrated_backbone(name, "16w8a")
  x_q = integer.quantize_inputs(program, x)
  text = runtime.stablehlo(lambda x: integer.features(program, x), [x_q])
  body = text[text.index("func.func"):]
  assert "convolution" in body
  assert not re.search(r"\b(f16|bf16|f32|f64)\b", body), re.findall(r".*\bf32\b.*", body)[:3]


def test_integer_operations_between_layers_match_their_real_values():
  from fwdgrad.models import crnn  # pylint: disable=g-import-not-at-top
  from fwdgrad.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a, b = (rng.integers(-127, 128, 5000) for _ in range(2))
  # Leaky ReLU on its own grid: the negative side times 0.1, rounded (ties up), the positive
  # side unchanged; onto a grid 4x finer, the real value's code but for an ulp of the multiplier.
  got = np.asarray(layers.leaky_relu_codes(jnp.asarray(a, jnp.int32),
                                           layers.leaky_relu_constants(0.1)))
  np.testing.assert_array_equal(got, np.where(a >= 0, a, np.floor(a * 0.1 + 0.5)))
  got = np.asarray(layers.leaky_relu_codes(jnp.asarray(a, jnp.int32),
                                           layers.leaky_relu_constants(0.1, 0.04, 0.01)))
  want = np.clip(np.rint(np.where(a >= 0, a, 0.1 * a) * 4.0), -127, 127)
  assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.01
  # A rescaled sum: the real sum's code, but for a rare tie or an ulp of the multipliers.
  sa, sb, sy = 0.031, 0.017, 0.045
  got = np.asarray(layers.add_codes(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32),
                                    layers.add_constants(sa, sb, sy)))
  want = np.clip(np.rint((a * sa + b * sb) / sy), -127, 127)
  assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.01
  # A mean over 25 positions.
  x = rng.integers(-127, 128, (40, 25))
  got = np.asarray(layers.mean_codes(jnp.asarray(x, jnp.int32), 1, layers.mean_constants(
      jnp.float32(0.02), jnp.float32(0.01), 25)))
  want = np.clip(np.rint(x.mean(1) * 2.0), -127, 127)
  assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.05
  # A GRU step on codes against the float GRU on their values: within a few codes.
  scales = (0.03, 0.02, 1 / 127, 0.04, 0.04, 0.05)
  gx, gh = rng.integers(-100, 100, (50, 12)), rng.integers(-100, 100, (50, 12))
  h = rng.integers(-127, 128, (50, 4))
  got = np.asarray(crnn.gru_codes(jnp.asarray(gx, jnp.int32), jnp.asarray(gh, jnp.int32),
                                  jnp.asarray(h, jnp.int32), crnn.gru_constants(*scales)))
  x_r, x_z, x_n = np.split(gx * scales[0], 3, -1)
  h_r, h_z, h_n = np.split(gh * scales[1], 3, -1)
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
  n = np.tanh(x_n + r * h_n)
  want = ((1 - z) * n + z * h * scales[2]) / scales[2]
  assert np.abs(got - want).max() <= 4 and np.abs(got - want).mean() < 1.0


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_runs_on_the_engine_as_in_jax(name):
  pytest.importorskip("iree.runtime")
  _, variables, program, x = _calibrated_backbone(name, "16w8a")
  x_q = integer.quantize_inputs(program, x[:2])
  head = integer.head_codes(program, variables["params"]["head"])
  forward = lambda x, b, w: integer.logits(program, integer.features(program, x),
                                           {"bias": b, "kernel": w})
  module = runtime.compile_function(forward, [x_q, head["bias"], head["kernel"]], "llvm-cpu")
  np.testing.assert_array_equal(module(x_q, head["bias"], head["kernel"]),
                                np.asarray(forward(x_q, head["bias"], head["kernel"])))
