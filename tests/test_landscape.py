"""Tests of the loss-landscape tools in fwdgrad/landscape.py."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import fwdgrad
from fwdgrad import landscape


def _params():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  return {"conv": {"kernel": jax.random.normal(k1, (3, 3, 4, 6)),
                   "bias": jax.random.normal(k2, (6,))},
          "dense": {"kernel": jax.random.normal(k3, (8, 5)), "bias": jnp.zeros(5)},
          "norm": {"scale": jax.random.normal(k4, (5,))}, "temperature": jnp.array(2.0)}


def _quadratic():
  a = jax.random.normal(jax.random.key(1), (6, 6))
  hessian = a @ a.T / 6 + jnp.eye(6)
  center = {"w": jnp.arange(6.0).reshape(2, 3) / 5, "b": jnp.array([0.5, -1.0])}
  loss = lambda p: 0.5 * p["w"].ravel() @ hessian @ p["w"].ravel() + jnp.sum(p["b"] ** 2)
  d1 = {"w": jnp.ones((2, 3)), "b": jnp.array([1.0, 0.0])}
  d2 = {"w": jnp.array([[1.0, -1.0, 0.0], [0.5, 0.0, -2.0]]), "b": jnp.array([0.0, 2.0])}
  return loss, center, (d1, d2)


def _norm(x, axis):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis))


def _planted_trajectory(num_points=12):
  """Points final + u_t e1 + v_t e2 on a known plane through the final point."""
  rng = np.random.default_rng(0)
  final = {"a": rng.normal(size=(4, 5)), "b": rng.normal(size=(3, 2, 2))}
  e1 = {"a": rng.normal(size=(4, 5)), "b": rng.normal(size=(3, 2, 2))}
  e2 = {"a": rng.normal(size=(4, 5)), "b": rng.normal(size=(3, 2, 2))}
  u = np.linspace(-3.0, 0.0, num_points) ** 2
  v = np.sin(np.linspace(0.0, 3.0, num_points)) * (1 - np.linspace(0, 1, num_points))
  points = [jax.tree.map(lambda f, x, y: (f + ui * x + vi * y).astype(np.float32), final, e1, e2)
            for ui, vi in zip(u, v)]
  return points, (e1, e2)


@pytest.mark.parametrize("ignore_bias_bn", [True, False])
def test_filter_normalize_matches_weight_filter_norms(ignore_bias_bn):
  params = _params()
  direction = fwdgrad.sample_direction(jax.random.key(2), params)
  d = landscape.filter_normalize(direction, params, ignore_bias_bn=ignore_bias_bn)
  for name, axes in (("conv", (0, 1, 2)), ("dense", (0,))):
    got = _norm(d[name]["kernel"], axis=axes)
    want = _norm(params[name]["kernel"], axis=axes)
    chex.assert_trees_all_close(got, want, rtol=1e-5)
    assert got.shape == (params[name]["kernel"].shape[-1],)
    # Direction within each filter is kept: the rescaled filter is parallel to the random one.
    cos = jnp.sum(d[name]["kernel"] * direction[name]["kernel"], axis=axes) / (
        got * _norm(direction[name]["kernel"], axis=axes))
    chex.assert_trees_all_close(cos, jnp.ones_like(cos), rtol=1e-5)
  small = {"conv_bias": (d["conv"]["bias"], params["conv"]["bias"]),
           "scale": (d["norm"]["scale"], params["norm"]["scale"]),
           "scalar": (d["temperature"], params["temperature"])}
  for got, weights in small.values():
    chex.assert_trees_all_close(got, jnp.zeros_like(weights) if ignore_bias_bn else weights,
                                atol=0.0)


def test_filter_axes_choose_the_output_units():
  w = {"q": jax.random.normal(jax.random.key(0), (6, 2, 3))}  # DenseGeneral (embed, heads, dim)
  d = landscape.filter_normalize(fwdgrad.sample_direction(jax.random.key(1), w), w,
                                 filter_axes=(-2, -1))
  chex.assert_trees_all_close(_norm(d["q"], axis=0), _norm(w["q"], axis=0),
                              rtol=1e-5)
  with pytest.raises(ValueError, match="filter_axes"):
    landscape.filter_normalize(w, w, filter_axes=5)


def test_random_directions_are_keyed_and_filter_normalized():
  params = _params()
  d1, d2 = landscape.random_directions(jax.random.key(3), params)
  again = landscape.random_directions(jax.random.key(3), params)
  chex.assert_trees_all_equal((d1, d2), again)
  assert not np.allclose(d1["dense"]["kernel"], d2["dense"]["kernel"])
  chex.assert_trees_all_close(_norm(d2["dense"]["kernel"], axis=0),
                              _norm(params["dense"]["kernel"], axis=0), rtol=1e-5)


def test_pca_recovers_a_planted_plane():
  points, (e1, e2) = _planted_trajectory()
  pca = landscape.pca_directions(points)
  chex.assert_trees_all_close(pca.explained_variance_ratio.sum(), 1.0, atol=1e-6)
  assert pca.explained_variance_ratio[0] >= pca.explained_variance_ratio[1] > 0.0
  chex.assert_trees_all_close(pca.center, points[-1], atol=0.0)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).astype(np.float64)
  basis = np.stack([flat(d) for d in pca.directions], -1)
  chex.assert_trees_all_close(basis.T @ basis, np.eye(2), atol=1e-6)
  # Both planted vectors lie in the recovered plane: their residual after projection is ~0.
  for e in (flat(e1), flat(e2)):
    residual = e - basis @ (basis.T @ e)
    assert np.linalg.norm(residual) < 1e-5 * np.linalg.norm(e)
  # The recorded points are reproduced exactly by their projected coordinates.
  coords = landscape.project_trajectory(points, pca.center, pca.directions)
  rebuilt = flat(pca.center) + coords @ basis.T
  chex.assert_trees_all_close(rebuilt, np.stack([flat(p) for p in points]), atol=1e-4)
  assert np.all(coords[0] <= 0.0)  # documented sign convention
  chex.assert_trees_all_close(coords[-1], np.zeros(2), atol=1e-12)


def test_pca_centred_variant_and_stacked_input():
  points, _ = _planted_trajectory()
  stacked = landscape.stack_trajectory(points)
  from_list = landscape.pca_directions(points, center=True)
  from_stack = landscape.pca_directions(stacked, center=True)
  chex.assert_trees_all_close(from_list.directions, from_stack.directions, atol=1e-6)
  chex.assert_trees_all_close(from_list.explained_variance_ratio.sum(), 1.0, atol=1e-6)


def test_centred_pca_matches_scikit_learn():
  """center=True is the reference implementation's sklearn PCA of the rows theta_t - theta_n."""
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  points = [{"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))} for _ in range(6)]
  pca = landscape.pca_directions(points, center=True, ignore_bias_bn=False)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  rows = np.stack([flat(p) - flat(points[-1]) for p in points])
  reference = PCA(n_components=2, svd_solver="full").fit(rows)
  chex.assert_trees_all_close(pca.explained_variance_ratio, reference.explained_variance_ratio_,
                              rtol=1e-10)
  for k in range(2):  # directions are stored in float32 (jax's default), hence the tolerance
    ours = flat(pca.directions[k]).astype(np.float64)
    chex.assert_trees_all_close(np.abs(ours @ reference.components_[k]), 1.0, rtol=1e-6)


def test_pca_ignores_biases_by_default():
  rng = np.random.default_rng(1)
  points = [{"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))} for _ in range(5)]
  pca = landscape.pca_directions(points)
  chex.assert_trees_all_close([d["bias"] for d in pca.directions], [np.zeros(4)] * 2, atol=0.0)
  kept = landscape.pca_directions(points, ignore_bias_bn=False)
  assert np.abs(kept.directions[0]["bias"]).max() > 0


def test_grid_equals_python_loop_on_a_quadratic():
  loss, center, directions = _quadratic()
  alphas, betas = landscape.grid_coordinates((-1.0, 2.0), (-0.5, 0.5), resolution=(7, 5))
  grid = landscape.evaluate_grid(loss, center, directions, alphas, betas, chunk_size=4)
  assert grid.shape == (7, 5)
  expected = np.array([[float(loss(jax.tree.map(lambda c, x, y: c + np.float32(a) * x
                                                 + np.float32(b) * y, center, *directions)))
                        for b in betas] for a in alphas])
  chex.assert_trees_all_close(grid, expected, rtol=1e-6)
  # Against the closed form in float64 as well (the loss is an exact quadratic in (a, b)).
  a = jax.random.normal(jax.random.key(1), (6, 6))
  hessian = np.asarray(a @ a.T / 6 + jnp.eye(6), np.float64)
  f = lambda p: 0.5 * p["w"].ravel() @ hessian @ p["w"].ravel() + np.sum(p["b"] ** 2)
  c64, (u, v) = jax.tree.map(lambda x: np.asarray(x, np.float64), (center, directions))
  closed = np.array([[f(jax.tree.map(lambda c, x, y: c + al * x + be * y, c64, u, v))
                      for be in betas] for al in alphas])
  chex.assert_trees_all_close(grid, closed, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_evaluation_equals_unchunked(chunk_size):
  params = _params()
  x = jax.random.normal(jax.random.key(5), (2, 6, 6, 4))

  def loss(p):
    h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h + p["conv"]["bias"]).mean(axis=(1, 2)) @ jnp.ones((6, 8))
    y = (h @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["norm"]["scale"]
    return jnp.mean(y ** 2) / p["temperature"]

  directions = landscape.random_directions(jax.random.key(0), params)
  alphas, betas = landscape.grid_coordinates(resolution=(5, 4))
  whole = landscape.evaluate_grid(loss, params, directions, alphas, betas, chunk_size=None)
  chunked = landscape.evaluate_grid(loss, params, directions, alphas, betas,
                                    chunk_size=chunk_size)
  chex.assert_trees_all_close(chunked, whole, rtol=1e-6)
  centre = landscape.evaluate_grid(loss, params, directions, [0.0], [0.0], chunk_size=chunk_size)
  chex.assert_trees_all_close(centre[0, 0], float(loss(params)), rtol=1e-6)


def test_projection_of_a_constructed_point_returns_its_coordinates():
  _, center, directions = _quadratic()  # non-orthogonal directions
  coefficients = np.array([[0.3, -1.2], [0.0, 0.0], [2.5, 0.7]])
  points = [jax.tree.map(lambda c, x, y: c + a * x + b * y, center, *directions)
            for a, b in coefficients]
  coords = landscape.project_trajectory(points, center, directions)
  chex.assert_trees_all_close(coords, coefficients, atol=1e-5)
  # An offset orthogonal to both directions does not move the coordinates.
  flat = [np.concatenate([np.ravel(d["b"]), np.ravel(d["w"])]) for d in directions]
  normal = np.linalg.svd(np.stack(flat))[2][-1]
  offset = {"b": normal[:2], "w": normal[2:].reshape(2, 3)}
  shifted = [jax.tree.map(lambda p, o: p + o, point, offset) for point in points]
  chex.assert_trees_all_close(landscape.project_trajectory(shifted, center, directions),
                              coefficients, atol=1e-5)


def test_png_and_npz_are_written_and_readable(tmp_path):
  loss, center, directions = _quadratic()
  alphas, betas = landscape.grid_coordinates(resolution=(9, 7))
  trajectory = [jax.tree.map(lambda c, x, y: c + a * x + b * y, center, *directions)
                for a, b in [(-0.8, 0.4), (-0.3, 0.1), (0.0, 0.0)]]
  surface = landscape.loss_surface(loss, center, directions, alphas, betas,
                                   trajectory=trajectory, method="random", chunk_size=8)
  npz = landscape.save_surface(tmp_path / "surface.npz", surface, run="FF 16w8a", steps=3)
  loaded, metadata = landscape.load_surface(npz)
  chex.assert_trees_all_close(loaded.losses, surface.losses, atol=0.0)
  chex.assert_trees_all_close(loaded.trajectory, surface.trajectory, atol=0.0)
  chex.assert_trees_all_close((loaded.alphas, loaded.betas), (alphas, betas), atol=0.0)
  assert loaded.method == "random" and loaded.explained_variance_ratio is None
  assert metadata == {"run": "FF 16w8a", "steps": 3}
  assert abs(loaded.direction_cosine - surface.direction_cosine) == 0.0

  png = landscape.plot_surface(surface, tmp_path / "surface.png", title="quadratic")
  diverged = surface.losses * 10
  diverged[0, :3] = [np.nan, np.inf, 1e30]  # a run that did not converge still plots
  for shared in (True, False):
    side = landscape.plot_surfaces({"BP": surface, "FF": loaded,
                                    "FF 8w8a": surface._replace(losses=diverged)},
                                   tmp_path / f"side_{shared}.png", shared_levels=shared,
                                   max_loss=float(surface.losses.max()) if shared else None)
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  single, wide = matplotlib.image.imread(png), matplotlib.image.imread(side)
  assert single.ndim == 3 and single.shape[0] > 100
  assert wide.shape[1] > 2 * single.shape[1]  # three panels side by side
  assert single[..., :3].std() > 0.05  # not a blank canvas


def test_bad_inputs_raise_clear_errors():
  loss, center, directions = _quadratic()
  with pytest.raises(ValueError, match="structure"):
    landscape.evaluate_grid(loss, center, (directions[0], {"w": directions[1]["w"]}), [0.0], [0.0])
  with pytest.raises(ValueError, match="shape"):
    landscape.filter_normalize({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, center)
  with pytest.raises(ValueError, match="trajectory\\[1\\]"):
    landscape.stack_trajectory([center, {"w": center["w"]}])
  with pytest.raises(ValueError, match="empty"):
    landscape.pca_directions([])
  with pytest.raises(ValueError, match="empty"):
    landscape.project_trajectory([], center, directions)
  with pytest.raises(ValueError, match="at least 3 trajectory points"):
    landscape.pca_directions([center, center])
  with pytest.raises(ValueError, match="fewer than two dimensions"):
    landscape.pca_directions([jax.tree.map(lambda c: c + t, center) for t in range(4)])
  step = jax.random.normal(jax.random.key(2), (50, 40)) * 1e-3  # a line, up to float32 rounding
  weights = jax.random.normal(jax.random.key(3), (50, 40))
  with pytest.raises(ValueError, match="fewer than two dimensions"):
    landscape.pca_directions([{"w": weights + t * step} for t in range(10)])
  for resolution in (1, (5, 1), 0):
    with pytest.raises(ValueError, match="at least 2 points"):
      landscape.grid_coordinates(resolution=resolution)
  with pytest.raises(ValueError, match="parallel"):
    landscape.project_trajectory([center], center, (directions[0], directions[0]))
  with pytest.raises(ValueError, match="scalar"):
    landscape.evaluate_grid(lambda p: p["w"], center, directions, [0.0], [0.0])
  with pytest.raises(ValueError, match="chunk_size"):
    landscape.evaluate_grid(loss, center, directions, [0.0], [0.0], chunk_size=0)
  with pytest.raises(ValueError, match="pair"):
    landscape.evaluate_grid(loss, center, directions[0], [0.0], [0.0])


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))


def test_end_to_end_forward_gradient_trajectory_on_digits(tmp_path):
  """A real model: an MLP on scikit-learn's bundled digits trained with sign-m-SPSA only."""
  digits = load_digits()
  images, labels = digits.data[:600].astype(np.float32) / 16.0, digits.target[:600]
  model = _MLP()
  params = model.init(jax.random.key(0), images[:1])

  def loss_fn(p):
    logits = model.apply(p, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  tx = optax.chain(fwdgrad.forward_gradient("spsa", key=jax.random.key(1), num_directions=4,
                                            sign=True), optax.adam(1e-2))

  def step(carry, _):
    p, state = carry
    updates, state = tx.update(p, state, p, value_fn=loss_fn)
    p = optax.apply_updates(p, updates)
    return (p, state), p

  record_every, steps = 10, 200
  run = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))
  (final, _), path = run((params, tx.init(params)))
  trajectory = jax.tree.map(lambda init, p: jnp.concatenate([init[None], p[record_every - 1::
                                                                           record_every]]),
                            params, path)
  assert float(loss_fn(final)) < 0.8 * float(loss_fn(params))  # it trained

  pca = landscape.pca_directions(trajectory)
  chex.assert_trees_all_close(pca.center, final, atol=0.0)
  coords = landscape.project_trajectory(trajectory, pca.center, pca.directions)
  alphas, betas = landscape.grid_coordinates(*landscape.fit_ranges(coords), resolution=(11, 9))
  assert alphas[0] < coords[:, 0].min() and coords[:, 0].max() < alphas[-1]
  assert betas[0] < coords[:, 1].min() and coords[:, 1].max() < betas[-1]
  surface = landscape.loss_surface(loss_fn, pca.center, pca.directions, alphas, betas,
                                   trajectory=trajectory, method="pca", chunk_size=16,
                                   explained_variance_ratio=pca.explained_variance_ratio)
  scale = np.abs(coords).max()
  assert np.abs(surface.trajectory[-1]).max() < 1e-6 * scale
  assert 0.5 < surface.explained_variance_ratio.sum() <= 1.0 + 1e-9
  at_center = landscape.evaluate_grid(loss_fn, pca.center, pca.directions, [0.0], [0.0])
  chex.assert_trees_all_close(at_center[0, 0], float(loss_fn(final)), rtol=1e-6)
  # The start of training lies uphill of the end on the drawn surface.
  nearest = lambda point: (np.abs(alphas - point[0]).argmin(), np.abs(betas - point[1]).argmin())
  assert surface.losses[nearest(coords[0])] > surface.losses[nearest(coords[-1])] + 0.3
  png = landscape.plot_surface(surface, tmp_path / "digits.png", title="FF (sign-m-SPSA)")
  npz = landscape.save_surface(tmp_path / "digits.npz", surface, steps=steps)
  assert (tmp_path / "digits.png").stat().st_size > 10_000 and png.endswith(".png")
  assert landscape.load_surface(npz)[0].losses.shape == (11, 9)
