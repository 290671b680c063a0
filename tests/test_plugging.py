"""Plugging the transforms into other people's training code: Flax Linen, Flax NNX, optax.

The Linen and NNX tests follow flax's MNIST example and NNX tutorial on scikit-learn's digits,
with only the step function changed (the README's recipes). The rest cover the traps of the
issue that asked for this: each either works or fails with one line that names the fix.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from sklearn.datasets import load_digits

import fwdgrad


def _digits(count=512):
  digits = load_digits()
  images = (digits.images.astype(np.float32) / 16.0)[..., None]
  order = np.random.default_rng(0).permutation(len(images))
  train, test = order[:count], order[-300:]
  return (jnp.asarray(images[train]), jnp.asarray(digits.target[train]),
          jnp.asarray(images[test]), jnp.asarray(digits.target[test]))


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class CNN(nn.Module):
  """flax's examples/mnist CNN, narrowed for 8x8 digits."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


def _linen_train(tx, steps):
  x, y, x_test, y_test = _digits()
  model = CNN()
  params = model.init(jax.random.key(0), x[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state, images, labels):  # The only function the recipe changes.
    loss_fn = lambda params: _cross_entropy(state.apply_fn({"params": params}, images), labels)
    state = fwdgrad.apply_forward_gradient(state, loss_fn)
    return state, fwdgrad.step_loss(state.opt_state)

  losses = []
  for step in range(steps):
    batch = np.random.default_rng(step).choice(len(x), 64, replace=False)
    state, loss = train_step(state, x[batch], y[batch])
    losses.append(float(loss))
  logits = model.apply({"params": state.params}, x_test)
  return losses, float(jnp.mean(logits.argmax(-1) == y_test)), state


def test_linen_train_state_recipe_trains_with_forward_gradient():
  tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=4), optax.adam(1e-2))
  losses, accuracy, state = _linen_train(tx, steps=300)  # scripts/plugging.py prints its run
  assert int(state.step) == 300
  assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-20:])
  assert accuracy > 0.5, accuracy  # chance: 0.1


def test_linen_train_state_recipe_trains_with_qzo_ff():
  # From scratch on the 16-bit grid (slower than Adam on floats: see scripts/plugging.py).
  losses, accuracy, state = _linen_train(fwdgrad.qzo_ff(1e-2, key=0, num_directions=4), steps=300)
  assert np.mean(losses[-20:]) < 0.93 * np.mean(losses[:5]), (losses[:5], losses[-20:])
  assert accuracy > 0.25, accuracy
  scale = state.opt_state.weight_scale
  for leaf, delta in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(scale)):
    np.testing.assert_allclose(leaf / delta, np.round(leaf / delta), atol=1e-3)  # On the grid.


def test_train_state_apply_gradients_names_the_recipe():
  params = {"w": jnp.ones(3)}
  state = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=fwdgrad.forward_gradient("spsa", key=0))
  with pytest.raises(ValueError, match="TrainState.apply_gradients drops value_fn.*"
                     "fwdgrad.apply_forward_gradient"):
    state.apply_gradients(grads=params, value_fn=lambda p: jnp.sum(p["w"] ** 2))


class NNXModel(nnx.Module):
  """The NNX tutorial's CNN, narrowed, with BatchNorm and dropout."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.dense = nnx.Linear(8 * 4 * 4, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    return self.dense(self.dropout(x.reshape((x.shape[0], -1))))


def _nnx_loss(model, images, labels):
  return _cross_entropy(model(images), labels)


@pytest.mark.parametrize("kind", ["forward_gradient", "qzo_ff"])
def test_nnx_optimizer_recipe_trains_and_updates_batchnorm(kind):
  x, y, x_test, y_test = _digits()
  model = NNXModel(nnx.Rngs(0, dropout=1))
  if kind == "forward_gradient":
    tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=4, has_aux=True),
                     optax.adam(1e-2))
  else:
    tx = fwdgrad.qzo_ff(1e-2, key=0, num_directions=4, has_aux=True)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  initial_mean = np.asarray(model.bn.mean[...])

  @nnx.jit
  def train_step(model, optimizer, images, labels):  # The only function the recipe changes.
    return fwdgrad.nnx_update(optimizer, model, _nnx_loss, images, labels)

  losses = []
  for step in range(250):
    batch = np.random.default_rng(step).choice(len(x), 64, replace=False)
    losses.append(float(train_step(model, optimizer, x[batch], y[batch])))
  assert int(optimizer.step[...]) == 250
  assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-20:])
  # The running statistics moved (from the first call of each step), so eval mode works.
  assert not np.allclose(model.bn.mean[...], initial_mean)
  assert int(model.dropout.rngs.count[...]) == 250  # One dropout draw per step.
  model.eval()
  assert float(jnp.mean(model(x_test).argmax(-1) == y_test)) > 0.45


def test_nnx_update_inside_nnx_scan_matches_the_eager_loop():
  x, y, _, _ = _digits(192)
  xs, ys = x.reshape(3, 64, 8, 8, 1), y.reshape(3, 64)

  def fresh():
    model = NNXModel(nnx.Rngs(0, dropout=1))
    tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=2, has_aux=True),
                     optax.adam(1e-2))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def run(carry, batch):
    model, optimizer = carry
    return carry, fwdgrad.nnx_update(optimizer, model, _nnx_loss, *batch)

  model, optimizer = fresh()
  scanned = nnx.jit(lambda model, optimizer: run((model, optimizer), (xs, ys))[1])(model,
                                                                                  optimizer)
  other, other_optimizer = fresh()
  eager = [fwdgrad.nnx_update(other_optimizer, other, _nnx_loss, xs[i], ys[i]) for i in range(3)]
  np.testing.assert_allclose(scanned, eager, rtol=1e-5)
  assert int(optimizer.step[...]) == 3 and int(model.dropout.rngs.count[...]) == 3
  np.testing.assert_allclose(model.bn.mean[...], other.bn.mean[...], rtol=1e-5, atol=1e-7)


def test_nnx_value_fn_sees_one_dropout_mask_and_fixed_statistics():
  x, y, _, _ = _digits(64)
  model = NNXModel(nnx.Rngs(0, dropout=1))
  value_fn, params = fwdgrad.nnx_value_fn(model, _nnx_loss, x, y)
  (loss_a, state_a), (loss_b, _) = value_fn(params), value_fn(params)
  assert float(loss_a) == float(loss_b)  # Same key, same statistics: a deterministic objective.
  assert int(state_a["dropout"]["rngs"]["count"]) == 1
  assert int(model.dropout.rngs.count[...]) == 0  # The caller's model is untouched.


def test_nnx_update_without_has_aux_says_how():
  x, y, _, _ = _digits(64)
  model = NNXModel(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, optax.chain(fwdgrad.forward_gradient("spsa", key=0),
                                               optax.sgd(1e-2)), wrt=nnx.Param)
  with pytest.raises(ValueError, match="build the transform with has_aux=True.*"
                     "update_state=False"):
    fwdgrad.nnx_update(optimizer, model, _nnx_loss, x, y)
  mean = np.asarray(model.bn.mean[...])
  loss = fwdgrad.nnx_update(optimizer, model, _nnx_loss, x, y, update_state=False)
  assert np.isfinite(float(loss))
  np.testing.assert_array_equal(model.bn.mean[...], mean)  # Frozen, as asked.


def test_nnx_update_returns_the_loss_fns_aux_and_freezes_on_request():
  x, y, _, _ = _digits(64)
  model = NNXModel(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, optax.chain(
      fwdgrad.forward_gradient("spsa", key=0, has_aux=True), optax.sgd(1e-2)), wrt=nnx.Param)
  loss_and_logits = lambda model, x, y: (_nnx_loss(model, x, y), model(x))
  loss, logits = fwdgrad.nnx_update(optimizer, model, loss_and_logits, x, y, has_aux=True)
  assert logits.shape == (64, 10) and np.isfinite(float(loss))
  mean = np.asarray(model.bn.mean[...])
  fwdgrad.nnx_update(optimizer, model, _nnx_loss, x, y, update_state=False)
  np.testing.assert_array_equal(model.bn.mean[...], mean)
  assert int(optimizer.step[...]) == 2


# Aux and the step's loss.

def _quadratic(params):
  return jnp.sum((params["w"] - 1.0) ** 2)


@pytest.mark.parametrize("estimator", ["spsa", "jvp"])
def test_has_aux_comes_from_the_first_call(estimator):
  params = {"w": jnp.zeros(5)}
  value_fn = lambda p: (_quadratic(p), p["w"])
  tx = fwdgrad.forward_gradient(estimator, key=0, num_directions=12, epsilon=0.1, has_aux=True)
  state = tx.init(params)
  assert fwdgrad.step_aux(state) is None
  _, state = jax.jit(lambda s: tx.update(params, s, params, value_fn=value_fn))(state)
  aux = fwdgrad.step_aux(state)
  if estimator == "jvp":
    np.testing.assert_array_equal(aux, params["w"])  # The unperturbed primal.
  else:  # w + ε z_1, z_1 the step's first direction.
    z = fwdgrad.sample_direction(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0),
                                 params)
    np.testing.assert_allclose(aux, 0.1 * z["w"], rtol=1e-6)
  np.testing.assert_allclose(fwdgrad.step_loss(state), 5.0, rtol=0.05)
  (loss, aux), _ = (fwdgrad.spsa_grad if estimator == "spsa" else fwdgrad.jvp_grad)(
      value_fn, params, jax.random.key(3), has_aux=True)
  assert aux.shape == (5,) and np.isfinite(float(loss))


def test_has_aux_on_qzo_ff_and_the_enhanced_estimator():
  params = {"w": jnp.linspace(-1.0, 1.0, 8)}
  value_fn = lambda p: (_quadratic(p), {"mean": jnp.mean(p["w"])})
  for tx in (fwdgrad.qzo_ff(1e-2, key=0, has_aux=True),
             fwdgrad.enhanced_forward_gradient(key=0, sharpness_radius=0.05, has_aux=True)):
    state = tx.init(params)
    _, state = tx.update(params, state, params, value_fn=value_fn)
    np.testing.assert_allclose(fwdgrad.step_aux(state)["mean"], 0.0, atol=0.05)
    assert float(fwdgrad.step_loss(state)) > 0


@pytest.mark.parametrize("wrap", [
    lambda tx: optax.apply_if_finite(tx, 3),
    lambda tx: optax.MultiSteps(tx, 2),
])
def test_init_with_aux_fixes_the_state_for_wrappers_and_one_compile(wrap):
  params = {"w": jnp.zeros(3)}
  value_fn = lambda p: (_quadratic(p), {"w": p["w"], "n": jnp.sum(p["w"] > 0)})
  inner = optax.chain(fwdgrad.forward_gradient("spsa", key=0, has_aux=True), optax.sgd(0.1))
  tx = wrap(inner)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(params, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  state = fwdgrad.init_with_aux(tx, params, value_fn)
  for _ in range(4):
    params, state = step(params, state)
  assert len(traces) == 1  # One compile: the state's structure never changes.
  if isinstance(tx, optax.MultiSteps):
    with pytest.raises(ValueError, match="MultiSteps wraps"):
      fwdgrad.step_aux(state)
  else:
    assert fwdgrad.step_aux(state)["w"].shape == (3,)
  with pytest.raises(ValueError, match="no forward-gradient transform built with has_aux=True"):
    fwdgrad.init_with_aux(optax.sgd(0.1), params, value_fn)


def test_step_loss_reads_through_chains_and_wrappers():
  params = {"w": jnp.zeros(4)}
  tx = optax.chain(optax.inject_hyperparams(fwdgrad.forward_gradient,
                                            static_args=("num_directions",))(
                                                key=0, num_directions=2, epsilon=1e-3),
                   optax.apply_if_finite(optax.adam(1e-2), 3))
  state = tx.init(params)
  _, state = tx.update(params, state, params, value_fn=_quadratic)
  np.testing.assert_allclose(fwdgrad.step_loss(state), 4.0, rtol=1e-3)
  with pytest.raises(ValueError, match="holds no forward-gradient state"):
    fwdgrad.step_loss(optax.adam(1e-2).init(params))


# Checked objectives.

@pytest.mark.parametrize("bad, match", [
    (lambda p: (p["w"] - 1.0) ** 2, r"shape \(4,\).*jnp.mean\(per_example_losses\)"),
    (lambda p: jnp.sum(p["w"]).reshape(1), r"shape \(1,\).*reshape\(\(\)\)"),
    (lambda p: (jnp.sum(p["w"]), {"acc": 1.0}), r"returned a tuple.*has_aux=True"),
    (lambda p: jnp.sum(p["w"] > 0), r"dtype int32.*step function"),
    (lambda p: jnp.all(p["w"] > 0), r"dtype bool.*step function"),
])
@pytest.mark.parametrize("make", [
    lambda: fwdgrad.forward_gradient("spsa", key=0),
    lambda: fwdgrad.forward_gradient("jvp", key=0),
    lambda: fwdgrad.qzo_ff(1e-3, key=0),
])
def test_bad_objectives_are_one_line_errors(bad, match, make):
  params = {"w": jnp.linspace(0.1, 1.0, 4)}
  tx = make()
  with pytest.raises(ValueError, match=match) as error:
    tx.update(params, tx.init(params), params, value_fn=bad)
  assert "\n" not in str(error.value)


def test_has_aux_with_a_plain_loss_says_what_it_expected():
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"must return a pair \(loss, aux\) with has_aux=True"):
    fwdgrad.spsa_grad(_quadratic, params, jax.random.key(0), has_aux=True)


def test_a_non_finite_loss_warns_also_under_jit():
  params = {"w": jnp.ones(3)}
  tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0), optax.sgd(1e-2))
  state = tx.init(params)
  step = jax.jit(lambda s, scale: tx.update(params, s, params,
                                            value_fn=lambda p: scale * _quadratic(p)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, state = step(state, 1.0)  # A finite loss: no warning.
    jax.effects_barrier()
  with pytest.warns(fwdgrad.NonFiniteLossWarning, match="loss is nan at update 1.*apply_if_finite"):
    step(state, jnp.nan)
    jax.effects_barrier()


def test_bad_hyperparameters_name_the_fix():
  with pytest.raises(ValueError, match="epsilon must be positive"):
    fwdgrad.forward_gradient("spsa", key=0, epsilon=-1.0)
  with pytest.raises(ValueError, match="epsilon must be positive"):
    fwdgrad.spsa_grad(_quadratic, {"w": jnp.ones(2)}, jax.random.key(0), epsilon=0.0)
  injected = optax.inject_hyperparams(fwdgrad.forward_gradient)(key=0, num_directions=2)
  with pytest.raises(ValueError, match=r"static_args=\('num_directions',\)"):
    injected.init({"w": jnp.ones(2)})
  injected = optax.inject_hyperparams(fwdgrad.qzo_ff, static_args=("num_directions",))(1e-3,
                                                                                       key=0)
  with pytest.raises(ValueError, match=r"weight_bits sets .*static_args=\('num_directions', "
                     r"'weight_bits', 'perturbation_bits', 'z_max'\)"):
    injected.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="epsilon must be positive"):
    fwdgrad.enhanced_forward_gradient(key=0, epsilon=0.0,
                                      momentum=fwdgrad.MomentumGuidedSampling())
  with pytest.raises(ValueError, match="has dtype int32.*Close over integer state"):
    fwdgrad.spsa_grad(lambda p: jnp.sum(p["n"]) * 1.0, {"n": jnp.ones(2, jnp.int32)},
                      jax.random.key(0))


def test_conv4_on_too_small_images_says_how_big():
  model = fwdgrad.models.get_model("conv4", num_classes=5)
  with pytest.raises(ValueError, match="at least 16x16 pixels.*features=\\(64, 64\\)"):
    model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"add the batch axis \(images\[None\]\)"):
    model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))


# Composition with optax.

def _two_leaves():
  return {"head": jnp.zeros(3), "body": jnp.ones(3)}


@pytest.mark.parametrize("wrap", [
    lambda fg: optax.masked(fg, {"head": True, "body": False}),
    lambda fg: optax.masked(fwdgrad.enhanced_forward_gradient(
        key=0, momentum=fwdgrad.MomentumGuidedSampling(), sharpness_radius=0.05),
                            {"head": True, "body": False}),
    lambda fg: optax.multi_transform({"train": fg, "freeze": optax.set_to_zero()},
                                     {"head": "train", "body": "freeze"}),
])
def test_masking_around_the_estimator_points_to_partition(wrap):
  params = _two_leaves()
  tx = wrap(fwdgrad.forward_gradient("spsa", key=0))
  loss = lambda p: jnp.sum(p["head"] ** 2) + jnp.sum(p["body"] ** 2)
  with pytest.raises(ValueError, match="optax.MaskedNode.*fwdgrad.partition.*bind_frozen"):
    tx.update(params, tx.init(params), params, value_fn=loss)


def test_partition_and_bind_frozen_leave_frozen_leaves_exactly():
  """The composition table's fix for chain(estimator, masked(optimizer, mask))."""
  params = _two_leaves()
  loss = lambda p: jnp.sum((p["head"] - 1.0) ** 2) + jnp.sum(p["body"] ** 2)
  trainable, frozen = fwdgrad.partition(params, {"head": True, "body": False})
  tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=2), optax.sgd(0.1))
  value_fn = fwdgrad.bind_frozen(loss, frozen)
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state):
    updates, state = tx.update(trainable, state, trainable, value_fn=value_fn)
    return optax.apply_updates(trainable, updates), state

  for _ in range(20):
    trainable, state = step(trainable, state)
  merged = fwdgrad.merge(trainable, frozen)
  np.testing.assert_array_equal(merged["body"], params["body"])
  assert float(jnp.sum((merged["head"] - 1.0) ** 2)) < 3.0


def test_micro_steps_with_multisteps_equal_the_estimate_on_the_union():
  rng = np.random.default_rng(0)
  x, y = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32), jnp.asarray(rng.normal(size=32),
                                                                         jnp.float32)
  params = {"w": jnp.zeros(5)}
  loss_on = lambda xs, ys: (lambda p: jnp.mean((xs @ p["w"] - ys) ** 2))
  k = 4
  accumulated = optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=3,
                                                     micro_steps=k),
                            optax.MultiSteps(optax.sgd(0.1), k))
  whole = optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=3), optax.sgd(0.1))
  state = accumulated.init(params)
  for micro in range(k):
    part = slice(8 * micro, 8 * (micro + 1))
    updates, state = accumulated.update(params, state, params, value_fn=loss_on(x[part], y[part]))
    if micro < k - 1:
      np.testing.assert_array_equal(updates["w"], 0.0)
  expected, _ = whole.update(params, whole.init(params), params, value_fn=loss_on(x, y))
  np.testing.assert_allclose(updates["w"], expected["w"], rtol=2e-3, atol=1e-6)


def test_multisteps_around_the_estimator_fails_loudly():
  params = {"w": jnp.zeros(2)}
  tx = optax.MultiSteps(optax.chain(fwdgrad.forward_gradient("spsa", key=0), optax.sgd(0.1)), 4)
  _, state = tx.update(params, tx.init(params), params, value_fn=_quadratic)
  with pytest.raises(ValueError, match="MultiSteps wraps the forward-gradient transform.*"
                     "micro_steps=k"):
    fwdgrad.step_loss(state)
