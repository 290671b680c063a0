"""Training on an inference engine: a true-integer forward, compiled by IREE, driven by QZO-FF.

  python -m fwdgrad.edge --workdir workdirs/edge

adapts the quickstart's pre-trained Conv4 (LP-1 at 16w8a) on IREE's CPU and ``vmvx`` backends
and prints a table: module sizes, step time against the JAX step, accuracy before and after, and
whether the engine's integer weights equal those of ``fwdgrad.qzo_ff`` run by JAX.

Needs the ``edge`` extra (``pip install -e ".[edge]"``: IREE's compiler and runtime).

``integer``  the integer forward of a calibrated Conv4, ResNet12, GRU CRNN or speech embedding
             (:func:`integer.program`, :func:`integer.features`, :func:`integer.logits`,
             :func:`integer.loss`) and how often the float simulation agrees with it
             (:func:`integer.simulation_agreement`).
``runtime``  ``jax.export`` → StableHLO → IREE (:func:`runtime.compile_function`).
``runner``   the QZO-FF loop on the compiled modules with the integer update in numpy
             (:func:`runner.compile_modules`, :func:`runner.engine_step`) and the JAX run it
             must equal (:func:`runner.jax_reference`).
"""

from fwdgrad.edge import integer
from fwdgrad.edge import runner
from fwdgrad.edge import runtime

__all__ = ("integer", "runner", "runtime")
