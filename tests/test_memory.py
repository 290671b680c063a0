"""Compiled memory of training steps against one inference call (XLA's own accounting).

XLA's buffer assignment is deterministic for a program, so these are not timing tests. The model's
parameters dominate the footprint of its inference call, the case where a naive forward-gradient
step costs several times inference. benchmarks/run.py measures the same ratios on real models.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import fwdgrad
from fwdgrad import profiling
from problems import dense_problem


def _problem():
  return dense_problem((384, 256))


def _optax_step_memory(tx, params, value_fn):
  def step(params, state):
    updates, state = tx.update(params, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Donated buffers that a small program cannot reuse.
    return profiling.step_memory(step, params, tx.init(params), donate_argnums=(0, 1))


def _optax_step_ratio(tx, params, x, y, loss_fn):
  inference = profiling.step_memory(loss_fn, params, x, y)
  memory = _optax_step_memory(tx, params, lambda p: loss_fn(p, x, y))
  return profiling.memory_ratio(memory, inference)


@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("estimator", ["spsa", "jvp"])
def test_forward_gradient_with_sgd_is_at_most_2_2x_inference(estimator, num_directions):
  params, x, y, loss_fn = _problem()
  tx = optax.chain(fwdgrad.forward_gradient(estimator, key=0, num_directions=num_directions),
                   optax.sgd(1e-2))
  assert _optax_step_ratio(tx, params, x, y, loss_fn) <= 2.2


@pytest.mark.parametrize("num_directions", [1, 3])
def test_qzo_ff_is_at_most_2_2x_inference(num_directions):
  params, x, y, loss_fn = _problem()
  tx = fwdgrad.qzo_ff(1e-3, key=0, num_directions=num_directions)
  assert _optax_step_ratio(tx, params, x, y, loss_fn) <= 2.2


@pytest.mark.parametrize("num_directions", [1, 3])
def test_fused_step_is_at_most_1_2x_inference(num_directions):
  params, x, y, loss_fn = _problem()
  step = fwdgrad.make_fused_train_step(loss_fn, learning_rate=1e-2,
                                       num_directions=num_directions)
  inference = profiling.step_memory(loss_fn, params, x, y)
  memory = profiling.step_memory(step, params, jax.random.key(0), 0, x, y)
  assert profiling.memory_ratio(memory, inference) <= 1.2


@pytest.mark.parametrize("distribution", ["irwin_hall", "fast_gaussian", "fast_rademacher"])
def test_directions_are_not_stored_with_a_fused_sampler(distribution):
  # The step's scratch stays far below one copy of the largest leaf (384 x 200 floats).
  params, x, y, loss_fn = _problem()
  step = fwdgrad.make_fused_train_step(loss_fn, learning_rate=1e-2, num_directions=3,
                                       distribution=distribution)
  memory = profiling.step_memory(step, params, jax.random.key(0), 0, x, y)
  assert memory.temp < 0.25 * 384 * 200 * 4


class _Conv(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(128, (3, 3))(x))
    x = nn.relu(nn.Conv(256, (3, 3))(x))
    return nn.Dense(5)(x.mean(axis=(1, 2)))


def test_directions_of_conv_kernels_are_not_stored():
  # Rank-4 leaves: a direction drawn on the kernel's shape (not flat) was once kept whole by XLA.
  model = _Conv()
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 64))
  y = jnp.arange(2)
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()
  step = fwdgrad.make_fused_train_step(loss_fn, learning_rate=1e-2, num_directions=1)
  inference = profiling.step_memory(loss_fn, params, x, y)
  memory = profiling.step_memory(step, params, jax.random.key(0), 0, x, y)
  assert profiling.memory_ratio(memory, inference) <= 1.2
  assert memory.temp < 0.25 * 3 * 3 * 128 * 256 * 4


class _ConvNet(nn.Module):
  features: int
  depth: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Conv(self.features, (3, 3))(x))
    return nn.Dense(5)(x.mean(axis=(1, 2)))


def _conv_problem(features, depth, input_shape):
  """``(params, x, y, loss_fn(p, x, y))`` of a ReLU conv net on a random batch."""
  model = _ConvNet(features, depth)
  x = jax.random.normal(jax.random.key(1), input_shape)
  y = jnp.arange(input_shape[0]) % 5
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()
  return params, x, y, loss_fn


@pytest.mark.parametrize("num_directions", [1, 3])
def test_jvp_step_of_an_activation_bound_model_is_at_most_2_2x_inference(num_directions):
  # A jvp holds a layer's primal and tangent activations together: 2x inference's scratch at
  # best. Drawn inline, the tangent was ready late and XLA ran the primal chain ahead of it,
  # keeping activations alive until the tangent caught up (2.32x and 2.66x here, 3.25x on Conv4).
  params, x, y, loss_fn = _conv_problem(16, 3, (8, 32, 32, 16))
  tx = optax.chain(fwdgrad.forward_gradient("jvp", key=0, num_directions=num_directions),
                   optax.sgd(1e-2))
  assert _optax_step_ratio(tx, params, x, y, loss_fn) <= 2.2


class _Wide(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(5)(x.mean(axis=(1, 2)))


def _wide_problem():
  model = _Wide()
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 8))
  y = jnp.arange(8) % 5
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()
  return params, loss_fn, profiling.step_memory(loss_fn, params)


# The forward calls of a step must not share XLA's materialised constants: merged across calls, a
# ReLU's zero broadcast to each activation's shape was written out and kept (27-29x inference
# here, with XLA's default CPU flags; 73 MiB on Conv4, and 1.33x the time of its forward calls).
@pytest.mark.parametrize("num_directions", [1, 3])
def test_spsa_and_qzo_calls_share_no_activation_sized_constants(num_directions):
  params, loss_fn, inference = _wide_problem()
  for tx in (optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=num_directions),
                         optax.sgd(1e-2)),
             fwdgrad.qzo_ff(1e-3, key=0, num_directions=num_directions)):
    memory = _optax_step_memory(tx, params, loss_fn)
    assert profiling.memory_ratio(memory, inference) < 4


@pytest.mark.parametrize("num_directions", [1, 3])
def test_fused_calls_share_no_activation_sized_constants(num_directions):
  # The same for the fused step, whose two calls per direction were inline (26x here).
  params, loss_fn, inference = _wide_problem()
  step = lambda p, key: fwdgrad.fused_spsa_step(loss_fn, p, key, learning_rate=1e-2,
                                                num_directions=num_directions)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    memory = profiling.step_memory(step, params, jax.random.key(0), donate_argnums=(0,))
  assert profiling.memory_ratio(memory, inference) <= 1.2


@pytest.mark.parametrize("num_directions", [1, 3])
def test_calls_get_no_perturbed_copy_of_the_params(num_directions):
  # Conv kernels dominate here (with XLA's default CPU flags the activations stay inside YNNPACK's
  # fusions). A call compiled apart receives its operands written out in full: given w + εz, the
  # SPSA step held a perturbed copy of every kernel beside the gradient (3.0x inference at m = 3;
  # 1.38x on ResNet18 at batch 32, where activations dominate). It must build the point inside
  # the call, from the params and a key: 2.0x, the params and the update. The batch is closed
  # over by both the step and the inference, so neither counts it.
  params, x, y, loss_fn = _conv_problem(128, 2, (16, 12, 12, 16))
  value_fn = lambda p: loss_fn(p, x, y)
  tx = optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=num_directions),
                   optax.sgd(1e-2))
  memory = _optax_step_memory(tx, params, value_fn)
  assert profiling.memory_ratio(memory, profiling.step_memory(value_fn, params)) <= 2.2


def test_calls_share_a_frozen_backbone():
  # Linear probing: the backbone does not depend on the trained head, so the calls stay inline
  # and XLA computes it once per step instead of 2m times.
  params, loss_fn, _ = _wide_problem()
  assert fwdgrad.estimators.frozen_share(loss_fn, params) < 0.1
  head = params["Dense_0"]
  probe = lambda h: loss_fn({**params, "Dense_0": h})
  assert fwdgrad.estimators.frozen_share(probe, head) > 0.9


class _Tall(nn.Module):

  @nn.compact
  def __call__(self, x):
    for _ in range(6):
      x = nn.tanh(nn.LayerNorm()(nn.Dense(64)(x)))
    return nn.Dense(5)(x)


def test_jvp_directions_do_not_share_the_primal_activations():
  # Activations (a batch of 2048) dominate. The primal half of m jvps is one computation to XLA;
  # run once, its activations stay alive for all m tangent passes (1.8x the m = 1 step here,
  # 28x inference on ViT-tiny). Each direction must recompute its own primal instead.
  model = _Tall()
  x = jax.random.normal(jax.random.key(1), (2048, 64))
  y = jnp.arange(2048) % 5
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()
  memory = {}
  for m in (1, 3):
    step = lambda p, m=m: fwdgrad.jvp_grad(loss_fn, p, jax.random.key(0), num_directions=m)
    memory[m] = profiling.step_memory(step, params).temp
  assert memory[3] < 1.3 * memory[1]
