"""A convolutional-recurrent network (CRNN) for audio classification on log-mel spectrograms.

Input: ``(batch, time, mel)`` log-mel frames. Three conv blocks (3x3 ConvBN, ReLU, max pool over
time and frequency) turn it into ``(batch, time', mel', channels)``; each time step's
``mel' x channels`` values feed a GRU (or LSTM) whose last hidden state is the feature vector;
a linear ``head`` follows. The defaults (64 mel bins) have about 250k parameters, the size of the
paper's CRNN.

The recurrent cells use :class:`fwdgrad.models.layers.QDense` for their fused input and hidden
projections (PyTorch's gate order: r, z, n for the GRU; i, f, g, o for the LSTM), so with a
fixed-point precision their weights and the hidden state are rounded. A calibrated static GRU CRNN
computes an integer engine's GRU (:func:`gru_codes`): 8-bit gate pre-activations, sigmoid and tanh
as 255-entry lookup tables onto the grid 1/127, products and sums of codes rescaled by multiply and
shift. The LSTM's gates and cell state stay in float (engines keep the cell state at 16 bits or
more); it has no integer forward here.

.. math::

   r = \\sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}),\\quad
   z = \\sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}),\\\\
   n = \\tanh(W_{in} x + b_{in} + r \\odot (W_{hn} h + b_{hn})),\\quad
   h' = (1 - z) \\odot n + z \\odot h

References:
  Choi et al., "Convolutional Recurrent Neural Networks for Music Classification", ICASSP 2017.
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024 (CRNN audio few-shot experiments).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fwdgrad import quant
from fwdgrad.models import layers

PrecisionLike = Union[str, layers.Precision, None]
RNN_CELLS = ("gru", "lstm")


# Sigmoid and tanh outputs lie in [-1, 1]: an engine writes them on the fixed grid 1/127.
GATE_LEVELS = 127


def gru_constants(input_scale, hidden_scale, state_scale, r_scale, z_scale, n_scale):
  """The integer GRU's constants, from its grids: the projections' outputs ``Δ_x`` and ``Δ_h``,
  the hidden state ``Δ_s`` and the three gate pre-activations.

  Returns ``(sigmoid_r, sigmoid_z, tanh_n, add_r, add_z, add_n, add_h)``: three 255-entry int32
  lookup tables (gate output codes on ``1/127`` of the pre-activation codes -127..127, the way an
  engine evaluates a sigmoid or tanh of 8-bit codes) and the multipliers of the four rescaled
  additions (:func:`fwdgrad.models.layers.add_constants`).
  """
  codes = jnp.arange(-GATE_LEVELS, GATE_LEVELS + 1, dtype=jnp.float32)
  levels = jnp.float32(GATE_LEVELS)

  def table(fn, scale):
    return jnp.round(fn(codes * scale) * levels).astype(jnp.int32)

  return (table(jax.nn.sigmoid, r_scale), table(jax.nn.sigmoid, z_scale), table(jnp.tanh, n_scale),
          layers.add_constants(input_scale, hidden_scale, r_scale),
          layers.add_constants(input_scale, hidden_scale, z_scale),
          layers.add_constants(input_scale, hidden_scale * layers.reciprocal(levels), n_scale),
          layers.add_constants(layers.reciprocal(levels * levels),
                               state_scale * layers.reciprocal(levels), state_scale))


def gru_codes(gates_x: jax.Array, gates_h: jax.Array, h: jax.Array, constants,
              bits: int = 8) -> jax.Array:
  """One integer GRU step on int32 codes: the next hidden state's codes (on ``Δ_s``).

  ``r = σ(x_r + h_r)``, ``z = σ(x_z + h_z)``, ``n = tanh(x_n + r h_n)``, ``h' = (1 - z) n + z h``:
  each sum rescaled onto its grid, each nonlinearity a table lookup, the products in int32.
  """
  sigmoid_r, sigmoid_z, tanh_n, add_r, add_z, add_n, add_h = constants
  x_r, x_z, x_n = jnp.split(gates_x, 3, axis=-1)
  h_r, h_z, h_n = jnp.split(gates_h, 3, axis=-1)
  r = jnp.take(sigmoid_r, layers.add_codes(x_r, h_r, add_r, bits) + GATE_LEVELS)
  z = jnp.take(sigmoid_z, layers.add_codes(x_z, h_z, add_z, bits) + GATE_LEVELS)
  n = jnp.take(tanh_n, layers.add_codes(x_n, r * h_n, add_n, bits) + GATE_LEVELS)
  return layers.add_codes((GATE_LEVELS - z) * n, z * h, add_h, bits)


def _gru_update(x_r, x_z, x_n, h_r, h_z, h_n, h):
  r = jax.nn.sigmoid(x_r + h_r)
  z = jax.nn.sigmoid(x_z + h_z)
  n = jnp.tanh(x_n + r * h_n)
  return (1.0 - z) * n + z * h


class QGRUCell(nn.RNNCellBase):
  """A GRU cell with quantized fused projections ``input`` (x -> 3H) and ``hidden`` (h -> 3H).

  Calibrated at a static precision and given ``input_scale`` (the grid of its inputs), the cell
  computes an integer engine's GRU (:func:`gru_codes`): the projections' exact integer forward,
  8-bit gate pre-activations (``act_r``, ``act_z``, ``act_n``), sigmoid and tanh as lookup tables,
  and the hidden state on ``act_hidden``'s grid, with the float GRU's derivative.
  """
  features: int
  precision: PrecisionLike = "float"
  input_scale: Optional[jax.Array] = None

  @nn.compact
  def __call__(self, carry: jax.Array, inputs: jax.Array):
    h = carry
    static = layers.exact_precision(self.precision)
    act_hidden = layers.QAct(self.precision, name="act_hidden")
    gates = [layers.QAct(self.precision, name=f"act_{gate}") for gate in "rzn"]
    h_scale = act_hidden.static_scale() if static else None
    # At a static precision the inputs are on the grid ``input_scale`` of the layer before.
    input_dense = layers.QDense(3 * self.features, self.precision, quantize_input=not static,
                                name="input")
    hidden_dense = layers.QDense(3 * self.features, self.precision, quantize_input=False,
                                 kernel_init=nn.initializers.orthogonal(), name="hidden")
    gates_x = input_dense(inputs, input_scale=self.input_scale)
    gates_h = hidden_dense(h, input_scale=h_scale)
    scales = (input_dense.output_scale(), hidden_dense.output_scale(), h_scale,
              *(gate.static_scale() for gate in gates))
    if self.input_scale is not None and all(scale is not None for scale in scales):
      bits = layers.Precision.parse(self.precision).activation_bits
      h = act_hidden(_exact_gru(bits, gates_x, gates_h, h, *scales))
      return h, h
    x_r, x_z, x_n = jnp.split(gates_x, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(gates_h, 3, axis=-1)
    r = jax.nn.sigmoid(gates[0](x_r + h_r))
    z = jax.nn.sigmoid(gates[1](x_z + h_z))
    n = jnp.tanh(gates[2](x_n + r * h_n))
    h = act_hidden((1.0 - z) * n + z * h)
    return h, h

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    del rng
    return jnp.zeros((*input_shape[:-1], self.features), jnp.float32)

  @property
  def num_feature_axes(self) -> int:
    return 1


def _exact_gru(bits: int, gates_x, gates_h, h, input_scale, hidden_scale, state_scale, r_scale,
               z_scale, n_scale):
  """The integer GRU step on on-grid floats, with the derivative of the float GRU."""
  scales = (input_scale, hidden_scale, state_scale, r_scale, z_scale, n_scale)

  def exact(gates_x, gates_h, h, *scales):
    def codes(x, scale):
      return jnp.round(x * layers.reciprocal(scale)).astype(jnp.int32)
    out = gru_codes(codes(gates_x, scales[0]), codes(gates_h, scales[1]), codes(h, scales[2]),
                    gru_constants(*scales), bits)
    return out.astype(jnp.float32) * scales[2]

  def approx(gates_x, gates_h, h, *scales):
    h = _gru_update(*jnp.split(gates_x, 3, axis=-1), *jnp.split(gates_h, 3, axis=-1), h)
    return quant.fake_quant(h, bits, scale=scales[2])

  return layers.straight_through(exact, approx, gates_x, gates_h, h, *scales)


class QLSTMCell(nn.RNNCellBase):
  """An LSTM cell with quantized fused projections ``input`` (x -> 4H) and ``hidden`` (h -> 4H)."""
  features: int
  precision: PrecisionLike = "float"

  @nn.compact
  def __call__(self, carry, inputs: jax.Array):
    c, h = carry
    gates = (layers.QDense(4 * self.features, self.precision, name="input")(inputs)
             + layers.QDense(4 * self.features, self.precision, use_bias=False,
                             quantize_input=False, kernel_init=nn.initializers.orthogonal(),
                             name="hidden")(h))
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = layers.QAct(self.precision, name="act_hidden")(jax.nn.sigmoid(o) * jnp.tanh(c))
    return (c, h), h

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    del rng
    shape = (*input_shape[:-1], self.features)
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)

  @property
  def num_feature_axes(self) -> int:
    return 1


class CRNN(nn.Module):
  """Conv blocks on a log-mel spectrogram, a GRU/LSTM over time, and a linear head.

  Attributes:
    num_classes: width of the linear head ``"head"``; ``None`` returns the last hidden state.
    conv_features: channels of the conv blocks.
    pool_sizes: ``(time, mel)`` max-pool window (and stride) after each conv block.
    rnn_features: hidden size of the recurrent layer.
    rnn: ``"gru"`` or ``"lstm"``.
    precision: ``"float"``, ``"16w8a"``, ...

  Call with ``spectrograms`` ``(batch, time, mel)`` (or ``(batch, time, mel, 1)``) and ``train``
  (``True``: BatchNorm batch statistics with ``mutable=["batch_stats"]``; ``False``: running statistics).

  Examples:
    >>> model = CRNN(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 64)))
    >>> model.apply(variables, jnp.zeros((2, 32, 64))).shape
    (2, 10)
  """
  num_classes: Optional[int] = None
  conv_features: Sequence[int] = (32, 64, 64)
  pool_sizes: Sequence[tuple[int, int]] = ((2, 2), (2, 2), (2, 2))
  rnn_features: int = 104
  rnn: str = "gru"
  precision: PrecisionLike = "float"

  @nn.compact
  def __call__(self, spectrograms: jax.Array, train: bool = False) -> jax.Array:
    if self.rnn not in RNN_CELLS:
      raise ValueError(f"unknown rnn {self.rnn!r}; expected one of {RNN_CELLS}.")
    if len(self.pool_sizes) != len(self.conv_features):
      raise ValueError(
          f"CRNN needs one pool size per conv block: got {len(self.conv_features)} blocks and "
          f"{len(self.pool_sizes)} pool sizes.")
    x = spectrograms
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4:
      raise ValueError(
          f"CRNN expects spectrograms of shape (batch, time, mel) or (batch, time, mel, 1), got "
          f"{spectrograms.shape}.")
    # Conv inputs come from ReLU and max-pool of quantized outputs: on the grid before, as read;
    # each layer is told that grid, so a calibrated static model computes what an integer engine
    # does (fwdgrad.edge.integer runs it on integers).
    act = layers.QAct(self.precision, name="act_input")
    x = act(x)
    scale = act.static_scale()
    for i, (width, pool) in enumerate(zip(self.conv_features, self.pool_sizes)):
      block = layers.ConvBN(width, (3, 3), (1, 1), 1, self.precision, quantize_input=False,
                            name=f"block{i}")
      x = block(x, train, input_scale=scale)
      scale = block.output_scale()
      x = nn.max_pool(nn.relu(x), tuple(pool), strides=tuple(pool))
    batch, steps = x.shape[:2]
    if steps == 0:
      raise ValueError(
          f"the input has too few frames ({spectrograms.shape[1]}) for the time pooling "
          f"{tuple(self.pool_sizes)}; pass longer spectrograms.")
    x = x.reshape(batch, steps, -1)
    if self.rnn == "gru":
      cell = QGRUCell(self.rnn_features, self.precision, input_scale=scale, name="rnn")
    else:
      cell = QLSTMCell(self.rnn_features, self.precision, name="rnn")
    # The cell's quantizers run inside the time scan: their static scales are shared by every
    # step, and a calibration pass records one observation per step (reduced by calibrate).
    x = nn.RNN(cell, variable_broadcast=("params", layers.QUANT),
               variable_axes={layers.QUANT_STATS: 0})(x)[:, -1]
    if self.num_classes is None:
      return x
    hidden_scale = (layers.calibrated_scale(self, "rnn", "act_hidden")
                    if self.rnn == "gru" and scale is not None else None)
    return layers.QDense(self.num_classes, self.precision, quantize_input=False, name="head")(
        x, input_scale=hidden_scale)
