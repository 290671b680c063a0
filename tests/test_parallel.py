"""Tests for fwdgrad.parallel: perturbation-parallel SPSA over 8 virtual CPU devices.

XLA fixes the number of CPU devices when JAX starts, so the multi-device checks run in a child
Python process started with ``--xla_force_host_platform_device_count=8``.
"""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from fwdgrad import parallel

_CHILD = textwrap.dedent("""
    import re
    import chex
    import jax
    import jax.numpy as jnp
    import optax
    from fwdgrad import estimators, parallel

    assert jax.device_count() == 8, jax.devices()
    params = {"w": jax.random.normal(jax.random.key(0), (24, 6)) * 0.3, "b": jnp.zeros(6)}
    x = jax.random.normal(jax.random.key(1), (16, 24))
    y = jnp.arange(16) % 6

    def loss_fn(p, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    key = jax.random.key(5)
    for m, sign in ((1, False), (3, True), (5, False)):
      loss, grads = estimators.spsa_grad(lambda p: loss_fn(p, x, y), params, key,
                                         num_directions=m, sign=sign)
      expected = jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)
      for shape in ((8, 1), (4, 2), (2, 4), (3, 1)):
        mesh = parallel.make_mesh(*shape, devices=jax.devices()[:shape[0] * shape[1]])
        step = parallel.make_parallel_train_step(loss_fn, mesh, learning_rate=0.1,
                                                 num_directions=m, sign=sign)
        got, got_loss = step(jax.tree.map(jnp.copy, params), key, x, y)
        # The central difference divides loss rounding (the shards' mean is summed in another
        # order) by 2 epsilon; sign-SPSA has no such amplification.
        chex.assert_trees_all_close(got, expected, atol=2e-4 if not sign else 1e-6, rtol=0)
        chex.assert_trees_all_close(got_loss, loss, atol=1e-5, rtol=0)

    # Only the vector of 2m losses crosses devices: every all-reduce is of a few scalars.
    mesh = parallel.make_mesh(4, 2)
    step = parallel.make_parallel_train_step(loss_fn, mesh, learning_rate=0.1, num_directions=3)
    text = step.lower(params, key, x, y).compile().as_text()
    reduced = re.findall(r"= (\\S+) all-reduce\\(", text)
    assert reduced, "no all-reduce found"
    for shape in reduced:
      assert shape in ("f32[6]{0}", "f32[6]"), reduced

    # A bad batch size is named.
    try:
      step(params, key, x[:15], y[:15])
    except ValueError as error:
      assert "multiple of 2" in str(error)
    else:
      raise AssertionError("no ValueError for a batch of 15 over 2 data devices")
    print("CHILD OK")
""")


def test_parallel_step_equals_single_device_on_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                        timeout=600, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode == 0, done.stderr[-4000:]
  assert "CHILD OK" in done.stdout


def test_make_mesh_validates_sizes():
  count = jax.device_count()
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("directions", "data")
  assert mesh.shape["directions"] == count and mesh.shape["data"] == 1
  with pytest.raises(ValueError, match="num_data"):
    parallel.make_mesh(num_data=count + 1)
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
    parallel.make_mesh(num_directions=count + 1)


def test_parallel_step_on_one_device_and_axis_check():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(num_directions=1, devices=jax.devices()[:1])
  loss_fn = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
  params = {"w": jnp.ones((4, 2))}
  x = jnp.arange(8.0).reshape(2, 4)
  step = parallel.make_parallel_train_step(loss_fn, mesh, learning_rate=0.01, num_directions=2,
                                           sign=True)
  new, loss = step({"w": jnp.ones((4, 2))}, jax.random.key(0), x)
  assert float(loss) > 0.0
  assert float(jnp.max(jnp.abs(new["w"] - params["w"]))) > 0.0
  with pytest.raises(ValueError, match="axes"):
    parallel.make_parallel_train_step(loss_fn, mesh, learning_rate=0.1, direction_axis="model")
  assert parallel.num_rounds(3, 4) == 2 and parallel.num_rounds(3, 8) == 1
