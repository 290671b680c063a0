"""Flax Linen layers that simulate a fixed-point inference engine with fake-quantization.

A :class:`Precision` such as ``"16w8a"`` says how many bits the weights and the activations have.
Every quantized layer rounds

* its **kernel** to ``weight_bits`` (signed symmetric, max-abs scale, per-tensor or per output
  channel), the paper's ``w_q = round(w / Δ_w)`` with ``Δ_w = w_max / (2^(b-1) - 1)``;
* its **input and output activations** to ``activation_bits`` (signed symmetric, per-tensor, max-abs
  scale computed on the tensor at hand, i.e. dynamic ranges; one scale for the whole batch, so
  ``vmap`` the model for per-example scales). Rounding an already-rounded tensor with its own
  max-abs scale is the identity, so chaining layers costs nothing extra; quantizing the input as
  well means that float operations in between (LayerNorm, softmax, GELU, pooling, residual
  additions) still feed the next matrix product with 8-bit values.

The weight scale is recomputed from the current kernel at every call, so a kernel that already lies
on a ``weight_bits`` grid (as the fixed-point training loop keeps it) is reproduced exactly as long
as its max-abs entry is unchanged.

.. math::

   y = Q_a\\big(Q_a(x) \\circledast Q_w(W) + b\\big), \\qquad
   Q_b(v) = \\Delta \\,\\mathrm{clip}(\\mathrm{round}(v / \\Delta), -(2^{b-1}-1), 2^{b-1}-1)

Choices the paper leaves open, made here:

* **Biases** are not rounded: fixed-point engines keep them in the 32-bit accumulator (with scale
  ``Δ_x Δ_w``), where float32 rounding is already finer than the integer grid.
* **BatchNorm** (:class:`ConvBN`) is *folded into the convolution* in evaluation mode
  (``train=False``), as an inference engine does: ``W' = W γ / sqrt(σ² + ε)``,
  ``b' = β − μ γ / sqrt(σ² + ε)``, and the folded kernel ``W'`` is what gets quantized. In training
  mode (``train=True``, with ``mutable=["batch_stats"]``) the convolution output is normalised with
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
  Inference", CVPR 2018 (BatchNorm folding, 32-bit biases).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fwdgrad import quant

Array = jax.Array
Initializer = Callable[..., Array]
Padding = Union[str, int, Sequence[tuple[int, int]]]

_PRECISION_PATTERN = re.compile(r"^(\d+)w(\d+)a(-per-channel)?$")

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

  Examples:
    >>> Precision.parse("16w8a")
    Precision(weight_bits=16, activation_bits=8, per_channel=False)
    >>> str(Precision.parse("float"))
    'float'
  """
  weight_bits: Optional[int] = None
  activation_bits: Optional[int] = None
  per_channel: bool = False

  def __post_init__(self):
    for name in ("weight_bits", "activation_bits"):
      bits = getattr(self, name)
      if bits is not None:
        try:
          quant.check_bits(bits)
        except ValueError as error:
          raise ValueError(f"Precision.{name}: {error}") from None
    if not isinstance(self.per_channel, bool):
      raise ValueError(f"Precision.per_channel must be a bool, got {self.per_channel!r}.")

  @classmethod
  def parse(cls, spec: Union[str, "Precision", None]) -> "Precision":
    """A Precision from ``"float"``, ``"<w>w<a>a"`` (e.g. ``"16w8a"``), or ``"<w>w<a>a-per-channel"``.

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
          "(for example '16w8a' for 16-bit weights and 8-bit activations, '8w8a', or "
          "'16w8a-per-channel').")
    weight_bits, activation_bits = int(match.group(1)), int(match.group(2))
    for bits in (weight_bits, activation_bits):
      if not 2 <= bits <= 32:
        raise ValueError(
            f"cannot use precision {spec!r}: bit widths must be between 2 and 32, got {bits}.")
    return cls(weight_bits, activation_bits, per_channel=match.group(3) is not None)

  @property
  def is_float(self) -> bool:
    return self.weight_bits is None and self.activation_bits is None

  def __str__(self) -> str:
    if self.is_float:
      return "float"
    weights = "f" if self.weight_bits is None else str(self.weight_bits)
    activations = "f" if self.activation_bits is None else str(self.activation_bits)
    return f"{weights}w{activations}a" + ("-per-channel" if self.per_channel else "")


def quantize_weight(w: Array, precision: Union[str, Precision, None], axis: int = -1) -> Array:
  """Rounds a kernel to ``precision.weight_bits`` (max-abs scale; per channel along ``axis``)."""
  precision = Precision.parse(precision)
  if precision.weight_bits is None:
    return w
  return quant.fake_quant(w, precision.weight_bits, axis=axis if precision.per_channel else None)


def quantize_activation(x: Array, precision: Union[str, Precision, None]) -> Array:
  """Rounds an activation tensor to ``precision.activation_bits`` (per-tensor max-abs scale)."""
  precision = Precision.parse(precision)
  if precision.activation_bits is None:
    return x
  return quant.fake_quant(x, precision.activation_bits)


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


class QDense(nn.Module):
  """A Dense layer with a quantized kernel, quantized input and quantized output.

  Attributes:
    features: output width.
    precision: ``"float"``, ``"16w8a"``, ... or a :class:`Precision`.
    use_bias: add a (float, accumulator-precision) bias.
    kernel_init, bias_init: initialisers; the kernel has shape ``(in, out)`` as in ``nn.Dense``.

  Examples:
    >>> layer = QDense(4, precision="16w8a")
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> layer.apply(variables, jnp.ones((2, 3))).shape
    (2, 4)
  """
  features: int
  precision: Union[str, Precision, None] = "float"
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    precision = Precision.parse(self.precision)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    x = quantize_activation(x, precision)
    y = jnp.dot(x, quantize_weight(kernel, precision, axis=-1))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return quantize_activation(y, precision)


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
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Padding = "SAME"
  precision: Union[str, Precision, None] = "float"
  use_bias: bool = True
  kernel_init: Initializer = conv_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    precision = Precision.parse(self.precision)
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    x = quantize_activation(x, precision)
    y = _conv(x, quantize_weight(kernel, precision, axis=-1), self.strides,
              _conv_padding(self.padding, self.kernel_size))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return quantize_activation(y, precision)


class ConvBN(nn.Module):
  """A bias-free convolution followed by BatchNorm, folded into one quantized conv for inference.

  Parameters: ``kernel`` (HWIO), BatchNorm ``scale`` (γ) and ``bias`` (β); collection
  ``batch_stats``: ``mean`` (μ) and ``var`` (σ²).

  .. math::

     \\text{train=False:}\\quad y = Q_a\\big(Q_a(x) \\circledast Q_w(W \\gamma / \\sqrt{\\sigma^2 +
     \\epsilon}) + \\beta - \\mu \\gamma / \\sqrt{\\sigma^2 + \\epsilon}\\big)

  With ``train=True`` the output of ``Q_a(x) ⊛ Q_w(W)`` is normalised with the batch mean and
  (biased) variance and the running averages are updated with ``momentum`` (0.9 here is PyTorch's
  ``momentum=0.1``); call ``apply(..., train=True, mutable=["batch_stats"])``.

  Attributes:
    features, kernel_size, strides, padding, precision: as for :class:`QConv`.
    momentum: running-average decay.
    epsilon: added to the variance.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Padding = "SAME"
  precision: Union[str, Precision, None] = "float"
  momentum: float = 0.9
  epsilon: float = 1e-5
  kernel_init: Initializer = conv_kernel_init

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    precision = Precision.parse(self.precision)
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    gamma = self.param("scale", nn.initializers.ones_init(), (self.features,), jnp.float32)
    beta = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, (self.features,), jnp.float32)
    padding = _conv_padding(self.padding, self.kernel_size)
    x = quantize_activation(x, precision)
    if not train:
      multiplier = gamma * jax.lax.rsqrt(var.value + self.epsilon)
      folded = kernel * multiplier
      y = _conv(x, quantize_weight(folded, precision, axis=-1), self.strides, padding)
      return quantize_activation(y + (beta - mean.value * multiplier), precision)
    y = quantize_activation(
        _conv(x, quantize_weight(kernel, precision, axis=-1), self.strides, padding), precision)
    batch_mean = jnp.mean(y, axis=(0, 1, 2))
    batch_var = jnp.mean(jnp.square(y - batch_mean), axis=(0, 1, 2))
    if not self.is_initializing():
      decay = self.momentum
      mean.value = decay * mean.value + (1 - decay) * jax.lax.stop_gradient(batch_mean)
      var.value = decay * var.value + (1 - decay) * jax.lax.stop_gradient(batch_var)
    y = (y - batch_mean) * jax.lax.rsqrt(batch_var + self.epsilon) * gamma + beta
    return quantize_activation(y, precision)


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
    weights = quantize_activation(jax.nn.softmax(logits, axis=-1), self.precision)
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
    x = quantize_activation(x + QAttention(self.num_heads, self.precision, name="attn")(y),
                            self.precision)
    y = nn.LayerNorm(epsilon=self.epsilon, name="norm2")(x)
    return quantize_activation(x + QMlp(self.mlp_features, self.precision, name="mlp")(y),
                               self.precision)
