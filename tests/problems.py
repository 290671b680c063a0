"""Small classification problems shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class DenseNet(nn.Module):
  """ReLU layers of widths ``hidden``, then a 5-way linear head."""
  hidden: tuple

  @nn.compact
  def __call__(self, x):
    for features in self.hidden:
      x = nn.relu(nn.Dense(features)(x))
    return nn.Dense(5)(x)


def dense_problem(hidden):
  """``(params, x, y, loss_fn)``: a :class:`DenseNet` on 16 random 200-feature examples."""
  model = DenseNet(tuple(hidden))
  x = jax.random.normal(jax.random.key(1), (16, 200))
  y = jnp.arange(16) % 5
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, x, y, loss_fn
