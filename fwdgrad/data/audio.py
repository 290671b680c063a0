"""Audio input: WAV reading, resampling, and the log-mel frontend of the speech-embedding model.

The frontend reproduces openWakeWord's ``melspectrogram.tflite`` (the input stage of its
reimplementation of Google's speech_embedding) from first principles rather than from the file's
constants; the tests check both the constants and the outputs against the original model. For 16 kHz
audio ``x`` in 16-bit PCM units (``pcm_scale`` times the ``[-1, 1)`` floats that :func:`read_wav`
returns), frame ``t`` covers samples ``160 t .. 160 t + 511`` (no centring or padding, so a clip of
``n`` samples gives ``1 + (n - 512) // 160`` frames) and

.. math::

   P_{t,k} = \\Big|\\sum_{n=0}^{511} w_n\\, x_{160 t + n}\\, e^{-2\\pi i k n / 512}\\Big|^2,\\qquad
   S_{t,m} = 10 \\log_{10} \\max\\Big(\\sum_k P_{t,k} F_{k,m},\\ 10^{-10}\\Big),

   \\mathrm{logmel}_{t,m} = \\max\\big(S_{t,m},\\ \\max_{t',m'} S_{t',m'} - 80\\big)

where ``w`` is a periodic Hann window of 400 samples (25 ms) placed at offset 56 of the 512-point
frame, and ``F`` is a 32-band mel filterbank from 60 Hz to 3800 Hz on the Slaney mel scale with
Slaney (area) normalisation, librosa's default. The embedding network reads
``logmel / 10 + 2`` (:func:`embedding_features`), 76 frames (775 ms, 12,512 samples) at a time.

One deliberate difference: the TFLite graph takes the 80 dB floor over the whole input tensor, batch
included; :func:`log_mel_spectrogram` takes it per clip, so a batch gives what the model gives each
clip on its own (a batch of one is identical).

The frontend is numpy (float64 inside): it is fixed preprocessing that runs once per clip on the
host, and nothing is differentiated through it.

References:
  Lyon et al. / Google, "speech_embedding" (TF Hub, 2020); openWakeWord (D. Scripka, Apache-2.0).
  Slaney, "Auditory Toolbox", Interval Research TR 1998-010 (the mel scale and normalisation).
"""

from __future__ import annotations

import math
import os
import struct
import wave
from typing import Tuple, Union

import numpy as np

SAMPLE_RATE = 16000
FFT_LENGTH = 512
WINDOW_LENGTH = 400
HOP_LENGTH = 160
NUM_MELS = 32
MEL_LOW_HZ = 60.0
MEL_HIGH_HZ = 3800.0
TOP_DB = 80.0
PCM_SCALE = 32768.0
EMBEDDING_FRAMES = 76
EMBEDDING_SAMPLES = FFT_LENGTH + (EMBEDDING_FRAMES - 1) * HOP_LENGTH  # 12,512 samples.

_POWER_FLOOR = 1e-10


def read_wav(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, int]:
  """Reads an integer-PCM WAV file with the standard library.

  Args:
    path: the file.

  Returns:
    ``(samples, sample_rate)``: float32 samples in ``[-1, 1)`` (channels averaged to mono) and the
    rate in Hz.

  Raises:
    ValueError: if the file is not 8-, 16- or 32-bit integer PCM.

  Examples:
    >>> audio, rate = read_wav("fsdd/recordings/0_george_0.wav")  # doctest: +SKIP
    >>> rate  # doctest: +SKIP
    8000
  """
  try:
    with wave.open(os.fspath(path), "rb") as f:
      width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
      frames = f.readframes(f.getnframes())
  except (wave.Error, EOFError, struct.error) as error:
    size = os.path.getsize(path) if os.path.exists(path) else None
    what = ("is empty (0 bytes)" if size == 0
            else f"is not a readable PCM WAV file ({error or type(error).__name__})")
    raise ValueError(f"{os.fspath(path)} {what}; remove it or re-export it as 16-bit PCM "
                     "WAV.") from None
  if width == 1:
    samples = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
  elif width == 2:
    samples = np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0
  elif width == 4:
    samples = (np.frombuffer(frames, "<i4").astype(np.float64) / 2.0**31).astype(np.float32)
  else:
    raise ValueError(
        f"{path}: {8 * width}-bit samples are not supported; convert the file to 16-bit PCM.")
  if channels > 1:
    samples = samples.reshape(-1, channels).mean(axis=1)
  return samples, rate


def resample(audio: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Changes the sample rate with a polyphase FIR filter (``scipy.signal.resample_poly``).

  The ratio ``target_rate / orig_rate`` is reduced to ``up / down``; the signal is upsampled by
  ``up``, low-pass filtered with scipy's default Kaiser-windowed FIR (beta 5, cutoff at the lower
  Nyquist frequency) and decimated by ``down``. The output has ``ceil(n * up / down)`` samples.

  Args:
    audio: samples along the last axis.
    orig_rate: the rate of ``audio`` in Hz.
    target_rate: the wanted rate, 16 kHz by default (what the speech-embedding frontend expects).

  Returns:
    float32 samples at ``target_rate``.
  """
  for name, rate in (("orig_rate", orig_rate), ("target_rate", target_rate)):
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
      raise ValueError(f"{name} must be a positive int number of Hz, got {rate!r}.")
  audio = np.asarray(audio, np.float32)
  if orig_rate == target_rate:
    return audio
  try:
    from scipy import signal  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("resample needs scipy; install it with `pip install scipy`.") from error
  divisor = math.gcd(int(orig_rate), int(target_rate))
  up, down = int(target_rate) // divisor, int(orig_rate) // divisor
  return signal.resample_poly(audio, up, down, axis=-1).astype(np.float32)


def fit_length(audio: np.ndarray, num_samples: int = EMBEDDING_SAMPLES) -> np.ndarray:
  """Centres a clip in ``num_samples``: pads with zeros (silence) or crops both ends equally.

  Args:
    audio: samples along the last axis.
    num_samples: the wanted length, by default the 12,512 samples of one 76-frame embedding window.

  Returns:
    ``audio`` with last axis ``num_samples``; when the difference is odd the extra sample of padding
    (or cropping) goes at the end.
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or (
      num_samples < 1):
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
  audio = np.asarray(audio)
  length = audio.shape[-1]
  if length >= num_samples:
    start = (length - num_samples) // 2
    return audio[..., start:start + num_samples]
  before = (num_samples - length) // 2
  pad = [(0, 0)] * (audio.ndim - 1) + [(before, num_samples - length - before)]
  return np.pad(audio, pad)


def num_frames(num_samples: int) -> int:
  """Frames the frontend makes of ``num_samples`` samples: ``1 + (num_samples - 512) // 160``."""
  if num_samples < FFT_LENGTH:
    return 0
  return 1 + (num_samples - FFT_LENGTH) // HOP_LENGTH


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney's mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, np.float64)
  linear = hz / (200.0 / 3.0)
  log_step = math.log(6.4) / 27.0
  logarithmic = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step
  return np.where(hz >= 1000.0, logarithmic, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  mel = np.asarray(mel, np.float64)
  log_step = math.log(6.4) / 27.0
  return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), mel * (200.0 / 3.0))


def mel_filterbank(
    num_mels: int = NUM_MELS,
    *,
    fft_length: int = FFT_LENGTH,
    sample_rate: int = SAMPLE_RATE,
    low_hz: float = MEL_LOW_HZ,
    high_hz: float = MEL_HIGH_HZ,
) -> np.ndarray:
  """Triangular mel filters on the Slaney scale with Slaney (area) normalisation.

  Band ``m`` rises from edge ``f_m`` to ``f_{m+1}`` and falls to ``f_{m+2}``, where the
  ``num_mels + 2`` edges are equally spaced in mel between ``low_hz`` and ``high_hz``; it is scaled
  by ``2 / (f_{m+2} - f_m)`` so that each band has the same area.

  Args:
    num_mels: number of bands.
    fft_length: the DFT length; there are ``fft_length // 2 + 1`` frequency bins.
    sample_rate: in Hz.
    low_hz, high_hz: edges of the lowest and highest band.

  Returns:
    float32 matrix of shape ``(fft_length // 2 + 1, num_mels)``; power spectra times it give mel
    energies.
  """
  if not 0 <= low_hz < high_hz <= sample_rate / 2:
    raise ValueError(
        f"need 0 <= low_hz < high_hz <= sample_rate / 2, got low_hz={low_hz}, high_hz={high_hz}, "
        f"sample_rate={sample_rate}.")
  bins = np.linspace(0.0, sample_rate / 2.0, fft_length // 2 + 1)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(low_hz), _hz_to_mel(high_hz), num_mels + 2))
  widths = np.diff(edges)
  offsets = edges[:, None] - bins[None, :]
  rising = -offsets[:-2] / widths[:-1, None]
  falling = offsets[2:] / widths[1:, None]
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
  return weights.T.astype(np.float32)


def analysis_window() -> np.ndarray:
  """The periodic Hann window of 400 samples, zero-padded to 512 with 56 zeros before it."""
  n = np.arange(WINDOW_LENGTH)
  hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / WINDOW_LENGTH)
  window = np.zeros(FFT_LENGTH, np.float64)
  offset = (FFT_LENGTH - WINDOW_LENGTH) // 2
  window[offset:offset + WINDOW_LENGTH] = hann
  return window.astype(np.float32)


def log_mel_spectrogram(audio: np.ndarray, *, pcm_scale: float = PCM_SCALE) -> np.ndarray:
  """The log-mel spectrogram in dB of openWakeWord's ``melspectrogram.tflite``.

  Computed in float64 with numpy and returned as float32. The frontend is fixed preprocessing (no
  parameter is trained through it), and float64 matters here: quiet mel bands of a loud frame are
  small differences of large DFT terms, where float32 DFTs (the TFLite model's included) carry
  errors of up to about 2e-4 dB.

  Args:
    audio: 16 kHz samples in ``[-1, 1)``, shape ``(..., num_samples)`` with at least 512 samples.
    pcm_scale: multiplies ``audio`` first; the pre-trained frontend was built for 16-bit PCM values,
      hence 32768. Pass 1.0 for audio that is already in PCM units.

  Returns:
    float32 array ``(..., num_frames, 32)`` (see the module docstring for the formula), the 80 dB
    floor taken per clip.

  Examples:
    >>> log_mel_spectrogram(np.zeros(12512)).shape
    (76, 32)
  """
  audio = np.asarray(audio, np.float64)
  samples = audio.shape[-1]
  frames = num_frames(samples)
  if frames < 1:
    raise ValueError(
        f"audio has {samples} samples but one frame needs {FFT_LENGTH}; pad it, e.g. with "
        "fit_length(audio, EMBEDDING_SAMPLES).")
  index = np.arange(frames)[:, None] * HOP_LENGTH + np.arange(FFT_LENGTH)[None, :]
  framed = (audio * pcm_scale)[..., index] * analysis_window().astype(np.float64)
  spectrum = np.fft.rfft(framed, axis=-1)
  power = spectrum.real**2 + spectrum.imag**2
  mel = power @ mel_filterbank().astype(np.float64)
  decibels = 10.0 * np.log10(np.maximum(mel, _POWER_FLOOR))
  peak = np.max(decibels, axis=(-2, -1), keepdims=True)
  return np.maximum(decibels, peak - TOP_DB).astype(np.float32)


def embedding_features(audio: np.ndarray, *, pcm_scale: float = PCM_SCALE) -> np.ndarray:
  """The speech-embedding network's input: ``log_mel_spectrogram(audio) / 10 + 2``.

  Args:
    audio: 16 kHz samples in ``[-1, 1)``, shape ``(..., num_samples)``; 12,512 samples
      (:data:`EMBEDDING_SAMPLES`) give the 76 frames of one embedding.
    pcm_scale: as for :func:`log_mel_spectrogram`.

  Returns:
    float32 array ``(..., num_frames, 32)``.

  Examples:
    >>> embedding_features(np.zeros(12512)).shape
    (76, 32)
  """
  return (log_mel_spectrogram(audio, pcm_scale=pcm_scale) / 10.0 + 2.0).astype(np.float32)
