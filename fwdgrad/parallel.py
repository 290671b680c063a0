"""Perturbation-parallel SPSA: the forward calls of a step spread over devices, losses exchanged.

An SPSA step makes ``2 m`` forward calls, ``f(w + ε z_i)`` and ``f(w - ε z_i)``, that do not depend
on each other. Every device holds the parameters and the key, so every device can regenerate any
direction ``z_i`` from ``fold_in(key, i)`` (:func:`fwdgrad.estimators.direction_key`): device ``d``
of ``D`` along the ``"directions"`` mesh axis evaluates the calls ``e = d, d + D, d + 2D, ...``
(call ``e`` is direction ``e // 2`` with sign ``+`` for even ``e``), writes its losses into a
vector of ``2 m`` zeros, and one ``psum`` of that vector gives every device every loss. Each device
then forms the same coefficients ``c_i`` and the same update
``w ← w − (η / m) Σ_i c_i z_i`` by regenerating the directions, so the only thing that crosses
devices is ``2 m`` scalars per step, never a parameter or gradient pytree. With ``D = 2 m`` each
device makes one forward call per step.

Data parallelism composes on a second mesh axis, ``"data"``: the batch is split along its leading
dimension over that axis, each device's loss is the mean over its shard, and a ``pmean`` over
``"data"`` makes it the loss of the whole batch (shards must be of equal size). A mesh of shape
``(D, B)`` runs ``D`` forward calls at once, each on ``B`` devices; communication is still a
vector of ``2 m`` scalars, reduced over both axes.

The result equals :func:`fwdgrad.spsa_grad` followed by SGD with the same key, up to the rounding of
the mean over data shards (exactly the same calls otherwise).

Multi-host: nothing here is tied to one process. On a cluster, call
:func:`jax.distributed.initialize` at the start of every process (one per host), then build the
mesh from ``jax.devices()``, which then lists the devices of every host, e.g.
``make_mesh(num_directions=jax.device_count() // B, num_data=B)``. Every process runs the same
program with the same parameters and key (replicated arrays; e.g. restored from the same
checkpoint). The batch must be a global array sharded over ``"data"``: each process builds its part
with :func:`jax.make_array_from_process_local_data` ``(NamedSharding(mesh, P("data")), local)``.
The ``psum`` of the losses then runs over the interconnect (a few bytes per step), and the code of
this module runs unchanged.

Examples:
  >>> mesh = fwdgrad.parallel.make_mesh(num_directions=4, num_data=2)  # doctest: +SKIP
  >>> mesh = fwdgrad.parallel.make_mesh()  # on the devices there are
  >>> step = fwdgrad.parallel.make_parallel_train_step(
  ...     loss_fn, mesh, learning_rate=1e-2, num_directions=3, sign=True)
  >>> for t in range(3):
  ...   params, loss = step(params, jax.random.fold_in(key, t), x, y)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fwdgrad import estimators

PyTree = Any

DIRECTIONS = "directions"
DATA = "data"


def make_mesh(
    num_directions: Optional[int] = None,
    num_data: int = 1,
    devices: Optional[Sequence[jax.Device]] = None,
) -> Mesh:
  """A ``(num_directions, num_data)`` mesh with axes ``("directions", "data")``.

  Args:
    num_directions: devices along the perturbation axis; by default all devices not used by
      ``num_data``.
    num_data: devices along the batch axis.
    devices: the devices to use; ``jax.devices()`` (all processes' devices) by default.

  Returns:
    A :class:`jax.sharding.Mesh`.

  Examples:
    >>> mesh = make_mesh()  # every device evaluates perturbations
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_data < 1 or len(devices) % num_data:
    raise ValueError(
        f"num_data={num_data} must be a positive divisor of the number of devices "
        f"({len(devices)}).")
  if num_directions is None:
    num_directions = len(devices) // num_data
  if num_directions < 1 or num_directions * num_data > len(devices):
    raise ValueError(
        f"a mesh of {num_directions} x {num_data} devices needs {num_directions * num_data} "
        f"devices, {len(devices)} are available; set XLA_FLAGS="
        "--xla_force_host_platform_device_count=N before importing jax for N CPU devices.")
  grid = [devices[i * num_data:(i + 1) * num_data] for i in range(num_directions)]
  return Mesh(np.array(grid, dtype=object), (DIRECTIONS, DATA))


def sharded_spsa_grad(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    num_directions: int = 1,
    epsilon: float = 1e-3,
    distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
    sign: bool = False,
    direction_axis: str = DIRECTIONS,
    data_axis: Optional[str] = None,
):
  """:func:`fwdgrad.spsa_grad` with its forward calls split over a mesh axis.

  Call it inside :func:`jax.shard_map` (or any context that binds ``direction_axis``) with the
  parameters and key replicated. Every device returns the same ``(loss, grads)``.

  .. math::

     L_{2i + s} = f(w + (-1)^s \\epsilon z_i) \\text{ on device } (2i + s) \\bmod D, \\qquad
     L = \\mathrm{psum}(L), \\qquad
     \\hat g = \\frac{1}{m} \\sum_i c_i(L_{2i}, L_{2i+1})\\, z_i

  Args:
    value_fn: scalar objective of the local shard of data, ``f(params)``; a pure, deterministic
      function of the params (same batch and dropout key in every call).
    params: pytree of float arrays, the same on every device.
    key: PRNG key, the same on every device; direction ``i`` uses ``fold_in(key, i)``.
    num_directions: ``m``, a Python int.
    epsilon: perturbation size ``ε``.
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.
    sign: sign-m-SPSA.
    direction_axis: mesh axis the forward calls are split over.
    data_axis: mesh axis the batch is split over, or ``None``; losses are averaged over it.

  Returns:
    ``(loss, grads)`` as :func:`fwdgrad.spsa_grad` returns them.

  Examples:
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = make_mesh()
    >>> @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("data")),
    ...                    out_specs=(P(), P()))
    ... def grad_fn(params, key, x):
    ...   return sharded_spsa_grad(lambda p: loss_fn(p, x), params, key, data_axis="data")
  """
  num_directions = estimators._check_num_directions(num_directions)
  estimators._check_params(params)
  sampler = estimators.get_sampler(distribution)
  num_calls = 2 * num_directions
  num_devices = jax.lax.axis_size(direction_axis)
  device = jax.lax.axis_index(direction_axis)
  rounds = -(-num_calls // num_devices)

  def evaluate(round_index, losses):
    call = device + round_index * num_devices
    # Devices past the last call evaluate a valid call and discard it: the shapes stay static.
    index = jnp.minimum(call, num_calls - 1)
    direction = estimators.sample_direction(
        estimators.direction_key(key, index // 2), params, sampler)
    scale = jnp.where(index % 2 == 0, epsilon, -epsilon)
    loss = value_fn(estimators._axpy(scale, direction, params)).astype(jnp.float32)
    return losses.at[index].add(jnp.where(call < num_calls, loss, 0.0))

  losses = jax.lax.fori_loop(0, rounds, evaluate, jnp.zeros((num_calls,), jnp.float32))
  losses = jax.lax.psum(losses, direction_axis)
  if data_axis is not None:
    losses = jax.lax.pmean(losses, data_axis)
  loss_plus, loss_minus = losses[0::2], losses[1::2]
  difference = loss_plus - loss_minus
  coefficients = jnp.sign(difference) if sign else difference / (2.0 * epsilon)

  def accumulate(index, grads):
    direction = estimators.sample_direction(estimators.direction_key(key, index), params, sampler)
    return estimators._axpy(coefficients[index] / num_directions, direction, grads)

  grads = jax.lax.fori_loop(0, num_directions, accumulate,
                            jax.tree_util.tree_map(jnp.zeros_like, params))
  loss = jnp.mean(0.5 * (loss_plus + loss_minus))
  return loss, grads


def make_parallel_train_step(
    loss_fn: Callable[..., jax.Array],
    mesh: Mesh,
    *,
    learning_rate: float,
    num_directions: int = 1,
    epsilon: float = 1e-3,
    distribution: Union[str, estimators.Sampler] = estimators.DEFAULT_DISTRIBUTION,
    sign: bool = False,
    direction_axis: str = DIRECTIONS,
    data_axis: Optional[str] = DATA,
):
  """A jitted SGD step ``step(params, key, *batch) -> (params, loss)`` over ``mesh``.

  Parameters and key are replicated; every array in ``batch`` is split along its leading
  dimension over ``data_axis`` (which must divide it). The parameters are donated.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> scalar``, the mean loss of a batch; a pure, deterministic
      function of the params (same batch and dropout key in every call).
    mesh: from :func:`make_mesh` (or any mesh with the two axes).
    learning_rate: ``η``.
    num_directions: ``m``, a Python int.
    epsilon: perturbation size ``ε``.
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.
    sign: sign-m-SPSA.
    direction_axis: mesh axis of the forward calls.
    data_axis: mesh axis of the batch, or ``None`` to replicate the batch.

  Returns:
    The jitted step; equal to ``spsa_grad`` + SGD on one device with the same key.

  Examples:
    >>> step = make_parallel_train_step(loss_fn, make_mesh(), learning_rate=1e-2)
    >>> params, loss = step(params, key, x, y)
  """
  estimators._check_num_directions(num_directions)
  estimators.get_sampler(distribution)
  for axis in (direction_axis, data_axis):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis!r}; build it with make_mesh.")
  data_spec = P(data_axis) if data_axis is not None else P()

  def local_step(params, key, *batch):
    loss, grads = sharded_spsa_grad(
        lambda p: loss_fn(p, *batch), params, key, num_directions=num_directions,
        epsilon=epsilon, distribution=distribution, sign=sign, direction_axis=direction_axis,
        data_axis=data_axis)
    params = jax.tree_util.tree_map(lambda w, g: (w - learning_rate * g).astype(w.dtype),
                                    params, grads)
    return params, loss

  def step(params, key, *batch):
    if data_axis is not None:
      size = mesh.shape[data_axis]
      for x in batch:
        if jnp.ndim(x) == 0 or x.shape[0] % size:
          raise ValueError(
              f"batch arrays are split over {size} devices along {data_axis!r}: their leading "
              f"dimension must be a multiple of {size}, got shape {jnp.shape(x)}.")
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P()) + (data_spec,) * len(batch),
        out_specs=(P(), P()), check_vma=False)
    return sharded(params, key, *batch)

  return jax.jit(step, donate_argnums=0)


def num_rounds(num_directions: int, num_devices: int) -> int:
  """Forward calls each device makes per step: ``ceil(2 m / D)``."""
  return math.ceil(2 * num_directions / num_devices)
