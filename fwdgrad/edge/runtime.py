"""Compile a JAX function for an edge runtime: ``jax.export`` to StableHLO, then IREE.

IREE (``pip install -e ".[edge]"``: ``iree-base-compiler``, ``iree-base-runtime``) compiles the
StableHLO module offline for its CPU backend (``"llvm-cpu"``, native code for this machine) and
for ``"vmvx"``, its portable bytecode for microcontroller-class targets; the runtime then calls the
compiled module with numpy arrays. Integer operations come out bit-exact.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np

BACKENDS = ("llvm-cpu", "vmvx")


def _iree():
  try:
    import iree.compiler as compiler  # pylint: disable=g-import-not-at-top
    import iree.runtime as runtime  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("the edge runtime needs IREE: pip install -e '.[edge]' (iree-base-compiler "
                      "and iree-base-runtime from PyPI)") from error
  return compiler, runtime


def stablehlo(fn: Callable, example_args: Sequence) -> str:
  """The StableHLO text of ``jax.jit(fn)`` for the shapes and dtypes of ``example_args``."""
  shapes = [jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype) for a in example_args]
  return jax.export.export(jax.jit(fn))(*shapes).mlir_module()


class CompiledModule:
  """A function compiled by IREE for one backend, called with numpy arrays.

  Attributes:
    backend: ``"llvm-cpu"`` or ``"vmvx"``.
    size: bytes of the compiled module (the ``.vmfb`` flatbuffer).
    compile_seconds: wall time of the IREE compilation.
    vmfb: the compiled module's bytes (write them out to deploy it).
  """

  def __init__(self, mlir: str, backend: str):
    if backend not in BACKENDS:
      raise ValueError(f"unknown IREE backend {backend!r}; expected one of {BACKENDS}.")
    compiler, runtime = _iree()
    flags = ["--iree-llvmcpu-target-cpu=host"] if backend == "llvm-cpu" else []
    start = time.perf_counter()
    self.vmfb = compiler.compile_str(mlir, target_backends=[backend], input_type="stablehlo",
                                     extra_args=flags)
    self.compile_seconds = time.perf_counter() - start
    self.backend, self.size = backend, len(self.vmfb)
    # local-sync: one thread, as on a microcontroller; the CPU code is the same either way.
    config = runtime.Config("local-sync")
    context = runtime.SystemContext(config=config)
    module = runtime.VmModule.copy_buffer(context.instance, self.vmfb)
    context.add_vm_module(module)
    self._main = context.modules[module.name]["main"]

  def __call__(self, *args):
    # (np.ascontiguousarray would turn a 0-d scalar into shape (1,).)
    args = [np.require(np.asarray(a), requirements="C") for a in args]
    out = self._main(*args)
    # Copies: a result may be a view of a runtime buffer that the next call reuses.
    if isinstance(out, (tuple, list)):
      return tuple(_host_copy(o) for o in out)
    return _host_copy(out)


def _host_copy(value) -> np.ndarray:
  host = value.to_host() if hasattr(value, "to_host") else np.asarray(value)
  return np.array(host, copy=True)


def compile_function(fn: Callable, example_args: Sequence, backend: str) -> CompiledModule:
  """``fn`` (a pure JAX function of arrays) compiled by IREE for ``backend``."""
  return CompiledModule(stablehlo(fn, example_args), backend)
