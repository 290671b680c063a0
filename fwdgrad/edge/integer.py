"""A true-integer forward of a calibrated fixed-point backbone, the way an NPU runs it.

:func:`program` turns a calibrated Conv4, ResNet12, GRU CRNN or speech embedding (at 16w8a or
8w8a, per tensor or per channel) into integer constants; :func:`features` and :func:`logits` run
them on int8 codes with integer operations only.

Everything between the input codes and the logit codes is integer arithmetic: int8 activations
times int16 (or int8) weights accumulated in int32 (``preferred_element_type=jnp.int32``), the
BatchNorm and the bias folded into a per-channel int32 offset on the accumulator, and the
requantization to int8 by a fixed-point multiplier and shift,

.. math::

   y_q = \\mathrm{clip}\\Big(\\big(\\sigma_c (a + B_c) M_c + 2^{k_c - 1}\\big) \\gg k_c\\Big),
   \\qquad \\frac{M_c}{2^{k_c}} \\approx \\frac{\\Delta_x \\Delta_w |m_c|}{\\Delta_y},\\quad
   B_c = \\mathrm{round}\\Big(\\frac{\\beta_c - \\mu_c m_c}{\\Delta_x \\Delta_w m_c}\\Big),\\quad
   \\sigma_c = \\mathrm{sign}(m_c)

with ``m = γ / sqrt(σ² + ε)`` (``m = 1`` and ``B`` the bias for a dense layer or a convolution
with a bias), ReLU and max-pooling on the codes. Between layers: a leaky ReLU onto a grid of its
own by two multipliers (``M₊`` for the positive side, ``M₋`` for the slope; ResNet12, and with
the floor -0.4 the speech embedding), a residual sum of two grids rescaled with 8 guard bits, a
global mean as an int32 sum and a multiply-and-shift (ResNet12), and the GRU's sigmoid and tanh as
255-entry lookup tables of the 8-bit pre-activation codes onto the grid 1/127
(:func:`fwdgrad.models.crnn.gru_codes`). The constants (``M``, ``k``, ``B``, the kernel codes) are computed once
on the host from the calibrated variables, as an engine's converter does (``M`` has 15 bits where
the shift, at most 31, allows; see :func:`fwdgrad.fixed_point.fixed_point_multiplier_array`). The trained head's
bias is held as int16 codes ``b_q`` on its own grid ``Δ_b`` (QZO-FF's) and enters the
accumulator by a second multiply and shift, ``B = (b_q M_b + 2^{k_b-1}) ≫ k_b`` with
``M_b / 2^{k_b} ≈ Δ_b / (Δ_x Δ_w)``.

Two steps stay in float and are marked: quantizing the input images (a sensor or a preprocessing
step hands the engine int8 codes) and the cross-entropy over the dequantized logits (the loss an
inference-only runtime computes on the host or in a float unit; :func:`loss`).

The simulation (the Flax model at a static precision such as ``"16w8a"``, calibrated) runs this
same arithmetic on integer-valued floats (``fwdgrad.models.layers.exact_conv``, ``requantize``,
``leaky_relu_codes``, ``add_codes``, ...) with the fake-quant derivative, and the constants here
come from the functions it calls, so its logits are this engine's codes times ``Δ_y``, bit for bit
(:func:`simulation_agreement` checks it on any inputs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad import fixed_point
from fwdgrad import quant
from fwdgrad.models import layers



class Requant(NamedTuple):
  """Per-channel requantization of an int32 accumulator to 8-bit codes."""
  multiplier: np.ndarray  # M_c, int32
  shift: np.ndarray       # k_c, int32
  sign: np.ndarray        # σ_c = sign(m_c), int32
  offset: np.ndarray      # B_c, int32, in accumulator units


class Head(NamedTuple):
  """The linear head's constants, shared by every program (its codes are trained apart).

  Attributes:
    feature_scale: ``Δ`` of the feature codes (the backbone's output).
    kernel_scale: ``Δ_w`` of the head kernel (a scalar, or one per class).
    bias_scale: ``Δ_b`` of the head bias codes (the calibrated ``bias_scale``).
    multiplier, shift: ``M, k`` of ``Δ_x Δ_w / Δ_y`` for the logits (per class).
    bias_multiplier, bias_shift: ``M_b, k_b`` of ``Δ_b / (Δ_x Δ_w)`` (per class).
    logit_scale: ``Δ_y`` of the logit codes (``head/act_out``).
    weight_bits: bits of the kernels (and of the head bias codes).
  """
  feature_scale: float
  kernel_scale: np.ndarray
  bias_scale: float
  multiplier: np.ndarray
  shift: np.ndarray
  bias_multiplier: np.ndarray
  bias_shift: np.ndarray
  logit_scale: float
  weight_bits: int


class Conv4Program(NamedTuple):
  """The integer constants of a calibrated Conv4 (what an engine's converter writes out).

  Attributes:
    input_scale: ``Δ`` of the input codes (``act_input``).
    kernels: per block, the HWIO kernel codes (int16 for 16-bit weights).
    requants: per block, its :class:`Requant`.
    head: the linear head's constants (:class:`Head`).
  """
  input_scale: float
  kernels: tuple
  requants: tuple
  head: "Head"


class ResNet12Block(NamedTuple):
  """One ResNet12 stage: three 3x3 ConvBN, the 1x1 shortcut, the residual addition and the
  three leaky ReLUs (``act1``, ``act2``, ``act_out``)."""
  kernels: tuple           # conv1..conv3, HWIO codes
  requants: tuple          # their Requant
  shortcut_kernel: np.ndarray
  shortcut_requant: Requant
  add: tuple               # (M_a, k_a, M_b, k_b) of layers.add_codes
  leaky: tuple             # per leaky ReLU, (M+, k+, M-, k-) of layers.leaky_relu_codes


class ResNet12Program(NamedTuple):
  """The integer constants of a calibrated ResNet12 .

  ``pool``: the scales ``(Δ_x, Δ_y)`` of the
  global average pool, whose multiplier also depends on the number of positions it averages
  (:func:`fwdgrad.models.layers.mean_constants`, computed when the input shape is known).
  """
  input_scale: float
  blocks: tuple
  pool: tuple
  head: "Head"


class SpeechEmbeddingProgram(NamedTuple):
  """The integer constants of a calibrated speech embedding : per convolution its kernel codes, :class:`Requant` (the bias is the
  offset) and padding, and per activation ``(M, k, floor)``
  (:func:`fwdgrad.models.speech_embedding.activation_constants`)."""
  input_scale: float
  kernels: tuple
  requants: tuple
  paddings: tuple
  activations: tuple
  head: "Head"


class Dense(NamedTuple):
  """A dense layer's integer codes and constants: ``kernel``, ``bias`` codes (on ``Δ_b``),
  ``M, k`` of ``Δ_x Δ_w / Δ_y`` and ``M_b, k_b`` of ``Δ_b / (Δ_x Δ_w)``."""
  kernel: np.ndarray
  bias: np.ndarray
  multiplier: np.ndarray
  shift: np.ndarray
  bias_multiplier: np.ndarray
  bias_shift: np.ndarray


class CRNNProgram(NamedTuple):
  """The integer constants of a calibrated GRU CRNN :
  the conv blocks (``kernels``, ``requants``, ``pools``), the GRU's two projections
  (:class:`Dense`) and its gate tables and additions
  (:func:`fwdgrad.models.crnn.gru_constants`), and the activation bits."""
  input_scale: float
  kernels: tuple
  requants: tuple
  pools: tuple
  gru_input: Dense
  gru_hidden: Dense
  gru: tuple
  activation_bits: int
  head: "Head"


@jax.jit
def _conv_bias_constants(bias, in_scale, kernel_scale, out_scale):
  ratio, offset = layers.conv_bias_constants(bias, in_scale, kernel_scale, out_scale)
  return layers.requant_multiplier(ratio) + (offset,)


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


def _check(model, variables: dict, name: str) -> layers.Precision:
  precision = layers.Precision.parse(model.precision)
  if not layers.exact_precision(precision):
    raise ValueError(f"the integer forward needs a static precision with at most 8-bit "
                     f"activations and 16-bit weights, such as '16w8a' or '8w8a'; got "
                     f"{str(precision)!r}.")
  if precision.activation_bits != 8:
    raise ValueError(f"the integer forward has 8-bit activations (int8); got "
                     f"{str(precision)!r}.")
  if model.num_classes is None:
    raise ValueError(f"the integer {name} needs its head: build it with num_classes set.")
  if "quant" not in variables:
    raise ValueError("these variables are not calibrated: call fwdgrad.models.calibrate first.")
  if "bias_scale" not in variables["quant"]["head"]:
    raise ValueError("these variables were calibrated before heads kept a bias grid: calibrate "
                     "again (fwdgrad.models.calibrate).")
  return precision


def _conv_bn(params: dict, stats: dict, scales: dict, in_scale, precision: layers.Precision):
  """A ConvBN's kernel codes, :class:`Requant` and output scale (``Δ`` of its ``act_out``)."""
  w_scale = _kernel_scale(scales["kernel_scale"], precision.per_channel)
  out_scale = jnp.asarray(scales["act_out"]["scale"], jnp.float32)
  constants = _block_constants(params["scale"], params["bias"], stats["mean"], stats["var"],
                               jnp.float32(1e-5), in_scale, w_scale, out_scale)
  kernel = np.asarray(layers.weight_codes(params["kernel"], w_scale, precision.weight_bits))
  return kernel, Requant(*(np.asarray(c, np.int32) for c in constants)), out_scale


def _head(variables: dict, in_scale, precision: layers.Precision) -> Head:
  """The :class:`Head` of a calibrated model whose head reads codes on ``in_scale``."""
  scales = variables["quant"]["head"]
  head_scale = _kernel_scale(scales["kernel_scale"], precision.per_channel)
  bias_scale = jnp.reshape(jnp.asarray(scales["bias_scale"], jnp.float32), ())
  logit_scale = jnp.asarray(scales["act_out"]["scale"], jnp.float32)
  head_m, head_k, bias_m, bias_k = (np.asarray(c, np.int32) for c in _head_constants(
      in_scale, head_scale, logit_scale, bias_scale))
  return Head(float(in_scale), np.asarray(head_scale), float(bias_scale), head_m, head_k, bias_m,
              bias_k, float(logit_scale), precision.weight_bits)


def conv4_program(model, variables: dict) -> Conv4Program:
  """The integer constants of a calibrated fixed-point :class:`fwdgrad.models.Conv4`.

  Args:
    model: the ``Conv4`` (``num_classes`` set, a static precision such as ``"16w8a"``).
    variables: its calibrated variables (``params`` with ``head``, ``batch_stats``, ``quant``).
  """
  precision = _check(model, variables, "Conv4")
  input_scale, kernels, requants, x_scale = _conv_blocks(variables, len(model.features), precision)
  return Conv4Program(input_scale, kernels, requants, _head(variables, x_scale, precision))


def _conv_blocks(variables: dict, count: int, precision: layers.Precision) -> tuple:
  """``(input scale, kernels, requants, output scale)`` of ConvBN layers ``block0..`` in a row."""
  params, stats, scales = variables["params"], variables.get("batch_stats", {}), variables["quant"]
  x_scale = jnp.asarray(scales["act_input"]["scale"], jnp.float32)
  input_scale = float(x_scale)
  kernels, requants = [], []
  for i in range(count):
    name = f"block{i}"
    kernel, requant, x_scale = _conv_bn(params[name], stats[name], scales[name], x_scale,
                                        precision)
    kernels.append(kernel)
    requants.append(requant)
  return input_scale, tuple(kernels), tuple(requants), x_scale


def _ints(values) -> tuple:
  return tuple(np.asarray(v, np.int32) for v in values)


def resnet12_program(model, variables: dict) -> ResNet12Program:
  """The integer constants of a calibrated fixed-point :class:`fwdgrad.models.ResNet12`."""
  precision = _check(model, variables, "ResNet12")
  from fwdgrad.models import resnet  # pylint: disable=g-import-not-at-top
  slope = jax.jit(functools.partial(layers.leaky_relu_constants,
                                    resnet.ResNet12Block.negative_slope))
  params, stats, scales = variables["params"], variables.get("batch_stats", {}), variables["quant"]
  x_scale = jnp.asarray(scales["act_input"]["scale"], jnp.float32)
  input_scale, blocks = float(x_scale), []
  for i in range(len(model.widths)):
    p, st, sc = params[f"block{i}"], stats[f"block{i}"], scales[f"block{i}"]
    kernels, requants, leaky, y_scale = [], [], [], x_scale
    for j in range(1, 4):
      kernel, requant, y_scale = _conv_bn(p[f"conv{j}"], st[f"conv{j}"], sc[f"conv{j}"], y_scale,
                                          precision)
      kernels.append(kernel)
      requants.append(requant)
      if j < 3:
        out_scale = jnp.asarray(sc[f"act{j}"]["scale"], jnp.float32)
        leaky.append(_ints(slope(y_scale, out_scale)))
        y_scale = out_scale
    shortcut, shortcut_rq, d_scale = _conv_bn(p["downsample"], st["downsample"],
                                              sc["downsample"], x_scale, precision)
    sum_scale = jnp.asarray(sc["act_sum"]["scale"], jnp.float32)
    add = _ints(jax.jit(layers.add_constants)(y_scale, d_scale, sum_scale))
    x_scale = jnp.asarray(sc["act_out"]["scale"], jnp.float32)
    leaky.append(_ints(slope(sum_scale, x_scale)))
    blocks.append(ResNet12Block(tuple(kernels), tuple(requants), shortcut, shortcut_rq, add,
                                tuple(leaky)))
  pool_scale = jnp.asarray(scales["act_pool"]["scale"], jnp.float32)
  return ResNet12Program(input_scale, tuple(blocks), (float(x_scale), float(pool_scale)),
                         _head(variables, pool_scale, precision))


def speech_embedding_program(model, variables: dict) -> SpeechEmbeddingProgram:
  """The integer constants of a calibrated fixed-point
  :class:`fwdgrad.models.speech_embedding.SpeechEmbedding`."""
  from fwdgrad.models import speech_embedding  # pylint: disable=g-import-not-at-top
  precision = _check(model, variables, "speech embedding")
  params, scales = variables["params"], variables["quant"]
  x_scale = jnp.asarray(scales["act_input"]["scale"], jnp.float32)
  input_scale = float(x_scale)
  kernels, requants, paddings, activations = [], [], [], []
  activation = jax.jit(speech_embedding.activation_constants)
  for i, spec in enumerate(speech_embedding.CONVS):
    p, sc = params[f"conv{i}"], scales[f"conv{i}"]
    w_scale = _kernel_scale(sc["kernel_scale"], precision.per_channel)
    out_scale = jnp.asarray(sc["act_out"]["scale"], jnp.float32)
    kernels.append(np.asarray(layers.weight_codes(p["kernel"], w_scale, precision.weight_bits)))
    requants.append(Requant(*_ints(_conv_bias_constants(jnp.asarray(p["bias"]), x_scale,
                                                        w_scale, out_scale))))
    paddings.append(spec.padding)
    x_scale = out_scale
    if i < len(speech_embedding.CONVS) - 1:
      out_scale = jnp.asarray(scales[f"act{i}"]["scale"], jnp.float32)
      activations.append(_ints(activation(x_scale, out_scale)))
      x_scale = out_scale
    else:
      activations.append(None)
  return SpeechEmbeddingProgram(input_scale, tuple(kernels), tuple(requants), tuple(paddings),
                                tuple(activations), _head(variables, x_scale, precision))


def _dense(params: dict, scales: dict, in_scale, precision: layers.Precision) -> tuple:
  """A calibrated QDense as :class:`Dense`, and the scale of its output."""
  kernel_scale = _kernel_scale(scales["kernel_scale"], precision.per_channel)
  bias_scale = jnp.reshape(jnp.asarray(scales["bias_scale"], jnp.float32), ())
  out_scale = jnp.asarray(scales["act_out"]["scale"], jnp.float32)
  constants = _ints(_head_constants(in_scale, kernel_scale, out_scale, bias_scale))
  return Dense(np.asarray(layers.weight_codes(params["kernel"], kernel_scale,
                                              precision.weight_bits)),
               np.asarray(layers.weight_codes(params["bias"], bias_scale, precision.weight_bits)),
               *constants), out_scale


def crnn_program(model, variables: dict) -> CRNNProgram:
  """The integer constants of a calibrated fixed-point :class:`fwdgrad.models.CRNN` (GRU)."""
  from fwdgrad.models import crnn  # pylint: disable=g-import-not-at-top
  precision = _check(model, variables, "CRNN")
  if model.rnn != "gru":
    raise ValueError(f"the integer CRNN runs a GRU; this one has rnn={model.rnn!r} (the LSTM "
                     "keeps its gates and cell state in float).")
  input_scale, kernels, requants, x_scale = _conv_blocks(variables, len(model.conv_features),
                                                         precision)
  rnn, rnn_scales = variables["params"]["rnn"], variables["quant"]["rnn"]
  h_scale = jnp.asarray(rnn_scales["act_hidden"]["scale"], jnp.float32)
  gru_input, input_out = _dense(rnn["input"], rnn_scales["input"], x_scale, precision)
  gru_hidden, hidden_out = _dense(rnn["hidden"], rnn_scales["hidden"], h_scale, precision)
  gates = [jnp.asarray(rnn_scales[f"act_{g}"]["scale"], jnp.float32) for g in "rzn"]
  gru = jax.tree.map(lambda c: np.asarray(c, np.int32), jax.jit(crnn.gru_constants)(
      input_out, hidden_out, h_scale, *gates))
  return CRNNProgram(input_scale, kernels, requants,
                     tuple(tuple(p) for p in model.pool_sizes), gru_input, gru_hidden, tuple(gru),
                     precision.activation_bits, _head(variables, h_scale, precision))


def program(model, variables: dict):
  """The integer program of a calibrated fixed-point model: Conv4, ResNet12, CRNN or the speech
  embedding (a NamedTuple of int constants and scales that :func:`features` and :func:`logits`
  run)."""
  builders = {"Conv4": conv4_program, "ResNet12": resnet12_program,
              "SpeechEmbedding": speech_embedding_program, "CRNN": crnn_program}
  name = type(model).__name__
  if name not in builders:
    raise ValueError(f"no integer forward for {name}; the integer forwards are "
                     f"{sorted(builders)}.")
  return builders[name](model, variables)


def weight_bytes(program) -> int:
  """Bytes of a program's integer weights (its int8 / int16 kernel and bias codes; the head's
  codes are not in the program)."""
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(program)
            if isinstance(leaf, np.ndarray)]
  return int(sum(leaf.nbytes for leaf in leaves if leaf.dtype in (np.int8, np.int16)))


def quantize_inputs(program, images) -> np.ndarray:
  """The int8 input codes of float images (the one float step before the engine)."""
  scale = jnp.float32(program.input_scale)
  # The simulation's own input quantizer (compiled, as in the model), then its codes.
  on_grid = jax.jit(lambda x: quant.fake_quant(x, 8, scale=scale))(jnp.asarray(images,
                                                                             jnp.float32))
  return np.asarray(jnp.round(on_grid / scale)).astype(np.int8)


def head_codes(program, head: dict) -> dict:
  """The head's float ``{"kernel", "bias"}`` as the integer codes the engine reads."""
  scales = {"kernel": jnp.asarray(program.head.kernel_scale),
            "bias": jnp.float32(program.head.bias_scale)}
  return {k: np.asarray(layers.weight_codes(head[k], scales[k], program.head.weight_bits))
          for k in scales}


def _conv_codes(x: jax.Array, kernel, rq: Requant, padding) -> jax.Array:
  """int32 codes of a convolution on int32 codes: the int32 accumulator, then the requantization
  (``padding``: an int, ``"SAME"``, ``"VALID"`` or explicit pairs)."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  acc = jax.lax.conv_general_dilated(
      x, jnp.asarray(kernel, jnp.int32), (1, 1), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.int32)
  return layers.rescale(acc, jnp.asarray(rq.multiplier), jnp.asarray(rq.shift),
                        jnp.asarray(rq.sign), jnp.asarray(rq.offset))


def _max_pool(x: jax.Array, window) -> jax.Array:
  """VALID max pooling with stride = window. The rows and columns a window does not cover are
  sliced off first: IREE (3.x) fails to compile a ``reduce_window`` that leaves a remainder."""
  height, width = (x.shape[1] // window[0]) * window[0], (x.shape[2] // window[1]) * window[1]
  x = x[:, :height, :width]
  window = (1, *window, 1)
  return jax.lax.reduce_window(x, jnp.int32(jnp.iinfo(jnp.int32).min), jax.lax.max, window,
                               window, "VALID")


def _conv4_features(program: Conv4Program, x: jax.Array) -> jax.Array:
  for kernel, rq in zip(program.kernels, program.requants):
    x = _max_pool(jnp.maximum(_conv_codes(x, kernel, rq, 1), 0), (2, 2))
  return x.reshape(x.shape[0], -1)


def _resnet12_features(program: ResNet12Program, x: jax.Array) -> jax.Array:
  arrays = lambda constants: tuple(jnp.asarray(c) for c in constants)
  for block in program.blocks:
    y = x
    for i, (kernel, rq) in enumerate(zip(block.kernels, block.requants)):
      y = _conv_codes(y, kernel, rq, 1)
      if i < 2:
        y = layers.leaky_relu_codes(y, arrays(block.leaky[i]))
    shortcut = _conv_codes(x, block.shortcut_kernel, block.shortcut_requant, 0)
    y = layers.add_codes(y, shortcut, arrays(block.add))
    x = _max_pool(layers.leaky_relu_codes(y, arrays(block.leaky[2])), (2, 2))
  # The pool's multiplier depends on how many positions it averages: a converter's constant,
  # computed here on the host once the shape is known.
  with jax.ensure_compile_time_eval():
    pool = jax.jit(layers.mean_constants, static_argnums=2)(
        jnp.float32(program.pool[0]), jnp.float32(program.pool[1]), x.shape[1] * x.shape[2])
    pool = tuple(np.asarray(c) for c in pool)
  return layers.mean_codes(x, (1, 2), tuple(jnp.asarray(c) for c in pool))


def _speech_embedding_features(program: SpeechEmbeddingProgram, x: jax.Array) -> jax.Array:
  from fwdgrad.models import speech_embedding  # pylint: disable=g-import-not-at-top
  if x.ndim == 3:
    x = x[..., None]
  for i, (kernel, rq, padding, act) in enumerate(zip(program.kernels, program.requants,
                                                     program.paddings, program.activations)):
    x = _conv_codes(x, kernel, rq, padding)
    if act is not None:
      x = speech_embedding.activation_codes(x, tuple(jnp.asarray(c) for c in act))
    if i in speech_embedding.POOLS:
      x = _max_pool(x, speech_embedding.POOLS[i])
  return x.reshape(x.shape[0], -1)


def _dense_codes(x: jax.Array, dense, bits: int = 8) -> jax.Array:
  """int32 codes of a dense layer (any :class:`Dense`-like constants) on int32 codes."""
  acc = jax.lax.dot_general(x.astype(jnp.int32), jnp.asarray(dense.kernel, jnp.int32),
                            (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  bias = fixed_point.multiply_shift(jnp.asarray(dense.bias, jnp.int32),
                                    jnp.asarray(dense.bias_multiplier),
                                    jnp.asarray(dense.bias_shift))
  return layers.rescale(acc + bias, jnp.asarray(dense.multiplier), jnp.asarray(dense.shift),
                        bits=bits)


def _crnn_features(program: CRNNProgram, x: jax.Array) -> jax.Array:
  from fwdgrad.models import crnn  # pylint: disable=g-import-not-at-top
  if x.ndim == 3:
    x = x[..., None]
  for kernel, rq, pool in zip(program.kernels, program.requants, program.pools):
    x = _max_pool(jnp.maximum(_conv_codes(x, kernel, rq, 1), 0), pool)
  x = x.reshape(x.shape[0], x.shape[1], -1)
  bits = program.activation_bits
  gates_x = _dense_codes(x, program.gru_input, bits)
  gru = tuple(jnp.asarray(c) for c in program.gru)
  gru = gru[:3] + tuple(tuple(c) for c in gru[3:])
  h = jnp.zeros((x.shape[0], program.gru_hidden.kernel.shape[0]), jnp.int32)
  for t in range(x.shape[1]):
    h = crnn.gru_codes(gates_x[:, t], _dense_codes(h, program.gru_hidden, bits), h, gru, bits)
  return h


def features(program, x_q: jax.Array) -> jax.Array:
  """The int8 feature codes (the head's input) of int8 input codes: integer operations only.

  ``program`` is any of this module's programs (:func:`program`). Activations stay int32 between
  layers and are cast to int8 once, at the end: IREE's ``vmvx`` backend (3.x) computes a maximum
  of int8 values as if they were unsigned.
  """
  x = jnp.asarray(x_q).astype(jnp.int32)
  if isinstance(program, Conv4Program):
    x = _conv4_features(program, x)
  elif isinstance(program, ResNet12Program):
    x = _resnet12_features(program, x)
  elif isinstance(program, SpeechEmbeddingProgram):
    x = _speech_embedding_features(program, x)
  elif isinstance(program, CRNNProgram):
    x = _crnn_features(program, x)
  else:
    raise TypeError(f"not an integer program: {type(program).__name__}; make one with "
                    "fwdgrad.edge.integer.program(model, variables).")
  return x.astype(jnp.int8)


def logits(program, feature_q: jax.Array, head_q: dict) -> jax.Array:
  """The int8 logit codes of int8 feature codes and the head's integer codes."""
  head = program.head
  dense = Dense(head_q["kernel"], head_q["bias"], head.multiplier, head.shift,
                head.bias_multiplier, head.bias_shift)
  return _dense_codes(jnp.asarray(feature_q), dense).astype(jnp.int8)


def loss(program, feature_q, labels, head_q: dict) -> jax.Array:
  """Mean cross-entropy of the dequantized logits (float32: the one float step of a call)."""
  z = (logits(program, feature_q, head_q).astype(jnp.float32)
       * jnp.float32(program.head.logit_scale))
  log_p = jax.nn.log_softmax(z, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, jnp.asarray(labels, jnp.int32)[:, None], -1))


def simulation_agreement(model, variables: dict, program, images) -> dict:
  """How often the float simulation's logit codes equal the engine's, on ``images``.

  Returns ``{"equal": fraction of logit codes equal, "max_difference": in codes}``.
  """
  simulated = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images)), np.float64)
  simulated = np.rint(simulated / program.head.logit_scale).astype(np.int64)
  head = head_codes(program, variables["params"]["head"])
  engine = np.asarray(logits(program, features(program, quantize_inputs(program, images)),
                             head), np.int64)
  difference = np.abs(simulated - engine)
  return {"equal": float(np.mean(difference == 0)), "max_difference": int(difference.max())}
