"""``train_and_evaluate(config, workdir)``: pre-train a backbone, adapt it by each method, report.

This is what ``train.py``, the tests and the notebooks call. A run:

1. checks the whole config before any work (:func:`fwdgrad.experiment.validate_config`);
2. loads the data and splits it: few-shot tasks take class-disjoint base / validation / novel
   classes (and, for audio, speaker-disjoint parts); transfer tasks a train / test split (and,
   with ``task.pretrain_fraction``, a clean pre-training part the shift never touches);
3. pre-trains the backbone with backprop on the base classes (or a separate source dataset), with
   checkpoints every ``pretrain.checkpoint_every`` steps, and saves it; a later run, or the same run
   started again, loads it (``pretrain.init_checkpoint`` loads one from elsewhere);
4. adapts the backbone to ``task.num_tasks`` tasks by every method of ``config.methods`` and
   records each task's query accuracy as it finishes;
5. writes ``results.json``, ``results.md`` and PNG curves, and prints the table.

Nothing is lost when a run is interrupted: started again with the same command, it resumes
pre-training from the last checkpoint and skips the tasks already done. Batches, episodes and
method keys are functions of ``(seed, step)`` and ``(seed, task)``, so the resumed run ends with
the same results as an uninterrupted one. That holds for a kill at any point: task records are
appended in one write and a torn last line is dropped (and that task redone), results files are
written then renamed, an unreadable checkpoint falls back to the one before with a
:class:`CheckpointWarning`, and an unreadable backbone is made again from the checkpoints. Ctrl-C
saves a checkpoint of the finished pre-training chunks. One run holds a workdir at a time (an
``flock`` on ``<workdir>/.lock`` that the kernel drops when its run dies). A pre-training loss
that turns non-finite or explodes raises :class:`DivergedError`; an adaptation method that does is
recorded as diverged (its row says at which task and step) and the other methods go on.

Layout of ``workdir``::

  pretrain/checkpoints/   orbax checkpoints of pre-training (params, batch_stats, optimizer)
  pretrain/metrics.jsonl  loss / accuracy every ``log_every`` steps (+ TensorBoard events)
  backbone/               the pre-trained backbone that adaptation starts from
  tasks/<method>.jsonl    one line per finished task: accuracy and the adaptation loss curve
  results.json, results.md, plots/*.png
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from fwdgrad import adaptation
from fwdgrad import experiment
from fwdgrad import models
from fwdgrad import reporting
from fwdgrad.data import dataset as dataset_lib
from fwdgrad.data import episodes


def _progress(iterable=None, **kwargs):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (text bar: no widget needed)
  return tqdm(iterable, dynamic_ncols=True, **kwargs)


# A loss this many times its start (pre-training: chance, log C) or non-finite is divergence: no
# training that still learns gets there, and a step size that does would go on to NaN.
DIVERGENCE_FACTOR = 100.0


def _first_divergence(losses: np.ndarray, limit: float) -> Optional[int]:
  """The 1-based index of the first loss that is non-finite or above ``limit``, else None."""
  bad = ~np.isfinite(losses) | (np.nan_to_num(losses, nan=np.inf) > limit)
  return int(np.argmax(bad)) + 1 if bad.any() else None


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir's lock."""


class DivergedError(RuntimeError):
  """Pre-training's loss went non-finite; the message names the step and the fix."""


class DivergenceWarning(UserWarning):
  """An adaptation method's loss went non-finite; its row in the results says diverged."""


class CheckpointWarning(UserWarning):
  """A checkpoint or saved backbone could not be read; the run fell back to an earlier one."""


def check_workdir(workdir) -> str:
  """The absolute workdir, created if needed, or a ConfigError saying what is wrong with it."""
  if not isinstance(workdir, (str, os.PathLike)) or not str(workdir).strip():
    raise experiment.ConfigError("--workdir is empty; give a folder for checkpoints and results, "
                                 "e.g. --workdir workdirs/quickstart.")
  path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise experiment.ConfigError(f"--workdir {workdir!r} is a file, not a folder; pass a folder "
                                 "(a new one is created).")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise experiment.ConfigError(f"--workdir {workdir!r} lies under {parent!r}, which is a file; "
                                 "pass a folder elsewhere.")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as error:
    raise experiment.ConfigError(f"--workdir {workdir!r} cannot be written ({error.strerror}); "
                                 "pass a folder you can write to.") from None
  return path


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds ``<workdir>/.lock`` for one run; a second run on the workdir stops at once.

  The lock is the kernel's (``flock``), so a run that dies, even by SIGKILL, releases it: a stale
  lock file never blocks the next run.
  """
  path = os.path.join(workdir, ".lock")
  handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another run"
      raise WorkdirBusyError(f"{workdir} is in use by {holder}; wait for that run to end (it "
                             "resumes from this workdir when started again) or pass another "
                             "--workdir.") from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"run pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    yield
  finally:
    os.close(handle)  # Releases the lock.


# ---------------------------------------------------------------------------------------------
# Data.


# config.task.tuning_fraction: the split of the tuning part is fixed (not config.seed), and a
# tuning run scores a third of it.
TUNING_SPLIT_SEED = 20_241_204
TUNE_TEST_FRACTION = 1.0 / 3.0


class Splits:
  """The datasets of a run: ``pretrain`` (+ ``pretrain_val``) and ``adapt`` (what tasks use)."""

  def __init__(self, pretrain, pretrain_val, adapt, adapt_test=None):
    self.pretrain, self.pretrain_val, self.adapt, self.adapt_test = (
        pretrain, pretrain_val, adapt, adapt_test)


def make_splits(config) -> Splits:
  """Loads and splits the data of ``config`` (see the module docstring)."""
  task = config.task
  data = experiment.load_data(config.data, apply_corruption=not task.pretrain_fraction)
  source = tuning = None
  if task.tuning_fraction:  # (validate_config allows it for transfer tasks only.)
    # The same examples for every seed, taken first, so that no reported run of any seed
    # pre-trains on, adapts on or scores them.
    data, tuning = dataset_lib.split_examples(data, task.tuning_fraction, seed=TUNING_SPLIT_SEED)
  if task.pretrain_fraction:  # (validate_config allows it for transfer tasks only.)
    # Pre-train on a clean part; the shift (and the noise of a corruption, per seed) touches only
    # the examples the tasks adapt on and score, which pre-training never saw.
    source, data = dataset_lib.split_examples(data, 1.0 - task.pretrain_fraction,
                                              seed=config.seed)
    data = experiment.corrupt(data, config.data, seed=config.seed)
    if tuning is not None:
      tuning = experiment.corrupt(tuning, config.data, seed=config.seed)
  if task.kind == "fewshot":
    base, validation, novel = _fewshot_parts(data, task, config.seed)
    if task.tune:  # Tuning episodes come from the validation part, which no reported run sees.
      novel = validation
    experiment.check_episodes(novel, task)
    source = base
    adapt_set, adapt_test = novel, None
  else:
    if task.tune:
      data = tuning
    adapt_set, adapt_test = dataset_lib.split_examples(
        data, TUNE_TEST_FRACTION if task.tune else task.test_fraction, seed=config.seed)
  if config.pretrain.data.source:
    source = experiment.load_data(config.pretrain.data)
  if source is None:
    pretrain = pretrain_val = None
  else:
    pretrain, pretrain_val = dataset_lib.split_examples(source, config.pretrain.val_fraction,
                                                        seed=config.seed)
  return Splits(pretrain, pretrain_val, adapt_set, adapt_test)


def _fewshot_parts(data, task, seed: int):
  """``(base, validation or None, novel)`` parts of a few-shot dataset, disjoint in classes.

  ``task.split_by`` is the unit cut: ``"class"``, ``"group"`` (whole alphabets or speakers, so
  that no group of the tasks was seen in pre-training) or ``"class_and_group"`` (both). The
  validation part is cut first with a fixed seed, the same for every ``seed``, so tuning on it
  never touches the classes any seed's tasks are drawn from; ``seed`` cuts the rest.
  """
  base_size, validation_size, novel_size = tuple(task.split_sizes)
  if task.split_by == "class_and_group":
    if validation_size:
      raise experiment.ConfigError(
          "config.task.split_by = 'class_and_group' tunes on held-out groups, not classes: set "
          "config.task.split_sizes[1] = 0 and config.task.group_split to three parts "
          "(pre-training, tuning, task groups).")
    group_sizes = tuple(task.group_split)
    validation = None
    if len(group_sizes) == 3:
      # Whole groups (speakers) for tuning, the same for every seed; the tasks never hear them.
      units = np.unique(data.groups).size
      counted = all(isinstance(size, (int, np.integer)) for size in group_sizes)
      held = int(group_sizes[1]) if counted else int(round(group_sizes[1] * units))
      if not held:
        raise experiment.ConfigError(f"config.task.group_split = {group_sizes} holds out no "
                                     "group for tuning; give its middle part at least one.")
      tuning, data = episodes.split_groups(data, (held, units - held), seed=TUNING_SPLIT_SEED)
      rest = (group_sizes[0], group_sizes[2])
      group_sizes = rest if counted else tuple(size / sum(rest) for size in rest)
    # Speakers (or alphabets) of pre-training never appear in the tasks, nor do their classes.
    base, novel = episodes.split_classes_and_groups(data, (base_size, novel_size), group_sizes,
                                                    seed=seed)
    if len(tuple(task.group_split)) == 3:
      # The tuning groups' examples of the task classes: new classes, as in the tasks.
      novel_names = set(novel.class_names)
      keep = np.isin(np.asarray(tuning.class_names)[tuning.labels], sorted(novel_names))
      validation = dataset_lib.subset(tuning, np.flatnonzero(keep), relabel=True)
    return base, validation, novel
  split = episodes.split_groups if task.split_by == "group" else episodes.split_classes
  validation = None
  if validation_size:
    units = np.unique(data.groups if task.split_by == "group" else data.labels).size
    counted = isinstance(validation_size, (int, np.integer))
    held = int(validation_size) if counted else int(round(validation_size * units))
    validation, data = split(data, (held, units - held), seed=TUNING_SPLIT_SEED)
    if not counted:  # The fractions of base and novel now apply to what is left.
      base_size, novel_size = (base_size / (base_size + novel_size),
                               novel_size / (base_size + novel_size))
  if not base_size:  # Pre-trained on another dataset: the tasks draw from all that is left.
    return None, validation, data
  base, novel = split(data, (base_size, novel_size), seed=seed)
  return base, validation, novel


def make_task(config, splits: Splits, index: int) -> adaptation.Task:
  """Task ``index``: a few-shot episode, or a (sub-sampled) train split and the test split."""
  task = config.task
  if task.kind == "fewshot":
    episode = episodes.sample_episode(splits.adapt, config.seed, index, num_ways=task.ways,
                                      num_shots=task.shots, num_queries=task.queries)
    return adaptation.Task(*episode[:4])
  train = splits.adapt
  if task.train_examples and task.train_examples < train.num_examples:
    order = np.random.default_rng((config.seed, 7, index)).permutation(train.num_examples)
    train = dataset_lib.subset(train, np.sort(order[:task.train_examples]))
  return adaptation.Task(train.inputs, train.labels, splits.adapt_test.inputs,
                         splits.adapt_test.labels)


# ---------------------------------------------------------------------------------------------
# Pre-training with backprop.


def _pretrain_model(config, num_classes: int):
  return models.get_model(config.model.name, num_classes=num_classes, precision="float",
                          **config.model.kwargs.to_dict())


def _init_variables(config, num_classes: int, example):
  model = _pretrain_model(config, num_classes)
  variables = model.init(jax.random.key(config.seed), example[:1], train=False)
  return model, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def pretrain(config, splits: Splits, workdir: str) -> dict:
  """Pre-trains with backprop (resuming from the last checkpoint); returns the backbone variables.

  The backbone is the pre-trained network without its ``"head"``; it is saved in
  ``<workdir>/backbone`` and loaded from there when it exists.
  """
  backbone_dir = os.path.join(os.path.abspath(workdir), "backbone")
  if config.pretrain.init_checkpoint:
    return load_backbone(config.pretrain.init_checkpoint, config.model.name)
  if os.path.exists(backbone_dir):
    try:
      return load_backbone(backbone_dir)
    except Exception as error:  # pylint: disable=broad-except  (any unreadable file)
      _warn(f"the saved backbone {backbone_dir} cannot be read ({_short(error)}); it is made "
            "again from the pre-training checkpoints.")
      shutil.rmtree(backbone_dir)
  train, val = splits.pretrain, splits.pretrain_val
  cfg = config.pretrain
  model, variables = _init_variables(config, train.num_classes, train.inputs)
  schedule = optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.steps, 1))
  tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                   adaptation.make_optimizer(cfg.optimizer, schedule))
  state = {"step": jnp.zeros((), jnp.int32), "variables": variables,
           "opt_state": tx.init(variables["params"])}

  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "pretrain", "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  writer = reporting.MetricWriter(os.path.join(workdir, "pretrain"))
  state = _restore_latest(manager, state, writer)
  start = int(state["step"])

  inputs, labels = jnp.asarray(train.inputs), jnp.asarray(train.labels)
  batch_size = min(cfg.batch_size, train.num_examples)
  data_key = jax.random.fold_in(jax.random.key(config.seed), 1)

  def loss_fn(params, batch_stats, x, y):
    logits, mutated = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (mutated.get("batch_stats", {}), jnp.mean(jnp.argmax(logits, -1) == y))

  def step(state, inputs, labels):
    index = jax.random.choice(jax.random.fold_in(data_key, state["step"]), inputs.shape[0],
                              (batch_size,), replace=False)
    params, batch_stats = state["variables"]["params"], state["variables"]["batch_stats"]
    (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, inputs[index], labels[index])
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1,
                 "variables": {"params": optax.apply_updates(params, updates),
                               "batch_stats": batch_stats},
                 "opt_state": opt_state}
    return new_state, (loss, accuracy)

  # One jitted step called from Python, not a lax.scan: XLA:CPU runs a conv net's backward pass
  # inside a while loop about 9x slower than the same step at top level (Conv4 on 28x28, batch
  # 128: 850 against 90 ms). The training set is an argument, not a constant of the program.
  one_step = jax.jit(step)

  def run_chunk(state, length, inputs, labels):
    losses, accuracies = [], []
    for _ in range(length):
      state, (loss, accuracy) = one_step(state, inputs, labels)
      losses.append(loss)
      accuracies.append(accuracy)
    return state, (jnp.stack(losses), jnp.stack(accuracies))

  evaluate = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
  bar = _progress(total=cfg.steps, initial=start, desc="pre-train", disable=not config.progress)
  saved = start
  try:
    while start < cfg.steps:
      length = min(cfg.log_every, cfg.steps - start)
      new_state, (losses, accuracies) = run_chunk(state, length, inputs, labels)
      losses = np.asarray(losses)
      first_bad = _first_divergence(losses, DIVERGENCE_FACTOR * max(np.log(train.num_classes),
                                                                      1.0))
      if first_bad is not None:
        bad = start + first_bad
        raise DivergedError(
            f"pre-training diverged: the loss is {losses[first_bad - 1]:.4g} at step {bad} "
            f"(config.pretrain.learning_rate = {cfg.learning_rate:g}). Lower the learning rate "
            f"(e.g. --config.pretrain.learning_rate={cfg.learning_rate / 10:g}) and start again: "
            f"with the same --workdir the run resumes from step {saved}, its last checkpoint.")
      state = new_state
      start += length
      row = {"loss": float(losses.mean()), "accuracy": float(accuracies.mean())}
      if val is not None and val.num_examples:
        logits = adaptation._batched_features(  # pylint: disable=protected-access
            lambda v, x: evaluate(v, x), state["variables"], jnp.asarray(val.inputs),
            config.adapt.eval_batch_size)
        row["val_accuracy"] = float(jnp.mean(jnp.argmax(logits, -1) == val.labels))
      writer.write(start, row)
      bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()}, refresh=False)
      bar.update(length)  # One refresh per chunk, postfix included.
      if start % cfg.checkpoint_every == 0 or start == cfg.steps:
        manager.save(start, args=ocp.args.StandardSave(state))
        saved = start
  except KeyboardInterrupt:
    if start > saved:  # Keep the finished chunks: the resumed run logs and draws from here.
      manager.save(start, args=ocp.args.StandardSave(state), force=True)
    raise
  finally:
    manager.wait_until_finished()
    manager.close()
    bar.close()
    writer.close()
  reporting.plot_curves(reporting.read_metrics(writer.path), ("loss", "accuracy", "val_accuracy"),
                        os.path.join(workdir, "plots", "pretrain.png"), "pre-training (backprop)")
  backbone = {"params": {k: v for k, v in state["variables"]["params"].items() if k != "head"},
              "batch_stats": state["variables"]["batch_stats"],
              # The pre-trained classifier, for transfer tasks on the same classes
              # (config.adapt.head = "pretrained"; its zero-shot is this classifier).
              "head": {"params": state["variables"]["params"]["head"]}}
  save_backbone(backbone_dir, backbone)
  return backbone


def _warn(message: str) -> None:
  warnings.warn(message, CheckpointWarning, stacklevel=3)
  logging.warning(message)


def _short(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= 200 else text[:200] + "..."


def _restore_latest(manager, state, writer):
  """The newest readable checkpoint (unreadable newer ones warn and are deleted), else ``state``."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # pylint: disable=broad-except  (any unreadable file)
      _warn(f"pre-training checkpoint {step} in {manager.directory} cannot be read "
            f"({_short(error)}); it is deleted and the run falls back to the one before.")
      shutil.rmtree(os.path.join(str(manager.directory), str(step)), ignore_errors=True)
      manager.reload()
      continue
    writer.truncate_after(step)
    return restored
  writer.truncate_after(0)
  return state


def save_backbone(path: str, variables: dict) -> None:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), variables)
  checkpointer.wait_until_finished()


def load_backbone(path: str, model_name: Optional[str] = None) -> dict:
  """Backbone variables ``{"params", "batch_stats"}``.

  Args:
    path: a directory saved by :func:`save_backbone` (the ``backbone`` directory of a workdir);
      for ``model_name="speech_embedding"`` also openWakeWord's ``embedding_model.tflite``, the
      ``pyopen-wakeword`` wheel or a directory holding either (its real pre-trained weights).
    model_name: the model the weights are for.
  """
  path = os.path.abspath(os.path.expanduser(path))
  saved_by_orbax = os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))
  if model_name == "speech_embedding" and not saved_by_orbax:
    from fwdgrad.models import speech_embedding  # pylint: disable=g-import-not-at-top
    variables = dict(speech_embedding.load_pretrained(path))
  elif not os.path.isdir(path):
    raise ValueError(f"config.pretrain.init_checkpoint: no checkpoint directory at {path}; "
                     "give the 'backbone' directory of an earlier run's workdir.")
  else:
    variables = ocp.StandardCheckpointer().restore(path)
  variables.setdefault("batch_stats", {})
  return jax.tree_util.tree_map(jnp.asarray, variables)


def pretrain_report(config, workdir: str) -> dict:
  """The pre-training's last validation accuracy against ``config.pretrain.min_val_accuracy``.

  Warns (and says so in the report) when a pre-training falls short: adaptation results on a
  backbone that never learned say nothing about the adaptation methods.
  """
  rows = [r for r in reporting.read_metrics(os.path.join(workdir, "pretrain", "metrics.jsonl"))
          if "val_accuracy" in r]
  if not rows:  # Loaded from elsewhere (init_checkpoint) or no validation split.
    return {}
  report = {"steps": int(rows[-1]["step"]), "val_accuracy": float(rows[-1]["val_accuracy"]),
            "min_val_accuracy": float(config.pretrain.min_val_accuracy)}
  report["healthy"] = report["val_accuracy"] >= report["min_val_accuracy"]
  if not report["healthy"]:
    message = (f"PRE-TRAINING FELL SHORT: validation accuracy {report['val_accuracy']:.3f} after "
               f"{report['steps']} steps, below the {report['min_val_accuracy']:.3f} this config "
               "expects (config.pretrain.min_val_accuracy). Adaptation results on this backbone "
               "do not measure the methods; pre-train longer or fix the learning rate.")
    warnings.warn(message, PretrainingWarning)
    logging.warning(message)
  return report


class PretrainingWarning(UserWarning):
  """A pre-training ended below the validation accuracy its config expects."""


# ---------------------------------------------------------------------------------------------
# Adaptation and the report.


def _base_mean(config, splits: Splits, variables: dict) -> Optional[np.ndarray]:
  """SimpleShot's centring feature: the mean pre-trained feature of (up to 1,000) base examples."""
  if config.adapt.head != "simpleshot" or splits.pretrain is None:
    return None
  model = models.get_model(config.model.name, num_classes=None, precision="float",
                           **config.model.kwargs.to_dict())
  inputs = jnp.asarray(splits.pretrain.inputs[:1000])
  features = adaptation._batched_features(  # pylint: disable=protected-access
      lambda p, x: model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                               train=False), variables["params"], inputs,
      config.adapt.eval_batch_size)
  return np.asarray(features.reshape(features.shape[0], -1).mean(0))


def _calibration_inputs(config, splits: Splits) -> Optional[np.ndarray]:
  """Pre-training examples that fix fixed-point scales (None: each task's support set does)."""
  if splits.pretrain is None or not len(splits.pretrain.inputs):
    return None
  inputs = splits.pretrain.inputs
  count = min(config.adapt.calibration_examples, len(inputs))
  index = np.sort(np.random.default_rng(config.seed).choice(len(inputs), count, replace=False))
  return np.asarray(inputs[index])


def _read_done(path: str) -> dict:
  return {row["task"]: row for row in reporting.read_metrics(path)}


def adapt_all(config, splits: Splits, variables: dict, workdir: str) -> dict:
  """Runs every method on every task (skipping tasks already recorded); returns the results."""
  os.makedirs(os.path.join(workdir, "tasks"), exist_ok=True)
  num_classes = config.task.ways if config.task.kind == "fewshot" else splits.adapt.num_classes
  base_mean = _base_mean(config, splits, variables)
  calibration_inputs = _calibration_inputs(config, splits)
  results, curves, accuracies = {}, {}, {}
  for name, method in experiment.methods(config):
    path = os.path.join(workdir, "tasks", f"{name}.jsonl")
    # A diverged task is tried again (with the config of this run, e.g. a lower learning rate).
    done = {i: row for i, row in _read_done(path).items() if not row.get("diverged")}
    adapter = None
    bar = _progress(range(config.task.num_tasks), desc=name, disable=not config.progress)
    seconds = []
    diverged = None
    for index in bar:
      if diverged is not None:
        break  # The same method on the next task would diverge too.
      if index not in done:
        if adapter is None:
          adapter = adaptation.Adapter(config.model.name, config.model.kwargs.to_dict(),
                                       variables, method, config.adapt, num_classes,
                                       config.seed, base_mean, calibration_inputs)
        task = make_task(config, splits, index)
        start = time.perf_counter()
        result = adapter(task, jax.random.fold_in(jax.random.key(config.seed), index))
        seconds.append(time.perf_counter() - start)
        losses = np.asarray(result.losses, np.float64)
        done[index] = {"task": index, "accuracy": result.accuracy,
                       "losses": [float(v) for v in losses], "seconds": seconds[-1]}
        step = (_first_divergence(losses, DIVERGENCE_FACTOR * max(losses[0], 1.0))
                if len(losses) and np.isfinite(losses[0]) else (1 if len(losses) else None))
        if step is None and not np.isfinite(result.accuracy):
          step = len(losses)
        if step is not None:
          done[index].update(diverged=True, step=step, accuracy=None,
                             losses=[float(v) for v in losses[:max(step - 1, 0)]])
          diverged = done[index]
        reporting.append_record(path, done[index])
      if diverged is None:
        bar.set_postfix(accuracy=f"{np.mean([done[i]['accuracy'] for i in done]):.3f}",
                        refresh=False)
    bar.close()
    if diverged is not None:
      message = (f"method {name!r} diverged: its loss blew up at adaptation step "
                 f"{diverged['step']} of task {diverged['task']} (learning rate "
                 f"{method.learning_rate:g}). Lower config.methods.{name}.learning_rate (e.g. "
                 f"--config.methods.{name}.learning_rate={method.learning_rate / 10:g}) and run again "
                 "with the same --workdir: the method starts again at that task; the other "
                 "methods are reported as usual.")
      warnings.warn(message, DivergenceWarning)
      logging.warning(message)
      results[name] = {"diverged": True, "task": int(diverged["task"]),
                       "step": int(diverged["step"]), "tasks": int(diverged["task"]),
                       "kind": method.kind, "precision": method.precision, "message": message}
      continue
    rows = [done[i] for i in range(config.task.num_tasks)]
    accuracies[name] = [row["accuracy"] for row in rows]
    losses = [row["losses"] for row in rows if row["losses"]]
    curves[name] = np.mean(np.asarray(losses), axis=0) if losses else None
    # Compile time is in the first task; report the steady-state time per task.
    steady = [row["seconds"] for row in rows[1:]] or [rows[0]["seconds"]]
    results[name] = {**reporting.summarize(accuracies[name]), "kind": method.kind,
                     "precision": method.precision, "seconds_per_task": float(np.median(steady))}
    if curves[name] is not None:
      results[name]["final_loss"] = float(curves[name][-1])
  reporting.plot_adaptation(curves, accuracies, os.path.join(workdir, "plots", "adaptation.png"),
                            f"{config.task.kind}: {config.data.source}, {config.model.name}, "
                            f"{config.adapt.mode}/{config.adapt.head}")
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pre-trains (or loads) a backbone, adapts it by every configured method, writes the report.

  Args:
    config: an experiment config (see ``configs/`` and :func:`fwdgrad.experiment.default_config`).
    workdir: where checkpoints, metrics, plots and results go; reusing it resumes the run.

  Returns:
    ``{method: {"accuracy", "ci95", "tasks", "kind", "precision", "seconds_per_task", ...}}``.
  """
  config = experiment.validate_config(config)
  workdir = check_workdir(workdir)
  with workdir_lock(workdir):
    return _train_and_evaluate(config, workdir)


def _check_sizes(config, splits: Splits) -> None:
  """Sizes only the loaded data can check."""
  cfg = config.pretrain
  if splits.pretrain is not None and not cfg.init_checkpoint:
    if cfg.batch_size > splits.pretrain.num_examples:
      raise experiment.ConfigError(
          f"config.pretrain.batch_size = {cfg.batch_size} is larger than the "
          f"{splits.pretrain.num_examples} pre-training examples; use at most "
          f"{splits.pretrain.num_examples}.")


def _train_and_evaluate(config, workdir: str) -> dict:
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  reporting.write_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=2))
  try:
    splits = make_splits(config)
  except experiment.ConfigError:
    raise
  except ValueError as error:  # What a data source says about its arguments or files.
    raise experiment.ConfigError(f"config.data (source {config.data.source!r}): {error}") from error
  _check_sizes(config, splits)
  variables = pretrain(config, splits, workdir)
  health = pretrain_report(config, workdir)
  results = adapt_all(config, splits, variables, workdir)
  reference = "backprop" if "backprop" in results else None
  table = reporting.results_table(results, reference)
  if health:
    table += (f"\n\npre-training: validation accuracy {100 * health['val_accuracy']:.2f}% after "
              f"{health['steps']} steps (expected at least "
              f"{100 * health['min_val_accuracy']:.2f}%)"
              + ("" if health["healthy"] else " -- FELL SHORT, see the warning above"))
  if config.task.tune:
    points = experiment.tune_points(config)
    chosen = reporting.tuning_choice(results, points)
    table += ("\n\ntuning run (config.task.tune): validation accuracy on the tuning part of the "
              "data, which reported runs never see; set each method's fields to its chosen point"
              "\n\n" + reporting.tuning_table(results, points))
    reporting.write_atomic(os.path.join(workdir, "tuning.json"), json.dumps(chosen, indent=2))
  reporting.write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
  if health:
    reporting.write_atomic(os.path.join(workdir, "pretrain", "health.json"),
                           json.dumps(health, indent=2))
  reporting.write_atomic(os.path.join(workdir, "results.md"), table + "\n")
  print(table)
  return results
