"""Synthetic image corruptions at severities 1-5, in the spirit of CIFAR-10-C.

The paper's in-domain OOD experiment adapts a CIFAR-10 model to CIFAR-10-C (Hendrycks & Dietterich,
2019), 15 corruptions at severities 1 / 3 / 5 (easy / medium / hard). ``tfds`` ships CIFAR-10-C as
``cifar10_corrupted/<corruption>_<severity>`` for users who have it prepared. For any other image
dataset (and offline), :func:`corrupt` applies a few of the same corruption families to images in
``[0, 1]``, with a strength that grows with the severity. The constants are our own choice, shaped
like the benchmark's (noise standard deviations and contrast factors that grow with severity); the
results are not comparable number-for-number with CIFAR-10-C.
"""

from __future__ import annotations

import numpy as np

# Per-severity strength of each corruption (severity 1 .. 5).
_GAUSSIAN_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
_SHOT_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)
_IMPULSE_FRACTION = (0.01, 0.02, 0.03, 0.05, 0.07)
_CONTRAST_FACTOR = (0.75, 0.5, 0.4, 0.3, 0.15)
_BRIGHTNESS_SHIFT = (0.05, 0.1, 0.15, 0.2, 0.3)
_PIXELATE_FACTOR = (0.95, 0.9, 0.85, 0.75, 0.65)
# CIFAR-10-C's Gaussian-blur standard deviations, in pixels of the image as given.
_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "contrast", "brightness",
               "pixelate", "gaussian_blur")


def _pixelate(images: np.ndarray, factor: float) -> np.ndarray:
  """Nearest-neighbour down- and up-sampling by ``factor`` of the spatial size."""
  _, height, width = images.shape[:3]
  small_h, small_w = max(1, int(round(height * factor))), max(1, int(round(width * factor)))
  rows = (np.arange(small_h) * height / small_h).astype(int)
  cols = (np.arange(small_w) * width / small_w).astype(int)
  small = images[:, rows][:, :, cols]
  back_rows = np.minimum((np.arange(height) * small_h / height).astype(int), small_h - 1)
  back_cols = np.minimum((np.arange(width) * small_w / width).astype(int), small_w - 1)
  return small[:, back_rows][:, :, back_cols]


def corrupt(images: np.ndarray, corruption: str, severity: int, *, seed: int) -> np.ndarray:
  """Returns corrupted copies of ``images`` (``(n, height, width, channels)`` in ``[0, 1]``).

  Args:
    images: float images in ``[0, 1]``.
    corruption: one of :data:`CORRUPTIONS`.
    severity: 1 (mild) to 5 (severe); the paper uses 1 / 3 / 5 as easy / medium / hard.
    seed: seeds the noise (a local ``np.random.default_rng``).

  Raises:
    ValueError: for an unknown corruption, a severity outside 1..5, or images that are not 4-D.
  """
  if corruption not in CORRUPTIONS:
    raise ValueError(f"unknown corruption {corruption!r}; expected one of {CORRUPTIONS}.")
  if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
    raise ValueError(f"severity must be an int from 1 to 5, got {severity!r}.")
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"corruptions apply to images (n, height, width, channels), got shape "
                     f"{images.shape}.")
  rng = np.random.default_rng(seed)
  level = severity - 1
  if corruption == "gaussian_noise":
    out = images + rng.normal(0.0, _GAUSSIAN_STD[level], images.shape)
  elif corruption == "shot_noise":
    photons = _SHOT_PHOTONS[level]
    out = rng.poisson(images * photons) / photons
  elif corruption == "impulse_noise":
    out = images.copy()
    hit = rng.random(images.shape) < _IMPULSE_FRACTION[level]
    out[hit] = rng.integers(0, 2, hit.sum())
  elif corruption == "contrast":
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    out = (images - mean) * _CONTRAST_FACTOR[level] + mean
  elif corruption == "brightness":
    out = images + _BRIGHTNESS_SHIFT[level]
  elif corruption == "gaussian_blur":
    from scipy import ndimage  # pylint: disable=g-import-not-at-top
    sigma = _BLUR_SIGMA[level]
    out = ndimage.gaussian_filter(images, sigma=(0.0, sigma, sigma, 0.0), mode="reflect")
  else:
    out = _pixelate(images, _PIXELATE_FACTOR[level])
  return np.clip(out, 0.0, 1.0).astype(np.float32)
