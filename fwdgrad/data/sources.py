"""Dataset sources selected by name, as a config does: ``load_dataset(name, **kwargs)``.

=================  ===========================================================================
name               source
=================  ===========================================================================
``digits``         scikit-learn's bundled 8x8 digits (1,797 images, no download): the default
``idx``            MNIST-format IDX files in a folder (MNIST, Fashion-MNIST, KMNIST, ...)
``image_folder``   a folder or zip of images, ``class/*`` or ``group/class/*``
``omniglot``       ``image_folder`` with the Omniglot layout, resized to 28x28 as in the paper
``wav_folder``     a folder of WAV clips labelled by their file names
``fsdd``           ``wav_folder`` for the Free Spoken Digit Dataset, 1 s clips
``tfds``           a prepared TensorFlow Datasets dataset, read without TensorFlow
=================  ===========================================================================

Nothing is downloaded: every source but ``digits`` reads a path that the caller provides.

Examples:
  >>> digits = load_dataset("digits")
  >>> fashion = load_dataset("idx", path="/usr/share/datasets/fashion-mnist",
  ...                        split="test")  # doctest: +SKIP
  >>> mnist = load_dataset("tfds:mnist", data_dir="/data/tensorflow_datasets")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import gzip
import inspect
import os
import zlib
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from fwdgrad.data.dataset import Dataset
from fwdgrad.data.dataset import PathLike
from fwdgrad.data.dataset import existing_path
from fwdgrad.data.dataset import make_dataset
from fwdgrad.data.images import load_image_folder
from fwdgrad.data.tfds_source import load_tfds
from fwdgrad.data.waveforms import load_wav_folder

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}


def load_digits(image_size: Optional[int] = None) -> Dataset:
  """scikit-learn's copy of the UCI handwritten digits: 1,797 images of 8x8 pixels, classes 0-9.

  Args:
    image_size: resize the images to this square size (bilinear), e.g. 28 to feed a backbone
      pre-trained on 28x28 images; None keeps 8x8.

  Returns:
    A :class:`Dataset` with ``inputs`` float32 ``(1797, 8, 8, 1)`` (or the size asked for) in
    ``[0, 1]`` (the 0..16 pixel counts divided by 16) and ``labels`` int32 in ``0..9``.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  inputs = digits.images.astype(np.float32)[..., None] / 16.0
  if image_size is not None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
      raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    import jax  # pylint: disable=g-import-not-at-top
    inputs = np.clip(np.asarray(jax.image.resize(
        inputs, (len(inputs), image_size, image_size, 1), "bilinear")), 0.0, 1.0)
  return make_dataset(inputs, digits.target, [str(c) for c in digits.target_names])


def _open(path: str, mode: str):
  return gzip.open(path, mode) if path.endswith(".gz") else open(path, mode)


def read_idx(path: PathLike) -> np.ndarray:
  """Reads an IDX file (gzipped when the name ends in ``.gz``) into a native-endian array.

  The format: two zero bytes, a type code, the number of dimensions ``d``, ``d`` big-endian int32
  sizes, then the values in row-major order, big-endian.

  Raises:
    ValueError: if the file is not IDX or is truncated.
  """
  path = existing_path(path, "IDX file", "Pass the path of an existing *-ubyte(.gz) file.")
  try:
    with _open(path, "rb") as f:
      data = f.read()
  except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError.
    what = ("a truncated gzip file" if isinstance(error, EOFError)
            else f"not a readable gzip file ({error})")
    raise ValueError(f"{path!r} is {what}; download or decompress it again.") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path!r} is not an IDX file (bad magic number {data[:4]!r}).")
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  shape = tuple(int(s) for s in np.frombuffer(data, ">i4", count=ndim, offset=4))
  offset = 4 + 4 * ndim
  size = int(np.prod(shape)) if shape else 1
  if len(data) - offset != size * dtype.itemsize:
    raise ValueError(f"{path!r} holds {len(data) - offset} bytes of values but its header "
                     f"announces shape {shape} of {dtype}; the file is truncated or corrupt.")
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file (gzipped when the name ends in ``.gz``); see :func:`read_idx`."""
  array = np.asarray(array)
  codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
  if array.dtype not in codes:
    raise ValueError(f"IDX stores uint8, int8, int16, int32, float32 or float64, not "
                     f"{array.dtype}; cast the array first.")
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
  with _open(os.fspath(path), "wb") as f:
    f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def _find_idx(root: str, prefix: str, kind: str, rank: int) -> str:
  candidates = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
  for name in candidates:
    for suffix in ("", ".gz"):
      if os.path.isfile(os.path.join(root, name + suffix)):
        return os.path.join(root, name + suffix)
  raise ValueError(f"No {candidates[0]}[.gz] in {root!r}. Pass path= the folder holding the IDX "
                   "files (e.g. /usr/share/datasets/fashion-mnist from the Debian package "
                   "dataset-fashion-mnist), or images_file= and labels_file=.")


def load_idx(
    path: Optional[PathLike] = None,
    *,
    split: str = "train",
    images_file: Optional[PathLike] = None,
    labels_file: Optional[PathLike] = None,
    class_names: Optional[Sequence[str]] = None,
) -> Dataset:
  """Reads MNIST-format image and label IDX files.

  Args:
    path: a folder with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
      ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``.
    split: ``"train"`` or ``"test"`` (the ``t10k`` files).
    images_file: the images file, instead of ``path`` and ``split``.
    labels_file: the labels file, instead of ``path`` and ``split``.
    class_names: names of the label values; default ``"0"``, ``"1"``, ...

  Returns:
    A :class:`Dataset` with ``inputs`` float32 ``(n, height, width, 1)``, uint8 pixels divided by
    255.

  Examples:
    >>> fashion = load_idx("/usr/share/datasets/fashion-mnist", split="test")  # doctest: +SKIP
  """
  if images_file is None or labels_file is None:
    if split not in _IDX_SPLITS:
      raise ValueError(f"split must be one of {sorted(_IDX_SPLITS)}, got {split!r}.")
    root = existing_path(path, "IDX folder", "Pass path= the folder holding the IDX files, or "
                         "images_file= and labels_file=.")
    images_file = images_file or _find_idx(root, _IDX_SPLITS[split], "images", 3)
    labels_file = labels_file or _find_idx(root, _IDX_SPLITS[split], "labels", 1)
  images, labels = read_idx(images_file), read_idx(labels_file)
  if images.ndim == 3:
    images = images[..., None]
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  if class_names is None:
    class_names = [str(c) for c in range(int(labels.max()) + 1)]
  return make_dataset(images.astype(np.float32) / scale, labels, class_names)


SOURCES: Dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "idx": load_idx,
    "image_folder": load_image_folder,
    "omniglot": functools.partial(load_image_folder, layout="group/class", image_size=28),
    "wav_folder": load_wav_folder,
    "fsdd": functools.partial(load_wav_folder, clip_seconds=1.0),
    "tfds": load_tfds,
}


def load_dataset(source: str, /, **kwargs) -> Dataset:
  """Loads a dataset by source name (see the table in the module docstring).

  Args:
    source: a key of :data:`SOURCES`, or ``"tfds:<tfds name>"`` as a shorthand for
      ``load_dataset("tfds", name=<tfds name>, ...)``.
    **kwargs: the source's arguments (``path=`` for the file sources).

  Returns:
    A :class:`Dataset`.

  Raises:
    ValueError: for an unknown source, arguments it does not take, or what the source raises
      (e.g. a missing path).
  """
  if source.startswith("tfds:"):
    kwargs["name"] = source[len("tfds:"):]
    source = "tfds"
  if source not in SOURCES:
    raise ValueError(f"Unknown dataset source {source!r}; use one of {sorted(SOURCES)} or "
                     "'tfds:<name>' for a prepared TensorFlow Datasets dataset.")
  load = SOURCES[source]
  try:
    inspect.signature(load).bind(**kwargs)
  except TypeError as error:
    raise ValueError(f"Bad arguments for dataset source {source!r} ({error}); it takes "
                     f"{inspect.signature(load)}.") from error
  return load(**kwargs)
