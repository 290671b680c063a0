"""The in-memory dataset every source returns, and the operations on it.

A :class:`Dataset` is a NamedTuple of numpy arrays: it is small enough to hold in memory for the
few-shot and on-device settings this library targets, and any integer array of positions selects a
subset (:func:`subset`); ``jax.device_put(dataset.inputs)`` moves the examples to an accelerator.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]


class Dataset(NamedTuple):
  """Examples held in memory.

  Attributes:
    inputs: float32 array with the examples on the first axis: images as ``(n, height, width,
      channels)`` in ``[0, 1]``, waveforms as ``(n, samples)`` in ``[-1, 1]``, or features ``(n, d)``.
    labels: int32 array ``(n,)`` with values in ``[0, len(class_names))``.
    class_names: the name of each label value.
    groups: optional int32 array ``(n,)`` naming who or what produced each example (the speaker of a
      clip, the alphabet of a character), used for group-disjoint splits; ``None`` when unknown.
    group_names: the name of each group value (empty when ``groups`` is ``None``).
    sample_rate: samples per second of waveform inputs; ``None`` for other inputs.
  """
  inputs: np.ndarray
  labels: np.ndarray
  class_names: Tuple[str, ...]
  groups: Optional[np.ndarray] = None
  group_names: Tuple[str, ...] = ()
  sample_rate: Optional[int] = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


def make_dataset(inputs, labels, class_names, groups=None, group_names=(),
                 sample_rate=None) -> Dataset:
  """Builds a :class:`Dataset`, casting to its dtypes and checking that the fields agree.

  Raises:
    ValueError: if the fields disagree in length or a label has no class name.
  """
  inputs = np.asarray(inputs, np.float32)
  labels = np.asarray(labels, np.int32)
  class_names = tuple(str(c) for c in class_names)
  if labels.ndim != 1 or inputs.shape[:1] != labels.shape:
    raise ValueError(f"inputs {inputs.shape} and labels {labels.shape} must have the same number "
                     "of examples on their first axis, with labels one-dimensional.")
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise ValueError(f"labels lie in [{labels.min()}, {labels.max()}] but there are "
                     f"{len(class_names)} class names; give one name per label value.")
  if groups is not None:
    groups = np.asarray(groups, np.int32)
    if groups.shape != labels.shape:
      raise ValueError(f"groups {groups.shape} must have the shape of labels {labels.shape}.")
    group_names = tuple(str(g) for g in group_names)
  else:
    group_names = ()
  return Dataset(inputs, labels, class_names, groups, group_names, sample_rate)


def subset(dataset: Dataset, indices, *, relabel: bool = False) -> Dataset:
  """The examples at ``indices``.

  Args:
    dataset: the dataset.
    indices: integer array of example positions (or a boolean mask).
    relabel: renumber the classes present to ``0..C-1`` in their original order and keep only
      their names; what a classifier trained on a class split needs.

  Returns:
    A new :class:`Dataset` (arrays are copies).
  """
  indices = np.asarray(indices)
  labels = dataset.labels[indices]
  class_names = dataset.class_names
  if relabel:
    present = np.unique(labels)
    labels = np.searchsorted(present, labels).astype(np.int32)
    class_names = tuple(dataset.class_names[c] for c in present)
  groups = None if dataset.groups is None else dataset.groups[indices]
  return Dataset(dataset.inputs[indices], labels, class_names, groups, dataset.group_names,
                 dataset.sample_rate)


def split_examples(dataset: Dataset, test_fraction: float, *, seed: int) -> Tuple[Dataset, Dataset]:
  """A stratified random split of the examples into train and test (the classes are shared).

  Each class contributes ``round(test_fraction * n_c)`` examples to the test part, chosen by
  ``np.random.default_rng(seed)``, so the split is a function of the seed alone.

  Args:
    dataset: the dataset.
    test_fraction: in ``(0, 1)``.
    seed: integer seed.

  Returns:
    ``(train, test)``.

  Examples:
    >>> train, test = split_examples(fwdgrad.data.load_digits(), 0.2, seed=0)
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
  rng = np.random.default_rng(seed)
  test = []
  for c in range(dataset.num_classes):
    members = np.flatnonzero(dataset.labels == c)
    test.append(rng.permutation(members)[:int(round(test_fraction * members.size))])
  test_mask = np.zeros(dataset.num_examples, bool)
  test_mask[np.concatenate(test).astype(np.int64)] = True
  return subset(dataset, np.flatnonzero(~test_mask)), subset(dataset, np.flatnonzero(test_mask))


def natural_sort_key(name: str):
  """Sorts ``"2"`` before ``"10"``: digit runs compare as numbers."""
  return [(0, int(part), "") if part.isdigit() else (1, 0, part)
          for part in re.split(r"(\d+)", name) if part]


def encode_names(names: Sequence[str]) -> Tuple[np.ndarray, Tuple[str, ...]]:
  """Integer codes for string names, with the vocabulary in natural order."""
  vocabulary = tuple(sorted(set(names), key=natural_sort_key))
  code = {name: i for i, name in enumerate(vocabulary)}
  return np.array([code[n] for n in names], np.int32), vocabulary


def existing_path(path: Optional[PathLike], what: str, hint: str) -> str:
  """``path`` as a string, or a ValueError naming the missing path and how to provide it."""
  if path is None:
    raise ValueError(f"No path given for {what}. {hint}")
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise ValueError(f"{what} not found at {path!r}. {hint}")
  return path
