"""Every docstring example in the package runs as written.

An example may use the names a reader brings from their own code, provided here (see
``_namespace``): ``jax``, ``jnp``, ``np``, ``optax``, ``functools``, ``fwdgrad``, a small Flax model
``model`` with a ``head`` and prompts, its ``params``, a batch ``x``, ``y`` (also as ``batch``),
``loss_fn(params, *batch)``, ``grads`` shaped like ``params``, a scalar objective ``f`` and a PRNG
``key``. Examples that need files or devices this machine does not have say ``+SKIP``.
"""

import doctest
import functools
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fwdgrad


def _modules():
  names = ["fwdgrad"]
  for info in pkgutil.walk_packages(fwdgrad.__path__, "fwdgrad."):
    names.append(info.name)
  return sorted(names)


def _shared():  # Fresh per module: an example may donate (delete) its params.
  model = fwdgrad.models.get_model("vit_tiny", num_classes=3, image_size=8, patch_size=4,
                                   width=16, depth=1, num_heads=2, mlp_features=32,
                                   num_prompts=2)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
  y = jnp.arange(4) % 3
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, *batch):
    del batch  # The example's batch is closed over.
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return dict(model=model, x=x, y=y, batch=(x, y), params=params, loss_fn=loss_fn,
              grads=jax.tree_util.tree_map(jnp.ones_like, params), key=jax.random.key(0),
              f=lambda p: sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(p)))


def _namespace():
  return dict(jax=jax, jnp=jnp, np=np, optax=optax, functools=functools, fwdgrad=fwdgrad,
              **_shared())


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
  failures = []
  for test in tests:
    test.globs = {**module.__dict__, **_namespace()}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=failures.append)
  assert not failures, "".join(failures)[:6000]
