"""End to end: a Flax MLP on the real scikit-learn digits, trained only through forward_gradient.

1,797 real 8x8 images bundled with scikit-learn (no download); 20% held out for testing.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import fwdgrad


class MLP(nn.Module):
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def _split():
  digits = load_digits()
  images = digits.data.astype(np.float32) / 16.0
  order = np.random.default_rng(0).permutation(len(images))
  cut = int(0.8 * len(images))
  train, test = order[:cut], order[cut:]
  return (images[train], digits.target[train]), (images[test], digits.target[test])


def _train(tx, steps, use_backprop):
  (x_train, y_train), (x_test, y_test) = _split()
  model = MLP()
  params = model.init(jax.random.key(0), x_train[:1])

  def loss_fn(params):
    logits = model.apply(params, x_train)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()

  def step(carry, _):
    params, opt_state = carry
    grads = jax.grad(loss_fn)(params) if use_backprop else params
    updates, opt_state = tx.update(grads, opt_state, params, value_fn=loss_fn)
    return (optax.apply_updates(params, updates), opt_state), None

  run = jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=steps)[0])
  params, _ = run((params, tx.init(params)))
  predictions = model.apply(params, x_test).argmax(-1)
  return float(np.mean(np.asarray(predictions) == y_test))


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["jvp", "spsa"])
def test_forward_gradient_only_reaches_90_percent(estimator):
  tx = optax.chain(
      fwdgrad.forward_gradient(estimator, key=jax.random.key(1), num_directions=8),
      optax.adam(3e-3))
  accuracy = _train(tx, steps=3000, use_backprop=False)
  assert accuracy >= 0.90, accuracy


def test_backprop_baseline_reaches_96_percent():
  accuracy = _train(optax.adam(1e-2), steps=300, use_backprop=True)
  assert accuracy >= 0.96, accuracy
