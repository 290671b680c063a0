"""Vision Transformer (DeiT-tiny by default) with deep visual prompt tuning.

The layout is timm's ``VisionTransformer`` as used by DeiT: a ``patch_embed`` convolution, a
``cls_token``, learned ``pos_embed``, ``depth`` pre-norm blocks (:class:`TransformerBlock`), a final
``norm`` and the ``head`` on the class token. DeiT-tiny (patch 16, width 192, depth 12, 3 heads,
MLP 768) has 5.72M parameters with a 1000-way head.

Deep visual prompt tuning (D-VPT): with ``num_prompts = p > 0`` the parameter ``prompts`` of shape
``(depth, p, width)`` holds ``p`` learnable tokens per layer. Before block ``l`` the prompt outputs of
the previous block are dropped and ``prompts[l]`` is inserted after the class token:

.. math::

   [x_{cls}^{l}, \\_, E^{l}] = B_l([x_{cls}^{l-1}, P^{l-1}, E^{l-1}]), \\qquad l = 1 \\dots L

The prompts are not position-embedded. Prompt tuning trains only ``params["prompts"]`` (and the
head): select them by the ``"prompt"`` in their path.

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
  Touvron et al., "Training data-efficient image transformers" (DeiT), ICML 2021.
  Jia et al., "Visual Prompt Tuning", ECCV 2022 (VPT-deep).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fwdgrad.models import layers

PrecisionLike = Union[str, layers.Precision, None]


class ViT(nn.Module):
  """A Vision Transformer; the defaults are DeiT-tiny at 224x224.

  Attributes:
    num_classes: width of the linear head ``"head"``; ``None`` returns the class-token features
      after the final LayerNorm.
    image_size: input height and width (square); ``pos_embed`` has ``(image_size/patch_size)^2 + 1``
      positions.
    patch_size: patch side; must divide ``image_size``.
    width: token width.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_features: MLP hidden width.
    num_prompts: D-VPT prompt tokens per layer (0: no prompts).
    precision: ``"float"``, ``"16w8a"``, ...

  Call with ``images`` ``(batch, image_size, image_size, channels)``; ``train`` is accepted for a
  uniform interface with the convolutional backbones and changes nothing (no dropout, no BatchNorm).

  Examples:
    >>> model = ViT(num_classes=10, image_size=32, patch_size=8, width=32, depth=2, num_heads=2,
    ...             mlp_features=64, num_prompts=4)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    >>> variables["params"]["prompts"].shape
    (2, 4, 32)
  """
  num_classes: Optional[int] = 1000
  image_size: int = 224
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_features: int = 768
  num_prompts: int = 0
  precision: PrecisionLike = "float"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout or BatchNorm: training and evaluation compute the same function.
    if self.image_size % self.patch_size:
      raise ValueError(
          f"patch_size={self.patch_size} does not divide image_size={self.image_size}; choose a "
          "patch size that tiles the image.")
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
          f"ViT was built for {self.image_size}x{self.image_size} images but got shape "
          f"{images.shape}; resize the images or set image_size.")
    if self.num_prompts < 0:
      raise ValueError(f"num_prompts must be >= 0, got {self.num_prompts}.")
    batch = images.shape[0]
    x = layers.QConv(self.width, (self.patch_size, self.patch_size),
                     (self.patch_size, self.patch_size), "VALID", self.precision,
                     kernel_init=layers.vit_kernel_init, name="patch_embed")(images)
    x = x.reshape(batch, -1, self.width)
    cls_token = self.param("cls_token", nn.initializers.zeros_init(), (1, 1, self.width))
    pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                           (1, x.shape[1] + 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.width)), x], axis=1)
    x = layers.QAct(self.precision, name="act_embed")(x + pos_embed)
    prompts = None
    if self.num_prompts:
      # VPT's initialisation: uniform with the Xavier bound of a patch-to-width projection.
      bound = math.sqrt(6.0 / (3 * self.patch_size ** 2 + self.width))
      prompts = self.param(
          "prompts",
          lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound),
          (self.depth, self.num_prompts, self.width))
    for i in range(self.depth):
      if prompts is not None:
        tokens = layers.QAct(self.precision, name=f"act_prompts_{i}")(
            jnp.broadcast_to(prompts[i], (batch, self.num_prompts, self.width)))
        patches = x[:, 1:] if i == 0 else x[:, 1 + self.num_prompts:]
        x = jnp.concatenate([x[:, :1], tokens, patches], axis=1)
      x = layers.TransformerBlock(self.num_heads, self.mlp_features, self.precision,
                                  name=f"blocks_{i}")(x)
    x = nn.LayerNorm(epsilon=1e-6, name="norm")(x[:, 0])
    x = layers.QAct(self.precision, name="act_norm")(x)
    if self.num_classes is None:
      return x
    return layers.QDense(self.num_classes, self.precision, quantize_input=False,
                         kernel_init=layers.vit_kernel_init,
                         name="head")(x)

