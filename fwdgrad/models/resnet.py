"""Residual networks: ResNet12 (few-shot learning) and ResNet18 (torchvision/ImageNet layout).

Both are built from :class:`fwdgrad.models.layers.ConvBN`, so in evaluation mode every BatchNorm
acts on its convolution's accumulator and, with a fixed-point ``precision``, the kernels are
rounded to ``weight_bits`` and every activation to ``activation_bits``. Residual sums and the global
average pool are rounded too. The features are the globally average-pooled output of the last stage.
A calibrated static ResNet12 (``"16w8a"``, ``"8w8a"``) computes exactly what an integer engine
does, leaky ReLU, residual sums and the average pool included (``fwdgrad.edge.integer`` runs it on
integers).

Module names follow the original code so that checkpoints map one to one: ResNet18 has ``conv1``
(the stem conv and ``bn1``), ``layer{1..4}_{j}`` with ``conv1``, ``conv2`` and ``downsample``, and
the head ``head`` (torchvision's ``fc``); see :mod:`fwdgrad.models.checkpoints`.

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
  Lee et al., "Meta-Learning with Differentiable Convex Optimization" (MetaOptNet), CVPR 2019, and
  Oreshkin et al., "TADAM", NeurIPS 2018 (the few-shot ResNet12).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fwdgrad.models import layers

PrecisionLike = Union[str, layers.Precision, None]


def _global_average_pool(x: jax.Array, precision: PrecisionLike) -> jax.Array:
  return layers.QAct(precision, name="act_pool")(jnp.mean(x, axis=(1, 2)))


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 ConvBN with ReLU and a (1x1 ConvBN) shortcut.

  .. math:: y = \\mathrm{relu}(\\mathrm{bn_2}(\\mathrm{conv_2}(\\mathrm{relu}(\\mathrm{bn_1}(
     \\mathrm{conv_1}(x))))) + \\mathrm{shortcut}(x))
  """
  features: int
  strides: int = 1
  precision: PrecisionLike = "float"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    strides = (self.strides, self.strides)
    # Inputs come from ReLUs of quantized sums: on the grid of the quantizer before, as read.
    conv = functools.partial(layers.ConvBN, precision=self.precision, quantize_input=False)
    y = conv(self.features, (3, 3), strides, 1, name="conv1")(x, train)
    y = conv(self.features, (3, 3), (1, 1), 1, name="conv2")(nn.relu(y), train)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), strides, 0, name="downsample")(x, train)
    return nn.relu(layers.QAct(self.precision, name="act_sum")(x + y))


class ResNet18(nn.Module):
  """ResNet18 with torchvision's layout (11.69M parameters with a 1000-way head).

  Stem: 7x7/2 conv, BN, ReLU, 3x3/2 max pool; four stages of two :class:`BasicBlock`; global
  average pool; linear head.

  Attributes:
    num_classes: width of the linear head ``"head"``; ``None`` returns the 512-d features.
    widths: channels of the stem (``widths[0]``) and the four stages; smaller values make small
      test networks.
    blocks: BasicBlocks per stage (``(3, 4, 6, 3)`` would be ResNet34).
    precision: ``"float"``, ``"16w8a"``, ...

  Call with ``images`` ``(batch, height, width, 3)`` and ``train`` (``True``: batch statistics,
  ``mutable=["batch_stats"]``; ``False``: BatchNorm with running statistics).
  """
  num_classes: Optional[int] = 1000
  widths: Sequence[int] = (64, 128, 256, 512)
  blocks: Sequence[int] = (2, 2, 2, 2)
  precision: PrecisionLike = "float"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if len(self.widths) != len(self.blocks):
      raise ValueError(
          f"ResNet18 needs one width per stage: got widths={tuple(self.widths)} and "
          f"blocks={tuple(self.blocks)}.")
    x = layers.QAct(self.precision, name="act_input")(images)
    x = layers.ConvBN(self.widths[0], (7, 7), (2, 2), 3, self.precision, quantize_input=False,
                      name="conv1")(x, train)
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (width, count) in enumerate(zip(self.widths, self.blocks)):
      for j in range(count):
        strides = 2 if stage > 0 and j == 0 else 1
        x = BasicBlock(width, strides, self.precision, name=f"layer{stage + 1}_{j}")(x, train)
    x = _global_average_pool(x, self.precision)
    if self.num_classes is None:
      return x
    return layers.QDense(self.num_classes, self.precision, quantize_input=False, name="head")(x)


class ResNet12Block(nn.Module):
  """Three 3x3 ConvBN with LeakyReLU(0.1), a 1x1 ConvBN shortcut, LeakyReLU and 2x2 max pool.

  Called with ``input_scale`` (the grid of ``x``) in a calibrated static fixed-point model, it
  computes what an integer engine does: each ConvBN on its input's grid, each leaky ReLU on the
  codes onto a grid of its own (:func:`fwdgrad.models.layers.leaky_relu_codes`), the residual sum
  rescaled onto its grid (:func:`fwdgrad.models.layers.add_codes`); it then returns
  ``(y, scale of y)``, else ``(y, None)``.
  """
  features: int
  precision: PrecisionLike = "float"
  negative_slope: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               input_scale: Optional[jax.Array] = None):
    exact = input_scale is not None and layers.exact_precision(self.precision)
    bits = layers.Precision.parse(self.precision).activation_bits

    def leaky(y, scale, name):
      # Each leaky ReLU writes its output on a grid of its own (an engine's LEAKY_RELU
      # requantizes), so the negative side is not rounded on the grid of the input's range.
      act = layers.QAct(self.precision, name=name)
      out_scale = act.static_scale() if exact and scale is not None else None
      if out_scale is not None:
        return act(layers.exact_leaky_relu(y, scale, out_scale, self.negative_slope, bits)), \
            out_scale
      return act(nn.leaky_relu(y, self.negative_slope)), None

    # At a static precision every conv reads its input on the grid of the quantizer before it
    # (max-pool keeps the grid), as an engine does; with per-batch scales each conv quantizes
    # its input.
    conv = functools.partial(layers.ConvBN, precision=self.precision, quantize_input=not exact)
    y, scale = x, input_scale
    for i in range(3):
      layer = conv(self.features, (3, 3), (1, 1), 1, name=f"conv{i + 1}")
      y = layer(y, train, input_scale=scale)
      scale = layer.output_scale() if exact else None
      if i < 2:
        y, scale = leaky(y, scale, f"act{i + 1}")
    downsample = conv(self.features, (1, 1), (1, 1), 0, name="downsample")
    shortcut = downsample(x, train, input_scale=input_scale)
    act_sum = layers.QAct(self.precision, name="act_sum")
    sum_scale = act_sum.static_scale() if exact else None
    if sum_scale is not None and scale is not None and downsample.output_scale() is not None:
      y = act_sum(layers.exact_add(y, scale, shortcut, downsample.output_scale(), sum_scale,
                                   bits))
    else:
      y = act_sum(y + shortcut)
    y, scale = leaky(y, sum_scale, "act_out")
    return nn.max_pool(y, (2, 2), strides=(2, 2)), scale


class ResNet12(nn.Module):
  """The few-shot ResNet12: four residual stages of three convs, widths 64-160-320-640 (12.4M).

  DropBlock, used by some papers while pre-training, is not included: the library adapts
  pre-trained networks.

  Attributes:
    num_classes: width of the linear head ``"head"``; ``None`` returns the pooled features.
    widths: channels of the four stages.
    precision: ``"float"``, ``"16w8a"``, ...
  """
  num_classes: Optional[int] = None
  widths: Sequence[int] = (64, 160, 320, 640)
  precision: PrecisionLike = "float"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    act = layers.QAct(self.precision, name="act_input")
    x = act(images)
    scale = act.static_scale()
    for i, width in enumerate(self.widths):
      x, scale = ResNet12Block(width, self.precision, name=f"block{i}")(x, train,
                                                                         input_scale=scale)
    pool = layers.QAct(self.precision, name="act_pool")
    pool_scale = pool.static_scale() if scale is not None else None
    if pool_scale is not None:  # The integer mean of the codes (an int32 sum, a multiply-shift).
      x = pool(layers.exact_mean(x, (1, 2), scale, pool_scale,
                                 layers.Precision.parse(self.precision).activation_bits))
    else:
      x = pool(jnp.mean(x, axis=(1, 2)))
    if self.num_classes is None:
      return x
    return layers.QDense(self.num_classes, self.precision, quantize_input=False, name="head")(
        x, input_scale=pool_scale)
