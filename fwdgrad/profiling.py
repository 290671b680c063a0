"""Measuring a step: its memory from XLA's buffer assignment, its time on the wall clock.

Memory is read from the compiled executable (:meth:`jax.stages.Compiled.memory_analysis`), so it is
deterministic for a given program, backend and XLA version and may be asserted in tests. The figure
that compares training with inference is the live footprint of one call,

.. math::

   \\mathrm{total} = \\mathrm{argument} + \\mathrm{output} + \\mathrm{temp} - \\mathrm{alias},

where ``alias`` counts the output bytes written into donated argument buffers (those bytes would
otherwise be counted twice). A training step that keeps parameters, one update and the scratch of a
forward pass costs about twice an inference call; a step that updates in place costs about one.

On CPU, XLA hands some fusions (convolutions, dots and their neighbours) to YNNPACK, which allocates
its own scratch outside XLA's buffer assignment: ``temp`` then misses activations, and inference
looks cheaper than it is. For complete accounting compile with
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (set before JAX starts), as
``benchmarks/run.py`` does for its memory figures.

Time is the median of repeated calls after warm-up calls that compile and fill caches. Every call
blocks on its outputs, and each call's outputs feed the next so that donated buffers stay valid.

Examples:
  >>> step = lambda params, key: fwdgrad.fused_spsa_step(loss_fn, params, key, learning_rate=1e-2)
  >>> fwdgrad.profiling.step_memory(step, params, key, donate_argnums=0).total > 0  # bytes
  True
  >>> seconds = fwdgrad.profiling.time_step(jax.jit(loss_fn), params, warmup=2, repeats=10)
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax

ArgNums = Union[int, Sequence[int]]


class StepMemory(NamedTuple):
  """Bytes of one compiled call, from XLA's memory analysis.

  Attributes:
    argument: bytes of the inputs.
    output: bytes of the outputs.
    temp: scratch bytes live during the call (activations, perturbed copies, loop carries).
    alias: output bytes that reuse donated input buffers.
    total: ``argument + output + temp - alias``, the footprint of the call.
  """
  argument: int
  output: int
  temp: int
  alias: int
  total: int


def memory_of_compiled(compiled: jax.stages.Compiled) -> StepMemory:
  """The :class:`StepMemory` of an already compiled function."""
  stats = compiled.memory_analysis()
  if stats is None:
    raise ValueError(
        "this backend reports no memory analysis for compiled programs; measure memory on CPU, "
        "GPU or TPU.")
  argument = int(stats.argument_size_in_bytes)
  output = int(stats.output_size_in_bytes)
  temp = int(stats.temp_size_in_bytes)
  alias = int(stats.alias_size_in_bytes)
  return StepMemory(argument=argument, output=output, temp=temp, alias=alias,
                    total=argument + output + temp - alias)


def step_memory(
    fn: Callable[..., Any],
    *args,
    donate_argnums: Optional[ArgNums] = None,
    static_argnums: Optional[ArgNums] = None,
    **kwargs,
) -> StepMemory:
  """Bytes of one call of ``jax.jit(fn, donate_argnums=...)`` on ``args``, without running it.

  Args:
    fn: a function of arrays (pytrees), or an already jitted function (``donate_argnums`` and
      ``static_argnums`` then must be left out: the jitted function's own are used).
    *args: example arguments; only shapes and dtypes matter (``jax.ShapeDtypeStruct`` works).
    donate_argnums: positions of the arguments whose buffers the call may overwrite.
    static_argnums: positions of hashable Python arguments.
    **kwargs: keyword arguments passed to ``fn`` (traced).

  Returns:
    A :class:`StepMemory`.

  Examples:
    >>> mem = step_memory(lambda p, x: model.apply({"params": p}, x).sum(), params, x)
    >>> mem.total > 0
    True
  """
  if isinstance(fn, jax.stages.Wrapped):
    if donate_argnums is not None or static_argnums is not None:
      raise ValueError(
          "fn is already jitted: pass the plain function to step_memory to choose "
          "donate_argnums/static_argnums, or set them on your jax.jit call.")
    jitted = fn
  else:
    jitted = jax.jit(fn, donate_argnums=() if donate_argnums is None else donate_argnums,
                     static_argnums=() if static_argnums is None else static_argnums)
  return memory_of_compiled(jitted.lower(*args, **kwargs).compile())


def memory_ratio(step: StepMemory, reference: StepMemory) -> float:
  """``step.total / reference.total``, e.g. a training step against one inference call."""
  if reference.total <= 0:
    raise ValueError(f"reference footprint must be positive, got {reference.total} bytes.")
  return step.total / reference.total


def time_step(
    fn: Callable[..., Any],
    *args,
    warmup: int = 2,
    repeats: int = 10,
    carry: Optional[Callable[[Any, tuple], tuple]] = None,
) -> float:
  """Median wall-clock seconds of ``fn(*args)`` after ``warmup`` calls.

  Args:
    fn: usually a jitted function; its outputs are waited for with :func:`jax.block_until_ready`.
    *args: its arguments.
    warmup: calls made and discarded first (the first one compiles).
    repeats: timed calls; the median is returned.
    carry: ``carry(outputs, args) -> args`` gives the next call's arguments from the last call's
      outputs. Needed when ``fn`` donates its inputs (they are invalid after the call), e.g.
      ``lambda out, args: (out[0],) + args[1:]`` for a step returning ``(params, loss)``.

  Returns:
    The median of the ``repeats`` timings, in seconds.

  Examples:
    >>> seconds = time_step(jax.jit(loss_fn), params, batch, warmup=2, repeats=20)
  """
  if warmup < 0 or repeats < 1:
    raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}.")
  timings = []
  for call in range(warmup + repeats):
    start = time.perf_counter()
    outputs = jax.block_until_ready(fn(*args))
    elapsed = time.perf_counter() - start
    if call >= warmup:
      timings.append(elapsed)
    if carry is not None:
      args = tuple(carry(outputs, args))
  return statistics.median(timings)
