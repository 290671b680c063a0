"""Tests of the ProtoNets and SimpleShot heads in fwdgrad/fewshot.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fwdgrad
from fwdgrad import adapt
from fwdgrad import fewshot


def _episode(seed=0, ways=5, shots=5, queries=15, dim=16, spread=0.3):
  """Classes around well-separated random centres (offset so the features are not centred)."""
  key_centres, key_support, key_query = jax.random.split(jax.random.key(seed), 3)
  centres = 4.0 * jax.random.normal(key_centres, (ways, dim)) + 3.0
  support_y = jnp.repeat(jnp.arange(ways), shots)
  query_y = jnp.tile(jnp.arange(ways), queries)
  support = centres[support_y] + spread * jax.random.normal(key_support, (ways * shots, dim))
  query = centres[query_y] + spread * jax.random.normal(key_query, (ways * queries, dim))
  return support, support_y, query, query_y


def test_prototypes_are_class_means():
  support = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
  labels = jnp.array([0, 0, 1, 2])
  protos = fewshot.prototypes(support, labels, 4)
  # Class 3 has no support example and gets a zero prototype.
  np.testing.assert_allclose(protos, [[1.0, 0.0], [0.0, 4.0], [1.0, 1.0], [0.0, 0.0]])
  # Trailing axes of features are flattened.
  np.testing.assert_allclose(fewshot.prototypes(support.reshape(4, 1, 2), labels, 4), protos)


def test_protonet_logits_match_a_hand_computation():
  query = jnp.array([[1.0, 1.0], [3.0, -1.0]])
  protos = jnp.array([[1.0, 0.0], [0.0, 4.0]])
  # ||(1,1)-(1,0)||^2 = 1, ||(1,1)-(0,4)||^2 = 1+9 = 10, ||(3,-1)-(1,0)||^2 = 5,
  # ||(3,-1)-(0,4)||^2 = 9+25 = 34.
  np.testing.assert_allclose(fewshot.protonet_logits(query, protos), [[-1.0, -10.0], [-5.0, -34.0]])


def _simpleshot_by_hand(query, support, labels, num_classes, mean):
  query, support = np.asarray(query, np.float64), np.asarray(support, np.float64)
  normalize = lambda x: (x - mean) / np.linalg.norm(x - mean, axis=1, keepdims=True)
  q, s = normalize(query), normalize(support)
  centroids = np.stack([s[np.asarray(labels) == k].mean(0) for k in range(num_classes)])
  return -((q[:, None, :] - centroids[None]) ** 2).sum(-1)


def test_simpleshot_logits_match_a_hand_computation():
  support, support_y, query, _ = _episode(seed=1, ways=3, shots=2, queries=2, dim=4, spread=1.0)
  support_mean = np.asarray(support, np.float64).mean(0)
  np.testing.assert_allclose(
      fewshot.simpleshot_logits(query, support, support_y, 3),
      _simpleshot_by_hand(query, support, support_y, 3, support_mean), rtol=1e-5, atol=1e-5)
  base_mean = np.array([1.0, -2.0, 0.5, 3.0])
  np.testing.assert_allclose(
      fewshot.simpleshot_logits(query, support, support_y, 3, mean=jnp.asarray(base_mean)),
      _simpleshot_by_hand(query, support, support_y, 3, base_mean), rtol=1e-5, atol=1e-5)
  normalized = fewshot.center_and_normalize(query, jnp.asarray(base_mean, jnp.float32))
  np.testing.assert_allclose(jnp.linalg.norm(normalized, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("method,mean", [("protonet", None), ("simpleshot", None),
                                         ("simpleshot", "base")])
def test_separable_episode_is_solved(method, mean):
  support, support_y, query, query_y = _episode()
  if mean == "base":
    mean = fewshot.feature_mean(jnp.concatenate([support, query]))

  @jax.jit
  def evaluate(support, query, mean):
    return (fewshot.episode_accuracy(support, support_y, query, query_y, 5, method=method,
                                     mean=mean),
            fewshot.episode_predictions(support, support_y, query, 5, method=method, mean=mean),
            fewshot.episode_loss(support, support_y, query, query_y, 5, method=method, mean=mean,
                                 scale=10.0))

  accuracy, predictions, loss = evaluate(support, query, mean)
  assert float(accuracy) == 1.0
  np.testing.assert_array_equal(predictions, query_y)
  assert float(loss) < 0.1


def test_accuracy_counts_mistakes():
  support, support_y, query, query_y = _episode()
  wrong = (query_y + 1) % 5
  assert float(fewshot.episode_accuracy(support, support_y, query, wrong, 5)) == 0.0
  half = jnp.where(jnp.arange(query_y.size) % 2 == 0, query_y, wrong)
  np.testing.assert_allclose(fewshot.episode_accuracy(support, support_y, query, half, 5),
                             np.mean(np.arange(query_y.size) % 2 == 0))


def test_loss_is_the_cross_entropy_of_the_logits():
  support, support_y, query, query_y = _episode(spread=3.0)
  logits = fewshot.episode_logits(support, support_y, query, 5, method="simpleshot", scale=2.0)
  logits64 = np.asarray(logits, np.float64)
  log_probs = logits64 - np.log(np.exp(logits64 - logits64.max(1, keepdims=True)).sum(1,
                                keepdims=True)) - logits64.max(1, keepdims=True)
  expected = -np.mean(log_probs[np.arange(query_y.size), np.asarray(query_y)])
  np.testing.assert_allclose(
      fewshot.episode_loss(support, support_y, query, query_y, 5, method="simpleshot", scale=2.0),
      expected, rtol=1e-5)


@pytest.mark.parametrize("method", fewshot.METHODS)
def test_jvp_through_the_loss_matches_vdot_grad(method):
  support, support_y, query, query_y = _episode(spread=3.0, dim=8)
  loss = lambda s, q: fewshot.episode_loss(s, support_y, q, query_y, 5, method=method)
  key_s, key_q = jax.random.split(jax.random.key(2))
  v_s, v_q = jax.random.normal(key_s, support.shape), jax.random.normal(key_q, query.shape)
  value, slope = jax.jit(lambda p, t: jax.jvp(loss, p, t))((support, query), (v_s, v_q))
  grad_s, grad_q = jax.jit(jax.grad(loss, argnums=(0, 1)))(support, query)
  np.testing.assert_allclose(value, loss(support, query), rtol=1e-6)
  np.testing.assert_allclose(slope, jnp.vdot(grad_s, v_s) + jnp.vdot(grad_q, v_q),
                             rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(slope)) > 1e-3


def test_forward_gradient_adaptation_lowers_the_episode_loss():
  # A frozen random projection followed by a trainable linear map, adapted on the episode loss
  # with jvp forward gradients through a partition (the head alone is trained).
  support, support_y, query, query_y = _episode(spread=4.0, dim=8)
  key_frozen, key_head = jax.random.split(jax.random.key(3))
  params = {"body": jax.random.normal(key_frozen, (8, 8)) / 3.0,
            "head": jnp.eye(8) + 0.1 * jax.random.normal(key_head, (8, 8))}

  def loss_fn(p):
    features = lambda x: jnp.tanh(x @ p["body"]) @ p["head"]
    return fewshot.episode_loss(features(support), support_y, features(query), query_y, 5)

  trainable, frozen = adapt.partition(params, adapt.select_trainable(params, "lp1"))
  value_fn = jax.jit(adapt.bind_frozen(loss_fn, frozen))
  initial = float(value_fn(trainable))

  @jax.jit
  def step(trainable, key):
    _, grads = fwdgrad.jvp_grad(value_fn, trainable, key, num_directions=16)
    return jax.tree_util.tree_map(lambda w, g: w - 0.05 * g, trainable, grads)

  for t in range(30):
    trainable = step(trainable, jax.random.fold_in(jax.random.key(4), t))
  assert float(value_fn(trainable)) < 0.8 * initial
  chex.assert_trees_all_close(adapt.merge(trainable, frozen)["body"], params["body"], atol=0,
                              rtol=0)


def test_scale_does_not_change_predictions():
  support, support_y, query, _ = _episode(spread=3.0)
  one = fewshot.episode_logits(support, support_y, query, 5, scale=1.0)
  ten = fewshot.episode_logits(support, support_y, query, 5, scale=10.0)
  np.testing.assert_allclose(ten, 10.0 * one, rtol=1e-6)
  np.testing.assert_array_equal(jnp.argmax(one, 1), jnp.argmax(ten, 1))


def test_errors():
  support, support_y, query, query_y = _episode()
  with pytest.raises(ValueError, match="unknown few-shot method"):
    fewshot.episode_loss(support, support_y, query, query_y, 5, method="matchingnet")
  with pytest.raises(ValueError, match="num_classes"):
    fewshot.prototypes(support, support_y, 0)
  with pytest.raises(ValueError, match="one integer label per example"):
    fewshot.prototypes(support, support_y[:-1], 5)
  with pytest.raises(ValueError, match="integer class indices"):
    fewshot.prototypes(support, support_y.astype(jnp.float32), 5)
  with pytest.raises(ValueError, match="query_labels"):
    fewshot.episode_loss(support, support_y, query, query_y[:3], 5)
  with pytest.raises(ValueError, match="simpleshot"):
    fewshot.episode_logits(support, support_y, query, 5, mean=jnp.zeros(16))
  with pytest.raises(ValueError, match="mean must have shape"):
    fewshot.simpleshot_logits(query, support, support_y, 5, mean=jnp.zeros(3))
  with pytest.raises(ValueError, match="protos must be"):
    fewshot.protonet_logits(query, jnp.zeros((5, 3)))
  with pytest.raises(ValueError, match="features"):
    fewshot.prototypes(jnp.zeros(5), support_y[:5], 5)
