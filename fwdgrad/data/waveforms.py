"""Folders of WAV clips whose file names carry the label (and the speaker).

The Free Spoken Digit Dataset names its clips ``{digit}_{speaker}_{index}.wav``; :data:`FSDD_PATTERN`
reads that, and any other naming scheme is one regular expression away. The loader returns raw
waveforms, resampled and centred in one length (:mod:`fwdgrad.data.audio` reads, resamples and
pads them); features such as log-mel spectrograms are computed from them afterwards.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from fwdgrad.data import audio
from fwdgrad.data.dataset import Dataset
from fwdgrad.data.dataset import PathLike
from fwdgrad.data.dataset import encode_names
from fwdgrad.data.dataset import existing_path
from fwdgrad.data.dataset import make_dataset
from fwdgrad.data.dataset import natural_sort_key

FSDD_PATTERN = r"(?P<label>\d+)_(?P<group>[^_]+)_(?P<take>\d+)\.wav"
# ESC-50's {fold}-{freesound clip id}-{take}-{class}.wav: the fold is the group, so a group split
# keeps the five official folds apart.
ESC50_PATTERN = r"(?P<group>\d)-(?P<clip>\d+)-(?P<take>[A-Z])-(?P<label>\d+)\.wav"
_HINT = ("Pass path= a folder of .wav files, e.g. the recordings/ folder of the Free Spoken Digit "
         "Dataset (github.com/Jakobovski/free-spoken-digit-dataset).")


def load_wav_folder(
    path: PathLike,
    *,
    pattern: str = FSDD_PATTERN,
    sample_rate: Optional[int] = None,
    clip_seconds: Optional[float] = None,
    max_per_class: Optional[int] = None,
) -> Dataset:
  """Reads every WAV clip under a folder whose file name matches ``pattern``.

  The label of a clip is the ``label`` group of the match and its speaker the optional ``group``
  group. Labels and groups are numbered in natural order of their names ("2" before "10"), clips in
  natural order of their file names. Files whose names do not match are skipped.

  Args:
    path: the folder (searched recursively).
    pattern: a regular expression matched against the whole file name, with a named group
      ``label`` and optionally ``group``; the default reads ``{digit}_{speaker}_{take}.wav``.
    sample_rate: resample every clip to this rate (polyphase); ``None`` keeps the files' rate,
      which must then be the same for all of them.
    clip_seconds: centre every clip in ``round(clip_seconds * sample_rate)`` samples, zero-padding
      or cropping both ends equally; ``None`` pads to the longest clip.
    max_per_class: keep only the first clips of each label (for quick experiments).

  Returns:
    A :class:`Dataset` with ``inputs`` float32 ``(n, num_samples)``, ``sample_rate`` set, and
    ``groups`` when the pattern has a ``group`` group.

  Raises:
    ValueError: for a missing folder, a pattern without ``label``, no matching file, or mixed
      sample rates without ``sample_rate``.

  Examples:
    >>> fsdd = load_wav_folder("free-spoken-digit-dataset/recordings", sample_rate=16000,
    ...                        clip_seconds=1.0)  # doctest: +SKIP
  """
  root = existing_path(path, "WAV folder", _HINT)
  if not os.path.isdir(root):
    raise ValueError(f"{root!r} is not a folder. {_HINT}")
  regex = re.compile(pattern)
  if "label" not in regex.groupindex:
    raise ValueError(f"pattern {pattern!r} needs a named group (?P<label>...) that captures the "
                     "label from the file name.")
  if clip_seconds is not None and clip_seconds <= 0:
    raise ValueError(f"clip_seconds must be positive, got {clip_seconds}.")

  matches = []
  for directory, _, files in os.walk(root):
    for name in files:
      match = regex.fullmatch(name)
      if match:
        matches.append((natural_sort_key(os.path.relpath(os.path.join(directory, name), root)),
                        os.path.join(directory, name), match))
  if not matches:
    raise ValueError(f"No file under {root!r} matches pattern {pattern!r}. Pass pattern= a "
                     "regular expression for your file names, or path= the folder of clips.")
  matches.sort(key=lambda m: m[0])
  if max_per_class is not None:
    kept, count = [], {}
    for m in matches:
      label = m[2].group("label")
      count[label] = count.get(label, 0) + 1
      if count[label] <= max_per_class:
        kept.append(m)
    matches = kept

  clips, rates = [], set()
  for _, file, _ in matches:
    samples, rate = audio.read_wav(file)
    rates.add(rate)
    if sample_rate is not None:
      samples = audio.resample(samples, rate, sample_rate)
    clips.append(samples)
  if sample_rate is None:
    if len(rates) > 1:
      raise ValueError(f"Clips have different sample rates {sorted(rates)}; pass sample_rate= to "
                       "resample them to one rate.")
    sample_rate = rates.pop()
  num_samples = (max(c.shape[0] for c in clips) if clip_seconds is None
                 else int(round(clip_seconds * sample_rate)))
  inputs = np.stack([audio.fit_length(c, num_samples) for c in clips])

  labels, class_names = encode_names([m[2].group("label") for m in matches])
  groups, group_names = None, ()
  if "group" in regex.groupindex:
    groups, group_names = encode_names([m[2].group("group") for m in matches])
  return make_dataset(inputs, labels, class_names, groups, group_names, sample_rate)
