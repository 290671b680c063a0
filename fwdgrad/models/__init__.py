"""Backbones (Flax Linen) with simulated fixed-point precision, selected by name.

Every model takes ``precision`` (``"float"``, ``"16w8a"``, ``"8w8a"``, any ``"<w>w<a>a"``, or a
:class:`Precision`) and ``num_classes`` (``None`` returns features; otherwise a linear layer named
``"head"``), and is called as ``model.apply(variables, inputs, train=False)``:

* ``train=False`` (evaluation, the mode forward-gradient adaptation uses): BatchNorm uses its
  running statistics on the convolution accumulators; ``variables`` need ``"params"`` and
  ``"batch_stats"``, nothing is mutated.
* ``train=True``: BatchNorm uses batch statistics and updates its running averages; call
  ``model.apply(variables, x, train=True, mutable=["batch_stats"])`` and keep the returned
  ``batch_stats``.

===================  ===========================================  ================================
name                 model                                        input
===================  ===========================================  ================================
``"conv4"``          :class:`Conv4` (ProtoNets backbone)          ``(batch, H, W, C)`` images
``"resnet12"``       :class:`ResNet12` (few-shot, 12.4M)          ``(batch, H, W, C)`` images
``"resnet18"``       :class:`ResNet18` (torchvision, 11.7M)       ``(batch, H, W, 3)`` images
``"vit_tiny"``       :class:`ViT` with DeiT-tiny defaults (5.7M)  ``(batch, 224, 224, 3)`` images
``"crnn"``           :class:`CRNN` (audio, ~250k)                 ``(batch, time, mel)`` log-mels
===================  ===========================================  ================================

A model at a fixed-point precision must be calibrated once (:func:`calibrate`: static activation
scales and weight grids in the ``"quant"`` collection, saved with the params) before it is applied;
an uncalibrated one raises :class:`NotCalibratedError` saying so.

Pre-trained torchvision ResNet18 and timm/DeiT ViT-tiny weights are imported from local files with
:func:`import_checkpoint` (see :mod:`fwdgrad.models.checkpoints`).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from fwdgrad import models
  >>> model = models.get_model("conv4", num_classes=5, precision="16w8a")
  >>> images = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1))
  >>> variables = model.init(jax.random.key(0), images[:1])
  >>> variables = models.calibrate(model, variables, images)   # the engine's static scales
  >>> model.apply(variables, images[:2]).shape
  (2, 5)
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from fwdgrad.models.calibration import CALIBRATION_METHODS
from fwdgrad.models.calibration import calibrate
from fwdgrad.models.calibration import weight_scales
from fwdgrad.models.checkpoints import import_checkpoint
from fwdgrad.models.checkpoints import load_state_dict
from fwdgrad.models.checkpoints import resnet18_from_torch
from fwdgrad.models.checkpoints import vit_from_torch
from fwdgrad.models.conv4 import Conv4
from fwdgrad.models.crnn import CRNN
from fwdgrad.models.layers import ConvBN
from fwdgrad.models.layers import NotCalibratedError
from fwdgrad.models.layers import Precision
from fwdgrad.models.layers import QAct
from fwdgrad.models.layers import QAttention
from fwdgrad.models.layers import QConv
from fwdgrad.models.layers import QDense
from fwdgrad.models.layers import QMlp
from fwdgrad.models.layers import TransformerBlock
from fwdgrad.models.layers import quantize_activation
from fwdgrad.models.layers import quantize_weight
from fwdgrad.models.resnet import ResNet12
from fwdgrad.models.resnet import ResNet18
from fwdgrad.models.speech_embedding import SpeechEmbedding
from fwdgrad.models.vit import ViT

# Name -> constructor taking keyword arguments. Other model families register themselves here
# (for example ``MODELS["speech_embedding"] = SpeechEmbedding``).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "conv4": Conv4,
    "resnet12": ResNet12,
    "resnet18": ResNet18,
    "vit_tiny": ViT,
    "crnn": CRNN,
    "speech_embedding": SpeechEmbedding,
}


def get_model(name: str, **kwargs) -> nn.Module:
  """The model registered as ``name``, built with ``kwargs`` (e.g. ``num_classes``, ``precision``).

  Raises:
    ValueError: for an unknown name (the message lists the registered ones) or an unparseable
      ``precision``.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}.")
  if "precision" in kwargs:
    Precision.parse(kwargs["precision"])  # Fail here, with a clear message, not inside apply.
  return MODELS[name](**kwargs)


__all__ = (
    "CALIBRATION_METHODS",
    "CRNN",
    "Conv4",
    "ConvBN",
    "MODELS",
    "NotCalibratedError",
    "Precision",
    "QAct",
    "QAttention",
    "QConv",
    "QDense",
    "QMlp",
    "ResNet12",
    "ResNet18",
    "TransformerBlock",
    "ViT",
    "calibrate",
    "get_model",
    "import_checkpoint",
    "load_state_dict",
    "quantize_activation",
    "quantize_weight",
    "resnet18_from_torch",
    "vit_from_torch",
    "weight_scales",
)
