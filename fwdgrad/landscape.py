"""Two-dimensional loss landscapes around a point, with the training trajectory on them.

The loss is evaluated on the plane through a centre :math:`\\theta^*` spanned by two directions,

.. math::

   f(\\alpha, \\beta) = L(\\theta^* + \\alpha\\, \\delta + \\beta\\, \\eta),

with the directions either filter-normalized random directions (:func:`random_directions`) or the
two leading principal components of a recorded trajectory (:func:`pca_directions`). The grid is
evaluated by :func:`evaluate_grid` (``vmap`` over a chunk of grid points inside ``lax.map`` over
chunks, so memory stays bounded), the trajectory is placed on the plane by
:func:`project_trajectory`, and :func:`plot_surface` / :func:`plot_surfaces` / :func:`save_surface`
(defined in :mod:`fwdgrad.landscape_plot`, re-exported here) write the results.

Filters in Flax layouts. Li et al. rescale every *filter* of a random direction to the norm of the
matching filter of the weights; a filter is one output unit. Flax puts the output units on the
last axis: ``nn.Dense`` kernels are ``(in, out)`` and ``nn.Conv`` kernels ``(h, w, in, out)`` (also
:class:`fwdgrad.models.layers.QDense` / ``QConv`` and the fused attention ``qkv`` kernel
``(width, 3 * width)``), so by default a filter is the slice ``kernel[..., j]`` and its norm is
taken over all the other axes. ``filter_axes`` changes this per leaf, e.g. ``(-2, -1)`` for an
``nn.DenseGeneral`` query kernel ``(embed, heads, head_dim)`` whose output units are
``(head, dim)`` pairs. Leaves with at most one dimension (biases, BatchNorm/LayerNorm scales and
offsets, running statistics) get a zero direction ("ignore biasbn", ``ignore_bias_bn=True``) or,
with ``ignore_bias_bn=False``, a copy of the weights, as in the reference implementation.

References:
  Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018.
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024 (the landscape comparison of BP,
  FF, FF 16w8a and FF 8w8a).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad import estimators

PyTree = Any
FilterAxes = Union[int, Sequence[int], Callable[[Tuple, jax.Array], Union[int, Sequence[int]]]]

FILTER_NORM_EPSILON = 1e-10  # Li et al.'s guard against a zero-norm random filter.


class PCADirections(NamedTuple):
  """The plane of a trajectory's two leading principal components.

  Attributes:
    center: the final point of the trajectory (the plane's origin).
    directions: ``(d1, d2)``, orthonormal pytrees shaped like ``center``.
    explained_variance_ratio: ``(2,)`` float64, the share of the trajectory's variance along each.
  """
  center: PyTree
  directions: Tuple[PyTree, PyTree]
  explained_variance_ratio: np.ndarray


class LossSurface(NamedTuple):
  """A loss grid and what is needed to read it.

  Attributes:
    alphas: ``(na,)`` coordinates along the first direction.
    betas: ``(nb,)`` coordinates along the second direction.
    losses: ``(na, nb)``; ``losses[i, j] = L(center + alphas[i] d1 + betas[j] d2)`` ("ij" indexing).
    trajectory: ``(T, 2)`` coordinates of the recorded points on the plane, or ``None``.
    method: how the directions were made, e.g. ``"random"`` or ``"pca"``.
    explained_variance_ratio: ``(2,)`` for PCA directions, ``None`` otherwise.
    direction_norms: ``(2,)`` Euclidean norms of ``d1`` and ``d2``.
    direction_cosine: cosine of the angle between ``d1`` and ``d2``.
  """
  alphas: np.ndarray
  betas: np.ndarray
  losses: np.ndarray
  trajectory: Optional[np.ndarray]
  method: str
  explained_variance_ratio: Optional[np.ndarray]
  direction_norms: np.ndarray
  direction_cosine: float


def _check_same_structure(reference: PyTree, other: PyTree, name: str, reference_name: str,
                          leading: int = 0) -> None:
  """Raises a ValueError unless ``other`` has the structure and leaf shapes of ``reference``."""
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
  leaves, treedef = jax.tree_util.tree_flatten(other)
  if treedef != ref_def:
    raise ValueError(
        f"{name} does not have the pytree structure of {reference_name}: got {treedef}, expected "
        f"{ref_def}. Build both from the same model's parameters (e.g. the same "
        "model.init(...) output).")
  for (path, ref), leaf in zip(ref_leaves, leaves):
    if tuple(np.shape(leaf))[leading:] != tuple(np.shape(ref)):
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} has shape {tuple(np.shape(leaf))[leading:]} but "
          f"{reference_name} has {tuple(np.shape(ref))} there; pass parameters of the same model.")


def _check_float(params: PyTree, name: str) -> None:
  estimators.check_float_leaves(
      params, name, empty="there is no plane to draw",
      why="only floating-point leaves can be moved along a direction", fn="loss_fn")


def _resolve_filter_axes(filter_axes: FilterAxes, path, leaf) -> Tuple[int, ...]:
  axes = filter_axes(path, leaf) if callable(filter_axes) else filter_axes
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  ndim = np.ndim(leaf)
  if not axes or any(not -ndim <= a < ndim for a in axes):
    raise ValueError(
        f"filter_axes {axes} do not fit parameter {jax.tree_util.keystr(path)} of shape "
        f"{np.shape(leaf)}; give the output-unit axes (the last axis for Flax Dense/Conv kernels).")
  return tuple(sorted({a % ndim for a in axes}))


def filter_normalize(direction: PyTree, params: PyTree, *, ignore_bias_bn: bool = True,
                     filter_axes: FilterAxes = -1) -> PyTree:
  """Rescales every filter of ``direction`` to the norm of the same filter of ``params``.

  .. math::

     d_{i,j} \\leftarrow \\frac{d_{i,j}}{\\lVert d_{i,j} \\rVert + 10^{-10}}\\,
     \\lVert \\theta_{i,j} \\rVert

  for filter ``j`` of layer ``i`` (the slice at index ``j`` of ``filter_axes``, norms over the other
  axes). Leaves with ``ndim <= 1`` become zero (``ignore_bias_bn=True``) or a copy of ``params``.

  Args:
    direction: pytree like ``params``.
    params: the weights the plane is centred on.
    ignore_bias_bn: zero the direction on biases and normalization parameters (Li et al.'s
      ``biasbn`` choice), otherwise copy the weights there.
    filter_axes: the axes indexing filters, an int, a tuple, or ``fn(path, leaf)`` returning either
      for each leaf with ``ndim >= 2``. Default ``-1``: output units of Flax ``Dense``/``Conv``.

  Returns:
    A pytree like ``params``, in the dtypes of ``params``.

  Examples:
    >>> d = filter_normalize(fwdgrad.sample_direction(key, params), params)
  """
  _check_same_structure(params, direction, "direction", "params")
  _check_float(params, "params")

  def normalize(path, d, w):
    if np.ndim(w) <= 1:
      return jnp.zeros_like(w) if ignore_bias_bn else jnp.asarray(w)
    axes = _resolve_filter_axes(filter_axes, path, w)
    norm_axes = tuple(a for a in range(np.ndim(w)) if a not in axes)
    d = jnp.asarray(d, jnp.result_type(w))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=norm_axes, keepdims=True))
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=norm_axes, keepdims=True))
    return d * (w_norm / (d_norm + FILTER_NORM_EPSILON))

  return jax.tree_util.tree_map_with_path(normalize, direction, params)


def random_directions(key: jax.Array, params: PyTree, *, ignore_bias_bn: bool = True,
                      filter_axes: FilterAxes = -1,
                      distribution: Union[str, estimators.Sampler] = "gaussian"
                      ) -> Tuple[PyTree, PyTree]:
  """Two filter-normalized random directions around ``params`` (Li et al. 2018, Sec. 4).

  Args:
    key: PRNG key; direction ``i`` is drawn from ``fold_in(key, i)``.
    params: the centre of the plane.
    ignore_bias_bn, filter_axes: as for :func:`filter_normalize`.
    distribution: of the raw directions, as for :func:`fwdgrad.sample_direction`.

  Returns:
    ``(d1, d2)``, pytrees like ``params``.

  Examples:
    >>> d1, d2 = random_directions(jax.random.key(0), params)
  """
  _check_float(params, "params")
  return tuple(
      filter_normalize(estimators.sample_direction(jax.random.fold_in(key, i), params,
                                                   distribution),
                       params, ignore_bias_bn=ignore_bias_bn, filter_axes=filter_axes)
      for i in range(2))


def stack_trajectory(trajectory: Union[Sequence[PyTree], PyTree]) -> PyTree:
  """A trajectory as one pytree whose leaves have a leading ``steps`` axis.

  Args:
    trajectory: a list or tuple of parameter pytrees (one per recorded step), or a pytree already
      stacked along a leading axis (what ``jax.lax.scan`` returns when it outputs the parameters).

  Returns:
    The stacked pytree.
  """
  if isinstance(trajectory, (list, tuple)):
    if not trajectory:
      raise ValueError("the trajectory is empty; record the parameters at least once.")
    for i, point in enumerate(trajectory[1:], start=1):
      _check_same_structure(trajectory[0], point, f"trajectory[{i}]", "trajectory[0]")
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trajectory)
  leaves = jax.tree_util.tree_leaves(trajectory)
  if not leaves:
    raise ValueError("the trajectory has no array leaves.")
  lengths = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(
        f"a stacked trajectory needs one leading steps axis shared by every leaf, got leading "
        f"sizes {sorted(map(str, lengths))}; pass a list of parameter pytrees instead.")
  if lengths == {0}:
    raise ValueError("the trajectory is empty; record the parameters at least once.")
  return trajectory


def pca_directions(trajectory: Union[Sequence[PyTree], PyTree], *, ignore_bias_bn: bool = True,
                   center: bool = False) -> PCADirections:
  """The two leading principal directions of a trajectory's differences to its final point.

  With :math:`M = [\\theta_0 - \\theta_n; \\dots; \\theta_n - \\theta_n]` (one row per recorded
  point, computed in float64) and its singular value decomposition :math:`M = U S V^\\top`, the
  directions are the first two rows of :math:`V^\\top` and the explained variance ratios are
  :math:`s_k^2 / \\sum_i s_i^2`. With ``center=False`` (default) the plane through
  :math:`\\theta_n` is the one closest, in summed squared distance, to the recorded points, which is
  the plane the surface is drawn on. ``center=True`` subtracts the column means of :math:`M` first,
  as the reference implementation's ``sklearn.decomposition.PCA`` does. The decomposition uses the
  ``T x T`` Gram matrix, so memory is one float64 copy of a leaf's trajectory at a time. Signs are
  chosen so that the first recorded point has non-positive coordinates.

  Args:
    trajectory: at least 3 recorded points, as for :func:`stack_trajectory`; the last is the centre.
    ignore_bias_bn: zero the rows' entries on leaves with ``ndim <= 1`` (biases, normalization).
    center: subtract the mean difference before the decomposition.

  Returns:
    A :class:`PCADirections` with unit-norm, orthogonal directions.

  Examples:
    >>> params_per_epoch = [jax.tree.map(lambda p: p + 0.01 * i * jnp.sin(p + i), params)
    ...                     for i in range(4)]
    >>> pca = pca_directions(params_per_epoch)  # then loss_surface(loss_fn, pca.center, ...)
  """
  stacked = stack_trajectory(trajectory)
  num_points = len(jax.tree_util.tree_leaves(stacked)[0])
  if num_points < 3:
    raise ValueError(
        f"PCA directions need at least 3 trajectory points (the final point is the centre and two "
        f"differences to it are needed to span a plane), got {num_points}; record more steps or "
        "use random_directions.")
  _check_float(stacked, "trajectory")
  leaves, treedef = jax.tree_util.tree_flatten(stacked)

  def differences(leaf):
    leaf = np.asarray(leaf, np.float64)
    rows = (leaf - leaf[-1]).reshape(num_points, -1)
    if ignore_bias_bn and leaf.ndim <= 2:
      rows = np.zeros_like(rows)
    return rows - rows.mean(axis=0) if center else rows

  gram, final_norm, eps = np.zeros((num_points, num_points)), 0.0, 0.0
  for leaf in leaves:
    rows = differences(leaf)
    gram += rows @ rows.T
    if rows.any():
      final_norm += np.sum(np.square(np.asarray(leaf[-1], np.float64)))
      eps = max(eps, np.finfo(np.result_type(leaf.dtype, np.float16)).eps)
  total = np.trace(gram)
  eigenvalues, eigenvectors = np.linalg.eigh(gram)
  eigenvalues, eigenvectors = eigenvalues[::-1][:2], eigenvectors[:, ::-1][:, :2]
  # Rounding the recorded points to their dtype alone moves them by up to eps * |theta| each, so a
  # second singular value below that noise floor is no direction of the trajectory.
  noise = np.sqrt(num_points * final_norm) * eps + num_points * np.finfo(np.float64).eps * (
      np.sqrt(max(eigenvalues[0], 0.0)))
  if total <= 0 or np.sqrt(max(eigenvalues[1], 0.0)) <= noise:
    raise ValueError(
        "the trajectory spans fewer than two dimensions (it does not move, or moves along a "
        "line up to rounding), so it has no second principal direction; use random_directions "
        "for the plane.")
  singular_values = np.sqrt(eigenvalues)
  directions = [[], []]
  first_coordinate = np.zeros(2)
  for leaf in leaves:
    rows = differences(leaf)
    raw_first = np.asarray(leaf[0], np.float64) - np.asarray(leaf[-1], np.float64)
    for k in range(2):
      d = (rows.T @ eigenvectors[:, k]) / singular_values[k]
      first_coordinate[k] += raw_first.ravel() @ d
      directions[k].append(d.reshape(np.shape(leaf)[1:]))
  signs = np.where(first_coordinate > 0, -1.0, 1.0)
  pairs = tuple(
      jax.tree_util.tree_unflatten(
          treedef, [jnp.asarray(signs[k] * d, jnp.result_type(leaf))
                    for d, leaf in zip(directions[k], leaves)])
      for k in range(2))
  final = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf[-1]) for leaf in leaves])
  return PCADirections(center=final, directions=pairs,
                       explained_variance_ratio=eigenvalues / total)


def _check_directions(center: PyTree, directions) -> Tuple[PyTree, PyTree]:
  if not isinstance(directions, (tuple, list)) or len(directions) != 2:
    raise ValueError("directions must be a pair (d1, d2) of pytrees shaped like the centre.")
  _check_float(center, "center")
  for i, d in enumerate(directions):
    _check_same_structure(center, d, f"directions[{i}]", "center")
  return directions[0], directions[1]


def grid_coordinates(alpha_range: Tuple[float, float] = (-1.0, 1.0),
                     beta_range: Tuple[float, float] = (-1.0, 1.0),
                     resolution: Union[int, Tuple[int, int]] = 21) -> Tuple[np.ndarray, np.ndarray]:
  """Evenly spaced ``(alphas, betas)`` covering ``alpha_range`` x ``beta_range``, ends included.

  Args:
    alpha_range, beta_range: ``(low, high)`` with ``low < high``.
    resolution: points per axis (an int for both, or ``(na, nb)``), each at least 2.

  Returns:
    ``(alphas, betas)``, float64 arrays of shapes ``(na,)`` and ``(nb,)``.
  """
  na, nb = (resolution, resolution) if np.ndim(resolution) == 0 else resolution
  for name, n in (("alpha", na), ("beta", nb)):
    if int(n) != n or n < 2:
      raise ValueError(f"the grid needs at least 2 points along {name}, got resolution {n}.")
  for name, (low, high) in (("alpha_range", alpha_range), ("beta_range", beta_range)):
    if not low < high:
      raise ValueError(f"{name} must be (low, high) with low < high, got {(low, high)}.")
  return np.linspace(*alpha_range, int(na)), np.linspace(*beta_range, int(nb))


def fit_ranges(coordinates: np.ndarray, margin: float = 0.25
               ) -> Tuple[Tuple[float, float], Tuple[float, float]]:
  """``(alpha_range, beta_range)`` covering projected points and the origin, padded by ``margin``.

  Each range is widened by ``margin`` times its span on both sides.
  """
  points = np.concatenate([np.asarray(coordinates, np.float64).reshape(-1, 2), np.zeros((1, 2))])
  low, high = points.min(axis=0), points.max(axis=0)
  span = np.maximum(high - low, 1e-12)
  low, high = low - margin * span, high + margin * span
  return (float(low[0]), float(high[0])), (float(low[1]), float(high[1]))


def evaluate_grid(loss_fn: Callable[[PyTree], jax.Array], center: PyTree, directions,
                  alphas, betas, *, chunk_size: Optional[int] = 64) -> np.ndarray:
  """``L(center + a d1 + b d2)`` on the grid ``alphas`` x ``betas``, vmapped in chunks.

  The ``na * nb`` points are evaluated by ``jax.lax.map(..., batch_size=chunk_size)``: ``vmap``
  over ``chunk_size`` points at a time, chunks one after another, so at most ``chunk_size`` moved
  copies of the parameters (and their activations) exist at once. Everything runs under one
  ``jax.jit``.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``; close over the data.
    center: the plane's origin.
    directions: ``(d1, d2)`` shaped like ``center``.
    alphas, betas: 1-D coordinates along ``d1`` and ``d2``.
    chunk_size: grid points per ``vmap``; ``None`` evaluates the whole grid in one ``vmap``.

  Returns:
    ``(na, nb)`` float64 losses, ``losses[i, j]`` at ``(alphas[i], betas[j])``.

  Examples:
    >>> alphas, betas = grid_coordinates(resolution=21)
    >>> losses = evaluate_grid(loss_fn, params, random_directions(key, params), alphas, betas)
  """
  d1, d2 = _check_directions(center, directions)
  alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
  for name, axis in (("alphas", alphas), ("betas", betas)):
    if axis.ndim != 1 or axis.size == 0:
      raise ValueError(f"{name} must be a non-empty 1-D array of coordinates, got {axis.shape}.")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
  out = jax.eval_shape(loss_fn, center)
  if getattr(out, "shape", None) != ():
    raise ValueError(f"loss_fn must return a scalar, got {out}; reduce the loss (e.g. .mean()).")

  grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")
  points = jnp.asarray(np.stack([grid_a.ravel(), grid_b.ravel()], axis=-1), jnp.float32)

  @jax.jit  # the parameters are arguments, not constants folded into the program
  def run(center, d1, d2, points):
    def point_loss(point):
      return loss_fn(jax.tree_util.tree_map(
          lambda c, x, y: c + (point[0] * x + point[1] * y).astype(jnp.result_type(c)),
          center, d1, d2))
    if chunk_size is None:
      return jax.vmap(point_loss)(points)
    return jax.lax.map(point_loss, points, batch_size=min(chunk_size, len(points)))

  losses = np.asarray(run(center, d1, d2, points), np.float64)
  return losses.reshape(alphas.size, betas.size)


def project_trajectory(trajectory: Union[Sequence[PyTree], PyTree], center: PyTree,
                       directions) -> np.ndarray:
  """Least-squares coordinates of recorded points on the plane through ``center``.

  .. math::

     (a_t, b_t) = \\arg\\min_{a, b} \\lVert \\theta_t - \\theta^* - a\\, d_1 - b\\, d_2 \\rVert^2
     = G^{-1} [d_1 \\cdot (\\theta_t - \\theta^*),\\ d_2 \\cdot (\\theta_t - \\theta^*)]^\\top,

  with :math:`G` the 2x2 Gram matrix of the directions (they need not be orthogonal). Float64.

  Args:
    trajectory: recorded points, as for :func:`stack_trajectory`.
    center: the plane's origin.
    directions: ``(d1, d2)``.

  Returns:
    ``(T, 2)`` float64 coordinates.
  """
  d1, d2 = _check_directions(center, directions)
  stacked = stack_trajectory(trajectory)
  _check_same_structure(center, stacked, "trajectory", "center", leading=1)
  num_points = len(jax.tree_util.tree_leaves(stacked)[0])
  gram, rhs = np.zeros((2, 2)), np.zeros((num_points, 2))
  for x, c, u, v in zip(*(jax.tree_util.tree_leaves(t) for t in (stacked, center, d1, d2))):
    basis = np.stack([np.asarray(u, np.float64).ravel(), np.asarray(v, np.float64).ravel()], -1)
    gram += basis.T @ basis
    rows = (np.asarray(x, np.float64) - np.asarray(c, np.float64)).reshape(num_points, -1)
    rhs += rows @ basis
  if np.linalg.cond(gram) > 1e12:
    raise ValueError(
        "the two directions are zero or (nearly) parallel, so they do not span a plane; draw "
        "them from different keys or use pca_directions.")
  return np.linalg.solve(gram, rhs.T).T


def loss_surface(loss_fn: Callable[[PyTree], jax.Array], center: PyTree, directions, alphas,
                 betas, *, trajectory: Union[Sequence[PyTree], PyTree, None] = None,
                 chunk_size: Optional[int] = 64, method: str = "random",
                 explained_variance_ratio=None) -> LossSurface:
  """Evaluates the grid, projects the trajectory and gathers both in a :class:`LossSurface`.

  Args:
    loss_fn, center, directions, alphas, betas, chunk_size: as for :func:`evaluate_grid`.
    trajectory: recorded points to place on the plane, or ``None``.
    method: a label saved with the surface (``"random"``, ``"pca"``).
    explained_variance_ratio: of PCA directions, saved and shown on the axes.

  Returns:
    A :class:`LossSurface`.

  Examples:
    >>> trajectory = [jax.tree.map(lambda p: p + 0.01 * i * jnp.sin(p + i), params)
    ...               for i in range(4)]
    >>> pca = pca_directions(trajectory)
    >>> ranges = fit_ranges(project_trajectory(trajectory, pca.center, pca.directions))
    >>> surface = loss_surface(loss_fn, pca.center, pca.directions, *grid_coordinates(*ranges),
    ...                        trajectory=trajectory, method="pca",
    ...                        explained_variance_ratio=pca.explained_variance_ratio)
  """
  losses = evaluate_grid(loss_fn, center, directions, alphas, betas, chunk_size=chunk_size)
  coords = None if trajectory is None else project_trajectory(trajectory, center, directions)
  flat = [np.concatenate([np.asarray(leaf, np.float64).ravel()
                          for leaf in jax.tree_util.tree_leaves(d)]) for d in directions]
  norms = np.array([np.linalg.norm(f) for f in flat])
  cosine = float(flat[0] @ flat[1] / max(norms[0] * norms[1], np.finfo(np.float64).tiny))
  evr = None if explained_variance_ratio is None else np.asarray(explained_variance_ratio,
                                                                 np.float64)
  return LossSurface(np.asarray(alphas, np.float64), np.asarray(betas, np.float64), losses,
                     coords, str(method), evr, norms, cosine)


# Saving and plotting live in fwdgrad/landscape_plot.py; their names are part of this module's API.
from fwdgrad.landscape_plot import load_surface  # pylint: disable=g-bad-import-order,wrong-import-position
from fwdgrad.landscape_plot import plot_surface  # pylint: disable=g-bad-import-order,wrong-import-position
from fwdgrad.landscape_plot import plot_surfaces  # pylint: disable=g-bad-import-order,wrong-import-position
from fwdgrad.landscape_plot import save_surface  # pylint: disable=g-bad-import-order,wrong-import-position
