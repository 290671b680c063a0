"""A true-integer forward of a calibrated fixed-point Conv4, the way an NPU runs it.

Everything between the input codes and the logit codes is integer arithmetic: int8 activations
times int16 (or int8) weights accumulated in int32 (``preferred_element_type=jnp.int32``), the
BatchNorm and the bias folded into a per-channel int32 offset on the accumulator, and the
requantization to int8 by a fixed-point multiplier and shift,

.. math::

   y_q = \\mathrm{clip}\\Big(\\big(\\sigma_c (a + B_c) M_c + 2^{k_c - 1}\\big) \\gg k_c\\Big),
   \\qquad \\frac{M_c}{2^{k_c}} \\approx \\frac{\\Delta_x \\Delta_w |m_c|}{\\Delta_y},\\quad
   B_c = \\mathrm{round}\\Big(\\frac{\\beta_c - \\mu_c m_c}{\\Delta_x \\Delta_w m_c}\\Big),\\quad
   \\sigma_c = \\mathrm{sign}(m_c)

with ``m = γ / sqrt(σ² + ε)`` (``m = 1`` and ``B`` the bias for a dense layer), ReLU and
max-pooling on the codes. The constants (``M``, ``k``, ``B``, the kernel codes) are computed once
on the host from the calibrated variables, as an engine's converter does (``M`` has 15 bits where
the shift, at most 31, allows; see :func:`fwdgrad.fixed_point.fixed_point_multiplier_array`). The trained head's
bias is held as int16 codes ``b_q`` on its own grid ``Δ_b`` (QZO-FF's) and enters the
accumulator by a second multiply and shift, ``B = (b_q M_b + 2^{k_b-1}) ≫ k_b`` with
``M_b / 2^{k_b} ≈ Δ_b / (Δ_x Δ_w)``.

Two steps stay in float and are marked: quantizing the input images (a sensor or a preprocessing
step hands the engine int8 codes) and the cross-entropy over the dequantized logits (the loss an
inference-only runtime computes on the host or in a float unit; :func:`loss`).

The simulation (``fwdgrad.models.Conv4`` at a static precision such as ``"16w8a"``, calibrated)
runs this same arithmetic on integer-valued floats (``fwdgrad.models.layers.exact_conv``,
``requantize``) with the fake-quant derivative, and the constants here come from the functions it
calls, so its logits are this engine's codes times ``Δ_y``, bit for bit
(:func:`simulation_agreement` checks it on any inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad import fixed_point
from fwdgrad import quant
from fwdgrad import qzo
from fwdgrad.models import layers



class Requant(NamedTuple):
  """Per-channel requantization of an int32 accumulator to 8-bit codes."""
  multiplier: np.ndarray  # M_c, int32
  shift: np.ndarray       # k_c, int32
  sign: np.ndarray        # σ_c = sign(m_c), int32
  offset: np.ndarray      # B_c, int32, in accumulator units


class Conv4Program(NamedTuple):
  """The integer constants of a calibrated Conv4 (what an engine's converter writes out).

  Attributes:
    input_scale: ``Δ`` of the input codes (``act_input``).
    kernels: per block, the HWIO kernel codes (int16 for 16-bit weights).
    requants: per block, its :class:`Requant`.
    feature_scale: ``Δ`` of the feature codes (the last block's output).
    head_kernel_scale: ``Δ_w`` of the head kernel (a scalar, or one per class).
    head_bias_scale: ``Δ_b`` of the head bias codes (the calibrated ``bias_scale``).
    head_multiplier, head_shift: ``M, k`` of ``Δ_x Δ_w / Δ_y`` for the logits (per class).
    bias_multiplier, bias_shift: ``M_b, k_b`` of ``Δ_b / (Δ_x Δ_w)`` (per class).
    logit_scale: ``Δ_y`` of the logit codes (``head/act_out``).
    weight_bits: bits of the kernels (and of the head bias codes).
  """
  input_scale: float
  kernels: tuple
  requants: tuple
  feature_scale: float
  head_kernel_scale: np.ndarray
  head_bias_scale: float
  head_multiplier: np.ndarray
  head_shift: np.ndarray
  bias_multiplier: np.ndarray
  bias_shift: np.ndarray
  logit_scale: float
  weight_bits: int


@jax.jit
def _block_constants(gamma, beta, mean, var, epsilon, in_scale, kernel_scale, out_scale):
  # The functions the model's own exact forward calls, so the constants are the same numbers.
  ratio, offset = layers.bn_requant_constants(gamma, beta, mean, var, epsilon, in_scale,
                                              kernel_scale, out_scale)
  return layers.requant_multiplier(ratio) + (offset,)


@jax.jit
def _head_constants(in_scale, kernel_scale, out_scale, bias_scale):
  ratio, bias_ratio = layers.dense_requant_constants(in_scale, kernel_scale, out_scale,
                                                     bias_scale)
  return layers.requant_multiplier(ratio)[:2] + fixed_point.fixed_point_multiplier_array(bias_ratio)


def _kernel_scale(value, per_channel: bool) -> jax.Array:
  value = jnp.asarray(value, jnp.float32)
  return jnp.reshape(value, (-1,) if per_channel else ())


def conv4_program(model, variables: dict) -> Conv4Program:
  """The integer constants of a calibrated fixed-point :class:`fwdgrad.models.Conv4`.

  Args:
    model: the ``Conv4`` (``num_classes`` set, a static precision such as ``"16w8a"``).
    variables: its calibrated variables (``params`` with ``head``, ``batch_stats``, ``quant``).
  """
  precision = layers.Precision.parse(model.precision)
  if not layers.exact_precision(precision):
    raise ValueError(f"the integer forward needs a static precision with at most 8-bit "
                     f"activations and 16-bit weights, such as '16w8a' or '8w8a'; got "
                     f"{str(precision)!r}.")
  if model.num_classes is None:
    raise ValueError("the integer Conv4 needs its head: build it with num_classes set.")
  if "quant" not in variables:
    raise ValueError("these variables are not calibrated: call fwdgrad.models.calibrate first.")
  params, stats, scales = variables["params"], variables.get("batch_stats", {}), variables["quant"]
  if "bias_scale" not in scales["head"]:
    raise ValueError("these variables were calibrated before heads kept a bias grid: calibrate "
                     "again (fwdgrad.models.calibrate).")
  per_channel = precision.per_channel
  x_scale = jnp.asarray(scales["act_input"]["scale"], jnp.float32)
  input_scale = float(x_scale)
  kernels, requants = [], []
  for i in range(len(model.features)):
    name = f"block{i}"
    p, s, q = params[name], stats[name], scales[name]
    w_scale = _kernel_scale(q["kernel_scale"], per_channel)
    out_scale = jnp.asarray(q["act_out"]["scale"], jnp.float32)
    constants = _block_constants(p["scale"], p["bias"], s["mean"], s["var"], jnp.float32(1e-5),
                                 x_scale, w_scale, out_scale)
    kernels.append(np.asarray(qzo.integer_weights(jnp.asarray(p["kernel"]), w_scale,
                                                  precision.weight_bits)))
    requants.append(Requant(*(np.asarray(c, np.int32) for c in constants)))
    x_scale = out_scale
  head_scale = _kernel_scale(scales["head"]["kernel_scale"], per_channel)
  bias_scale = jnp.reshape(jnp.asarray(scales["head"]["bias_scale"], jnp.float32), ())
  logit_scale = jnp.asarray(scales["head"]["act_out"]["scale"], jnp.float32)
  head_m, head_k, bias_m, bias_k = (np.asarray(c, np.int32) for c in _head_constants(
      x_scale, head_scale, logit_scale, bias_scale))
  return Conv4Program(input_scale, tuple(kernels), tuple(requants), float(x_scale),
                      np.asarray(head_scale), float(bias_scale), head_m, head_k, bias_m, bias_k,
                      float(logit_scale), precision.weight_bits)


def quantize_inputs(program: Conv4Program, images) -> np.ndarray:
  """The int8 input codes of float images (the one float step before the engine)."""
  scale = jnp.float32(program.input_scale)
  # The simulation's own input quantizer (compiled, as in the model), then its codes.
  on_grid = jax.jit(lambda x: quant.fake_quant(x, 8, scale=scale))(jnp.asarray(images,
                                                                             jnp.float32))
  return np.asarray(jnp.round(on_grid / scale)).astype(np.int8)


def head_codes(program: Conv4Program, head: dict) -> dict:
  """The head's float ``{"kernel", "bias"}`` as the integer codes the engine reads."""
  scales = {"kernel": jnp.asarray(program.head_kernel_scale),
            "bias": jnp.float32(program.head_bias_scale)}
  codes = qzo.integer_weights({k: jnp.asarray(head[k]) for k in scales}, scales,
                              program.weight_bits)
  return {k: np.asarray(v) for k, v in codes.items()}


def features(program: Conv4Program, x_q: jax.Array) -> jax.Array:
  """The int8 feature codes of int8 input codes: integer operations only.

  ReLU and max-pooling run on the int32 codes before the cast to int8: IREE's ``vmvx`` backend
  (3.x) computes a maximum of int8 values as if they were unsigned.
  """
  x = jnp.asarray(x_q)
  for kernel, rq in zip(program.kernels, program.requants):
    acc = jax.lax.conv_general_dilated(
        x.astype(jnp.int32), jnp.asarray(kernel, jnp.int32), (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.int32)
    y = layers.rescale(acc, jnp.asarray(rq.multiplier), jnp.asarray(rq.shift),
                       jnp.asarray(rq.sign), jnp.asarray(rq.offset))
    y = jnp.maximum(y, 0)
    x = jax.lax.reduce_window(y, jnp.int32(0), jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                              "VALID").astype(jnp.int8)
  return x.reshape(x.shape[0], -1)


def logits(program: Conv4Program, feature_q: jax.Array, head_q: dict) -> jax.Array:
  """The int8 logit codes of int8 feature codes and the head's integer codes."""
  acc = jax.lax.dot_general(jnp.asarray(feature_q, jnp.int32),
                            jnp.asarray(head_q["kernel"], jnp.int32), (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  bias = fixed_point.multiply_shift(jnp.asarray(head_q["bias"], jnp.int32),
                                    jnp.asarray(program.bias_multiplier),
                                    jnp.asarray(program.bias_shift))
  return layers.rescale(acc + bias, jnp.asarray(program.head_multiplier),
                        jnp.asarray(program.head_shift)).astype(jnp.int8)


def loss(program: Conv4Program, feature_q, labels, head_q: dict) -> jax.Array:
  """Mean cross-entropy of the dequantized logits (float32: the one float step of a call)."""
  z = logits(program, feature_q, head_q).astype(jnp.float32) * jnp.float32(program.logit_scale)
  log_p = jax.nn.log_softmax(z, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, jnp.asarray(labels, jnp.int32)[:, None], -1))


def simulation_agreement(model, variables: dict, program: Conv4Program, images) -> dict:
  """How often the float simulation's logit codes equal the engine's, on ``images``.

  Returns ``{"equal": fraction of logit codes equal, "max_difference": in codes}``.
  """
  simulated = np.asarray(model.apply(variables, jnp.asarray(images)), np.float64)
  simulated = np.rint(simulated / program.logit_scale).astype(np.int64)
  head = head_codes(program, variables["params"]["head"])
  engine = np.asarray(logits(program, features(program, quantize_inputs(program, images)),
                             head), np.int64)
  difference = np.abs(simulated - engine)
  return {"equal": float(np.mean(difference == 0)), "max_difference": int(difference.max())}
