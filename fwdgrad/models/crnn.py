"""A convolutional-recurrent network (CRNN) for audio classification on log-mel spectrograms.

Input: ``(batch, time, mel)`` log-mel frames. Three conv blocks (3x3 ConvBN, ReLU, max pool over
time and frequency) turn it into ``(batch, time', mel', channels)``; each time step's
``mel' x channels`` values feed a GRU (or LSTM) whose last hidden state is the feature vector;
a linear ``head`` follows. The defaults (64 mel bins) have about 250k parameters, the size of the
paper's CRNN.

The recurrent cells use :class:`fwdgrad.models.layers.QDense` for their fused input and hidden
projections (PyTorch's gate order: r, z, n for the GRU; i, f, g, o for the LSTM), so with a
fixed-point precision their weights and the hidden state are rounded; gate nonlinearities and the
LSTM cell state stay in float (engines keep the cell state at 16 bits or more).

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

from fwdgrad.models import layers

PrecisionLike = Union[str, layers.Precision, None]
RNN_CELLS = ("gru", "lstm")


class QGRUCell(nn.RNNCellBase):
  """A GRU cell with quantized fused projections ``input`` (x -> 3H) and ``hidden`` (h -> 3H)."""
  features: int
  precision: PrecisionLike = "float"

  @nn.compact
  def __call__(self, carry: jax.Array, inputs: jax.Array):
    h = carry
    gates_x = layers.QDense(3 * self.features, self.precision, name="input")(inputs)
    gates_h = layers.QDense(3 * self.features, self.precision, quantize_input=False,
                            kernel_init=nn.initializers.orthogonal(), name="hidden")(h)
    x_r, x_z, x_n = jnp.split(gates_x, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(gates_h, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    h = layers.QAct(self.precision, name="act_hidden")((1.0 - z) * n + z * h)
    return h, h

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    del rng
    return jnp.zeros((*input_shape[:-1], self.features), jnp.float32)

  @property
  def num_feature_axes(self) -> int:
    return 1


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
    # Conv inputs come from ReLU and max-pool of quantized outputs: on the grid before, as read.
    x = layers.QAct(self.precision, name="act_input")(x)
    for i, (width, pool) in enumerate(zip(self.conv_features, self.pool_sizes)):
      x = layers.ConvBN(width, (3, 3), (1, 1), 1, self.precision, quantize_input=False,
                        name=f"block{i}")(x, train)
      x = nn.max_pool(nn.relu(x), tuple(pool), strides=tuple(pool))
    batch, steps = x.shape[:2]
    if steps == 0:
      raise ValueError(
          f"the input has too few frames ({spectrograms.shape[1]}) for the time pooling "
          f"{tuple(self.pool_sizes)}; pass longer spectrograms.")
    x = x.reshape(batch, steps, -1)
    cell = {"gru": QGRUCell, "lstm": QLSTMCell}[self.rnn]
    # The cell's quantizers run inside the time scan: their static scales are shared by every
    # step, and a calibration pass records one observation per step (reduced by calibrate).
    x = nn.RNN(cell(self.rnn_features, self.precision, name="rnn"),
               variable_broadcast=("params", layers.QUANT),
               variable_axes={layers.QUANT_STATS: 0})(x)[:, -1]
    if self.num_classes is None:
      return x
    return layers.QDense(self.num_classes, self.precision, quantize_input=False, name="head")(x)
