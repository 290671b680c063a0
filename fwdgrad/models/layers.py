"""Flax Linen layers that simulate a fixed-point inference engine with fake-quantization.

A :class:`Precision` such as ``"16w8a"`` says how many bits the weights and the activations have.
Like an engine, the model is given its scales once, by calibration (:func:`fwdgrad.models.calibrate`,
which fills the ``"quant"`` variable collection, saved with the params), and then uses them
unchanged in training and evaluation. Every quantized layer rounds

* its **kernel** to ``weight_bits`` on a static grid ``quant/<layer>/kernel_scale`` (signed
  symmetric, per tensor or per output channel), the paper's ``w_q = round(w / Δ_w)`` with
  ``Δ_w = w_max / (2^(b-1) - 1)``, chosen by :func:`fwdgrad.fixed_point.weight_scales`: the grid
  :func:`fwdgrad.qzo_ff` trains on, so weights QZO-FF keeps on it are read without a second
  rounding;
* its **output** (and, unless ``quantize_input=False``, its input) to ``activation_bits`` with a
  static per-tensor scale ``quant/<quantizer>/scale`` (:class:`QAct`), so an example's output does
  not depend on the rest of its batch. Where a layer reads the output of another quantizer through
  ReLU or max-pooling, which keep the grid, the models skip the input quantizer, as an engine that
  fuses those ops does; float operations (LayerNorm, softmax, GELU in the ViT) are followed by a
  quantizer.

Where a layer is told the grid of its input (``input_scale``), a calibrated static model computes
what an integer engine does, bit for bit: the exact int32 accumulator and a multiply-and-shift
requantization (:func:`exact_conv`, :func:`requantize`), and between layers the integer forms of
a leaky ReLU onto its own grid (:func:`leaky_relu_codes`), a residual sum of two grids
(:func:`add_codes`) and a mean (:func:`mean_codes`), each with the derivative of its fake-quant
formula (:func:`straight_through`). Conv4, ResNet12, the GRU CRNN and the speech embedding run
this way (``fwdgrad.edge.integer`` runs them on integers); constants that divide by a scale
multiply by its :func:`reciprocal`, so that compiled and op-by-op runs give the same bits.

A fixed-point model applied before calibration raises :class:`NotCalibratedError`. Per-batch
(dynamic) activation scales stay available as ``"16w8a-dynamic"``, never by default.

.. math::

   y = Q_a\\big(Q_a(x) \\circledast Q_w(W) + b\\big), \\qquad
   Q_b(v) = \\Delta \\,\\mathrm{clip}(\\mathrm{round}(v / \\Delta), -(2^{b-1}-1), 2^{b-1}-1)

Choices the paper leaves open, made here:

* **Biases** are not rounded: fixed-point engines keep them in the 32-bit accumulator (with scale
  ``Δ_x Δ_w``), where float32 rounding is already finer than the integer grid.
* **BatchNorm** (:class:`ConvBN`) in evaluation mode (``train=False``) acts on the 32-bit
  accumulator, as an engine's per-channel requantization multiplier and bias:
  ``y = (Q_a(x) ⊛ Q_w(W)) m + β − μ m`` with ``m = γ / sqrt(σ² + ε)``. It is kept apart from the
  kernel (not folded into it before rounding), so the forward and the integer update see the same
  kernel, γ and β on the same grids. In training mode (``train=True``, with ``mutable=["batch_stats"]``) the convolution output is normalised with
  the batch statistics in float and the running averages are updated; that mode is for the backprop
  baseline and pre-training, and does not match an engine.
* **LayerNorm**, softmax, GELU, sigmoid and tanh run in float on quantized inputs; their outputs are
  rounded by the next layer's input quantizer (softmax probabilities are rounded explicitly).
* With ``precision="float"`` nothing is rounded and the layers are ordinary float layers.

All rounding goes through :func:`fwdgrad.quant.fake_quant`, a ``jax.custom_jvp`` with a
straight-through tangent, so ``jax.jvp`` (forward gradients), ``jax.grad`` (backprop) and SPSA all
run through every layer.

References:
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024, Sec. 3.3 and App. A.
  Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference", CVPR 2018 (static calibrated scales, per-channel requantization, 32-bit biases).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fwdgrad import fixed_point
from fwdgrad import quant

Array = jax.Array
Initializer = Callable[..., Array]
Padding = Union[str, int, Sequence[tuple[int, int]]]

_PRECISION_PATTERN = re.compile(r"^(\d+)w(\d+)a(-per-channel)?(-dynamic)?$")

# Variable collections of a fixed-point model. ``QUANT`` holds the static scales an engine is
# given (activation ``scale`` and weight ``kernel_scale``), set once by
# :func:`fwdgrad.models.calibrate` and saved with the params; ``QUANT_STATS`` is what a calibration
# pass observes (made mutable only by ``calibrate``).
QUANT = "quant"
QUANT_STATS = "quant_stats"
HISTOGRAM_BINS = 2048

# torchvision's ResNet initialisation (He normal, fan-out) and timm's ViT one (truncated normal).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
vit_kernel_init = nn.initializers.truncated_normal(0.02)


@dataclasses.dataclass(frozen=True)
class Precision:
  """Bit widths of a simulated fixed-point engine.

  Attributes:
    weight_bits: bits of the kernels (2 to 32), or ``None`` for float kernels.
    activation_bits: bits of the activations (2 to 32), or ``None`` for float activations.
    per_channel: one weight scale per output channel instead of one per tensor.
    dynamic: activation scales taken from each call's own tensor (per batch) instead of the static,
      calibrated ones an engine uses; ``"16w8a-dynamic"``. Never the default: an example's output
      then depends on the rest of its batch.

  Examples:
    >>> Precision.parse("16w8a")
    Precision(weight_bits=16, activation_bits=8, per_channel=False, dynamic=False)
    >>> str(Precision.parse("float"))
    'float'
  """
  weight_bits: Optional[int] = None
  activation_bits: Optional[int] = None
  per_channel: bool = False
  dynamic: bool = False

  def __post_init__(self):
    for name in ("weight_bits", "activation_bits"):
      bits = getattr(self, name)
      if bits is not None:
        try:
          quant.check_bits(bits)
        except ValueError as error:
          raise ValueError(f"Precision.{name}: {error}") from None
    for name in ("per_channel", "dynamic"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"Precision.{name} must be a bool, got {getattr(self, name)!r}.")

  @classmethod
  def parse(cls, spec: Union[str, "Precision", None]) -> "Precision":
    """A Precision from ``"float"`` or ``"<w>w<a>a"`` (e.g. ``"16w8a"``), optionally followed by
    ``"-per-channel"`` (weight scales per output channel) and ``"-dynamic"`` (per-batch activation
    scales).

    ``None`` means float and a Precision is returned unchanged.
    """
    if spec is None:
      return cls()
    if isinstance(spec, cls):
      return spec
    if not isinstance(spec, str):
      raise ValueError(
          f"precision must be a string such as 'float' or '16w8a', or a Precision; got {spec!r}.")
    text = spec.strip().lower()
    if text in ("float", "float32", "fp32"):
      return cls()
    match = _PRECISION_PATTERN.match(text)
    if match is None:
      raise ValueError(
          f"cannot parse precision {spec!r}: expected 'float' or '<w>w<a>a' with bit widths 2 to 32 "
          "(for example '16w8a' for 16-bit weights and 8-bit activations, '8w8a', "
          "'16w8a-per-channel' or '16w8a-dynamic').")
    weight_bits, activation_bits = int(match.group(1)), int(match.group(2))
    for bits in (weight_bits, activation_bits):
      if not 2 <= bits <= 32:
        raise ValueError(
            f"cannot use precision {spec!r}: bit widths must be between 2 and 32, got {bits}.")
    return cls(weight_bits, activation_bits, per_channel=match.group(3) is not None,
               dynamic=match.group(4) is not None)

  @property
  def is_float(self) -> bool:
    return self.weight_bits is None and self.activation_bits is None

  def __str__(self) -> str:
    if self.is_float:
      return "float"
    weights = "f" if self.weight_bits is None else str(self.weight_bits)
    activations = "f" if self.activation_bits is None else str(self.activation_bits)
    return (f"{weights}w{activations}a" + ("-per-channel" if self.per_channel else "")
            + ("-dynamic" if self.dynamic else ""))


def quantize_weight(w: Array, precision: Union[str, Precision, None], axis: int = -1) -> Array:
  """Rounds a kernel to ``precision.weight_bits`` with its own max-abs scale (per call).

  A helper for code outside a model; the layers use their calibrated ``kernel_scale`` instead.
  """
  precision = Precision.parse(precision)
  if precision.weight_bits is None:
    return w
  return quant.fake_quant(w, precision.weight_bits, axis=axis if precision.per_channel else None)


def quantize_activation(x: Array, precision: Union[str, Precision, None]) -> Array:
  """Rounds a tensor to ``precision.activation_bits`` with its own max-abs scale (dynamic).

  A helper for code outside a model; inside one, :class:`QAct` uses a static calibrated scale.
  """
  precision = Precision.parse(precision)
  if precision.activation_bits is None:
    return x
  return quant.fake_quant(x, precision.activation_bits)


class NotCalibratedError(ValueError):
  """A fixed-point model was applied before :func:`fwdgrad.models.calibrate` set its scales."""


def _not_calibrated(module: nn.Module, what: str, precision: Precision) -> NotCalibratedError:
  path = "/".join(module.scope.path) or type(module).__name__
  dynamic = dataclasses.replace(precision, dynamic=True)
  return NotCalibratedError(
      f"{type(module).__name__} {path!r} at precision {str(precision)!r} has no calibrated {what} "
      f"(variables[{QUANT!r}] is missing or incomplete). Calibrate once before applying the model: "
      "variables = fwdgrad.models.calibrate(model, variables, inputs) with a few hundred "
      "pre-training examples (or the task's support set), and keep variables["
      f"{QUANT!r}] with the params; or use precision {str(dynamic)!r} for per-batch scales.")


def _calibrating(module: nn.Module) -> bool:
  """True in a calibration pass (``calibrate`` makes ``QUANT_STATS`` mutable), not at init."""
  return not module.is_initializing() and module.is_mutable_collection(QUANT_STATS)


def _observe(module: nn.Module, x: Array) -> None:
  """Records what calibration needs of ``|x|``: its max, then (second pass) its histogram."""
  magnitude = jnp.abs(x.astype(jnp.float32))
  levels = quant.qmax(Precision.parse(module.precision).activation_bits)
  module.variable(QUANT_STATS, "levels", lambda: jnp.float32(levels))
  amax = module.variable(QUANT_STATS, "amax", lambda: jnp.zeros((), jnp.float32))
  if module.has_variable(QUANT_STATS, "histogram"):
    histogram = module.variable(QUANT_STATS, "histogram", jnp.zeros, (HISTOGRAM_BINS,), jnp.int32)
    top = jnp.where(amax.value > 0, amax.value, 1.0)
    index = jnp.clip(jnp.floor(magnitude / top * HISTOGRAM_BINS), 0, HISTOGRAM_BINS - 1)
    histogram.value = histogram.value + jnp.bincount(
        index.astype(jnp.int32).ravel(), length=HISTOGRAM_BINS).astype(jnp.int32)
  else:
    amax.value = jnp.maximum(amax.value, jnp.max(magnitude))


class QAct(nn.Module):
  """An engine's activation quantizer: one static per-tensor scale, fixed by calibration.

  The scale is the variable ``quant/<path>/scale``, set by :func:`fwdgrad.models.calibrate` from
  a calibration set (max-abs, a percentile, or the MSE-optimal clipping range of what this point
  sees) and then used unchanged in training and evaluation, so an example's output never depends
  on the rest of its batch. Applying a fixed-point model without it raises
  :class:`NotCalibratedError`. With ``Precision.dynamic`` (``"16w8a-dynamic"``) each call takes
  the max-abs of its own tensor instead. During a calibration pass values go through unrounded.

  Attributes:
    precision: ``"float"`` (the identity), ``"16w8a"``, ... or a :class:`Precision`.
  """
  precision: Union[str, Precision, None] = "float"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    precision = Precision.parse(self.precision)
    bits = precision.activation_bits
    if bits is None:
      return x
    if precision.dynamic or self.is_initializing():
      return quant.fake_quant(x, bits)
    if _calibrating(self):
      _observe(self, x)
      return x
    if not self.has_variable(QUANT, "scale"):
      raise _not_calibrated(self, "activation scale", precision)
    return quant.fake_quant(x, bits, scale=self.get_variable(QUANT, "scale"))

  def static_scale(self) -> Optional[Array]:
    """The calibrated scale ``Δ`` of this quantizer's grid, or ``None`` (float, dynamic, not
    calibrated yet, or in a calibration pass)."""
    precision = Precision.parse(self.precision)
    if (precision.activation_bits is None or precision.dynamic or self.is_initializing()
        or _calibrating(self) or not self.has_variable(QUANT, "scale")):
      return None
    return self.get_variable(QUANT, "scale")


def calibrated_scale(module: nn.Module, *path: str) -> Optional[Array]:
  """The calibrated ``quant/<path>/scale`` below ``module`` at a static precision, or ``None``
  (float or per-batch scales, at init, in a calibration pass, or not calibrated yet)."""
  precision = Precision.parse(module.precision)
  if (precision.activation_bits is None or precision.dynamic or module.is_initializing()
      or _calibrating(module)):
    return None
  node = module.variables.get(QUANT, {})
  for name in path:
    node = node.get(name, {})
  return node.get("scale")


def _broadcast_scale(scale: Array, ndim: int, per_channel: bool) -> Array:
  """A stored ``kernel_scale`` ((1,) or (channels,)) shaped to broadcast against the kernel."""
  if not per_channel:
    return jnp.reshape(scale, ())
  return jnp.reshape(scale, (1,) * (ndim - 1) + (-1,))


def _quantized_kernel(module: nn.Module, kernel: Array, precision: Precision) -> Array:
  """The kernel on its static grid ``quant/<path>/kernel_scale`` (one grid with QZO-FF's).

  The scale is set by calibration with :func:`fwdgrad.fixed_point.weight_scales` from the
  layer's params (the rule :func:`fwdgrad.qzo_ff` applies at ``init``), so a kernel that QZO-FF
  keeps on its grid is reproduced exactly, never rounded again onto a grid of its own.
  """
  bits = precision.weight_bits
  if bits is None:
    return kernel
  axis = kernel.ndim - 1 if precision.per_channel else None
  if module.is_initializing():
    return quant.fake_quant(kernel, bits, axis=axis)
  if _calibrating(module):
    scale = fixed_point.weight_scales(dict(module.variables["params"]), bits, axis=axis)["kernel"]
    stat = module.variable(QUANT_STATS, "kernel_scale", jnp.zeros, (scale.size,), jnp.float32)
    stat.value = jnp.reshape(scale, (-1,))
    return quant.fake_quant(kernel, bits, scale=scale)
  if module.has_variable(QUANT, "kernel_scale"):
    scale = _broadcast_scale(module.get_variable(QUANT, "kernel_scale"), kernel.ndim,
                             precision.per_channel)
    return quant.fake_quant(kernel, bits, scale=scale)
  if precision.dynamic:
    return quant.fake_quant(kernel, bits, axis=axis)
  raise _not_calibrated(module, "weight scale", precision)


def _conv_padding(padding: Padding, kernel_size: Sequence[int]):
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * len(kernel_size)
  return [tuple(p) for p in padding]


def _conv(x: Array, kernel: Array, strides: Sequence[int], padding) -> Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))



# Exact integer arithmetic ----------------------------------------------------------------------
# Where a layer is told the grid of its input (``input_scale``), its static fixed-point forward
# computes what an integer engine computes (fwdgrad.edge runs the same arithmetic on integers):
# the int32 accumulator of the codes, exactly, and the requantization by a multiply and shift.

# |x| <= 127 times a weight part |w| <= 128: up to 1032 products sum below 2^24, where float32
# holds every integer exactly. 16-bit kernels are split into two such parts, w = 256 w_hi + w_lo.
_EXACT_TERMS = 1032


def exact_precision(precision: Union[str, "Precision", None]) -> bool:
  """Whether a precision has the exact integer forward: static, <= 8-bit activations and
  <= 16-bit weights."""
  precision = Precision.parse(precision)
  return (precision.activation_bits is not None and precision.activation_bits <= 8
          and precision.weight_bits is not None and precision.weight_bits <= 16
          and not precision.dynamic)


def _weight_parts(w_codes: Array, weight_bits: int):
  if weight_bits <= 8:
    return ((w_codes, 1),)
  high = jnp.round(w_codes / 256.0)
  return ((high, 256), (w_codes - 256.0 * high, 1))


def exact_dot(x_codes: Array, w_codes: Array, weight_bits: int) -> Array:
  """``x_codes @ w_codes`` (integer-valued floats) as an exact int32 array."""
  total = None
  size = x_codes.shape[-1]
  for start in range(0, size, _EXACT_TERMS):
    x = x_codes[..., start:start + _EXACT_TERMS]
    for part, factor in _weight_parts(w_codes[start:start + _EXACT_TERMS], weight_bits):
      term = jnp.dot(x, part, precision=jax.lax.Precision.HIGHEST).astype(jnp.int32) * factor
      total = term if total is None else total + term
  return total


def exact_conv(x_codes: Array, w_codes: Array, weight_bits: int, strides, padding) -> Array:
  """The NHWC x HWIO convolution of integer-valued floats as an exact int32 array."""
  kh, kw, channels, _ = w_codes.shape
  step = max(1, _EXACT_TERMS // (kh * kw))
  total = None
  for start in range(0, channels, step):
    x = x_codes[..., start:start + step]
    for part, factor in _weight_parts(w_codes[:, :, start:start + step], weight_bits):
      term = jax.lax.conv_general_dilated(
          x, part, window_strides=tuple(strides), padding=padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=jax.lax.Precision.HIGHEST).astype(jnp.int32) * factor
      total = term if total is None else total + term
  return total


def requant_multiplier(ratio: Array):
  """``(M, k, σ)`` int32 with ``M / 2^k ≈ |ratio|`` and ``σ`` the sign of ``ratio``.

  ``(M, k)`` come from :func:`fwdgrad.fixed_point.fixed_point_multiplier_array` (15-bit ``M``,
  ``k <= 31``). An engine's converter computes them once (``fwdgrad.edge.integer``).
  """
  multiplier, shift = fixed_point.fixed_point_multiplier_array(jnp.abs(ratio))
  return multiplier, shift, jnp.where(ratio < 0, -1, 1).astype(jnp.int32)


def rescale(acc: Array, multiplier, shift, sign=1, offset=0, bits: int = 8) -> Array:
  """int32 codes ``clip((σ (acc + B) M + 2^(k-1)) >> k)`` at ``bits``; ``B`` in accumulator units."""
  levels = quant.qmax(bits)
  return jnp.clip(fixed_point.multiply_shift(sign * (acc + offset), multiplier, shift), -levels,
                  levels)


def requantize(acc: Array, ratio: Array, bits: int, offset: Optional[Array] = None) -> Array:
  """int32 codes of ``acc`` rescaled by ``ratio`` (:func:`requant_multiplier`, :func:`rescale`)."""
  return rescale(acc, *requant_multiplier(ratio), 0 if offset is None else offset, bits)


# Integer forms of the operations between layers. Each takes and returns int32 codes, so the
# simulation (on the codes of its on-grid floats) and fwdgrad.edge (on int8 arrays) call the same
# function. Their constants are computed once from the scales, as a converter does.

# The extra bits a rescaled addition keeps until its one final rounding.
_ADD_GUARD_BITS = 8


def leaky_relu_constants(slope: float, in_scale=1.0, out_scale=1.0):
  """``(M₊, k₊, M₋, k₋)`` int32 of a leaky ReLU from the grid ``Δ_x`` to ``Δ_y``:
  ``M₊ / 2^k₊ ≈ Δ_x / Δ_y`` and ``M₋ / 2^k₋ ≈ slope Δ_x / Δ_y`` (an engine's LEAKY_RELU, which
  requantizes its output)."""
  ratio = jnp.asarray(in_scale, jnp.float32) * reciprocal(out_scale)
  return (fixed_point.fixed_point_multiplier_array(ratio)
          + fixed_point.fixed_point_multiplier_array(jnp.float32(slope) * ratio))


def leaky_relu_codes(codes: Array, constants, bits: int = 8) -> Array:
  """Leaky ReLU on int32 codes, onto the output grid: ``c M₊ >> k₊`` where ``c >= 0``, else
  ``c M₋ >> k₋`` (rounded), saturated at ``bits``."""
  positive_m, positive_k, negative_m, negative_k = constants
  levels = quant.qmax(bits)
  return jnp.clip(jnp.where(codes >= 0, fixed_point.multiply_shift(codes, positive_m, positive_k),
                            fixed_point.multiply_shift(codes, negative_m, negative_k)),
                  -levels, levels)


def add_constants(a_scale, b_scale, out_scale):
  """``(M_a, k_a, M_b, k_b)`` of a rescaled addition: ``Δ_a / Δ_y`` and ``Δ_b / Δ_y`` with guard bits."""
  guard = jnp.float32(2 ** _ADD_GUARD_BITS)
  inverse = reciprocal(out_scale)
  return (fixed_point.fixed_point_multiplier_array(guard * a_scale * inverse)
          + fixed_point.fixed_point_multiplier_array(guard * b_scale * inverse))


def add_codes(a: Array, b: Array, constants, bits: int = 8) -> Array:
  """``a Δ_a + b Δ_b`` as int32 codes on ``Δ_y``: each term rescaled to ``Δ_y / 2^8``, one rounding.

  This is an engine's residual addition of two tensors on different grids (TFLite's ADD keeps
  guard bits the same way).
  """
  a_multiplier, a_shift, b_multiplier, b_shift = constants
  total = (fixed_point.multiply_shift(a, a_multiplier, a_shift)
           + fixed_point.multiply_shift(b, b_multiplier, b_shift))
  levels = quant.qmax(bits)
  return jnp.clip(fixed_point.multiply_shift(total, 1, _ADD_GUARD_BITS), -levels, levels)


def mean_constants(in_scale, out_scale, count: int):
  """``(M, k, σ)`` of a mean over ``count`` codes: ``Δ_x / (count Δ_y)``."""
  return requant_multiplier(in_scale * reciprocal(jnp.float32(count) * out_scale))


def mean_codes(codes: Array, axis, constants, bits: int = 8) -> Array:
  """The mean of int32 codes over ``axis`` (an int32 sum, then a multiply and shift) on ``Δ_y``."""
  return rescale(jnp.sum(codes, axis=axis), *constants, bits=bits)


def _int_codes(x: Array, scale: Array, bits: int) -> Array:
  return _codes(x, scale, quant.qmax(bits)).astype(jnp.int32)


def on_codes(fn: Callable, approx: Callable, x: Array, in_scale: Array,
             out_scale: Array) -> Array:
  """``fn(codes, Δ_x, Δ_y)`` (int32 codes of ``x`` on ``Δ_x`` to int32 codes on ``Δ_y``) times
  ``Δ_y``: the value an engine computes, with the derivative of ``approx(x, Δ_y)``."""
  def exact(x, in_scale, out_scale):
    return fn(_int_codes(x, in_scale, 16), in_scale, out_scale).astype(jnp.float32) * out_scale

  return straight_through(exact, lambda x, in_scale, out_scale: approx(x, out_scale), x,
                          in_scale, out_scale)


def exact_leaky_relu(x: Array, in_scale: Array, out_scale: Array, slope: float,
                     bits: int = 8) -> Array:
  """A leaky ReLU of ``x`` on ``Δ_x`` onto ``Δ_y`` by :func:`leaky_relu_codes`, with the
  derivative of ``fake_quant(leaky_relu(x))``."""
  return on_codes(
      lambda c, a, b: leaky_relu_codes(c, leaky_relu_constants(slope, a, b), bits),
      lambda x, b: quant.fake_quant(nn.leaky_relu(x, slope), bits, scale=b), x, in_scale,
      out_scale)


def exact_add(a: Array, a_scale: Array, b: Array, b_scale: Array, out_scale: Array,
              bits: int = 8) -> Array:
  """``a + b`` of on-grid tensors by :func:`add_codes`, with the derivative of the float sum."""
  def exact(a, a_scale, b, b_scale, out_scale):
    codes = add_codes(_int_codes(a, a_scale, 16), _int_codes(b, b_scale, 16),
                      add_constants(a_scale, b_scale, out_scale), bits)
    return codes.astype(jnp.float32) * out_scale

  def approx(a, a_scale, b, b_scale, out_scale):
    del a_scale, b_scale
    return quant.fake_quant(a + b, bits, scale=out_scale)

  return straight_through(exact, approx, a, a_scale, b, b_scale, out_scale)


def exact_mean(x: Array, axis, in_scale: Array, out_scale: Array, bits: int = 8) -> Array:
  """The mean of on-grid ``x`` over ``axis`` by :func:`mean_codes`, straight-through."""
  axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  count = 1
  for a in axis:
    count *= x.shape[a]

  def exact(x, in_scale, out_scale):
    codes = mean_codes(_int_codes(x, in_scale, 16), axis,
                       mean_constants(in_scale, out_scale, count), bits)
    return codes.astype(jnp.float32) * out_scale

  def approx(x, in_scale, out_scale):
    del in_scale
    return quant.fake_quant(jnp.mean(x, axis=axis), bits, scale=out_scale)

  return straight_through(exact, approx, x, in_scale, out_scale)


def straight_through(exact: Callable, approx: Callable, *args):
  """``exact(*args)`` as the value and the derivative of ``approx`` (the fake-quant formula): how
  a layer's integer forward gets a derivative for ``jax.jvp``, ``jax.grad`` and SPSA alike."""
  @jax.custom_jvp
  def fn(*args):
    return exact(*args)

  @fn.defjvp
  def fn_jvp(primals, tangents):
    _, tangent = jax.jvp(approx, primals, tangents)
    return exact(*primals), tangent

  return fn(*args)


def _codes(x: Array, scale: Array, levels: int) -> Array:
  return jnp.clip(jnp.round(x * reciprocal(scale)), -levels, levels)


def reciprocal(x) -> Array:
  """``1 / x`` in float32. The integer forward's constants and codes divide by multiplying with
  it: XLA turns a division by a broadcast scalar into that product under ``jit`` (and not when
  called op by op), so writing it out gives the same bits compiled or not, in the model and in
  ``fwdgrad.edge``."""
  return jnp.float32(1.0) / jnp.asarray(x, jnp.float32)


def weight_codes(w: Array, scale: Array, bits: int) -> Array:
  """The integer codes ``clip(round(w / Δ))`` of weights, as the integer forward reads them
  (int8, int16 or int32 by ``bits``)."""
  return _codes(jnp.asarray(w, jnp.float32), scale, quant.qmax(bits)).astype(
      quant.integer_dtype(bits))


def dense_requant_constants(in_scale, kernel_scale, out_scale, bias_scale):
  """``(ratio, bias_ratio)`` of a dense layer: ``Δ_x Δ_w / Δ_y`` and ``Δ_b / (Δ_x Δ_w)``."""
  product = in_scale * kernel_scale
  return product * reciprocal(out_scale), bias_scale * reciprocal(product)


def bn_requant_constants(gamma, beta, mean, var, epsilon, in_scale, kernel_scale, out_scale):
  """``(ratio, offset)`` of a conv-BatchNorm: ``Δ_x Δ_w m / Δ_y`` and ``B`` (int32).

  ``m = γ / sqrt(σ² + ε)``; ``B = round((β − μ m) / (Δ_x Δ_w m))``, the BatchNorm's offset on
  the accumulator (a dead channel, ``m = 0``, gets a tiny ``m`` and saturates at its offset).
  """
  factor = gamma * jax.lax.rsqrt(var + epsilon)
  factor = jnp.where(factor == 0, jnp.float32(1e-30), factor)
  product = in_scale * kernel_scale * factor
  offset = jnp.clip(jnp.round((beta - mean * factor) * reciprocal(product)), -2.0 ** 30,
                    2.0 ** 30)
  return product * reciprocal(out_scale), offset.astype(jnp.int32)


def conv_bias_constants(bias, in_scale, kernel_scale, out_scale):
  """``(ratio, offset)`` of a convolution with a bias: ``Δ_x Δ_w / Δ_y`` and
  ``B = round(b / (Δ_x Δ_w))`` (int32), the bias on the accumulator."""
  product = in_scale * kernel_scale
  offset = jnp.clip(jnp.round(bias * reciprocal(product)), -2.0 ** 30, 2.0 ** 30)
  return product * reciprocal(out_scale), offset.astype(jnp.int32)


class QDense(nn.Module):
  """A Dense layer with a quantized kernel, quantized input and quantized output.

  Attributes:
    features: output width.
    precision: ``"float"``, ``"16w8a"``, ... or a :class:`Precision`.
    use_bias: add a (float, accumulator-precision) bias.
    quantize_input: round the input with a quantizer of its own; ``False`` where the input already
      lies on the previous quantizer's grid (after ReLU or max-pool), as an engine that fuses those
      ops reads it without requantizing.
    kernel_init, bias_init: initialisers; the kernel has shape ``(in, out)`` as in ``nn.Dense``.

  Examples:
    >>> layer = QDense(4, precision="16w8a")
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> variables = fwdgrad.models.calibrate(layer, variables, jnp.ones((8, 3)))
    >>> layer.apply(variables, jnp.ones((2, 3))).shape
    (2, 4)
  """
  features: int
  precision: Union[str, Precision, None] = "float"
  use_bias: bool = True
  quantize_input: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array, input_scale: Optional[Array] = None) -> Array:
    """``input_scale``: the grid ``Δ_x`` that ``x`` lies on (with ``quantize_input=False``); a
    calibrated static layer then computes the exact integer forward (see :func:`exact_dot`)."""
    precision = Precision.parse(self.precision)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    if self.quantize_input:
      x = QAct(precision, name="act_in")(x)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias
            else None)
    out = QAct(precision, name="act_out")
    quantized = _quantized_kernel(self, kernel, precision)
    if bias is not None and precision.weight_bits is not None and _calibrating(self):
      # The bias grid Δ_b, by the rule qzo_ff applies (a zero bias gets the kernel's range).
      scale = fixed_point.weight_scales(dict(self.variables["params"]), precision.weight_bits)
      stat = self.variable(QUANT_STATS, "bias_scale", jnp.zeros, (1,), jnp.float32)
      stat.value = jnp.reshape(scale["bias"], (-1,))[:1]
    out_scale = out.static_scale()
    if (input_scale is not None and not self.quantize_input and exact_precision(precision)
        and out_scale is not None and self.has_variable(QUANT, "kernel_scale")
        and (bias is None or self.has_variable(QUANT, "bias_scale"))):
      kernel_scale = _broadcast_scale(self.get_variable(QUANT, "kernel_scale"), 2,
                                      precision.per_channel)
      bias_scale = (jnp.reshape(self.get_variable(QUANT, "bias_scale"), ()) if bias is not None
                    else jnp.float32(1.0))
      # (Through the output quantizer, the identity on these on-grid values, so that its output
      # is there to inspect like any other quantizer's.)
      return out(_exact_dense(x, kernel, jnp.zeros(self.features) if bias is None else bias,
                              jnp.asarray(input_scale, jnp.float32), kernel_scale, out_scale,
                              bias_scale, precision, bias is not None))
    y = jnp.dot(x, quantized)
    if bias is not None:
      y = y + bias
    return out(y)

  def output_scale(self) -> Optional[Array]:
    """The calibrated grid of this layer's output (``act_out``), or ``None`` before calibration."""
    return _output_scale(self)


def _exact_dense(x, kernel, bias, in_scale, kernel_scale, out_scale, bias_scale,
                 precision: Precision, use_bias: bool):
  """A dense layer's integer forward on float codes, with the fake-quant derivative."""
  wbits, abits = precision.weight_bits, precision.activation_bits

  def exact(x, kernel, bias, in_scale, kernel_scale, out_scale, bias_scale):
    acc = exact_dot(_codes(x, in_scale, quant.qmax(abits)),
                    _codes(kernel, kernel_scale, quant.qmax(wbits)), wbits)
    ratio, bias_ratio = dense_requant_constants(in_scale, kernel_scale, out_scale, bias_scale)
    if use_bias:
      multiplier, shift = fixed_point.fixed_point_multiplier_array(bias_ratio)
      codes = _codes(bias, bias_scale, quant.qmax(wbits)).astype(jnp.int32)
      acc = acc + fixed_point.multiply_shift(codes, multiplier, shift)
    return requantize(acc, ratio, abits).astype(jnp.float32) * out_scale

  def approx(x, kernel, bias, in_scale, kernel_scale, out_scale, bias_scale):
    del in_scale, bias_scale
    y = jnp.dot(x, quant.fake_quant(kernel, wbits, scale=kernel_scale))
    if use_bias:
      y = y + bias
    return quant.fake_quant(y, abits, scale=out_scale)

  return straight_through(exact, approx, x, kernel, bias, in_scale, kernel_scale, out_scale,
                           bias_scale)


class QConv(nn.Module):
  """A 2-D convolution (NHWC, HWIO kernel) with quantized kernel, input and output.

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"``, an int, or ``((top, bottom), (left, right))``; an int ``p`` pads
      like PyTorch's ``padding=p``.
    precision: ``"float"``, ``"16w8a"``, ... or a :class:`Precision`.
    use_bias: add a float bias.
    quantize_input: as for :class:`QDense`.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Padding = "SAME"
  precision: Union[str, Precision, None] = "float"
  use_bias: bool = True
  quantize_input: bool = True
  kernel_init: Initializer = conv_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array, input_scale: Optional[Array] = None) -> Array:
    """``input_scale``: as for :class:`QDense`."""
    precision = Precision.parse(self.precision)
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    if self.quantize_input:
      x = QAct(precision, name="act_in")(x)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias
            else jnp.zeros((self.features,), jnp.float32))
    padding = _conv_padding(self.padding, self.kernel_size)
    out = QAct(precision, name="act_out")
    quantized = _quantized_kernel(self, kernel, precision)
    out_scale = out.static_scale()
    if (input_scale is not None and not self.quantize_input and exact_precision(precision)
        and out_scale is not None and self.has_variable(QUANT, "kernel_scale")):
      kernel_scale = _broadcast_scale(self.get_variable(QUANT, "kernel_scale"), kernel.ndim,
                                      precision.per_channel)
      return out(_exact_conv_bias(x, kernel, bias, jnp.asarray(input_scale, jnp.float32),
                                  kernel_scale, out_scale, precision, tuple(self.strides),
                                  padding))
    return out(_conv(x, quantized, self.strides, padding) + bias)

  def output_scale(self) -> Optional[Array]:
    """The calibrated grid of this layer's output (``act_out``), or ``None`` before calibration."""
    return _output_scale(self)


def _output_scale(module: nn.Module) -> Optional[Array]:
  return calibrated_scale(module, "act_out")


def _exact_conv_bias(x, kernel, bias, in_scale, kernel_scale, out_scale, precision: Precision,
                     strides, padding):
  """A convolution-with-bias's integer forward on float codes, with the fake-quant derivative."""
  wbits, abits = precision.weight_bits, precision.activation_bits

  def exact(x, kernel, bias, in_scale, kernel_scale, out_scale):
    acc = exact_conv(_codes(x, in_scale, quant.qmax(abits)),
                     _codes(kernel, kernel_scale, quant.qmax(wbits)), wbits, strides, padding)
    ratio, offset = conv_bias_constants(bias, in_scale, kernel_scale, out_scale)
    return requantize(acc, ratio, abits, offset).astype(jnp.float32) * out_scale

  def approx(x, kernel, bias, in_scale, kernel_scale, out_scale):
    del in_scale
    y = _conv(x, quant.fake_quant(kernel, wbits, scale=kernel_scale), strides, padding)
    return quant.fake_quant(y + bias, abits, scale=out_scale)

  return straight_through(exact, approx, x, kernel, bias, in_scale, kernel_scale, out_scale)


class ConvBN(nn.Module):
  """A bias-free convolution followed by BatchNorm; in evaluation, BatchNorm is the requantization.

  Parameters: ``kernel`` (HWIO), BatchNorm ``scale`` (γ) and ``bias`` (β); collection
  ``batch_stats``: ``mean`` (μ) and ``var`` (σ²).

  .. math::

     \\text{train=False:}\\quad y = Q_a\\big((Q_a(x) \\circledast Q_w(W))\\, m + \\beta - \\mu m\\big),
     \\qquad m = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}

  BatchNorm is kept apart from the kernel: the kernel has its own grid (the one
  :func:`fwdgrad.qzo_ff` trains it on), and the per-channel factor ``m`` and offset act on the
  32-bit accumulator, as an engine's per-channel requantization multiplier and bias do. The
  forward and the integer update thus see the same kernel, γ and β.

  With ``train=True`` the output of ``Q_a(x) ⊛ Q_w(W)`` is normalised with the batch mean and
  (biased) variance and the running averages are updated with ``momentum`` (0.9 here is PyTorch's
  ``momentum=0.1``); call ``apply(..., train=True, mutable=["batch_stats"])``.

  Attributes:
    features, kernel_size, strides, padding, precision, quantize_input: as for :class:`QConv`.
    momentum: running-average decay.
    epsilon: added to the variance.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Padding = "SAME"
  precision: Union[str, Precision, None] = "float"
  quantize_input: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5
  kernel_init: Initializer = conv_kernel_init

  @nn.compact
  def __call__(self, x: Array, train: bool = False, input_scale: Optional[Array] = None) -> Array:
    """``input_scale``: as for :class:`QDense`; used in evaluation mode (``train=False``)."""
    precision = Precision.parse(self.precision)
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    gamma = self.param("scale", nn.initializers.ones_init(), (self.features,), jnp.float32)
    beta = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, (self.features,), jnp.float32)
    padding = _conv_padding(self.padding, self.kernel_size)
    if self.quantize_input:
      x = QAct(precision, name="act_in")(x)
    out = QAct(precision, name="act_out")
    quantized = _quantized_kernel(self, kernel, precision)
    out_scale = out.static_scale()
    if (not train and input_scale is not None and not self.quantize_input
        and exact_precision(precision) and out_scale is not None
        and self.has_variable(QUANT, "kernel_scale")):
      kernel_scale = _broadcast_scale(self.get_variable(QUANT, "kernel_scale"), kernel.ndim,
                                      precision.per_channel)
      return out(_exact_conv_bn(x, kernel, gamma, beta, mean.value, var.value,
                                jnp.asarray(input_scale, jnp.float32), kernel_scale, out_scale,
                                precision, self.epsilon, tuple(self.strides), padding))
    y = _conv(x, quantized, self.strides, padding)
    if not train:
      multiplier = gamma * jax.lax.rsqrt(var.value + self.epsilon)
      return out(y * multiplier + (beta - mean.value * multiplier))
    batch_mean = jnp.mean(y, axis=(0, 1, 2))
    batch_var = jnp.mean(jnp.square(y - batch_mean), axis=(0, 1, 2))
    if not self.is_initializing():
      decay = self.momentum
      mean.value = decay * mean.value + (1 - decay) * jax.lax.stop_gradient(batch_mean)
      var.value = decay * var.value + (1 - decay) * jax.lax.stop_gradient(batch_var)
    y = (y - batch_mean) * jax.lax.rsqrt(batch_var + self.epsilon) * gamma + beta
    return out(y)

  def output_scale(self) -> Optional[Array]:
    """The calibrated grid of this layer's output (``act_out``), or ``None`` before calibration."""
    return _output_scale(self)


def _exact_conv_bn(x, kernel, gamma, beta, mean, var, in_scale, kernel_scale, out_scale,
                   precision: Precision, epsilon: float, strides, padding):
  """A conv-BatchNorm's integer forward on float codes, with the fake-quant derivative."""
  wbits, abits = precision.weight_bits, precision.activation_bits

  def exact(x, kernel, gamma, beta, mean, var, in_scale, kernel_scale, out_scale):
    acc = exact_conv(_codes(x, in_scale, quant.qmax(abits)),
                     _codes(kernel, kernel_scale, quant.qmax(wbits)), wbits, strides, padding)
    ratio, offset = bn_requant_constants(gamma, beta, mean, var, epsilon, in_scale, kernel_scale,
                                         out_scale)
    return requantize(acc, ratio, abits, offset).astype(jnp.float32) * out_scale

  def approx(x, kernel, gamma, beta, mean, var, in_scale, kernel_scale, out_scale):
    del in_scale
    y = _conv(x, quant.fake_quant(kernel, wbits, scale=kernel_scale), strides, padding)
    factor = gamma * jax.lax.rsqrt(var + epsilon)
    return quant.fake_quant(y * factor + (beta - mean * factor), abits, scale=out_scale)

  return straight_through(exact, approx, x, kernel, gamma, beta, mean, var, in_scale,
                           kernel_scale, out_scale)


class QAttention(nn.Module):
  """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj`` (timm layout).

  The query/key/value and output projections are :class:`QDense` layers; the attention logits are
  products of 8-bit queries and keys (exact in a 32-bit accumulator), the softmax runs in float and
  its probabilities are rounded to ``activation_bits`` before they weight the values.

  .. math::

     \\mathrm{Attn}(X) = \\mathrm{proj}\\big(\\mathrm{softmax}(Q K^\\top / \\sqrt{d_h})\\, V\\big),
     \\quad [Q, K, V] = \\mathrm{qkv}(X)

  Attributes:
    num_heads: number of heads; the width must be divisible by it.
    precision: as for :class:`QDense`.
  """
  num_heads: int
  precision: Union[str, Precision, None] = "float"
  kernel_init: Initializer = vit_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(
          f"attention width {width} is not divisible by num_heads={self.num_heads}; choose a width "
          "that is a multiple of the number of heads.")
    head_dim = width // self.num_heads
    qkv = QDense(3 * width, self.precision, kernel_init=self.kernel_init, name="qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
    weights = QAct(self.precision, name="act_softmax")(jax.nn.softmax(logits, axis=-1))
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
    return QDense(width, self.precision, kernel_init=self.kernel_init, name="proj")(out)


class QMlp(nn.Module):
  """The transformer MLP: ``fc2(gelu(fc1(x)))`` with exact (erf) GELU, as in timm/DeiT.

  Attributes:
    hidden_features: width of ``fc1``.
    precision: as for :class:`QDense`.
  """
  hidden_features: int
  precision: Union[str, Precision, None] = "float"
  kernel_init: Initializer = vit_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    h = QDense(self.hidden_features, self.precision, kernel_init=self.kernel_init, name="fc1")(x)
    h = nn.gelu(h, approximate=False)
    return QDense(width, self.precision, kernel_init=self.kernel_init, name="fc2")(h)


class TransformerBlock(nn.Module):
  """A pre-norm ViT block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; LayerNorm in float.

  Residual sums are rounded to ``activation_bits`` (the engine's residual stream is 8-bit).

  Attributes:
    num_heads: attention heads.
    mlp_features: hidden width of the MLP.
    precision: as for :class:`QDense`.
    epsilon: LayerNorm epsilon (1e-6 in timm's ViT/DeiT).
  """
  num_heads: int
  mlp_features: int
  precision: Union[str, Precision, None] = "float"
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = nn.LayerNorm(epsilon=self.epsilon, name="norm1")(x)
    x = QAct(self.precision, name="act_attn")(
        x + QAttention(self.num_heads, self.precision, name="attn")(y))
    y = nn.LayerNorm(epsilon=self.epsilon, name="norm2")(x)
    return QAct(self.precision, name="act_mlp")(
        x + QMlp(self.mlp_features, self.precision, name="mlp")(y))
