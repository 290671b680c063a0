"""The paper's loss-landscape comparison on a real task: BP, FF, FF 16w8a and FF 8w8a, LP and FT.

``run_study(config, workdir)`` pre-trains a backbone with backprop (or loads it), takes one fixed
few-shot task, and for every adaptation mode of ``config.landscape.modes`` and every method of
``config.methods``:

1. adapts the task's trainable parameters for ``method.steps`` steps on the whole support set and
   records every ``landscape.record_every``-th point :math:`\\theta_0, \\dots, \\theta_T`;
2. draws the plane of the trajectory's two leading principal components through
   :math:`\\theta_T` (:func:`fwdgrad.pca_directions`) and evaluates the support loss on a grid
   fitted to the projected trajectory, with the model at the method's precision;
3. optionally (``landscape.random_plane``) evaluates the same loss on one filter-normalized random
   plane shared by all methods of the mode, each centred on its own starting point.

A trajectory that does not move (8-bit weights round every step to zero) has no principal plane;
its panel shows the shared random plane instead and says so. A ``"linear"`` head starts as the
ProtoNets classifier of the support set and its cross-entropy divides the logits by the
episode-loss temperature (the feature width, see :class:`fwdgrad.adaptation.Adapter`), so that the
softmax is not saturated at the start. Runs of ``qzo_ff`` start from the
pre-trained weights rounded to their fixed-point grid, which is what the integer engine holds, so
the first recorded step is a training step and not the rounding.

The step sizes along a trajectory are :math:`s_t = \\lVert \\theta_{t+1} - \\theta_t \\rVert_2`;
the summary gives their mean and maximum, the path length :math:`\\sum_t s_t`, the displacement
:math:`\\lVert \\theta_T - \\theta_0 \\rVert_2` and their ratio (1 for a straight path).

Layout of ``workdir`` (``pretrain/`` and ``backbone/`` as in :mod:`fwdgrad.train_lib`)::

  landscape/<mode>.png               PCA planes of BP | FF | FF 16w8a | FF 8w8a side by side
  landscape/<mode>_random.png        the shared random plane (with landscape.random_plane)
  landscape/<mode>/<method>.npz      raw grids (fwdgrad.load_surface), <method>_random.npz
  landscape/summary.json             losses, accuracies, explained variance, step sizes

References:
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024 (loss landscape figure).
  Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fwdgrad import adapt
from fwdgrad import adaptation
from fwdgrad import experiment
from fwdgrad import fewshot
from fwdgrad import landscape
from fwdgrad import models
from fwdgrad import qzo
from fwdgrad import train_lib

PyTree = Any
STUDY_MODES = ("lp", "ft", "dvpt")


def landscape_defaults() -> ml_collections.ConfigDict:
  """The fields of ``config.landscape`` with their defaults."""
  study = ml_collections.ConfigDict()
  study.modes = ("lp", "ft")      # adaptation modes, one figure each
  study.task_index = 0            # which few-shot task of the novel classes
  study.record_every = 1          # record the parameters every this many steps
  study.resolution = 21           # grid points per axis
  study.margin = 0.3              # grid padding around the trajectory, times its extent
  study.chunk_size = 64           # grid points per vmap
  study.random_plane = True       # also draw a shared filter-normalized random plane per mode
  study.still_range = 0.05        # random-plane half-width when no trajectory of a mode moves
  # Per-mode method fields, e.g. {"lp": {"bp": {"learning_rate": 30.0}}}: a linear probe and the
  # whole network need different learning rates.
  study.overrides = ml_collections.ConfigDict()
  return study


def validate_study_config(config) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """``(experiment config, landscape config)`` with defaults, or a ConfigError naming the field.

  Every mode is validated as an experiment of its own (with its ``overrides``). The experiment
  config returned has ``adapt.mode`` set to the first mode and no overrides applied; the study
  builds each mode's config from it with :func:`_mode_config`.
  """
  if "landscape" not in config:
    raise experiment.ConfigError("config.landscape is missing; start from "
                                 "fwdgrad.landscape_study.landscape_defaults().")
  study = landscape_defaults()
  given = dict(config.landscape)
  overrides = given.pop("overrides", {}) or {}
  experiment._merge(study, given, "config.landscape")  # pylint: disable=protected-access
  if not hasattr(overrides, "items"):
    raise experiment.ConfigError("config.landscape.overrides must be a dict {mode: {method: "
                                 f"{{field: value}}}}, got {overrides!r}.")
  study.overrides = ml_collections.ConfigDict(dict(overrides))
  base = ml_collections.ConfigDict({k: v for k, v in config.items() if k != "landscape"})
  modes = tuple(study.modes)
  if not modes or len(set(modes)) != len(modes):
    raise experiment.ConfigError(f"config.landscape.modes = {modes!r} must name distinct modes "
                                 f"from {STUDY_MODES}.")
  for mode in modes:
    if mode not in STUDY_MODES:
      raise experiment.ConfigError(f"config.landscape.modes: {mode!r} is not allowed; use modes "
                                   f"from {STUDY_MODES}.")
  overrides = study.overrides.to_dict() if hasattr(study.overrides, "to_dict") else dict(
      study.overrides)
  unknown = sorted(set(overrides) - set(modes))
  if unknown:
    raise experiment.ConfigError(f"config.landscape.overrides names modes {unknown} that are not "
                                 f"in config.landscape.modes = {modes}.")
  for mode in modes:  # Every mode must be a valid experiment on its own.
    experiment.validate_config(_mode_config(base, mode, overrides.get(mode, {})))
  checked = experiment.validate_config(_mode_config(base, modes[0], {}))
  for name, method in checked.methods.items():
    if method.kind == "zero_shot":
      raise experiment.ConfigError(f"config.methods.{name}: a zero-shot method does not move, so "
                                   "it has no trajectory; remove it from config.methods.")
  if checked.adapt.batch_size:
    raise experiment.ConfigError("config.adapt.batch_size must be 0: the study draws the loss of "
                                 "the whole support set, so it also trains on the whole set.")
  if checked.adapt.head == "simpleshot":
    raise experiment.ConfigError("config.adapt.head = 'simpleshot' is not supported by the study "
                                 "(it needs the base-class mean); use 'linear' or 'protonet'.")
  if checked.task.kind != "fewshot":
    raise experiment.ConfigError("config.task.kind must be 'fewshot': the study adapts one "
                                 "few-shot task of the novel classes.")
  for field in ("record_every", "resolution", "chunk_size"):
    experiment._positive(f"config.landscape.{field}", study[field])  # pylint: disable=protected-access
  if study.resolution < 2:
    raise experiment.ConfigError("config.landscape.resolution must be at least 2 (points per "
                                 f"axis), got {study.resolution}.")
  if not 0 <= study.task_index < checked.task.num_tasks:
    raise experiment.ConfigError(f"config.landscape.task_index = {study.task_index} must lie in "
                                 f"[0, config.task.num_tasks = {checked.task.num_tasks}).")
  if not study.margin >= 0 or not study.still_range > 0:
    raise experiment.ConfigError("config.landscape.margin must be >= 0 and "
                                 "config.landscape.still_range > 0.")
  for name, method in checked.methods.items():
    if method.steps < 2 * study.record_every:
      raise experiment.ConfigError(
          f"config.methods.{name}.steps = {method.steps} records fewer than 3 points with "
          f"config.landscape.record_every = {study.record_every}; a PCA plane needs 3.")
  study.modes = modes
  return checked, study


def _mode_config(config, mode: str, overrides) -> ml_collections.ConfigDict:
  """A copy of ``config`` adapting in ``mode``, with ``overrides`` ({method: {field: value}})."""
  config = ml_collections.ConfigDict(config.to_dict())
  with config.ignore_type():
    config.adapt.mode = mode
  for name, fields in overrides.items():
    if name not in config.methods:
      raise experiment.ConfigError(
          f"config.landscape.overrides.{mode}.{name}: no such method in config.methods "
          f"({sorted(config.methods)}).")
    if not hasattr(fields, "items"):
      raise experiment.ConfigError(f"config.landscape.overrides.{mode}.{name} must be a dict of "
                                   f"method fields, got {fields!r}.")
    for field, value in fields.items():
      if field not in experiment.METHOD_DEFAULTS:
        raise experiment.ConfigError(
            f"config.landscape.overrides.{mode}.{name}.{field} is not a method field; the fields "
            f"are {sorted(experiment.METHOD_DEFAULTS)}.")
      with config.methods[name].ignore_type():
        config.methods[name][field] = value
  return config


class Run(NamedTuple):
  """One adapted trajectory and what is needed to draw its landscape."""
  loss_fn: Callable[[PyTree], jax.Array]
  trajectory: PyTree      # stacked, leading axis = recorded points
  losses: np.ndarray      # the exact support loss at each recorded point
  accuracy: float         # query accuracy at the end


def _problem(config, variables, method, mode: str, task: adaptation.Task, key: jax.Array):
  """``(loss_fn, initial trainable, accuracy_fn)`` of one method in one mode."""
  adapt_config = config.adapt.copy_and_resolve_references()
  with adapt_config.ignore_type():
    adapt_config.mode = mode
  # A fixed-point backbone gets its static scales from the support set.
  adapter = adaptation.Adapter(config.model.name, config.model.kwargs.to_dict(), variables, method,
                               adapt_config, config.task.ways, config.seed,
                               calibration_inputs=task.support_inputs)
  inputs = {"support": jnp.asarray(task.support_inputs), "query": jnp.asarray(task.query_inputs)}
  ys, yq = jnp.asarray(task.support_labels), jnp.asarray(task.query_labels)
  frozen, ways = adapter.frozen, config.task.ways
  if mode == "lp":  # The backbone is frozen: its features are computed once.
    cached = {part: adapter.features(frozen, x) for part, x in inputs.items()}
    features = lambda trainable, part: cached[part]
  else:
    features = lambda trainable, part: adapter.features(
        adapt.merge(trainable["backbone"], frozen), inputs[part])
  head_kwargs = dict(method=adapt_config.head)
  # The ProtoNets classifier that a linear head starts as saturates the softmax on pre-trained
  # features (loss ~0, nothing to train or draw); its logits are divided by the episode-loss
  # temperature instead, which keeps the weights at their natural scale (what b-bit rounding sees).
  temperature = 1.0
  if adapt_config.head == "linear":
    start = {} if mode == "lp" else {"backbone": adapter.trainable_backbone}
    temperature = adapter._temperature(  # pylint: disable=protected-access
        jax.eval_shape(lambda t: features(t, "support"), start))

  head_quant = {}

  def loss_fn(trainable):
    support = features(trainable, "support")
    if adapter.parametric_head:
      logits = adapter._head_apply(  # pylint: disable=protected-access
          trainable["head"], head_quant, support) / temperature
      return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()
    scale = 1.0 / adapter._temperature(support)  # pylint: disable=protected-access
    return fewshot.episode_loss(support, ys, support, ys, ways, scale=scale, **head_kwargs)

  def accuracy_fn(trainable):
    support, query = features(trainable, "support"), features(trainable, "query")
    if adapter.parametric_head:
      logits = adapter._head_apply(  # pylint: disable=protected-access
          trainable["head"], head_quant, query)
      return jnp.mean((jnp.argmax(logits, -1) == yq).astype(jnp.float32))
    return fewshot.episode_accuracy(support, ys, query, yq, ways, **head_kwargs)

  trainable = {} if mode == "lp" else {"backbone": adapter.trainable_backbone}
  if adapter.parametric_head:
    support = features(trainable, "support")
    trainable["head"] = adapter._init_head(key, support, ys)  # pylint: disable=protected-access
    head_quant.update(adapter._head_quant(trainable["head"], support))  # pylint: disable=protected-access
  return loss_fn, trainable, accuracy_fn


def _snap_to_grid(trainable, opt_state, weight_bits: int):
  """The weights ``qzo_ff`` holds: ``Δ_w round(w / Δ_w)`` with its state's scales."""
  w_q = qzo.integer_weights(trainable, opt_state.weight_scale, weight_bits)
  return jax.tree_util.tree_map(lambda q, s, p: (q.astype(jnp.float32) * s).astype(p.dtype),
                                w_q, opt_state.weight_scale, trainable)


def adapt_and_record(config, variables, method, mode: str, task: adaptation.Task, key: jax.Array,
                     record_every: int) -> Run:
  """Adapts one task by one method and records the trajectory (see the module docstring)."""
  head_key, method_key = jax.random.split(key)
  loss_fn, trainable, accuracy_fn = _problem(config, variables, method, mode, task, head_key)
  tx = adaptation.make_transform(method, method_key)
  opt_state = tx.init(trainable)
  if method.kind == "qzo_ff":
    bits = models.Precision.parse(method.precision).weight_bits
    trainable = _snap_to_grid(trainable, opt_state, bits)

  def step(carry, _):
    params, state = carry
    if method.kind == "backprop":
      grads = jax.grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params, value_fn=loss_fn)
    else:
      updates, state = tx.update(params, state, params, value_fn=loss_fn)
    return (optax.apply_updates(params, updates), state), None

  def chunk(carry, _):
    carry, _ = jax.lax.scan(step, carry, None, length=record_every)
    return carry, carry[0]

  @jax.jit
  def run(trainable, opt_state):
    (final, _), path = jax.lax.scan(chunk, (trainable, opt_state), None,
                                    length=method.steps // record_every)
    path = jax.tree_util.tree_map(lambda first, rest: jnp.concatenate([first[None], rest]),
                                  trainable, path)
    return path, jax.lax.map(loss_fn, path), accuracy_fn(final)

  path, losses, accuracy = run(trainable, opt_state)
  return Run(loss_fn, jax.tree_util.tree_map(np.asarray, path), np.asarray(losses, np.float64),
             float(accuracy))


def step_statistics(trajectory: PyTree) -> dict:
  """Step sizes ``‖θ_{t+1} - θ_t‖`` between recorded points, path length, displacement (float64).

  Args:
    trajectory: a stacked pytree (leading axis = recorded points), at least 2 points.

  Returns:
    ``{"mean_step", "max_step", "path_length", "displacement", "straightness"`` (displacement /
    path length, 0 for a path that does not move), ``"relative_displacement"`` (over
    ``‖θ_0‖``), ``"moved"}``.
  """
  leaves = [np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
            for x in jax.tree_util.tree_leaves(trajectory)]
  flat = np.concatenate(leaves, axis=1)
  steps = np.linalg.norm(np.diff(flat, axis=0), axis=1)
  displacement = float(np.linalg.norm(flat[-1] - flat[0]))
  path = float(steps.sum())
  return {"mean_step": float(steps.mean()), "max_step": float(steps.max()),
          "path_length": path, "displacement": displacement,
          "straightness": displacement / path if path > 0 else 0.0,
          "relative_displacement": displacement / max(float(np.linalg.norm(flat[0])), 1e-30),
          "moved": bool(path > 0)}


def _title(name, method) -> str:
  return f"{name} ({method.kind}, {method.precision})"


def _random_surfaces(study, runs, key):
  """Surfaces of every run on one random plane (directions from the first run's start)."""
  start = lambda run: jax.tree_util.tree_map(lambda x: x[0], run.trajectory)
  first = start(next(iter(runs.values())))
  directions = landscape.random_directions(key, first)
  coords = {name: landscape.project_trajectory(run.trajectory, start(run), directions)
            for name, run in runs.items()}
  points = np.concatenate(list(coords.values()))
  if np.abs(points).max() > 0:
    alpha_range, beta_range = landscape.fit_ranges(points, study.margin)
    half = max(abs(v) for v in alpha_range + beta_range)
    alpha_range = beta_range = (-half, half)
  else:
    alpha_range = beta_range = (-study.still_range, study.still_range)
  alphas, betas = landscape.grid_coordinates(alpha_range, beta_range, study.resolution)
  return {name: landscape.loss_surface(run.loss_fn, start(run), directions, alphas, betas,
                                       trajectory=run.trajectory, chunk_size=study.chunk_size,
                                       method="random")
          for name, run in runs.items()}


def _pca_surface(study, run):
  pca = landscape.pca_directions(run.trajectory)
  coords = landscape.project_trajectory(run.trajectory, pca.center, pca.directions)
  ranges = landscape.fit_ranges(coords, study.margin)
  alphas, betas = landscape.grid_coordinates(*ranges, resolution=study.resolution)
  return landscape.loss_surface(run.loss_fn, pca.center, pca.directions, alphas, betas,
                                trajectory=run.trajectory, chunk_size=study.chunk_size,
                                method="pca", explained_variance_ratio=pca.explained_variance_ratio)


def study_mode(config, study, variables, task, mode: str, outdir: str) -> dict:
  """Runs every method in one mode, writes its grids and figures; returns its summary."""
  os.makedirs(os.path.join(outdir, mode), exist_ok=True)
  methods = list(experiment.methods(config))
  base_key = jax.random.fold_in(jax.random.key(config.seed), study.task_index)
  runs, summary = {}, {}
  for index, (name, method) in enumerate(methods):
    runs[name] = adapt_and_record(config, variables, method, mode, task,
                                  jax.random.fold_in(base_key, index), study.record_every)
  pca = {}
  for name, run in runs.items():
    try:
      pca[name] = _pca_surface(study, run)
    except ValueError as error:  # No second principal direction: it did not move (8w8a).
      if "fewer than two dimensions" not in str(error):
        raise
  random = {}
  if study.random_plane or len(pca) < len(runs):
    random = _random_surfaces(study, runs, jax.random.fold_in(base_key, 1000))
  panels = {}
  for name, method in methods:
    run = runs[name]
    if name in pca:
      surface, plane = pca[name], "pca"
    else:
      surface, plane = random[name], "random (the trajectory does not span a plane)"
    panels[_title(name, method) + ("" if plane == "pca" else "\nrandom plane: did not move")] = (
        surface)
    npz = landscape.save_surface(os.path.join(outdir, mode, f"{name}.npz"), surface, mode=mode,
                                 method=name, kind=method.kind, precision=method.precision)
    if name in random and study.random_plane:
      landscape.save_surface(os.path.join(outdir, mode, f"{name}_random.npz"), random[name],
                             mode=mode, method=name, kind=method.kind, precision=method.precision)
    evr = surface.explained_variance_ratio
    summary[name] = {
        "kind": method.kind, "precision": method.precision, "steps": int(method.steps),
        "learning_rate": float(method.learning_rate), "plane": plane,
        "initial_loss": float(run.losses[0]), "final_loss": float(run.losses[-1]),
        "query_accuracy": run.accuracy,
        "explained_variance_ratio": None if evr is None else [float(v) for v in evr],
        "grid_loss_range": [float(np.nanmin(surface.losses)), float(np.nanmax(surface.losses))],
        "npz": os.path.relpath(npz, outdir), **step_statistics(run.trajectory)}
  landscape.plot_surfaces(panels, os.path.join(outdir, f"{mode}.png"))
  if study.random_plane:
    landscape.plot_surfaces({_title(n, m) + "\nshared random plane": random[n] for n, m in methods},
                            os.path.join(outdir, f"{mode}_random.png"))
  return summary


def summary_table(summary: dict) -> str:
  """A Markdown table of the summary, one row per mode and method."""
  rows = ["| mode | method | precision | loss start -> end | query acc | mean step | path | "
          "displacement | PCA variance |", "|" + "---|" * 9]
  for mode, methods in summary["modes"].items():
    for name, row in methods.items():
      evr = row["explained_variance_ratio"]
      rows.append(
          f"| {mode} | {name} | {row['precision']} | {row['initial_loss']:.4f} -> "
          f"{row['final_loss']:.4f} | {row['query_accuracy']:.3f} | {row['mean_step']:.4g} | "
          f"{row['path_length']:.4g} | {row['displacement']:.4g} | "
          f"{'-' if evr is None else f'{evr[0]:.2f} + {evr[1]:.2f}'} |")
  return "\n".join(rows)


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pre-trains (or loads) the backbone, adapts one task by every method and mode, draws it all.

  Args:
    config: an experiment config (:func:`fwdgrad.experiment.default_config`) plus
      ``config.landscape`` (:func:`landscape_defaults`); ``config.adapt.mode`` is replaced by each
      of ``config.landscape.modes`` in turn. See ``configs/landscape.py``.
    workdir: where the backbone, the grids, the figures and ``landscape/summary.json`` go.

  Returns:
    The summary: ``{"task": ..., "modes": {mode: {method: {...}}}}``.

  Examples:
    >>> summary = run_study(get_config("tiny"), "/tmp/landscape")  # doctest: +SKIP
    >>> summary["modes"]["lp"]["ff_8w8a"]["path_length"]  # doctest: +SKIP
    0.0
  """
  config, study = validate_study_config(config)
  outdir = os.path.join(workdir, "landscape")
  os.makedirs(outdir, exist_ok=True)
  with open(os.path.join(outdir, "config.json"), "w") as f:
    f.write(json.dumps({**json.loads(config.to_json()), "landscape": study.to_dict()}, indent=2,
                       default=list))
  try:
    splits = train_lib.make_splits(config)
  except experiment.ConfigError:
    raise
  except ValueError as error:
    raise experiment.ConfigError(f"config.data (source {config.data.source!r}): {error}") from error
  variables = train_lib.pretrain(config, splits, workdir)
  task = train_lib.make_task(config, splits, study.task_index)
  summary = {"task": {"index": study.task_index, "ways": config.task.ways,
                      "shots": config.task.shots, "queries": config.task.queries,
                      "data": config.data.source, "model": config.model.name},
             "modes": {}}
  overrides = study.overrides.to_dict()
  for mode in study.modes:
    mode_config = experiment.validate_config(_mode_config(config, mode, overrides.get(mode, {})))
    summary["modes"][mode] = study_mode(mode_config, study, variables, task, mode, outdir)
  with open(os.path.join(outdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(outdir, "summary.md"), "w") as f:
    f.write(summary_table(summary) + "\n")
  print(summary_table(summary))
  return summary
