"""The Linen TrainState and NNX recipes of the README on scikit-learn's digits, as a table.

  python scripts/plugging.py

Runs the four trainings that tests/test_plugging.py checks (the same models, data, steps and
learning rates: flax's MNIST CNN and the NNX tutorial's CNN narrowed for 8x8 digits, trained from
scratch with only the step function changed) and prints their losses and held-out accuracies.
"""

import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import fwdgrad  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_plugging as recipes  # pylint: disable=g-import-not-at-top,wrong-import-position


def _nnx(tx, steps):
  x, y, x_test, y_test = recipes._digits()  # pylint: disable=protected-access
  model = recipes.NNXModel(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = nnx.jit(lambda model, optimizer, a, b: fwdgrad.nnx_update(
      optimizer, model, recipes._nnx_loss, a, b))  # pylint: disable=protected-access
  losses = []
  for index in range(steps):
    batch = np.random.default_rng(index).choice(len(x), 64, replace=False)
    losses.append(float(step(model, optimizer, x[batch], y[batch])))
  model.eval()
  return losses, float(jnp.mean(model(x_test).argmax(-1) == y_test))


def main():
  runs = [
      ("Linen TrainState", "forward_gradient spsa m=4 + adam(1e-2)", 300, lambda: recipes._linen_train(  # pylint: disable=protected-access
          optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=4),
                      optax.adam(1e-2)), 300)[:2]),
      ("Linen TrainState", "qzo_ff 16-bit, η=1e-2, m=4", 300, lambda: recipes._linen_train(  # pylint: disable=protected-access
          fwdgrad.qzo_ff(1e-2, key=0, num_directions=4), 300)[:2]),
      ("NNX Optimizer (BatchNorm, dropout)", "forward_gradient spsa m=4 + adam(1e-2)", 250,
       lambda: _nnx(optax.chain(fwdgrad.forward_gradient("spsa", key=0, num_directions=4,
                                                         has_aux=True), optax.adam(1e-2)), 250)),
      ("NNX Optimizer (BatchNorm, dropout)", "qzo_ff 16-bit, η=1e-2, m=4", 250,
       lambda: _nnx(fwdgrad.qzo_ff(1e-2, key=0, num_directions=4, has_aux=True), 250)),
  ]
  print("| recipe | transform | steps | loss, first 5 → last 20 steps | test accuracy (300 "
        "held-out digits) | seconds |")
  print("|---|---|---|---|---|---|")
  for recipe, transform, steps, run in runs:
    start = time.perf_counter()
    losses, accuracy = run()
    print(f"| {recipe} | {transform} | {steps} | {np.mean(losses[:5]):.2f} → "
          f"{np.mean(losses[-20:]):.2f} | {100 * accuracy:.1f}% | "
          f"{time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
  main()
