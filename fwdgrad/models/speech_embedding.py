"""The speech-embedding network of openWakeWord (a reimplementation of Google's speech_embedding).

A small all-convolutional network that maps 76 log-mel frames (775 ms of 16 kHz audio, 32 mel bands,
from :func:`fwdgrad.data.audio.embedding_features`) to a 96-d embedding, pre-trained by Google on a
large keyword-spotting corpus and re-exported by openWakeWord as ``embedding_model.tflite``. It has
20 convolutions (328,224 float32 parameters, BatchNorm already folded into their biases): a 3x3
stem, then five stages of factorised ``(1, 3)`` / ``(3, 1)`` convolution pairs separated by max
pooling, and a final ``(3, 1)`` convolution. Every convolution but the last is followed by

.. math::

   \\phi(x) = \\max\\big(\\mathrm{LeakyReLU}_{0.2}(x),\\ -0.4\\big)

The ``(1, 3)`` convolutions pad the mel axis (SAME), the ``(3, 1)`` ones do not pad time (VALID), so
time shrinks 76 -> 74 -> 72 -> 36 -> ... -> 3 -> 1 and the mel axis 32 -> 16 -> 8 -> 4 -> 2 -> 1.

Every convolution is a :class:`fwdgrad.models.layers.QConv`, so ``precision="16w8a"`` simulates the
paper's fixed-point engine (16-bit kernels, 8-bit activations), and ``jax.jvp`` / SPSA run through
it.
:func:`load_pretrained` reads the real weights offline from the ``.tflite`` file (or the
``pyopen-wakeword`` wheel that ships it) and checks the graph against this architecture.

Examples:
  >>> model = SpeechEmbedding()
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 76, 32)))
  >>> model.apply(variables, jnp.zeros((2, 76, 32))).shape
  (2, 96)

References:
  Lin et al., "Training Keyword Spotters with Limited and Synthesized Speech Data", ICASSP 2020
  (Google's speech_embedding).
  openWakeWord, D. Scripka, https://github.com/dscripka/openWakeWord (Apache-2.0).
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad import quant
from fwdgrad.models import layers
from fwdgrad.models import tflite_import

Array = jax.Array
PyTree = Any

INPUT_FRAMES = 76
NUM_MELS = 32
EMBEDDING_DIM = 96
NEGATIVE_SLOPE = 0.2
ACTIVATION_FLOOR = -0.4
TFLITE_FILENAME = "embedding_model.tflite"


class ConvSpec(NamedTuple):
  """One convolution: output channels, kernel ``(time, mel)``, and padding (``"SAME"``/``"VALID"``
  or explicit ``((time_lo, time_hi), (mel_lo, mel_hi))``)."""
  features: int
  kernel_size: Tuple[int, int]
  padding: Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]


def _stage(features: int, pairs: int) -> Tuple[ConvSpec, ...]:
  return ((ConvSpec(features, (1, 3), "SAME"), ConvSpec(features, (3, 1), "VALID")) * pairs)


# The stem pads the mel axis by one on each side and not time (a ZeroPadding2D before a VALID conv).
CONVS: Tuple[ConvSpec, ...] = (
    (ConvSpec(24, (3, 3), ((0, 0), (1, 1))),) + _stage(24, 1) + _stage(48, 2) + _stage(72, 2)
    + _stage(96, 2) + _stage(96, 2) + (ConvSpec(96, (3, 1), "VALID"),))

# Max pooling (window = strides) after the convolution with this index.
POOLS: Dict[int, Tuple[int, int]] = {2: (2, 2), 6: (1, 2), 10: (2, 2), 14: (1, 2), 18: (2, 2)}


def activation(x: Array) -> Array:
  """``max(leaky_relu(x, 0.2), -0.4)``, the nonlinearity after every convolution but the last."""
  return jnp.maximum(nn.leaky_relu(x, NEGATIVE_SLOPE), ACTIVATION_FLOOR)


def activation_constants(in_scale: Array, out_scale: Array):
  """``(M₊, k₊, M₋, k₋, floor)`` int32 of :func:`activation` from codes on ``Δ_x`` to codes on
  ``Δ_y``: the leaky ReLU's multipliers (:func:`fwdgrad.models.layers.leaky_relu_constants`) and
  the code of -0.4 on ``Δ_y``."""
  floor = jnp.clip(jnp.round(jnp.float32(ACTIVATION_FLOOR) * layers.reciprocal(out_scale)), -127,
                   127)
  return layers.leaky_relu_constants(NEGATIVE_SLOPE, in_scale, out_scale) + (
      floor.astype(jnp.int32),)


def activation_codes(codes: Array, constants, bits: int = 8) -> Array:
  """:func:`activation` on int32 codes (an engine's LEAKY_RELU, then MAXIMUM), onto ``Δ_y``."""
  return jnp.maximum(layers.leaky_relu_codes(codes, constants[:4], bits), constants[4])


class SpeechEmbedding(nn.Module):
  """openWakeWord's speech-embedding network, with an optional linear head.

  Attributes:
    num_classes: width of the linear head ``"head"`` on the 96-d embedding; ``None`` returns the
      embedding itself.
    precision: ``"float"``, ``"16w8a"``, ... (see :class:`fwdgrad.models.layers.Precision`).

  Call with ``features`` of shape ``(batch, 76, 32)`` or ``(batch, 76, 32, 1)``: log-mel frames
  scaled as :func:`fwdgrad.data.audio.embedding_features` does (``dB / 10 + 2``). ``train`` is
  accepted for a uniform backbone interface and changes nothing (the network has no BatchNorm or
  dropout). Returns ``(batch, 96)`` embeddings or ``(batch, num_classes)`` logits.
  """
  num_classes: Optional[int] = None
  precision: Union[str, layers.Precision, None] = "float"

  @nn.compact
  def __call__(self, features: Array, train: bool = False) -> Array:
    del train  # No batch statistics or dropout.
    if self.num_classes is not None and (
        isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
        or self.num_classes < 1):
      raise ValueError(
          f"num_classes must be a positive int or None (no head), got {self.num_classes!r}.")
    x = jnp.asarray(features)
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (INPUT_FRAMES, NUM_MELS, 1):
      raise ValueError(
          f"SpeechEmbedding expects features of shape (batch, {INPUT_FRAMES}, {NUM_MELS}) or "
          f"(batch, {INPUT_FRAMES}, {NUM_MELS}, 1), got {tuple(jnp.shape(features))}; make them "
          "with fwdgrad.data.audio.embedding_features(fit_length(audio)) from 16 kHz audio.")
    # At a static precision each layer reads its input on the grid of the one before (the
    # activation runs on the codes and max-pooling keeps the grid), so the model computes what an
    # integer engine does (fwdgrad.edge.integer runs it on integers); per-batch scales requantize.
    static = layers.exact_precision(self.precision)
    bits = layers.Precision.parse(self.precision).activation_bits
    act = layers.QAct(self.precision, name="act_input")
    x = act(x)
    scale = act.static_scale() if static else None
    last = len(CONVS) - 1
    for i, spec in enumerate(CONVS):
      conv = layers.QConv(spec.features, spec.kernel_size, padding=spec.padding,
                          precision=self.precision, quantize_input=not static, name=f"conv{i}")
      x = conv(x, input_scale=scale)
      scale = conv.output_scale() if scale is not None else None
      if i != last:
        # The activation's output has a grid of its own (its range is not the convolution's).
        act = layers.QAct(self.precision, name=f"act{i}")
        out_scale = act.static_scale() if scale is not None else None
        if out_scale is not None:
          x = act(layers.on_codes(
              lambda c, a, b: activation_codes(c, activation_constants(a, b), bits),
              lambda x, b: quant.fake_quant(activation(x), bits, scale=b), x, scale, out_scale))
        else:
          x = act(activation(x))
        scale = out_scale
      if i in POOLS:
        x = nn.max_pool(x, POOLS[i], strides=POOLS[i], padding="VALID")
    x = x.reshape(x.shape[0], EMBEDDING_DIM)
    if self.num_classes is None:
      return x
    return layers.QDense(self.num_classes, self.precision, quantize_input=not static,
                         name="head")(x, input_scale=scale)


def _check_op(op: tflite_import.TFLiteOperator, name: str, position: int, **options) -> None:
  if op.name != name:
    raise ValueError(
        f"operator {position} of the TFLite graph is {op.name}, expected {name}: the file is not "
        f"openWakeWord's {TFLITE_FILENAME} (pyopen-wakeword 1.1.0).")
  for key, value in options.items():
    if op.options.get(key) != value:
      raise ValueError(
          f"operator {position} ({name}) has {key}={op.options.get(key)!r}, expected {value!r}: "
          f"the graph does not match the SpeechEmbedding architecture.")


def _scalar(graph: tflite_import.TFLiteGraph, index: int) -> float:
  return float(np.asarray(graph.constant(index)).reshape(()))


def params_from_graph(graph: tflite_import.TFLiteGraph) -> Dict[str, Dict[str, np.ndarray]]:
  """Maps the operators of ``embedding_model.tflite`` onto :class:`SpeechEmbedding` parameters.

  The graph must be, in order: PAD (mel by 1), then for each convolution of :data:`CONVS` a CONV_2D
  (stride 1, no fused activation, the same padding) followed, except for the last, by LEAKY_RELU
  (alpha 0.2) and MAXIMUM with -0.4, and MAX_POOL_2D where :data:`POOLS` says. TFLite stores kernels
  as ``(out, kh, kw, in)``; Flax wants ``(kh, kw, in, out)``.

  Args:
    graph: from :func:`fwdgrad.models.tflite_import.read_tflite`.

  Returns:
    ``{"conv0": {"kernel": ..., "bias": ...}, ...}`` as float32 numpy arrays.

  Raises:
    ValueError: naming the first operator that does not match.
  """
  ops = list(graph.operators)
  position = 0

  def take(name, **options):
    nonlocal position
    if position >= len(ops):
      raise ValueError(f"the TFLite graph ends after {len(ops)} operators, expected a {name}.")
    op = ops[position]
    _check_op(op, name, position, **options)
    position += 1
    return op

  pad = take("PAD")
  paddings = np.asarray(graph.constant(pad.inputs[1])).tolist()
  if paddings != [[0, 0], [0, 0], [1, 1], [0, 0]]:
    raise ValueError(
        f"the stem PAD has paddings {paddings}, expected mel padding of one on each side.")
  params = {}
  last = len(CONVS) - 1
  for i, spec in enumerate(CONVS):
    padding = "VALID" if i == 0 else spec.padding  # The stem's padding is the PAD above.
    op = take("CONV_2D", StrideH=1, StrideW=1, DilationHFactor=1, DilationWFactor=1,
              FusedActivationFunction=0, Padding={"SAME": 0, "VALID": 1}[padding])
    kernel = np.transpose(graph.constant(op.inputs[1]), (1, 2, 3, 0)).astype(np.float32)
    bias = np.asarray(graph.constant(op.inputs[2]), np.float32)
    if kernel.shape[:2] != spec.kernel_size or kernel.shape[3] != spec.features:
      raise ValueError(
          f"convolution {i} has kernel shape {kernel.shape} (HWIO), expected "
          f"{spec.kernel_size} x {spec.features} output channels.")
    params[f"conv{i}"] = {"kernel": kernel, "bias": bias}
    if i != last:
      op = take("LEAKY_RELU")
      if abs(op.options.get("Alpha", 0.0) - NEGATIVE_SLOPE) > 1e-6:
        raise ValueError(f"LEAKY_RELU {position - 1} has alpha {op.options.get('Alpha')}, not 0.2.")
      op = take("MAXIMUM")
      if _scalar(graph, op.inputs[1]) != np.float32(ACTIVATION_FLOOR):
        raise ValueError(
            f"MAXIMUM {position - 1} has floor {_scalar(graph, op.inputs[1])}, not -0.4.")
    if i in POOLS:
      height, width = POOLS[i]
      take("MAX_POOL_2D", FilterHeight=height, FilterWidth=width, StrideH=height, StrideW=width)
  if position != len(ops):
    raise ValueError(
        f"the TFLite graph has {len(ops) - position} operators after the last convolution "
        f"({[op.name for op in ops[position:]]}); expected none.")
  return params


def load_pretrained(path, variables: Optional[PyTree] = None) -> PyTree:
  """The pre-trained openWakeWord weights as Flax variables, read offline.

  Args:
    path: ``embedding_model.tflite``, a directory containing it or the ``pyopen-wakeword`` wheel
      (for example the directory that
      ``pip download --no-deps pyopen-wakeword==1.1.0 -d DIR`` fills).
    variables: optional variables of a :class:`SpeechEmbedding` (e.g. with a ``"head"`` from
      ``model.init``); their convolutions are replaced and everything else is kept.

  Returns:
    ``{"params": {"conv0": {...}, ..., "conv19": {...}}}`` (plus the other entries of
    ``variables``), float32 jax arrays.

  Raises:
    ValueError: if the file is missing or its graph or shapes do not match the architecture.

  Examples:
    >>> variables = load_pretrained("/path/to/wheel_dir")  # doctest: +SKIP
    >>> SpeechEmbedding().apply(variables, features).shape  # doctest: +SKIP
    (batch, 96)
  """
  graph = tflite_import.read_tflite(tflite_import.find_tflite(path, TFLITE_FILENAME))
  convs = jax.tree.map(jnp.asarray, params_from_graph(graph))
  if variables is None:
    return {"params": convs}
  params = dict(variables["params"])
  for name, leaves in convs.items():
    if name not in params:
      raise ValueError(f"variables have no {name!r}; pass the variables of a SpeechEmbedding.")
    for key, value in leaves.items():
      if params[name][key].shape != value.shape:
        raise ValueError(
            f"variables['params'][{name!r}][{key!r}] has shape {params[name][key].shape}, the "
            f"pre-trained one {value.shape}.")
    params[name] = leaves
  return {**variables, "params": params}


def num_parameters(variables: PyTree, *, exclude: Sequence[str] = ()) -> int:
  """Number of scalars in ``variables["params"]``, leaving out the top-level modules ``exclude``."""
  params = {k: v for k, v in variables["params"].items() if k not in exclude}
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
