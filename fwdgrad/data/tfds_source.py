"""Any TensorFlow Datasets (TFDS) dataset, read without TensorFlow.

TFDS random-access data sources (``builder.as_data_source``) read the ``array_record`` (or
``parquet``) files of a prepared dataset and decode them with numpy and PIL, so the loader needs
``tensorflow-datasets`` and ``array-record`` but not TensorFlow. Preparing a dataset (downloading
it and writing those files) is not done here: it needs the network, and for image datasets
TensorFlow to encode the images. Prepare it once where both are available and copy the folder::

  tfds build mnist --file_format=array_record --data_dir=/path/to/tensorflow_datasets

then pass ``data_dir=/path/to/tensorflow_datasets`` (or set ``TFDS_DATA_DIR``). Datasets that need
a manual download take ``--manual_dir`` as well. A dataset that is not prepared fails at once with
that instruction; nothing here retries the network.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import numpy as np

from fwdgrad.data.dataset import Dataset
from fwdgrad.data.dataset import PathLike
from fwdgrad.data.dataset import encode_names
from fwdgrad.data.dataset import make_dataset


def _how_to_prepare(name: str, data_dir) -> str:
  where = data_dir if data_dir is not None else "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
  return (f"Prepare it where the network and TensorFlow are available with `tfds build {name} "
          f"--file_format=array_record --data_dir=DIR` (add --manual_dir=... for datasets that "
          f"need a manual download), copy DIR here, and pass data_dir=DIR. Looked in {where}.")


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("Reading TFDS datasets needs `pip install tensorflow-datasets array-record` "
                      "(TensorFlow itself is not needed).") from error
  try:
    import array_record  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    raise ImportError("TFDS data sources read array_record files: `pip install array-record`."
                      ) from error
  return tfds


def _resize(image: np.ndarray, image_size: Tuple[int, int]) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  pil = pil.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
  out = np.asarray(pil)
  return out[..., None] if squeeze else out


def _as_float(values: np.ndarray) -> np.ndarray:
  """Integers to floats by their full scale (uint8 images to [0, 1], int16 audio to [-1, 1])."""
  if values.dtype == np.uint8:
    return values.astype(np.float32) / 255.0
  if np.issubdtype(values.dtype, np.signedinteger):
    return values.astype(np.float32) / float(2 ** (8 * values.dtype.itemsize - 1))
  return values.astype(np.float32)


def load_tfds(
    name: str,
    *,
    split: str = "train",
    data_dir: Optional[PathLike] = None,
    input_key: Optional[str] = None,
    label_key: Optional[str] = None,
    group_key: Optional[str] = None,
    image_size: Optional[Union[int, Tuple[int, int]]] = None,
    max_examples: Optional[int] = None,
    read_batch_size: int = 1024,
) -> Dataset:
  """Reads a prepared TFDS dataset split into memory, without TensorFlow.

  Args:
    name: a TFDS name, optionally with config and version (``"mnist"``, ``"cifar10:3.0.2"``).
    split: a TFDS split, slices included (``"train"``, ``"test[:10%]"``).
    data_dir: the folder holding the prepared dataset; ``None`` uses TFDS's default.
    input_key: the feature read as inputs; default: the first of the dataset's supervised keys.
    label_key: the feature read as labels; default: the second supervised key.
    group_key: an optional feature read as groups (e.g. a speaker id).
    image_size: ``(height, width)`` or an int to resize images to (bilinear); needed when the
      images have different sizes.
    max_examples: read only the first examples of the split.
    read_batch_size: examples fetched per call of the data source.

  Returns:
    A :class:`Dataset`; uint8 inputs are scaled to ``[0, 1]`` and signed integer inputs (audio) to
    ``[-1, 1]``; class names come from the label's ``ClassLabel``.

  Raises:
    ValueError: for an unknown name, a dataset that is not prepared (with how to prepare it), one
      prepared in a format without random access, an unknown split or key.

  Examples:
    >>> mnist = load_tfds("mnist", split="test",
    ...                   data_dir="/data/tensorflow_datasets")  # doctest: +SKIP
  """
  tfds = _import_tfds()
  data_dir = None if data_dir is None else str(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(f"{name!r} is neither a TFDS dataset name nor a dataset prepared under "
                     f"data_dir={data_dir!r}; see tfds.list_builders() for the names. "
                     f"{_how_to_prepare(name, data_dir)}") from error
  if not builder.is_prepared():
    raise ValueError(f"The TFDS dataset {name!r} is not prepared under {builder.data_dir}, and "
                     f"it is not downloaded at run time. {_how_to_prepare(name, data_dir)}")
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as error:
    raise ValueError(f"The TFDS dataset {name!r} at {builder.data_dir} is stored as "
                     f"{builder.info.file_format}, which only TensorFlow reads. Rebuild it with "
                     f"--file_format=array_record. {_how_to_prepare(name, data_dir)}") from error
  except (KeyError, ValueError) as error:
    raise ValueError(f"Cannot read split {split!r} of {name!r} ({error}); its splits are "
                     f"{sorted(builder.info.splits.keys())}.") from error

  features = builder.info.features
  supervised = builder.info.supervised_keys or (None, None)
  input_key = input_key or supervised[0]
  label_key = label_key or supervised[1]
  for what, key in (("input_key", input_key), ("label_key", label_key), ("group_key", group_key)):
    if (key is None and what != "group_key") or (key is not None and key not in features):
      raise ValueError(f"{what}={key!r} is not a feature of {name!r}; pass one of "
                       f"{sorted(features.keys())}.")
  if isinstance(image_size, int):
    image_size = (image_size, image_size)

  count = len(source) if max_examples is None else min(len(source), max_examples)
  inputs, labels, groups = [], [], []
  for start in range(0, count, read_batch_size):
    positions = list(range(start, min(count, start + read_batch_size)))
    getitems = getattr(source, "__getitems__", None)
    examples = getitems(positions) if getitems else [source[i] for i in positions]
    for example in examples:
      value = np.asarray(example[input_key])
      if image_size is not None:
        value = _resize(value, image_size)
      inputs.append(value)
      labels.append(example[label_key])
      if group_key is not None:
        groups.append(example[group_key])

  shapes = sorted({x.shape for x in inputs})
  if len(shapes) > 1:
    raise ValueError(f"Inputs of {name!r} have different shapes {shapes[:4]}; pass "
                     "image_size=(height, width) to resize images to one size.")
  label_feature = features[label_key]
  if isinstance(label_feature, tfds.features.ClassLabel):
    labels, class_names = np.asarray(labels, np.int32), tuple(label_feature.names)
  else:
    labels, class_names = encode_names([_as_name(v) for v in labels])
  group_codes, group_names = None, ()
  if group_key is not None:
    group_codes, group_names = encode_names([_as_name(v) for v in groups])
  sample_rate = getattr(features[input_key], "sample_rate", None)
  return make_dataset(_as_float(np.stack(inputs)), labels, class_names, group_codes, group_names,
                      sample_rate)


def _as_name(value: Any) -> str:
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode() if isinstance(value, bytes) else str(value)

