"""Saving, loading and drawing the loss surfaces of :mod:`fwdgrad.landscape`.

:func:`save_surface` / :func:`load_surface` keep a :class:`fwdgrad.landscape.LossSurface` as an
``.npz`` file (plain arrays, no pickling), and :func:`plot_surface` / :func:`plot_surfaces` draw
filled contour plots with the projected training trajectory, several side by side (BP / FF /
FF 16w8a / FF 8w8a). matplotlib is imported only when a plot is drawn. Every name here is also
importable from :mod:`fwdgrad.landscape`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:
  from fwdgrad.landscape import LossSurface


def save_surface(path: Union[str, os.PathLike], surface: LossSurface, **metadata) -> str:
  """Writes a surface as ``.npz`` (no pickling); ``metadata`` adds scalars, strings or arrays.

  Keys: ``alphas``, ``betas``, ``losses``, ``trajectory`` (``(0, 2)`` when absent), ``method``,
  ``explained_variance_ratio`` (NaN for random directions), ``direction_norms``,
  ``direction_cosine`` and ``meta_<name>`` for each metadata entry. Returns the path.
  """
  path = os.fspath(path)
  trajectory = np.zeros((0, 2)) if surface.trajectory is None else surface.trajectory
  evr = (np.full(2, np.nan) if surface.explained_variance_ratio is None
         else surface.explained_variance_ratio)
  extra = {f"meta_{k}": np.asarray(v) for k, v in metadata.items()}
  for key, value in extra.items():
    if value.dtype == object:
      raise ValueError(f"metadata {key[5:]!r} is not a number, string or numeric array.")
  with open(path, "wb") as f:
    np.savez(f, alphas=surface.alphas, betas=surface.betas, losses=surface.losses,
             trajectory=trajectory, method=np.asarray(surface.method),
             explained_variance_ratio=evr, direction_norms=surface.direction_norms,
             direction_cosine=np.asarray(surface.direction_cosine), **extra)
  return path


def load_surface(path: Union[str, os.PathLike]) -> Tuple[LossSurface, dict]:
  """Reads a file written by :func:`save_surface`; returns ``(surface, metadata)``."""
  # Imported here, not at the top: fwdgrad.landscape re-exports this module's names.
  from fwdgrad.landscape import LossSurface  # pylint: disable=g-import-not-at-top
  with np.load(os.fspath(path), allow_pickle=False) as data:
    evr = data["explained_variance_ratio"]
    trajectory = data["trajectory"]
    surface = LossSurface(
        data["alphas"], data["betas"], data["losses"], trajectory if len(trajectory) else None,
        str(data["method"]), None if np.isnan(evr).all() else evr, data["direction_norms"],
        float(data["direction_cosine"]))
    metadata = {k[5:]: data[k][()] if data[k].ndim == 0 else data[k]
                for k in data.files if k.startswith("meta_")}
  return surface, metadata


def _contour_levels(surfaces: Sequence[LossSurface], levels, max_loss):
  if not np.isscalar(levels):
    return np.asarray(levels)
  finite = np.concatenate([s.losses[np.isfinite(s.losses)] for s in surfaces])
  if finite.size == 0:
    raise ValueError("every loss on the grid is NaN or infinite; there is nothing to contour.")
  low, high = finite.min(), finite.max()
  high = high if max_loss is None else min(high, max_loss)
  return np.linspace(low, high if high > low else low + 1.0, int(levels))


def _draw(ax, surface: LossSurface, levels, title):
  if surface.alphas.size < 2 or surface.betas.size < 2:
    raise ValueError("a contour plot needs a grid of at least 2 x 2 points.")
  losses = np.ma.masked_invalid(surface.losses.T)  # contour wants (ny, nx)
  filled = ax.contourf(surface.alphas, surface.betas, losses, levels=levels, cmap="viridis",
                       extend="both")
  lines = ax.contour(surface.alphas, surface.betas, losses, levels=levels[::3], colors="white",
                     linewidths=0.5)
  ax.clabel(lines, fontsize=6, fmt="%.3g")
  if surface.trajectory is not None:
    t = surface.trajectory
    ax.plot(t[:, 0], t[:, 1], ".-", color="tab:red", markersize=3, linewidth=1, label="trajectory")
    ax.plot(t[0, 0], t[0, 1], "o", color="tab:red", markersize=5, label="start")
    ax.plot(t[-1, 0], t[-1, 1], "*", color="yellow", markeredgecolor="k", markersize=10,
            label="end")
    ax.legend(loc="upper right", fontsize=6)
  evr = surface.explained_variance_ratio
  ax.set_xlabel("1st direction" + ("" if evr is None else f" ({evr[0]:.1%} of variance)"))
  ax.set_ylabel("2nd direction" + ("" if evr is None else f" ({evr[1]:.1%} of variance)"))
  if title:
    ax.set_title(title)
  return filled


def plot_surface(surface: LossSurface, path: Union[str, os.PathLike], *,
                 title: Optional[str] = None, levels: Union[int, Sequence[float]] = 30,
                 max_loss: Optional[float] = None, dpi: int = 150) -> str:
  """Saves a filled contour plot of ``surface`` with its trajectory overlaid as a PNG.

  ``levels`` is the number of contour levels between the finite minimum loss and the finite
  maximum (capped at ``max_loss``; higher losses take the top colour), or their values. NaN and
  infinite losses (a diverged 8w8a run) are left blank. See :func:`plot_surfaces`. Returns the path.
  """
  return plot_surfaces({title or "": surface}, path, levels=levels, max_loss=max_loss, dpi=dpi)


def plot_surfaces(surfaces: Mapping[str, LossSurface], path: Union[str, os.PathLike], *,
                  levels: Union[int, Sequence[float]] = 30, max_loss: Optional[float] = None,
                  shared_levels: bool = False, dpi: int = 150) -> str:
  """Saves several surfaces side by side as one PNG, e.g. BP / FF / FF 16w8a / FF 8w8a.

  Uses matplotlib's Agg canvas directly (no pyplot, no change of the global backend); matplotlib
  is imported only here.

  Args:
    surfaces: ``{panel title: surface}``, drawn left to right in order.
    path: the ``.png`` to write.
    levels, max_loss: as for :func:`plot_surface`.
    shared_levels: one set of contour levels (and colour bar) for all panels, so equal colours
      mean equal losses; set ``max_loss`` with it when a run diverged. By default each panel spans
      its own range and has its own colour bar.
    dpi: resolution.

  Returns:
    The path written.

  Examples:
    >>> import os, tempfile
    >>> grid = fwdgrad.landscape.grid_coordinates(resolution=5)
    >>> bp = ff = fwdgrad.loss_surface(loss_fn, params, fwdgrad.random_directions(key, params), *grid)
    >>> path = plot_surfaces({"BP": bp, "FF": ff}, os.path.join(tempfile.mkdtemp(), "landscape.png"))
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  if not surfaces:
    raise ValueError("surfaces is empty; pass {title: LossSurface, ...}.")
  items = list(surfaces.items())
  common = _contour_levels([s for _, s in items], levels, max_loss) if shared_levels else None
  figure = Figure(figsize=(4.2 * len(items), 3.8), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, len(items), squeeze=False)[0]
  for ax, (title, surface) in zip(axes, items):
    panel_levels = common if shared_levels else _contour_levels([surface], levels, max_loss)
    filled = _draw(ax, surface, panel_levels, title)
    if not shared_levels:
      figure.colorbar(filled, ax=ax, label="loss")
  if shared_levels:
    figure.colorbar(filled, ax=list(axes), label="loss")
  path = os.fspath(path)
  figure.savefig(path, dpi=dpi)
  return path
