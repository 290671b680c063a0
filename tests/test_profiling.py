"""Tests for fwdgrad.profiling: memory from XLA's analysis, median timing."""

import jax
import jax.numpy as jnp
import pytest

from fwdgrad import profiling


def test_step_memory_counts_arguments_and_outputs():
  x = jnp.ones((256, 128), jnp.float32)
  y = jnp.ones((128,), jnp.float32)
  memory = profiling.step_memory(lambda a, b: (a * b).sum(0), x, y)
  assert memory.argument == x.nbytes + y.nbytes
  assert memory.output == 128 * 4
  assert memory.alias == 0
  assert memory.total == memory.argument + memory.output + memory.temp - memory.alias


def test_step_memory_donation_aliases_the_output():
  x = jnp.ones((256, 128), jnp.float32)
  kept = profiling.step_memory(lambda a: a * 2.0, x)
  donated = profiling.step_memory(lambda a: a * 2.0, x, donate_argnums=0)
  assert donated.alias == x.nbytes
  assert donated.total == kept.total - x.nbytes


def test_step_memory_accepts_shape_structs_and_kwargs():
  spec = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  memory = profiling.step_memory(lambda a, *, scale: a * scale, spec, scale=2.0)
  assert memory.argument >= 64 * 64 * 4


def test_step_memory_of_jitted_function_rejects_donation_argument():
  with pytest.raises(ValueError, match="already jitted"):
    profiling.step_memory(jax.jit(lambda a: a), jnp.ones(3), donate_argnums=0)
  assert profiling.step_memory(jax.jit(lambda a: a + 1), jnp.ones(3)).argument == 12


def test_memory_ratio():
  small = profiling.StepMemory(10, 0, 0, 0, 10)
  big = profiling.StepMemory(20, 0, 5, 0, 25)
  assert profiling.memory_ratio(big, small) == 2.5
  with pytest.raises(ValueError, match="positive"):
    profiling.memory_ratio(big, profiling.StepMemory(0, 0, 0, 0, 0))


def test_time_step_returns_median_and_threads_donated_outputs():
  calls = []

  @jax.jit
  def step(x):
    return x + 1.0

  def counted(x):
    calls.append(float(x))
    return step(x)

  seconds = profiling.time_step(counted, jnp.float32(0.0), warmup=2, repeats=3,
                                carry=lambda out, args: (out,))
  assert seconds > 0.0
  assert calls == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_time_step_rejects_bad_counts():
  with pytest.raises(ValueError, match="repeats"):
    profiling.time_step(lambda: None, warmup=0, repeats=0)
  with pytest.raises(ValueError, match="warmup"):
    profiling.time_step(lambda: None, warmup=-1, repeats=1)
