"""QZO-FF driven by an inference engine: compiled forward calls, the integer update in numpy.

The engine runs three compiled modules and nothing else: the backbone's integer forward
(``features``), the loss of the two perturbed heads of one direction (``losses``: int16 head codes
in, two float32 losses out) and the direction draw (``directions``: the key and the step count in,
the ``m`` int8 perturbations ``z_q`` out, the same counter-based draw as :func:`fwdgrad.qzo_ff`).
The runner keeps the integer weights ``w_q`` as numpy int16 and applies the paper's update with
integer operations only (see :mod:`fwdgrad.qzo`):

.. math::

   w^{\\pm}_{q,i} = \\mathrm{clip}\\big(((w_q 1_q \\pm \\epsilon_q z_{q,i}) M_z + 2^{k_z-1})
   \\gg k_z\\big),\\quad
   g_q = \\mathrm{round}\\Big(\\tfrac{1}{m}\\sum_i \\mathrm{sign}(L^+_i - L^-_i)\\, z_{q,i}\\Big),
   \\quad w_q \\leftarrow \\mathrm{clip}\\big(w_q - ((g_q M_u + 2^{k_u-1}) \\gg k_u)\\big)

With the same key, learning rate, ε and data its weights equal, integer for integer, those of
``fwdgrad.qzo_ff`` whose ``value_fn`` is the same integer forward run by XLA
(:func:`jax_reference`); the tests check it on both IREE backends.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fwdgrad
from fwdgrad import estimators
from fwdgrad import qzo
from fwdgrad import quant
from fwdgrad.edge import integer
from fwdgrad.edge import runtime

LEAVES = ("bias", "kernel")  # The head's leaves, in pytree order.


def multiply_shift(x, multiplier: int, shift: int) -> np.ndarray:
  """``floor((x M + 2^(k-1)) / 2^k)`` in int64 numpy (the engine's round-to-nearest rescale)."""
  x = np.asarray(x, np.int64)
  return ((x * int(multiplier) + ((1 << int(shift)) >> 1)) >> int(shift)).astype(np.int32)


def round_divide(x, divisor: int) -> np.ndarray:
  """``x / divisor`` to the nearest integer, ties away from zero."""
  x = np.asarray(x, np.int64)
  return (np.sign(x) * ((np.abs(x) + divisor // 2) // divisor)).astype(np.int32)


class UpdateConstants(NamedTuple):
  """What the integer update needs besides ``w_q``: per leaf ``ε_q``, ``M_u``, ``k_u``."""
  epsilon_q: dict
  multiplier: dict
  shift: dict
  weight_scale: dict
  fmt: qzo.PerturbationFormat
  weight_bits: int


def update_constants(state: qzo.QZOState, learning_rate: float, weight_bits: int = 16,
                     perturbation_bits: int = 8, z_max: float = 3.5) -> UpdateConstants:
  """The constants of a ``qzo_ff`` state, computed once on the host (as ``qzo_ff`` does)."""
  for name in LEAVES:
    if np.size(state.weight_scale[name]) != 1:
      raise ValueError("the engine runner trains per-tensor grids; the head's "
                       f"{name} has {np.size(state.weight_scale[name])} scales (per-channel).")
  fmt = qzo.perturbation_format(perturbation_bits, z_max)
  multiplier, shift = qzo.update_multiplier(learning_rate, state.weight_scale, fmt)
  as_int = lambda tree: {k: int(np.asarray(tree[k]).reshape(())) for k in LEAVES}
  return UpdateConstants(as_int(state.epsilon_q), as_int(multiplier), as_int(shift),
                         {k: float(np.asarray(state.weight_scale[k]).reshape(())) for k in LEAVES},
                         fmt, weight_bits)


def _template(head_q: dict) -> dict:
  return {k: jnp.zeros(np.shape(head_q[k]), jnp.float32) for k in LEAVES}


def direction_fn(head_q: dict, num_directions: int, fmt: qzo.PerturbationFormat,
                 distribution: str = estimators.DEFAULT_DISTRIBUTION) -> Callable:
  """``(key_data uint32[2], step int32) -> (z_bias [m, ...], z_kernel [m, ...])`` as int8."""
  template = _template(head_q)

  def directions(key_data, step):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
    draws = [qzo.sample_quantized_direction(estimators.direction_key(step_key, i), template, fmt,
                                            distribution) for i in range(num_directions)]
    return tuple(jnp.stack([d[k] for d in draws]) for k in LEAVES)

  return directions


def losses_fn(program: integer.Conv4Program) -> Callable:
  """``(features, labels, b+, w+, b-, w-) -> (L+, L-)``: one direction's two forward calls."""
  def losses(feature_q, labels, bias_plus, kernel_plus, bias_minus, kernel_minus):
    plus = integer.loss(program, feature_q, labels, {"bias": bias_plus, "kernel": kernel_plus})
    minus = integer.loss(program, feature_q, labels, {"bias": bias_minus, "kernel": kernel_minus})
    return plus, minus
  return losses


class EngineModules(NamedTuple):
  features: runtime.CompiledModule
  losses: runtime.CompiledModule
  logits: runtime.CompiledModule
  directions: runtime.CompiledModule


def compile_modules(program: integer.Conv4Program, head_q: dict, image_shape, train_batch: int,
                    eval_batch: int, num_directions: int, fmt: qzo.PerturbationFormat,
                    backend: str) -> EngineModules:
  """The four modules of an engine-driven QZO-FF run, compiled by IREE for ``backend``."""
  x = np.zeros((eval_batch,) + tuple(image_shape), np.int8)
  f = np.asarray(jax.eval_shape(lambda x: integer.features(program, x), x).shape)
  feats = lambda n: np.zeros((n, int(f[1])), np.int8)
  b, w = np.asarray(head_q["bias"]), np.asarray(head_q["kernel"])
  return EngineModules(
      features=runtime.compile_function(lambda x: integer.features(program, x), [x], backend),
      losses=runtime.compile_function(losses_fn(program), [feats(train_batch),
                                                           np.zeros(train_batch, np.int32),
                                                           b, w, b, w], backend),
      logits=runtime.compile_function(
          lambda f, b, w: integer.logits(program, f, {"bias": b, "kernel": w}),
          [feats(eval_batch), b, w], backend),
      directions=runtime.compile_function(direction_fn(head_q, num_directions, fmt),
                                          [np.zeros(2, np.uint32), np.int32(0)], backend))


def batched(module: runtime.CompiledModule, inputs: np.ndarray, batch: int, *rest) -> np.ndarray:
  """``module(inputs[i:i+batch], *rest)`` over ``inputs``, the last chunk zero-padded."""
  out = []
  for start in range(0, inputs.shape[0], batch):
    chunk = inputs[start:start + batch]
    pad = batch - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(module(chunk, *rest)[:batch - pad])
  return np.concatenate(out)


def perturbed(w_q: np.ndarray, coefficient: int, z_q: np.ndarray, fmt, weight_bits: int):
  """``clip(((w_q 1_q + c z_q) M_z + 2^(k_z-1)) >> k_z)``, as int16 (int8 for 8 bits)."""
  levels = quant.qmax(weight_bits)
  acc = w_q.astype(np.int64) * fmt.one + int(coefficient) * z_q.astype(np.int64)
  shifted = multiply_shift(acc, fmt.multiplier, fmt.shift)
  return np.clip(shifted, -levels, levels).astype(w_q.dtype)


class StepTimes(NamedTuple):
  directions: float
  forward: float
  update: float


def engine_step(modules: EngineModules, w_q: dict, constants: UpdateConstants,
                key_data: np.ndarray, step: int, feature_q: np.ndarray, labels: np.ndarray,
                times: list | None = None):
  """One QZO-FF step on the engine; returns ``(new w_q, mean loss)``."""
  c = constants
  t0 = time.perf_counter()
  z = dict(zip(LEAVES, modules.directions(key_data, np.int32(step))))
  t1 = time.perf_counter()
  m = z["kernel"].shape[0]
  signs, loss_sum = [], np.float32(0)
  for i in range(m):
    plus = {k: perturbed(w_q[k], c.epsilon_q[k], z[k][i], c.fmt, c.weight_bits) for k in LEAVES}
    minus = {k: perturbed(w_q[k], -c.epsilon_q[k], z[k][i], c.fmt, c.weight_bits)
             for k in LEAVES}
    loss_plus, loss_minus = modules.losses(feature_q, labels, plus["bias"], plus["kernel"],
                                           minus["bias"], minus["kernel"])
    loss_plus, loss_minus = np.float32(loss_plus), np.float32(loss_minus)
    same = all(np.array_equal(plus[k], minus[k]) for k in LEAVES)
    signs.append(0 if same else int(np.sign(loss_plus - loss_minus)))
    loss_sum = np.float32(loss_sum + np.float32(0.5) * (loss_plus + loss_minus))
  t2 = time.perf_counter()
  levels = quant.qmax(c.weight_bits)
  new = {}
  for k in LEAVES:
    total = sum(s * z[k][i].astype(np.int64) for i, s in enumerate(signs))
    g_q = round_divide(total, m)
    step_q = multiply_shift(g_q, c.multiplier[k], c.shift[k])
    new[k] = np.clip(w_q[k].astype(np.int64) - step_q, -levels, levels).astype(w_q[k].dtype)
  if times is not None:
    times.append(StepTimes(t1 - t0, t2 - t1, time.perf_counter() - t2))
  return new, float(loss_sum / m)


def jax_reference(program: integer.Conv4Program, head_q: dict, weight_scale: dict,
                  learning_rate: float, seed: int, num_directions: int, epsilon: float,
                  feature_q, labels, steps: int, weight_bits: int = 16):
  """``fwdgrad.qzo_ff`` for ``steps`` on the same integer forward, run by XLA.

  It starts from the head codes ``head_q`` (params ``Δ_w w_q``, so that every rounding of
  ``params / Δ_w`` gives ``w_q`` back exactly, eager or compiled).

  Returns ``(w_q after the steps, per-step losses, seconds per step after warm-up)``.
  """
  params = {k: jnp.asarray(head_q[k], jnp.float32) * jnp.float32(weight_scale[k]) for k in LEAVES}
  tx = fwdgrad.qzo_ff(learning_rate, key=seed, num_directions=num_directions, epsilon=epsilon,
                      weight_bits=weight_bits,
                      weight_scale={k: jnp.float32(weight_scale[k]) for k in LEAVES})
  state = tx.init(params)
  feature_q, labels = jnp.asarray(feature_q), jnp.asarray(labels)

  def value_fn(params):
    return integer.loss(program, feature_q, labels,
                        qzo.integer_weights(params, state.weight_scale, weight_bits))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(params, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  losses, start = [], None
  for t in range(steps):
    if t == 1:
      start = time.perf_counter()
    params, state = step(params, state)
    losses.append(float(state.loss))
  seconds = (time.perf_counter() - start) / max(steps - 1, 1) if start else float("nan")
  return ({k: np.asarray(v) for k, v in
           qzo.qzo_integer_weights(params, state, weight_bits).items()},
          losses, seconds)
