"""Conv4: the four-block convolutional backbone of few-shot learning (ProtoNets, MAML).

Each block is a 3x3 convolution with 64 channels, BatchNorm, ReLU and 2x2 max pooling; the features
are the flattened output of the last block (64 for 28x28 Omniglot, 1600 for 84x84 images). Small and
fast: the backbone of the library's quick tests and examples.

References:
  Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017.
  Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax

from fwdgrad.models import layers


class Conv4(nn.Module):
  """Four conv-BN-ReLU-maxpool blocks, then an optional linear head.

  Attributes:
    num_classes: width of the linear head ``"head"``; ``None`` returns the flattened features.
    features: channels of the four blocks (64 each in the standard Conv4).
    precision: ``"float"``, ``"16w8a"``, ... (see :class:`fwdgrad.models.layers.Precision`).

  Call with ``images`` of shape ``(batch, height, width, channels)`` and ``train`` (``True`` uses
  batch statistics and needs ``mutable=["batch_stats"]``; ``False`` applies BatchNorm with its running statistics).

  Examples:
    >>> model = Conv4(num_classes=5)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    >>> model.apply(variables, jnp.zeros((2, 28, 28, 1))).shape
    (2, 5)
  """
  num_classes: Optional[int] = None
  features: Sequence[int] = (64, 64, 64, 64)
  precision: Union[str, layers.Precision, None] = "float"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    # Every layer reads its input on the grid of the quantizer before it (ReLU and max-pool keep
    # the grid), so only the images get a quantizer of their own.
    smallest = 2 ** len(self.features)
    if images.ndim != 4:
      raise ValueError(f"Conv4 takes images of shape (batch, height, width, channels), got shape "
                       f"{tuple(images.shape)}; add the batch axis (images[None]) or the channel "
                       "axis (images[..., None]).")
    if min(images.shape[1:3]) < smallest:
      raise ValueError(
          f"Conv4 takes images of shape (batch, height, width, channels) and halves them in each "
          f"of its {len(self.features)} blocks, so it needs at least {smallest}x{smallest} pixels; "
          f"got shape {tuple(images.shape)}. Resize the images (jax.image.resize to 28x28, say) "
          f"or use fewer blocks (features=(64, 64)).")
    # Each layer is told the grid of its input, so that a calibrated static fixed-point model
    # computes what an integer engine does (fwdgrad.edge.integer runs it on integers).
    act = layers.QAct(self.precision, name="act_input")
    x = act(images)
    scale = act.static_scale()
    for i, width in enumerate(self.features):
      block = layers.ConvBN(width, (3, 3), padding=1, precision=self.precision,
                            quantize_input=False, name=f"block{i}")
      x = block(x, train, input_scale=scale)
      scale = block.output_scale()
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    if self.num_classes is None:
      return x
    return layers.QDense(self.num_classes, self.precision, quantize_input=False,
                         name="head")(x, input_scale=scale)
