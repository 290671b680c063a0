"""Few-shot splits and N-way K-shot episodes, each a function of a seed alone.

A few-shot benchmark holds out whole classes: a model is trained (or pre-trained) on the *base*
classes, tuned on *validation* classes and evaluated on *novel* classes it never saw, each test
task being an *episode*: ``N`` classes drawn from the novel ones, ``K`` labelled *support*
examples of each to adapt on and ``Q`` *query* examples of each to score. For speech the held-out
unit is the speaker, so a model is scored on voices it never heard (:func:`split_groups`).

Every random choice here comes from ``np.random.default_rng`` seeded with the caller's seed (an
int or a JAX key) and the episode index, so episode ``t`` is the same whatever was drawn before it,
in any process, and episodes can be drawn in parallel or out of order.

Examples:
  >>> digits = fwdgrad.data.load_digits()
  >>> base, val, novel = split_classes(digits, (0.4, 0.1, 0.5), seed=0)
  >>> episode = sample_episode(novel, 0, 17, num_ways=5, num_shots=5, num_queries=15)
  >>> episode.support_inputs.shape  # (N * K, 8, 8, 1), labels 0..4 in blocks of K
  (25, 8, 8, 1)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence, Tuple, Union

import jax
import numpy as np

from fwdgrad.data.dataset import Dataset
from fwdgrad.data.dataset import subset

Seed = Union[int, jax.Array]


class Episode(NamedTuple):
  """One N-way K-shot Q-query task.

  Attributes:
    support_inputs: ``(N * K, ...)``, class-major: the ``K`` examples of episode class 0 first.
    support_labels: int32 ``(N * K,)``, ``[0]*K + [1]*K + ... + [N-1]*K``.
    query_inputs: ``(N * Q, ...)``, class-major like the support.
    query_labels: int32 ``(N * Q,)``.
    classes: int32 ``(N,)``, the dataset label of each episode class (episode label ``i`` is
      dataset label ``classes[i]``).
  """
  support_inputs: np.ndarray
  support_labels: np.ndarray
  query_inputs: np.ndarray
  query_labels: np.ndarray
  classes: np.ndarray


class EpisodeEvaluation(NamedTuple):
  """Accuracy over episodes: ``mean``, its 95% confidence half-width ``ci95`` and all values."""
  mean: float
  ci95: float
  accuracies: np.ndarray


def _rng(seed: Seed, *purpose: int) -> np.random.Generator:
  """A numpy generator determined by the seed (int or JAX key) and the integers ``purpose``."""
  if isinstance(seed, (int, np.integer)):
    if seed < 0:
      raise ValueError(f"seed must be a non-negative integer or a JAX key, got {seed}.")
    entropy = [int(seed)]
  else:
    key = seed
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    entropy = [int(v) for v in np.asarray(key, np.uint32).ravel()]
  return np.random.default_rng(entropy + [int(p) for p in purpose])


def _part_sizes(sizes: Sequence[Union[int, float]], total: int, what: str) -> list:
  """Counts per part from counts (summing to at most ``total``) or fractions (summing to 1)."""
  if not sizes:
    raise ValueError("sizes must name at least one part, e.g. (0.6, 0.2, 0.2).")
  if all(isinstance(s, (int, np.integer)) for s in sizes):
    counts = [int(s) for s in sizes]
    if sum(counts) > total:
      raise ValueError(f"sizes {tuple(counts)} ask for {sum(counts)} {what} but there are only "
                       f"{total}; lower them or give fractions that sum to 1.")
  else:
    if abs(sum(sizes) - 1.0) > 1e-6 or min(sizes) < 0:
      raise ValueError(f"Fractional sizes must be non-negative and sum to 1, got {tuple(sizes)}.")
    bounds = np.round(np.cumsum([0.0] + list(sizes)) * total).astype(int)
    counts = list(np.diff(bounds))
  if min(counts) < 1:
    raise ValueError(f"sizes {tuple(sizes)} leave a part without {what} (counts {counts} of "
                     f"{total}); give each part at least one.")
  return counts


def _split_by(dataset: Dataset, values: np.ndarray, sizes, seed: Seed, purpose: int, what: str
              ) -> Tuple[Dataset, ...]:
  present = np.unique(values)
  counts = _part_sizes(sizes, present.size, what)
  order = _rng(seed, purpose).permutation(present)
  parts, start = [], 0
  for count in counts:
    chosen = np.sort(order[start:start + count])
    start += count
    parts.append(subset(dataset, np.flatnonzero(np.isin(values, chosen)), relabel=True))
  return tuple(parts)


def split_classes(dataset: Dataset, sizes: Sequence[Union[int, float]], *, seed: Seed
                  ) -> Tuple[Dataset, ...]:
  """Splits a dataset into parts with disjoint classes (e.g. base / validation / novel).

  The classes are permuted by a generator seeded with ``seed`` and cut into consecutive parts;
  each part keeps all examples of its classes, relabelled ``0..C_part-1`` in their original
  order, with their names.

  Args:
    dataset: the dataset.
    sizes: numbers of classes per part (summing to at most the number of classes; the rest is
      dropped) or fractions summing to 1 (rounded at the cumulative boundaries).
    seed: an int or a JAX key.

  Returns:
    One :class:`Dataset` per entry of ``sizes``.
  """
  return _split_by(dataset, dataset.labels, sizes, seed, 1, "classes")


def split_groups(dataset: Dataset, sizes: Sequence[Union[int, float]], *, seed: Seed
                 ) -> Tuple[Dataset, ...]:
  """Splits a dataset into parts with disjoint groups (speakers, alphabets, ...).

  Like :func:`split_classes` but the unit is ``dataset.groups``: every example of a speaker lands
  in the same part. Labels are renumbered over the classes present in each part (for a speaker
  split of spoken digits every part has all ten, and the labels are unchanged).

  Raises:
    ValueError: if the dataset has no groups.
  """
  if dataset.groups is None:
    raise ValueError("The dataset has no groups; load it with a source that records them (e.g. "
                     "a wav_folder pattern with (?P<group>...)) or split by class instead.")
  parts = _split_by(dataset, dataset.groups, sizes, seed, 2, "groups")
  return parts


def split_classes_and_groups(dataset: Dataset, class_sizes: Sequence[Union[int, float]],
                             group_sizes: Sequence[Union[int, float]], *, seed: Seed
                             ) -> Tuple[Dataset, Dataset]:
  """``(base, novel)`` with disjoint classes *and* disjoint groups (speakers, alphabets).

  The classes and the groups are each cut once over the whole dataset, with the same generators
  as :func:`split_classes` and :func:`split_groups`: ``base`` holds the first class part's
  examples by the first group part, ``novel`` the last class part's by the last group part.
  Cutting the classes inside each group part instead can put one class in both when the parts hold
  different class sets.
  """
  if dataset.groups is None:
    raise ValueError("The dataset has no groups; load it with a source that records them (e.g. "
                     "a wav_folder pattern with (?P<group>...)) or split by class instead.")

  def cut(values, sizes, purpose, what):
    present = np.unique(values)
    counts = _part_sizes(sizes, present.size, what)
    order = _rng(seed, purpose).permutation(present)
    return order[:counts[0]], order[sum(counts[:-1]):sum(counts)]

  base_classes, novel_classes = cut(dataset.labels, class_sizes, 1, "classes")
  base_groups, novel_groups = cut(dataset.groups, group_sizes, 2, "groups")
  parts = []
  for classes, groups in ((base_classes, base_groups), (novel_classes, novel_groups)):
    mask = np.isin(dataset.labels, classes) & np.isin(dataset.groups, groups)
    if not mask.any():
      raise ValueError(f"No example has one of the classes {sorted(classes.tolist())} and one of "
                       f"the groups {sorted(groups.tolist())}; change the sizes or the seed.")
    parts.append(subset(dataset, np.flatnonzero(mask), relabel=True))
  return tuple(parts)


def episode_indices(labels: np.ndarray, seed: Seed, index: int, *, num_ways: int,
                    num_shots: int, num_queries: int
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Example positions of episode ``index``: ``(support, query, classes)``.

  ``num_ways`` classes are drawn without replacement from those present in ``labels``, then
  ``num_shots + num_queries`` distinct examples of each; the first ``num_shots`` are the support.
  All draws come from ``np.random.default_rng`` seeded with ``(seed, index)``.

  Raises:
    ValueError: if ``num_ways`` exceeds the number of classes, or a class has fewer than
      ``num_shots + num_queries`` examples.
  """
  if num_ways < 1 or num_shots < 1 or num_queries < 0:
    raise ValueError(f"Need num_ways >= 1, num_shots >= 1 and num_queries >= 0, got "
                     f"{num_ways}, {num_shots}, {num_queries}.")
  if index < 0:
    raise ValueError(f"The episode index must be non-negative, got {index}.")
  labels = np.asarray(labels)
  present, sizes = np.unique(labels, return_counts=True)
  if num_ways > present.size:
    raise ValueError(f"num_ways={num_ways} but the dataset has only {present.size} classes; "
                     "lower num_ways or use a split with more classes.")
  per_class = num_shots + num_queries
  if sizes.min() < per_class:
    raise ValueError(f"Class {present[sizes.argmin()]} has {sizes.min()} examples but an episode "
                     f"takes num_shots + num_queries = {per_class} from each class; lower them "
                     "or drop the small classes with fwdgrad.data.subset.")
  rng = _rng(seed, 3, index)
  classes = rng.choice(present, num_ways, replace=False)
  chosen = np.stack([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                     for c in classes])
  return (chosen[:, :num_shots].ravel(), chosen[:, num_shots:].ravel(),
          classes.astype(np.int32))


def sample_episode(dataset: Dataset, seed: Seed, index: int, *, num_ways: int, num_shots: int,
                   num_queries: int) -> Episode:
  """Episode ``index`` of the sequence that ``seed`` defines (see :func:`episode_indices`).

  Args:
    dataset: the dataset to draw from (usually the novel classes of :func:`split_classes`).
    seed: an int or a JAX key.
    index: the episode number ``t >= 0``.
    num_ways: ``N``, classes per episode.
    num_shots: ``K``, support examples per class.
    num_queries: ``Q``, query examples per class.

  Returns:
    An :class:`Episode` with labels relabelled ``0..N-1``.
  """
  support, query, classes = episode_indices(dataset.labels, seed, index, num_ways=num_ways,
                                            num_shots=num_shots, num_queries=num_queries)
  ways = np.arange(num_ways, dtype=np.int32)
  return Episode(dataset.inputs[support], np.repeat(ways, num_shots),
                 dataset.inputs[query], np.repeat(ways, num_queries), classes)


def sample_episodes(dataset: Dataset, seed: Seed, num_episodes: int, *, num_ways: int,
                    num_shots: int, num_queries: int, start: int = 0) -> Episode:
  """Episodes ``start .. start + num_episodes - 1`` stacked on a new leading axis.

  Every field gains a leading axis of size ``num_episodes``, ready for ``jax.vmap``; episode ``t``
  equals ``sample_episode(dataset, seed, t, ...)``.
  """
  episodes = [sample_episode(dataset, seed, t, num_ways=num_ways, num_shots=num_shots,
                             num_queries=num_queries)
              for t in range(start, start + num_episodes)]
  return Episode(*(np.stack(field) for field in zip(*episodes)))


def mean_confidence_interval(values: Sequence[float]) -> Tuple[float, float]:
  """The mean and the half-width of its Student-t 95% confidence interval.

  .. math::

     \\bar a = \\frac{1}{T} \\sum_t a_t, \\qquad
     \\mathrm{ci}_{95} = t_{0.975,\\,T-1} \\, \\frac{s}{\\sqrt{T}}, \\qquad
     s = \\sqrt{\\tfrac{1}{T-1} \\sum_t (a_t - \\bar a)^2}

  The t quantile (not 1.96) keeps the interval honest for a handful of seeds: with ``T = 3`` it
  is 4.30, more than twice the normal value. One value has no interval (``nan``).

  Examples:
    >>> mean_confidence_interval([0.5, 0.7])
    (0.6, 1.2706...)
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"Need a non-empty 1-D sequence of values, got shape {values.shape}.")
  if values.size == 1:
    return float(values[0]), float("nan")
  from scipy import stats  # pylint: disable=g-import-not-at-top
  quantile = float(stats.t.ppf(0.975, values.size - 1))
  return float(values.mean()), quantile * float(values.std(ddof=1)) / math.sqrt(values.size)


def evaluate_episodes(accuracy_fn: Callable[[Episode], float], dataset: Dataset, seed: Seed,
                      num_episodes: int, *, num_ways: int, num_shots: int, num_queries: int
                      ) -> EpisodeEvaluation:
  """Averages ``accuracy_fn`` over episodes ``0 .. num_episodes - 1`` of ``seed``.

  Args:
    accuracy_fn: ``episode -> accuracy`` on its queries (adapt on the support inside it).
    dataset: the dataset the episodes are drawn from.
    seed: an int or a JAX key; the same seed scores every method on the same tasks.
    num_episodes: ``T``, the number of tasks (the paper uses 100).
    num_ways: ``N``.
    num_shots: ``K``.
    num_queries: ``Q``.

  Returns:
    An :class:`EpisodeEvaluation` (see :func:`mean_confidence_interval`).
  """
  if num_episodes < 1:
    raise ValueError(f"num_episodes must be at least 1, got {num_episodes}.")
  accuracies = np.array([
      float(accuracy_fn(sample_episode(dataset, seed, t, num_ways=num_ways, num_shots=num_shots,
                                       num_queries=num_queries)))
      for t in range(num_episodes)])
  mean, ci95 = mean_confidence_interval(accuracies)
  return EpisodeEvaluation(mean, ci95, accuracies)
