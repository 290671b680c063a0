"""Tests of the adaptation modes and the trainable/frozen partition in fwdgrad/adapt.py."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fwdgrad
from fwdgrad import adapt


class TinyPromptedNet(nn.Module):
  """A prompt vector, a dense body, a LayerNorm and a LinearHead named "head"."""
  num_classes: int = 3
  head_layers: int = 1
  use_prompt: bool = True

  @nn.compact
  def __call__(self, x):
    if self.use_prompt:
      x = x + self.param("prompt", nn.initializers.normal(1.0), (x.shape[-1],))
    x = nn.relu(nn.Dense(16, name="body")(x))
    x = nn.LayerNorm(name="norm")(x)
    return adapt.LinearHead(self.num_classes, num_layers=self.head_layers, hidden=8,
                            name="head")(x)


def _setup(head_layers=1, use_prompt=True, seed=0):
  model = TinyPromptedNet(head_layers=head_layers, use_prompt=use_prompt)
  key_init, key_x, key_y = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(key_x, (32, 6))
  y = jax.random.randint(key_y, (32,), 0, 3)
  params = jax.jit(model.init)(key_init, x)["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return params, loss_fn


def _names(tree):
  return sorted(adapt.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def _exact(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_close(a, b, atol=0, rtol=0)


SELECTIONS = [
    dict(mode="ft"),
    dict(mode="lp1"),
    dict(mode="dvpt"),
    dict(mode="dvpt", train_head=False),
    dict(mode="custom", pattern=r"^body/"),
    dict(mode="ft", sparsity=0.9, sparse_method="topk"),
    dict(mode="ft", sparsity=0.9, sparse_method="random", key=jax.random.key(3)),
    dict(mode="ft", sparsity=0.9, sparse_method="threshold"),
    dict(mode="dvpt", sparsity=0.5, sparse_method="topk"),
]


@pytest.mark.parametrize("kwargs", SELECTIONS)
def test_partition_merge_round_trip_is_exact(kwargs):
  params, _ = _setup()
  trainable, frozen = adapt.partition(params, adapt.select_trainable(params, **kwargs))
  _exact(adapt.merge(trainable, frozen), params)
  _exact(jax.jit(adapt.merge)(trainable, frozen), params)


def test_modes_select_the_right_leaves():
  params, _ = _setup()
  all_names = _names(params)
  head = [n for n in all_names if n.startswith("head/")]
  assert head == ["head/dense_0/bias", "head/dense_0/kernel"]
  cases = {
      "ft": all_names,
      "lp1": head,
      "dvpt": sorted(["prompt"] + head),
  }
  for mode, expected in cases.items():
    trainable, frozen = adapt.partition(params, adapt.select_trainable(params, mode))
    assert _names(trainable) == expected, mode
    assert sorted(_names(frozen) + _names(trainable)) == all_names, mode
  trainable, _ = adapt.partition(params, adapt.select_trainable(params, "dvpt", train_head=False))
  assert _names(trainable) == ["prompt"]
  trainable, _ = adapt.partition(params, adapt.select_trainable(params, "custom",
                                                                pattern=r"norm|prompt"))
  assert _names(trainable) == ["norm/bias", "norm/scale", "prompt"]


def test_lp3_trains_a_three_layer_head():
  params, _ = _setup(head_layers=3)
  trainable, _ = adapt.partition(params, adapt.select_trainable(params, "lp3"))
  assert _names(trainable) == sorted(f"head/dense_{i}/{p}" for i in range(3)
                                     for p in ("bias", "kernel"))
  assert trainable["head"]["dense_0"]["kernel"].shape == (16, 8)
  assert trainable["head"]["dense_2"]["kernel"].shape == (8, 3)
  assert adapt.head_num_layers("lp3") == 3 and adapt.head_num_layers("lp1") == 1
  with pytest.raises(ValueError, match="3-layer head"):
    adapt.select_trainable(_setup(head_layers=1)[0], "lp3")
  with pytest.raises(ValueError, match="1-layer head"):
    adapt.select_trainable(params, "lp1")


@pytest.mark.parametrize("estimator", ["jvp", "spsa"])
def test_estimators_see_only_the_trainable_part(estimator):
  params, loss_fn = _setup()
  trainable, frozen = adapt.partition(params, adapt.select_trainable(params, "dvpt"))
  value_fn = adapt.bind_frozen(loss_fn, frozen)
  estimate = jax.jit(fwdgrad.jvp_grad if estimator == "jvp" else fwdgrad.spsa_grad,
                     static_argnames=("value_fn", "num_directions"))
  loss, grads = estimate(value_fn=value_fn, params=trainable, key=jax.random.key(1),
                         num_directions=2)
  chex.assert_trees_all_equal_structs(grads, trainable)
  assert _names(grads) == ["head/dense_0/bias", "head/dense_0/kernel", "prompt"]
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(grads))
  np.testing.assert_allclose(loss, loss_fn(params), rtol=1e-4)


def test_frozen_weights_are_not_perturbed():
  # The objective depends on frozen weights only; were they perturbed, SPSA would see a change.
  params, _ = _setup()
  trainable, frozen = adapt.partition(params, adapt.select_trainable(params, "lp1"))
  value_fn = adapt.bind_frozen(lambda p: jnp.sum(p["body"]["kernel"] ** 2), frozen)
  _, grads = fwdgrad.spsa_grad(value_fn, trainable, jax.random.key(0), num_directions=3,
                               epsilon=1e-1)
  for g in jax.tree_util.tree_leaves(grads):
    np.testing.assert_array_equal(g, np.zeros_like(g))


@pytest.mark.parametrize("kwargs", [dict(mode="lp1"),
                                    dict(mode="ft", sparsity=0.9, sparse_method="topk")])
def test_optax_step_changes_only_trainable_params(kwargs):
  params, loss_fn = _setup()
  selection = adapt.select_trainable(params, **kwargs)
  trainable, frozen = adapt.partition(params, selection)
  tx = optax.chain(fwdgrad.forward_gradient("jvp", key=jax.random.key(0), num_directions=2),
                   optax.sgd(0.1))
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state, frozen):
    value_fn = adapt.bind_frozen(loss_fn, frozen)
    updates, state = tx.update(trainable, state, trainable, value_fn=value_fn)
    return optax.apply_updates(trainable, updates), state

  for _ in range(3):
    trainable, state = step(trainable, state, frozen)
  new_params = adapt.merge(trainable, frozen)
  flat_old = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_new = jax.tree_util.tree_leaves(new_params)
  selections = jax.tree_util.tree_structure(params).flatten_up_to(selection)
  for (path, old), new, chosen in zip(flat_old, flat_new, selections):
    old, new = np.asarray(old).ravel(), np.asarray(new).ravel()
    changed = np.flatnonzero(old != new)
    if chosen is False:
      assert changed.size == 0, adapt.path_name(path)
    elif chosen is True:
      assert changed.size == old.size, adapt.path_name(path)
    else:
      np.testing.assert_array_equal(changed, np.asarray(chosen))


def test_sparse_gradient_is_the_full_gradient_at_the_selected_entries():
  params, loss_fn = _setup()
  selection = adapt.select_trainable(params, "ft", sparsity=0.8, sparse_method="random",
                                     key=jax.random.key(5))
  trainable, frozen = adapt.partition(params, selection)
  sparse_grads = jax.jit(jax.grad(adapt.bind_frozen(loss_fn, frozen)))(trainable)
  full_grads = jax.jit(jax.grad(loss_fn))(params)
  expected = jax.tree_util.tree_map(lambda g, i: jnp.ravel(g)[i], full_grads, selection)
  chex.assert_trees_all_close(sparse_grads, expected, atol=1e-7, rtol=1e-6)
  # And the directional derivative along a trainable direction is vdot(grad, v).
  v = fwdgrad.sample_direction(jax.random.key(6), trainable)
  _, slope = jax.jit(lambda t, v: jax.jvp(adapt.bind_frozen(loss_fn, frozen), (t,), (v,)))(
      trainable, v)
  dot = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(sparse_grads),
                                           jax.tree_util.tree_leaves(v)))
  np.testing.assert_allclose(slope, dot, rtol=1e-5, atol=1e-7)


def test_topk_keeps_the_largest_magnitudes():
  params, _ = _setup()
  selection = adapt.sparse_selection(params, adapt.mode_mask(params, "ft"), sparsity=0.9)
  for leaf, indices in zip(jax.tree_util.tree_leaves(params),
                           jax.tree_util.tree_leaves(selection)):
    magnitude = np.abs(np.asarray(leaf)).ravel()
    k = max(1, round(0.1 * magnitude.size))
    assert indices.shape == (k,) and indices.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(indices), np.sort(np.argsort(-magnitude)[:k]))
  trainable, _ = adapt.partition(params, selection)
  total = adapt.count_parameters(params)
  assert adapt.count_parameters(trainable) == sum(
      max(1, round(0.1 * np.size(leaf))) for leaf in jax.tree_util.tree_leaves(params))
  assert adapt.count_parameters(trainable) < 0.15 * total


def test_random_mask_is_reproducible_and_has_the_right_count():
  params, _ = _setup()
  mask = adapt.mode_mask(params, "ft")

  def draw(seed):
    return adapt.sparse_selection(params, mask, sparsity=0.75, method="random",
                                  key=jax.random.key(seed))

  first, again, other = draw(0), draw(0), draw(1)
  _exact(first, again)
  kernel_first = np.asarray(first["body"]["kernel"])
  assert kernel_first.size == round(0.25 * 6 * 16)
  assert np.all(np.diff(kernel_first) > 0)  # sorted and unique
  assert not np.array_equal(kernel_first, np.asarray(other["body"]["kernel"]))


def test_threshold_semantics():
  params = {"a": jnp.array([[0.1, -0.5], [0.3, 0.9]]), "b": jnp.array([0.2, -0.3, 0.05]),
            "c": jnp.array([0.01, -0.02])}
  mask = {"a": True, "b": True, "c": False}
  selection = adapt.sparse_selection(params, mask, method="threshold", threshold=0.3)
  # Strictly above the threshold: 0.3 itself stays frozen; a leaf with no entry is frozen.
  np.testing.assert_array_equal(selection["a"], [1, 3])
  assert selection["b"] is False and selection["c"] is False
  trainable, _ = adapt.partition(params, selection)
  np.testing.assert_array_equal(trainable["a"], np.float32([-0.5, 0.9]))
  # Without a threshold: one global cut freezing the fraction `sparsity` of the masked entries.
  selection = adapt.sparse_selection(params, mask, sparsity=5 / 7, method="threshold")
  np.testing.assert_array_equal(selection["a"], [1, 3])
  assert selection["b"] is False


def test_partition_accepts_boolean_mask_arrays():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2)}
  selection = {"w": np.array([[True, False, True], [False, False, True]]), "b": False}
  trainable, frozen = adapt.partition(params, selection)
  np.testing.assert_array_equal(trainable["w"], [0.0, 2.0, 5.0])
  assert trainable["b"] is None
  merged = adapt.merge({"w": jnp.array([10.0, 20.0, 30.0]), "b": None}, frozen)
  np.testing.assert_array_equal(merged["w"], [[10.0, 1.0, 20.0], [3.0, 4.0, 30.0]])
  np.testing.assert_array_equal(merged["b"], params["b"])


def test_linear_head():
  x = jnp.ones((4, 10))
  head = adapt.LinearHead(num_classes=5, num_layers=3, hidden=7)
  variables = head.init(jax.random.key(0), x)
  assert head.apply(variables, x).shape == (4, 5)
  shapes = jax.tree_util.tree_map(jnp.shape, variables["params"])
  assert shapes["dense_0"]["kernel"] == (10, 7) and shapes["dense_2"]["kernel"] == (7, 5)
  linear = adapt.LinearHead(num_classes=5)
  assert list(linear.init(jax.random.key(0), x)["params"]) == ["dense_0"]
  with pytest.raises(ValueError, match="num_layers"):
    adapt.LinearHead(num_classes=5, num_layers=0).init(jax.random.key(0), x)


def test_errors():
  params, _ = _setup()
  with pytest.raises(ValueError, match="unknown adaptation mode"):
    adapt.select_trainable(params, "bitfit")
  for sparsity in (1.0, -0.1, True, "0.9"):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
      adapt.select_trainable(params, "ft", sparsity=sparsity)
  with pytest.raises(ValueError, match="needs key"):
    adapt.select_trainable(params, "ft", sparsity=0.9, sparse_method="random")
  with pytest.raises(ValueError, match="unknown sparse method"):
    adapt.select_trainable(params, "ft", sparsity=0.9, sparse_method="magnitude")
  with pytest.raises(ValueError, match='only used by method="threshold"'):
    adapt.select_trainable(params, "ft", threshold=0.1)
  with pytest.raises(ValueError, match="kept no entry"):
    adapt.select_trainable(params, "ft", sparse_method="threshold", threshold=1e9)
  with pytest.raises(ValueError, match="contains 'prompt'"):
    adapt.select_trainable(_setup(use_prompt=False)[0], "dvpt")
  with pytest.raises(ValueError, match="selects nothing"):
    adapt.select_trainable(params, "custom", pattern="no_such_layer")
  with pytest.raises(ValueError, match="selects nothing"):
    adapt.select_trainable(params, "lp1", head="classifier")
  with pytest.raises(ValueError, match="pattern="):
    adapt.select_trainable(params, "ft", pattern="body")
  with pytest.raises(ValueError, match="regular expression"):
    adapt.path_mask(params, "(")
  with pytest.raises(ValueError, match="trains nothing"):
    adapt.partition(params, jax.tree_util.tree_map(lambda _: False, params))
  with pytest.raises(ValueError, match="structure of params"):
    adapt.partition(params, {"body": True})
  trainable, frozen = adapt.partition(params, adapt.select_trainable(params, "lp1"))
  other, _ = adapt.partition(params, adapt.select_trainable(params, "dvpt"))
  with pytest.raises(ValueError, match="same partition"):
    adapt.merge(other, frozen)
  with pytest.raises(ValueError, match="same partition"):
    adapt.merge({"head": trainable["head"]}, frozen)


def _get_model(name, **kwargs):
  try:
    from fwdgrad import models  # pylint: disable=import-outside-toplevel
    return models.get_model(name, **kwargs)
  except (ImportError, AttributeError, KeyError, ValueError, TypeError) as error:
    pytest.skip(f"fwdgrad.models.get_model({name!r}) is not available: {error}")


def _random_params(model, inputs):
  """Parameters shaped by ``model.init`` without compiling it (values from a local numpy seed)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def test_modes_on_the_library_backbones():
  params = _random_params(_get_model("conv4", num_classes=5), jnp.zeros((1, 28, 28, 1)))
  for mode in ("ft", "lp1"):
    selection = adapt.select_trainable(params, mode, sparsity=0.9 if mode == "ft" else 0.0)
    trainable, frozen = adapt.partition(params, selection)
    _exact(adapt.merge(trainable, frozen), params)
    assert 0 < adapt.count_parameters(trainable) < adapt.count_parameters(params)
  vit = _get_model("vit_tiny", num_classes=5, image_size=16, patch_size=8, width=16, depth=2,
                   num_heads=2, mlp_features=32, num_prompts=3)
  params = _random_params(vit, jnp.zeros((1, 16, 16, 3)))
  trainable, frozen = adapt.partition(params, adapt.select_trainable(params, "dvpt"))
  names = _names(trainable)
  assert any("prompt" in n for n in names)
  assert all("prompt" in n or n.startswith("head/") for n in names), names
  _exact(adapt.merge(trainable, frozen), params)


class _Features(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.relu(nn.Dense(12, name="body")(x))


def test_probed_model_puts_a_deep_head_on_a_backbone():
  model = adapt.ProbedModel(_Features(), adapt.LinearHead(4, num_layers=3, hidden=6))
  x = jnp.ones((2, 5))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  assert model.apply({"params": params}, x, train=True).shape == (2, 4)
  trainable, frozen = adapt.partition(params, adapt.select_trainable(params, "lp3"))
  assert _names(trainable) == sorted(f"head/dense_{i}/{p}" for i in range(3)
                                     for p in ("bias", "kernel"))
  assert _names(frozen) == ["backbone/body/bias", "backbone/body/kernel"]
