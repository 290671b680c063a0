"""Tests of few-shot splits, episodes and their evaluation in fwdgrad/data/episodes.py."""

import math

import chex
import jax
import numpy as np
import pytest

from fwdgrad import data


@pytest.fixture(scope="module")
def digits():
  return data.load_digits()


def _speech_like(num_speakers=6, num_digits=10, takes=3):
  """A dataset shaped like spoken digits: every speaker says every digit ``takes`` times."""
  labels = np.tile(np.repeat(np.arange(num_digits), takes), num_speakers)
  groups = np.repeat(np.arange(num_speakers), num_digits * takes)
  inputs = np.stack([labels, groups, np.arange(labels.size)], axis=1).astype(np.float32)
  return data.make_dataset(inputs, labels, [str(d) for d in range(num_digits)], groups,
                           [f"speaker{s}" for s in range(num_speakers)])


# Splits ---------------------------------------------------------------------------------------


def test_class_split_is_disjoint_complete_relabelled_and_seeded(digits):
  base, val, novel = data.split_classes(digits, (6, 2, 2), seed=0)
  names = [set(part.class_names) for part in (base, val, novel)]
  assert [len(n) for n in names] == [6, 2, 2]
  assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
  assert set.union(*names) == set(digits.class_names)
  assert base.num_examples + val.num_examples + novel.num_examples == digits.num_examples
  for part in (base, val, novel):
    np.testing.assert_array_equal(np.unique(part.labels), np.arange(part.num_classes))
    # Relabelled images keep their class: the original label of each example is its name.
    original = np.array([int(part.class_names[c]) for c in part.labels])
    matches = (digits.inputs[None] == part.inputs[:5, None]).all(axis=(2, 3, 4))
    for row, label in zip(matches, original[:5]):
      assert label in digits.labels[row]
  again = data.split_classes(digits, (6, 2, 2), seed=0)
  assert [p.class_names for p in again] == [base.class_names, val.class_names, novel.class_names]
  others = [data.split_classes(digits, (6, 2, 2), seed=s)[2].class_names for s in range(1, 6)]
  assert any(o != novel.class_names for o in others)


def test_fractional_sizes_and_jax_key_seed(digits):
  parts = data.split_classes(digits, (0.6, 0.2, 0.2), seed=jax.random.key(3))
  assert [p.num_classes for p in parts] == [6, 2, 2]
  again = data.split_classes(digits, (0.6, 0.2, 0.2), seed=jax.random.key(3))
  chex.assert_trees_all_close(parts[2].inputs, again[2].inputs, atol=0, rtol=0)
  dropped = data.split_classes(digits, (3, 3), seed=0)
  assert sum(p.num_classes for p in dropped) == 6


@pytest.mark.parametrize("sizes, match", [((8, 3), "ask for 11 classes"),
                                          ((0.5, 0.6), "sum to 1"),
                                          ((10, 0), "without classes"),
                                          ((), "at least one part")])
def test_bad_split_sizes(digits, sizes, match):
  with pytest.raises(ValueError, match=match):
    data.split_classes(digits, sizes, seed=0)


def test_group_split_keeps_speakers_apart_and_all_digits():
  speech = _speech_like()
  train, val, test = data.split_groups(speech, (4, 1, 1), seed=0)
  speakers = [set(part.inputs[:, 1].astype(int)) for part in (train, val, test)]
  assert [len(s) for s in speakers] == [4, 1, 1]
  assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2])
  for part in (train, val, test):
    assert part.class_names == speech.class_names
    np.testing.assert_array_equal(part.labels, part.inputs[:, 0].astype(int))
    np.testing.assert_array_equal(part.groups, part.inputs[:, 1].astype(int))
  with pytest.raises(ValueError, match="no groups"):
    data.split_groups(data.load_digits(), (0.5, 0.5), seed=0)


def test_class_and_group_split_is_disjoint_in_both_when_speakers_say_different_words():
  # Speaker s says digits s..s+5 (mod 10): cutting the classes inside each speaker half (the old
  # rule) put a digit in both base and novel for 18 of these 20 seeds.
  full = _speech_like()
  keep = (full.labels - full.groups) % 10 < 6
  speech = data.subset(full, np.flatnonzero(keep))
  for seed in range(20):
    base, novel = data.split_classes_and_groups(speech, (0.5, 0.5), (0.5, 0.5), seed=seed)
    base_digits, novel_digits = (set(p.inputs[:, 0].astype(int)) for p in (base, novel))
    base_speakers, novel_speakers = (set(p.inputs[:, 1].astype(int)) for p in (base, novel))
    assert base_digits and novel_digits and not base_digits & novel_digits, seed
    assert not base_speakers & novel_speakers, seed
    assert set(base.class_names) == {str(d) for d in base_digits}
    np.testing.assert_array_equal(novel.labels, np.searchsorted(sorted(novel_digits),
                                                                novel.inputs[:, 0].astype(int)))
  # The split is a function of the seed.
  again = data.split_classes_and_groups(speech, (0.5, 0.5), (0.5, 0.5), seed=3)[1]
  np.testing.assert_array_equal(again.inputs,
                                data.split_classes_and_groups(speech, (0.5, 0.5), (0.5, 0.5),
                                                              seed=3)[1].inputs)
  with pytest.raises(ValueError, match="no groups"):
    data.split_classes_and_groups(data.load_digits(), (0.5, 0.5), (0.5, 0.5), seed=0)


# Episodes -------------------------------------------------------------------------------------


def test_episode_shapes_and_labels(digits):
  episode = data.sample_episode(digits, 0, 0, num_ways=5, num_shots=3, num_queries=4)
  assert episode.support_inputs.shape == (15, 8, 8, 1)
  assert episode.query_inputs.shape == (20, 8, 8, 1)
  np.testing.assert_array_equal(episode.support_labels, np.repeat(np.arange(5), 3))
  np.testing.assert_array_equal(episode.query_labels, np.repeat(np.arange(5), 4))
  assert episode.support_labels.dtype == np.int32 and episode.classes.dtype == np.int32
  assert len(set(episode.classes.tolist())) == 5


def test_episode_examples_belong_to_their_class_and_do_not_repeat(digits):
  support, query, classes = data.episode_indices(digits.labels, 7, 3, num_ways=4, num_shots=5,
                                                 num_queries=6)
  assert len(set(support.tolist()) | set(query.tolist())) == support.size + query.size
  np.testing.assert_array_equal(digits.labels[support], np.repeat(classes, 5))
  np.testing.assert_array_equal(digits.labels[query], np.repeat(classes, 6))


def test_episodes_are_a_function_of_seed_and_index(digits):
  kwargs = dict(num_ways=5, num_shots=1, num_queries=2)
  first = data.sample_episode(digits, 11, 4, **kwargs)
  # Drawing other episodes in between changes nothing: no global state.
  data.sample_episode(digits, 11, 0, **kwargs)
  np.random.seed(123)
  chex.assert_trees_all_close(first, data.sample_episode(digits, 11, 4, **kwargs), atol=0, rtol=0)
  stacked = data.sample_episodes(digits, 11, 6, **kwargs)
  assert stacked.support_inputs.shape == (6, 5, 8, 8, 1)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[4], stacked), first, atol=0, rtol=0)
  other_index = data.sample_episode(digits, 11, 5, **kwargs)
  other_seed = data.sample_episode(digits, 12, 4, **kwargs)
  assert not np.array_equal(other_index.support_inputs, first.support_inputs)
  assert not np.array_equal(other_seed.support_inputs, first.support_inputs)
  key = jax.random.key(11)
  by_key = data.sample_episode(digits, key, 4, **kwargs)
  chex.assert_trees_all_close(by_key, data.sample_episode(digits, jax.random.key(11), 4, **kwargs),
                              atol=0, rtol=0)
  raw = data.sample_episode(digits, jax.random.key_data(key), 4, **kwargs)
  chex.assert_trees_all_close(by_key, raw, atol=0, rtol=0)


def test_episodes_cover_the_classes_evenly(digits):
  """Over many episodes every class is drawn about equally often (probabilistic, ~6 sigma)."""
  counts = np.zeros(10)
  for t in range(400):
    counts[data.episode_indices(digits.labels, 0, t, num_ways=5, num_shots=1,
                                num_queries=0)[2]] += 1
  # Each class appears in 200 of 400 episodes on average, std sqrt(400 * 0.5 * 0.5) = 10.
  assert np.abs(counts - 200).max() < 60


@pytest.mark.parametrize("ways, shots, queries, match", [
    (11, 1, 1, "only 10 classes"),
    (5, 150, 50, "takes num_shots \\+ num_queries = 200"),
    (0, 1, 1, "num_ways >= 1"),
    (5, 0, 1, "num_shots >= 1"),
])
def test_impossible_episodes_raise(digits, ways, shots, queries, match):
  with pytest.raises(ValueError, match=match):
    data.sample_episode(digits, 0, 0, num_ways=ways, num_shots=shots, num_queries=queries)


# Evaluation -----------------------------------------------------------------------------------


def test_confidence_interval_formula():
  values = np.array([0.5, 0.7, 0.9, 0.6])
  mean, ci95 = data.mean_confidence_interval(values)
  assert mean == pytest.approx(0.675, abs=1e-12)
  spread = math.sqrt(np.sum((values - 0.675) ** 2) / 3)  # the sample sd, T - 1 = 3
  assert ci95 == pytest.approx(3.182446305284263 * spread / 2.0, abs=1e-12)  # t_{0.975, 3}
  assert math.isnan(data.mean_confidence_interval([0.3])[1])  # one value: no interval
  with pytest.raises(ValueError, match="non-empty"):
    data.mean_confidence_interval([])


def test_headroom_rule_needs_3_points_and_an_interval_above_zero():
  from fwdgrad import reporting
  # Gap 10 points, tight: meets. Mean gap 4 points but one seed at -4: interval crosses 0.
  room = reporting.headroom([0.95, 0.96, 0.94], [0.85, 0.86, 0.84])
  assert room["meets"] and room["gap"] == pytest.approx(0.10)
  assert room["ci95"] == pytest.approx(0.0, abs=1e-12)
  noisy = reporting.headroom([0.95, 0.99, 0.86], [0.90, 0.91, 0.90])
  assert noisy["gap"] == pytest.approx(0.03) and not noisy["meets"]
  # (sd of (5, 8, -4) points = 6.24; t_{0.975,2} = 4.303; half-width 15.5 points.)
  assert noisy["ci95"] == pytest.approx(4.302652729911275 * 0.0624499799839840 / math.sqrt(3))
  small = reporting.headroom([0.92, 0.921, 0.919], [0.90, 0.901, 0.899])  # 2 points, exact
  assert not small["meets"]
  with pytest.raises(ValueError, match="at least 2 replicates"):
    reporting.headroom([0.9], [0.8])


def _nearest_prototype_accuracy(episode):
  flat = lambda x: x.reshape(x.shape[0], -1)
  ways = int(episode.support_labels.max()) + 1
  prototypes = np.stack([flat(episode.support_inputs)[episode.support_labels == c].mean(0)
                         for c in range(ways)])
  distances = ((flat(episode.query_inputs)[:, None] - prototypes[None]) ** 2).sum(-1)
  return float((distances.argmin(1) == episode.query_labels).mean())


def test_evaluate_episodes_with_a_prototype_classifier(digits):
  # Nearest class mean on raw pixels separates digits well; mismatched support and query
  # labels would give chance (20%).
  result = data.evaluate_episodes(_nearest_prototype_accuracy, digits, 0, 50, num_ways=5,
                                  num_shots=5, num_queries=10)
  assert result.accuracies.shape == (50,)
  assert 0.85 < result.mean <= 1.0
  mean, ci95 = data.mean_confidence_interval(result.accuracies)
  assert (result.mean, result.ci95) == (mean, ci95)
  assert 0.0 < result.ci95 < 0.05
  again = data.evaluate_episodes(_nearest_prototype_accuracy, digits, 0, 50, num_ways=5,
                                 num_shots=5, num_queries=10)
  np.testing.assert_array_equal(again.accuracies, result.accuracies)
