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
on the host from the calibrated variables, as an engine's converter does. The trained head's
bias is held as int16 codes ``b_q`` on its own grid ``Δ_b`` (QZO-FF's) and enters the
accumulator by a second multiply and shift, ``B = (b_q M_b + 2^{k_b-1}) ≫ k_b`` with
``M_b / 2^{k_b} ≈ Δ_b / (Δ_x Δ_w)``.

Two steps stay in float and are marked: quantizing the input images (a sensor or a preprocessing
step hands the engine int8 codes) and the cross-entropy over the dequantized logits (the loss an
inference-only runtime computes on the host or in a float unit; :func:`loss`).

The float fake-quant simulation (``fwdgrad.models`` at ``precision="16w8a"``) rounds the same
grids but computes the accumulator and the BatchNorm factor in float32, so it can land one code
away from this engine where a value sits within float32 error of a rounding boundary, or where the
15-bit multiplier's error moves it across one (:func:`simulation_agreement` measures how often).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad import fixed_point
from fwdgrad import quant
from fwdgrad.models import layers

PyTree = Any
A8 = 127


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
    head_kernel_scale: ``Δ_w`` of the head kernel (the calibrated one, QZO-FF's grid).
    head_bias_scale: ``Δ_b`` of the head bias codes (QZO-FF's rule for the bias).
    head_multiplier, head_shift: ``M, k`` of ``Δ_x Δ_w / Δ_y`` for the logits.
    bias_multiplier, bias_shift: ``M_b, k_b`` of ``Δ_b / (Δ_x Δ_w)``.
    logit_scale: ``Δ_y`` of the logit codes (``head/act_out``).
    weight_bits: bits of the kernels.
  """
  input_scale: float
  kernels: tuple
  requants: tuple
  feature_scale: float
  head_kernel_scale: float
  head_bias_scale: float
  head_multiplier: int
  head_shift: int
  bias_multiplier: int
  bias_shift: int
  logit_scale: float
  weight_bits: int


def _multiplier(ratio) -> tuple[np.ndarray, np.ndarray]:
  """``(M, k)`` with ``M / 2^k ≈ ratio``, a 15-bit ``M`` where ``k <= 31`` allows it.

  16-bit weights make ``Δ_x Δ_w / Δ_y`` small (``~1e-6``): the shift is capped at 31 and ``M``
  keeps the bits left (at least 8, a relative error below 2^-8).
  """
  ratio = np.asarray(ratio, np.float64)
  if np.any(ratio <= 0) or np.any(ratio >= 2.0 ** fixed_point.MULTIPLIER_BITS - 1):
    raise ValueError(f"a requantization ratio {ratio.min():.3g}..{ratio.max():.3g} is outside "
                     f"(0, 2^{fixed_point.MULTIPLIER_BITS} - 1): the calibrated scales do not "
                     "fit an int32 multiply and shift; recalibrate on representative inputs.")
  shift = np.minimum(fixed_point.MULTIPLIER_BITS - 1 - np.floor(np.log2(ratio)), 31)
  multiplier = np.rint(ratio * 2.0 ** shift)
  carry = multiplier >= 2 ** fixed_point.MULTIPLIER_BITS
  multiplier = np.where(carry, np.rint(ratio * 2.0 ** (shift - 1)), multiplier)
  shift = np.where(carry, shift - 1, shift)
  if np.any(multiplier < 2 ** 8) or np.any(shift < 0):
    raise ValueError(f"a requantization ratio of {ratio.min():.3g} needs a shift beyond 31; "
                     "the scales are too far apart for an int32 multiply and shift.")
  return multiplier.astype(np.int32), shift.astype(np.int32)


def _node(tree, *names):
  for name in names:
    tree = tree[name]
  return tree


def _scalar_scale(value) -> float:
  value = np.asarray(value, np.float64).ravel()
  if value.size != 1:
    raise ValueError("the integer Conv4 takes per-tensor weight scales; per-channel kernels "
                     "(precision '-per-channel') are not supported yet.")
  return float(value[0])


def conv4_program(model, variables: dict, bias_scale: float) -> Conv4Program:
  """The integer constants of a calibrated fixed-point :class:`fwdgrad.models.Conv4`.

  Args:
    model: the ``Conv4`` (``num_classes`` set, a static precision such as ``"16w8a"``).
    variables: its calibrated variables (``params`` with ``head``, ``batch_stats``, ``quant``).
    bias_scale: ``Δ_b``, the grid of the head bias codes (the one ``qzo_ff`` trains on, e.g.
      ``qzo_ff(...).init(params).weight_scale["head"]["bias"]``).
  """
  precision = layers.Precision.parse(model.precision)
  if precision.is_float or precision.dynamic or precision.activation_bits != 8:
    raise ValueError(f"the integer forward needs a static 8-bit-activation precision such as "
                     f"'16w8a' or '8w8a', got {str(precision)!r}.")
  if precision.weight_bits is None or precision.weight_bits > 16:
    raise ValueError(f"the integer forward needs weights of at most 16 bits, got {precision}.")
  if model.num_classes is None:
    raise ValueError("the integer Conv4 needs its head: build it with num_classes set.")
  if "quant" not in variables:
    raise ValueError("these variables are not calibrated: call fwdgrad.models.calibrate first.")
  params, stats, scales = variables["params"], variables.get("batch_stats", {}), variables["quant"]
  x_scale = float(np.asarray(scales["act_input"]["scale"], np.float64))
  input_scale = x_scale
  kernels, requants = [], []
  for i in range(len(model.features)):
    name = f"block{i}"
    p, s, q = params[name], stats[name], scales[name]
    w_scale = _scalar_scale(q["kernel_scale"])
    codes = np.asarray(quant.quantize(jnp.asarray(p["kernel"]), precision.weight_bits,
                                      scale=w_scale)[0])
    gamma = np.asarray(p["scale"], np.float64)
    factor = gamma / np.sqrt(np.asarray(s["var"], np.float64) + 1e-5)
    factor = np.where(factor == 0, 1e-30, factor)  # A dead channel: its output is the offset.
    out_scale = float(np.asarray(q["act_out"]["scale"], np.float64))
    offset = (np.asarray(p["bias"], np.float64) - np.asarray(s["mean"], np.float64) * factor)
    offset = offset / (x_scale * w_scale * factor)
    multiplier, shift = _multiplier(x_scale * w_scale * np.abs(factor) / out_scale)
    if np.any(np.abs(offset) > 2.0 ** 30):
      raise ValueError(f"{name}: the BatchNorm offset does not fit the int32 accumulator.")
    kernels.append(codes)
    requants.append(Requant(multiplier, shift, np.sign(factor).astype(np.int32),
                            np.rint(offset).astype(np.int32)))
    x_scale = out_scale
  head_scale = _scalar_scale(scales["head"]["kernel_scale"])
  logit_scale = float(np.asarray(scales["head"]["act_out"]["scale"], np.float64))
  (head_m,), (head_k,) = _multiplier([x_scale * head_scale / logit_scale])
  (bias_m,), (bias_k,) = _multiplier([float(bias_scale) / (x_scale * head_scale)])
  return Conv4Program(input_scale, tuple(kernels), tuple(requants), x_scale, head_scale,
                      float(bias_scale), int(head_m), int(head_k), int(bias_m), int(bias_k),
                      logit_scale, precision.weight_bits)


def quantize_inputs(program: Conv4Program, images) -> np.ndarray:
  """The int8 input codes of float images (the one float step before the engine)."""
  return np.asarray(quant.quantize(jnp.asarray(images, jnp.float32), 8,
                                   scale=program.input_scale)[0])


def head_codes(program: Conv4Program, head: dict) -> dict:
  """The head's float ``{"kernel", "bias"}`` as the integer codes the engine reads."""
  return {"kernel": np.asarray(quant.quantize(jnp.asarray(head["kernel"]), program.weight_bits,
                                              scale=program.head_kernel_scale)[0]),
          "bias": np.asarray(quant.quantize(jnp.asarray(head["bias"]), program.weight_bits,
                                            scale=program.head_bias_scale)[0])}


def _requantize(acc, multiplier, shift, sign=1, offset=0):
  """int32 codes clipped to the 8-bit range (still int32: see :func:`features`)."""
  acc = sign * (acc + offset)
  return jnp.clip(fixed_point.multiply_shift(acc, multiplier, shift), -A8, A8)


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
    y = _requantize(acc, jnp.asarray(rq.multiplier), jnp.asarray(rq.shift),
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
                                    program.bias_multiplier, program.bias_shift)
  return _requantize(acc + bias, program.head_multiplier, program.head_shift).astype(jnp.int8)


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
