"""Input pipelines: in-memory datasets from local files, few-shot splits and episodes.

Sources (``load_dataset(name, **kwargs)``; nothing is downloaded)
  ``load_digits``         scikit-learn's bundled 8x8 digits, the default dataset.
  ``load_idx``            MNIST-format IDX files; ``read_idx`` / ``write_idx`` for single files.
  ``load_image_folder``   ``class/*`` or ``group/class/*`` (Omniglot) folders or zips of images.
  ``load_wav_folder``     WAV clips labelled by file name (FSDD: ``{digit}_{speaker}_{take}.wav``).
  ``load_tfds``           a prepared TensorFlow Datasets dataset, read without TensorFlow.

Few-shot (``fwdgrad.data.episodes``)
  ``split_classes`` / ``split_groups``     class- or speaker-disjoint splits from a seed
  ``split_classes_and_groups``             both at once (few-shot audio: new speakers, new words)
  ``sample_episode`` / ``sample_episodes``  N-way K-shot Q-query tasks from (seed, index).
  ``evaluate_episodes``                    mean accuracy over T tasks with a 95% interval.
"""

from fwdgrad.data.dataset import Dataset
from fwdgrad.data.dataset import make_dataset
from fwdgrad.data.dataset import split_examples
from fwdgrad.data.dataset import subset
from fwdgrad.data.episodes import Episode
from fwdgrad.data.episodes import EpisodeEvaluation
from fwdgrad.data.episodes import episode_indices
from fwdgrad.data.episodes import evaluate_episodes
from fwdgrad.data.episodes import mean_confidence_interval
from fwdgrad.data.episodes import sample_episode
from fwdgrad.data.episodes import sample_episodes
from fwdgrad.data.episodes import split_classes
from fwdgrad.data.episodes import split_classes_and_groups
from fwdgrad.data.episodes import split_groups
from fwdgrad.data.images import load_image_folder
from fwdgrad.data.sources import SOURCES
from fwdgrad.data.sources import load_dataset
from fwdgrad.data.sources import load_digits
from fwdgrad.data.sources import load_idx
from fwdgrad.data.sources import read_idx
from fwdgrad.data.sources import write_idx
from fwdgrad.data.tfds_source import load_tfds
from fwdgrad.data.waveforms import ESC50_PATTERN
from fwdgrad.data.waveforms import FSDD_PATTERN
from fwdgrad.data.waveforms import load_wav_folder

__all__ = (
    "Dataset",
    "Episode",
    "EpisodeEvaluation",
    "ESC50_PATTERN",
    "FSDD_PATTERN",
    "SOURCES",
    "episode_indices",
    "evaluate_episodes",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_image_folder",
    "load_tfds",
    "load_wav_folder",
    "make_dataset",
    "mean_confidence_interval",
    "read_idx",
    "sample_episode",
    "sample_episodes",
    "split_classes",
    "split_classes_and_groups",
    "split_examples",
    "split_groups",
    "subset",
    "write_idx",
)
