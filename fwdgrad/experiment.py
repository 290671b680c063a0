"""The experiment config: its defaults, and the checks that run before any work.

Every config in ``configs/`` starts from :func:`default_config` and overrides fields. A field that
the defaults do not have (a typo), a name outside the allowed values, an impossible shape or a
missing data path stops the run at once with a ``ValueError`` that names the field (for example
``config.adapt.mode``) and what it accepts.

Methods live in ``config.methods``, a dict from a display name to a method config; any field a
method leaves out takes its value from :data:`METHOD_DEFAULTS` (and ``steps`` from
``config.adapt.steps``).
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator, Mapping

import ml_collections
import numpy as np

from fwdgrad import adaptation
from fwdgrad import estimators
from fwdgrad import models
from fwdgrad.data import sources

TASK_KINDS = ("fewshot", "transfer")
SPLITS = ("class", "group", "class_and_group")
FRONTENDS = ("none", "log_mel")

METHOD_DEFAULTS = dict(
    kind="zero_shot",        # one of adaptation.METHOD_KINDS
    precision="float",       # "float", "16w8a", "8w8a", "<w>w<a>a"
    learning_rate=1e-3,
    optimizer="sgd",         # not used by qzo_ff, whose update rule is integer
    num_directions=3,
    epsilon=1e-3,
    distribution=estimators.DEFAULT_DISTRIBUTION,  # the library's ("irwin_hall"): an
                             # experiment measures what a user of the transforms gets
    sign=True,               # spsa only: sign-m-SPSA
    steps=-1,                # -1: config.adapt.steps
    # The paper's enhancements (Sec. 3.4); the sparse update is config.adapt.sparsity.
    momentum=False,          # spsa, qzo_ff: momentum-guided sampling (MomentumGuidedSampling())
    sharpness_radius=0.0,    # spsa, qzo_ff: ρ of the sharpness-aware ascent step (0: off)
    kernelwise=False,        # ff, spsa, qzo_ff: kernel-wise normalization of the update
    # Fixed-point methods: the trained head's weight range w_max and its output (logit) range, as
    # multiples of the ranges calibrated on the initial head. Static scales never change, so no
    # weight or logit passes the range it starts with; a randomly initialised decoder needs room
    # to grow (scripts/weight_range.py measures it).
    head_range=1.0,
)

_ENHANCED_KINDS = dict(momentum=("spsa", "qzo_ff"), sharpness_radius=("spsa", "qzo_ff"),
                       kernelwise=("ff", "spsa", "qzo_ff"))


class ConfigError(ValueError):
  """A config field is wrong; the message names it and what it accepts."""


def method(kind: str, **overrides) -> ml_collections.ConfigDict:
  """A method config with every field (so any can be overridden on the command line).

  Examples:
    >>> config = fwdgrad.default_config()
    >>> config.methods = dict(zero_shot=method("zero_shot"),
    ...                       qzo_16w8a=method("qzo_ff", precision="16w8a", learning_rate=1e-3))
  """
  _allowed("method kind", kind, adaptation.METHOD_KINDS)
  unknown = sorted(set(overrides) - set(METHOD_DEFAULTS))
  if unknown:
    raise ConfigError(f"{unknown} are not method fields; the fields are {sorted(METHOD_DEFAULTS)}.")
  return ml_collections.ConfigDict(dict(METHOD_DEFAULTS, kind=kind, **overrides))


def paper_methods(learning_rate: float = 3e-3, *, backprop_learning_rate: float = 3e-3,
                  backprop_steps: int = 100, kernelwise_learning_rate: float = 3e-2,
                  sharpness_radius: float = 0.05, **overrides) -> dict:
  """The paper's comparison, one method config per row (the names experiment configs share).

  Zero-shot in float and at 16w8a (what fixed-point inference alone costs); backprop (Adam); float
  FF (jvp); float sign-m-SPSA; QZO-FF at 16w8a and 8w8a with m = 3, and 16w8a at m = 1; and the
  enhancements of Sec. 3.4 on QZO-FF 16w8a: momentum-guided sampling, sharpness-aware, kernel-wise,
  sharpness-aware + kernel-wise. Forward-gradient rows take ``config.adapt.steps``.

  Args:
    learning_rate: of every forward-gradient row but the kernel-wise ones.
    backprop_learning_rate, backprop_steps: backprop's.
    kernelwise_learning_rate: of the kernel-wise rows, whose step is η‖w^i‖ per kernel.
    sharpness_radius: ρ of the sharpness-aware rows.
    **overrides: ``name=dict(field=value, ...)`` replaces fields of one row (tuned values), or
      ``name=None`` drops the row.
  """
  fg = dict(learning_rate=learning_rate, num_directions=3)
  kw = dict(fg, learning_rate=kernelwise_learning_rate, kernelwise=True)
  rows = dict(
      zero_shot=method("zero_shot"),
      zero_shot_16w8a=method("zero_shot", precision="16w8a"),
      backprop=method("backprop", learning_rate=backprop_learning_rate, optimizer="adam",
                      steps=backprop_steps),
      ff=method("ff", optimizer="sgd", **fg),
      spsa=method("spsa", optimizer="sgd", **fg),
      qzo_ff_16w8a=method("qzo_ff", precision="16w8a", **fg),
      qzo_ff_16w8a_m1=method("qzo_ff", precision="16w8a", **dict(fg, num_directions=1)),
      qzo_ff_8w8a=method("qzo_ff", precision="8w8a", **fg),
      qzo_ff_16w8a_momentum=method("qzo_ff", precision="16w8a", momentum=True, **fg),
      qzo_ff_16w8a_sharpness=method("qzo_ff", precision="16w8a",
                                    sharpness_radius=sharpness_radius, **fg),
      qzo_ff_16w8a_kernelwise=method("qzo_ff", precision="16w8a", **kw),
      qzo_ff_16w8a_sharpness_kernelwise=method("qzo_ff", precision="16w8a",
                                               sharpness_radius=sharpness_radius, **kw),
  )
  for name, fields in overrides.items():
    if name not in rows:
      raise ConfigError(f"paper_methods: there is no row {name!r}; the rows are {sorted(rows)}.")
    if fields is None:
      del rows[name]
    else:
      rows[name] = method(rows[name].kind, **dict(
          {k: v for k, v in rows[name].items() if k != "kind"}, **fields))
  return rows


def config_variant(arg, variants, config_file: str, *, combinable: bool = False) -> tuple:
  """The parts of a config's variant argument (``configs/x.py:tiny``), or a ConfigError naming them.

  Args:
    arg: what follows the ``:`` (None or "" for the full run).
    variants: the variants the config knows.
    config_file: the config's path, for the message.
    combinable: variants join with ``_`` (``tiny_sparse_lp3``).
  """
  if not arg:
    return ()
  parts = tuple(arg.split("_")) if combinable else (arg,)
  unknown = [part for part in parts if part not in variants]
  if unknown:
    joined = " joined by '_'" if combinable else ""
    raise ConfigError(f"{config_file}:{arg}: {unknown[0]!r} is not a variant of this config; its "
                      f"variants are {tuple(variants)}{joined} (no variant: the full run).")
  return parts


def data_dir(*parts: str) -> str:
  """A path under ``$FWDGRAD_DATA_DIR`` (default ``./data``): where configs look for local data."""
  return os.path.join(os.environ.get("FWDGRAD_DATA_DIR", "data"), *parts)


def data_defaults() -> ml_collections.ConfigDict:
  """The fields of a data config (``config.data`` and ``config.pretrain.data``)."""
  data = ml_collections.ConfigDict()
  data.source = ""               # a key of fwdgrad.data.SOURCES, or "tfds:<name>"
  data.kwargs = ml_collections.ConfigDict()  # the source's arguments, e.g. path=...
  data.frontend = "none"         # "log_mel": waveforms -> the speech embedding's log-mel input
  data.max_examples = 0          # keep at most this many examples (0: all); for quick runs
  data.positive_classes = ()     # non-empty: binary labels, 1 for these class names
  data.corruption = ""           # one of fwdgrad.data.corruptions.CORRUPTIONS (an OOD shift)
  data.severity = 3              # of the corruption, 1 to 5
  return data


def default_config() -> ml_collections.ConfigDict:
  """All fields an experiment config may set, with their defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.progress = True

  config.data = data_defaults()
  config.data.source = "digits"

  config.task = ml_collections.ConfigDict()
  config.task.kind = "fewshot"
  config.task.split_by = "class"             # or "group" (whole alphabets / speakers), or both
  # Base / validation / novel classes (groups when split by group); validation: config.task.tune's
  # episodes, the same for every seed; base 0: pre-trained on config.pretrain.data instead.
  config.task.split_sizes = (0.5, 0.0, 0.5)
  # class_and_group: pre-training / task groups, or pre-training / tuning / task groups (the
  # tuning groups, the same for every seed, give config.task.tune's episodes).
  config.task.group_split = (0.5, 0.5)
  config.task.ways = 5
  config.task.shots = 5
  config.task.queries = 15
  config.task.num_tasks = 20
  config.task.test_fraction = 0.1            # transfer: held-out fraction
  config.task.train_examples = 0             # transfer: examples per task (0: all)
  # transfer: pre-train on this fraction of config.data's examples, kept clean (the shift, e.g.
  # config.data.corruption, applies to the rest only); 0: pre-train on config.pretrain.data.
  config.task.pretrain_fraction = 0.0
  # transfer: set this fraction of the tasks' data aside, the same examples for every seed (a
  # fixed split seed), for tuning only: reported runs never adapt on it or score it. With
  # config.task.tune, the tasks adapt on two thirds of it and score the other third, and every
  # point of config.tune_grid runs.
  config.task.tuning_fraction = 0.0
  config.task.tune = False

  config.model = ml_collections.ConfigDict()
  config.model.name = "conv4"
  config.model.kwargs = ml_collections.ConfigDict()

  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.steps = 500
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 3e-3
  config.pretrain.optimizer = "adam"
  config.pretrain.weight_decay = 0.0
  config.pretrain.val_fraction = 0.1
  config.pretrain.log_every = 50
  config.pretrain.checkpoint_every = 100
  config.pretrain.init_checkpoint = ""       # a backbone directory to start from instead
  # The validation accuracy a healthy pre-training of this config reaches; a run that ends
  # below it warns loudly (0: no check).
  config.pretrain.min_val_accuracy = 0.0
  config.pretrain.data = data_defaults()  # source "": pre-train on the base classes

  config.adapt = ml_collections.ConfigDict()
  config.adapt.mode = "ft"            # "ft", "lp", "dvpt"
  config.adapt.head = "protonet"      # "protonet", "simpleshot", "linear" (LP-1), "mlp3" (LP-3),
                                      # "pretrained" (LP-1 from the pre-trained classifier),
                                      # "random" (LP-1 from a random decoder)
  config.adapt.steps = 20
  config.adapt.sparsity = 0.0         # 0.9: the paper's 90%-sparse update
  config.adapt.sparse_method = "topk"
  config.adapt.batch_size = 0         # 0: the whole training set of the task every step
  config.adapt.eval_batch_size = 256
  config.adapt.head_hidden = 0        # LP-3 hidden width (0: the feature width)
  config.adapt.temperature = 0.0      # episode-loss temperature (0: automatic, see Adapter)
  # What a ProtoNets / SimpleShot head's episode loss scores: "support" (the support set against
  # its own prototypes) or "views" (a new random view of each support example per step, against
  # the prototypes of the originals: at 1 shot "support" is degenerate, every example is its
  # own prototype). A view shifts each of the augment_axes circularly by up to augment_shift of
  # its length and adds Gaussian noise of augment_noise times the support set's deviation.
  config.adapt.objective = "support"
  config.adapt.augment_axes = (1,)    # (1,): time of (batch, time, mel); (1, 2): image rows, cols
  config.adapt.augment_shift = 0.1
  config.adapt.augment_noise = 0.1
  # Static scales of fixed-point methods (fwdgrad.models.calibrate): "max", "percentile", "mse",
  # from this many pre-training examples (the task's support set when there are none).
  config.adapt.calibration = "max"
  config.adapt.calibration_examples = 256

  config.methods = ml_collections.ConfigDict()
  config.methods.zero_shot = method("zero_shot")
  # {method name: {field: (values, ...)}}: the grid that a config.task.tune run tries for each
  # method (every combination), recorded with the config whose methods it chose.
  config.tune_grid = ml_collections.ConfigDict()
  return config


def _grid_value(value) -> str:
  # Config field names cannot hold dots: 0.003 -> "3e-3", 0.0015 -> "1p5e-3", 2.5 -> "2p5".
  if isinstance(value, float):
    text = f"{value:g}"
    if "." in text and "e" not in text and abs(value) < 1:
      mantissa, exponent = f"{value:e}".split("e")
      text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return text.replace(".", "p")
  return str(value).replace(".", "p")


def grid_name(name: str, point: Mapping) -> str:
  """The method name of one point of a tuning grid: ``ff@learning_rate=3e-3,steps=2000``."""
  return name + "@" + ",".join(f"{field}={_grid_value(value)}" for field, value in point.items())


def tune_points(config) -> dict:
  """``{method name: [(variant name, {field: value}), ...]}``: the points of ``config.tune_grid``."""
  points = {}
  for name, grid in config.tune_grid.items():
    fields = sorted(grid.keys())
    points[name] = [(grid_name(name, dict(zip(fields, values))), dict(zip(fields, values)))
                    for values in itertools.product(*(tuple(grid[f]) for f in fields))]
  return points


def _check_tune_grid(full, methods: Mapping) -> None:
  for name, grid in full.tune_grid.items():
    if name not in methods and full.task.tune:  # (A grid for a method left out is harmless.)
      raise ConfigError(f"config.tune_grid.{name}: there is no method {name!r} to tune; the "
                        f"methods are {sorted(methods)}.")
    if not hasattr(grid, "items") or not grid:
      raise ConfigError(f"config.tune_grid.{name} must map method fields to tuples of values, "
                        f"e.g. {{'learning_rate': (1e-3, 3e-3)}}; got {grid!r}.")
    for field, values in grid.items():
      if field not in METHOD_DEFAULTS:
        raise ConfigError(f"config.tune_grid.{name}.{field} is not a method field; the fields "
                          f"are {sorted(METHOD_DEFAULTS)}.")
      if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)) or not values:
        raise ConfigError(f"config.tune_grid.{name}.{field} must be a non-empty tuple of values, "
                          f"got {values!r}.")


def _allowed(what: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"{what} = {value!r} is not allowed; use one of {tuple(allowed)}.")


def _merge(defaults: ml_collections.ConfigDict, given, where: str) -> None:
  """Copies ``given`` into ``defaults``, refusing fields the defaults do not have."""
  for key, value in given.items():
    if key not in defaults:
      raise ConfigError(f"{where}.{key} is not a config field (a typo?); the fields of {where} "
                       f"are {sorted(defaults.keys())}.")
    if isinstance(defaults[key], ml_collections.ConfigDict) and key != "kwargs":
      if not hasattr(value, "items"):
        raise ConfigError(f"{where}.{key} must be a dict of fields, got {value!r}.")
      _merge(defaults[key], value, f"{where}.{key}")
    elif key == "kwargs":
      defaults[key] = ml_collections.ConfigDict(dict(value))
    else:
      with defaults.ignore_type():
        defaults[key] = value


def validate_config(config) -> ml_collections.ConfigDict:
  """The config with defaults filled in, or a ValueError naming the first bad field."""
  full = default_config()
  methods = dict(config.get("methods", {}) or {})
  grid = dict(config.get("tune_grid", {}) or {})
  given = {k: v for k, v in config.items() if k not in ("methods", "tune_grid")}
  _merge(full, given, "config")
  full.tune_grid = ml_collections.ConfigDict(grid)
  if not methods:
    raise ConfigError("config.methods is empty; add at least one method, e.g. "
                     "config.methods.zero_shot = dict(kind='zero_shot').")
  full.methods = ml_collections.ConfigDict()
  for name, method in methods.items():
    merged = ml_collections.ConfigDict(METHOD_DEFAULTS)
    _merge(merged, method, f"config.methods.{name}")
    full.methods[name] = merged

  _allowed("config.model.name", full.model.name, models.MODELS)
  _check_data(full.data, "config.data")
  if full.pretrain.data.source:
    _check_data(full.pretrain.data, "config.pretrain.data")
  task, adapt = full.task, full.adapt
  _allowed("config.task.kind", task.kind, TASK_KINDS)
  _allowed("config.task.split_by", task.split_by, SPLITS)
  _allowed("config.adapt.mode", adapt.mode, adaptation.MODES)
  _allowed("config.adapt.head", adapt.head, adaptation.HEADS)
  _allowed("config.adapt.sparse_method", adapt.sparse_method, ("topk", "random"))
  _allowed("config.adapt.objective", adapt.objective, adaptation.OBJECTIVES)
  if adapt.objective == "views":
    if adapt.head not in ("protonet", "simpleshot") or adapt.mode == "lp":
      raise ConfigError("config.adapt.objective = 'views' trains a backbone with the episode "
                        "loss: it needs config.adapt.head 'protonet' or 'simpleshot' and mode "
                        f"'ft' or 'dvpt' (got head {adapt.head!r}, mode {adapt.mode!r}).")
    if not adapt.augment_axes or any(int(a) < 1 for a in adapt.augment_axes):
      raise ConfigError(f"config.adapt.augment_axes = {tuple(adapt.augment_axes)} must name "
                        "input axes after the batch axis (1 for time or image rows).")
  _allowed("config.pretrain.optimizer", full.pretrain.optimizer, adaptation.OPTIMIZERS)
  _check_ranges(full)
  for field in ("ways", "shots", "num_tasks"):
    _positive(f"config.task.{field}", task[field])
  _positive("config.task.queries", task.queries)
  _positive("config.pretrain.log_every", full.pretrain.log_every)
  _positive("config.pretrain.checkpoint_every", full.pretrain.checkpoint_every)
  _positive("config.adapt.eval_batch_size", adapt.eval_batch_size)
  _allowed("config.adapt.calibration", adapt.calibration, models.CALIBRATION_METHODS)
  _positive("config.adapt.calibration_examples", adapt.calibration_examples)
  if full.pretrain.checkpoint_every % full.pretrain.log_every:
    raise ConfigError("config.pretrain.checkpoint_every must be a multiple of "
                     f"config.pretrain.log_every ({full.pretrain.log_every}).")
  if not 0.0 <= adapt.sparsity < 1.0:
    raise ConfigError(f"config.adapt.sparsity = {adapt.sparsity} must lie in [0, 1).")
  if adapt.mode == "dvpt" and full.model.name != "vit_tiny":
    raise ConfigError("config.adapt.mode = 'dvpt' (deep visual prompt tuning) needs a ViT: set "
                     "config.model.name = 'vit_tiny' with model.kwargs.num_prompts > 0.")
  if task.kind == "fewshot" and len(task.split_sizes) != 3:
    raise ConfigError("config.task.split_sizes must give (base, validation, novel) sizes.")
  if task.pretrain_fraction:
    if task.kind != "transfer":
      raise ConfigError("config.task.pretrain_fraction splits the examples of a transfer task; "
                       "few-shot tasks pre-train on their base classes (config.task.split_sizes).")
    if not 0.0 < task.pretrain_fraction < 1.0:
      raise ConfigError(f"config.task.pretrain_fraction = {task.pretrain_fraction} must lie in "
                       "(0, 1) (0: pre-train on config.pretrain.data).")
    if full.pretrain.data.source:
      raise ConfigError("set config.task.pretrain_fraction (pre-train on part of config.data) or "
                       "config.pretrain.data.source (another dataset), not both.")
  if task.kind == "transfer" and not (full.pretrain.data.source or full.pretrain.init_checkpoint
                                      or task.pretrain_fraction):
    raise ConfigError("a transfer task adapts a pre-trained backbone: set "
                     "config.pretrain.data.source (the source domain), "
                     "config.task.pretrain_fraction (a clean part of config.data) or "
                     "config.pretrain.init_checkpoint.")
  if adapt.head == "pretrained" and task.kind != "transfer":
    raise ConfigError("config.adapt.head = 'pretrained' keeps the pre-trained classifier, which "
                     "only a transfer task (the same classes) can use; few-shot tasks take "
                     "'protonet', 'simpleshot', 'linear' or 'mlp3'.")
  if not 0.0 <= full.pretrain.min_val_accuracy <= 1.0:
    raise ConfigError(f"config.pretrain.min_val_accuracy = {full.pretrain.min_val_accuracy} must "
                     "be a fraction in [0, 1] (0: no check).")
  init = full.pretrain.init_checkpoint
  if init and not os.path.exists(os.path.expanduser(init)):
    raise ConfigError(f"config.pretrain.init_checkpoint = {init!r} does not exist; give the "
                     "'backbone' directory of an earlier run, or for model 'speech_embedding' the "
                     "pyopen-wakeword wheel or its embedding_model.tflite.")
  _check_tune_grid(full, full.methods)
  if (task.kind == "fewshot" and not task.split_sizes[0]
      and not (full.pretrain.data.source or full.pretrain.init_checkpoint)):
    raise ConfigError("config.task.split_sizes[0] = 0 leaves no base classes to pre-train on: "
                      "set config.pretrain.data.source (pre-train on another dataset) or "
                      "config.pretrain.init_checkpoint, or give the base part classes.")
  if task.tune and task.kind == "fewshot":
    if task.split_by == "class_and_group" and len(tuple(task.group_split)) != 3:
      raise ConfigError("config.task.tune draws a class-and-group split's tuning episodes from "
                        "held-out groups: give config.task.group_split three parts "
                        "(pre-training, tuning, task groups), e.g. (2, 1, 3).")
    if task.split_by != "class_and_group" and not task.split_sizes[1]:
      raise ConfigError("config.task.tune draws a few-shot run's tuning episodes from the "
                        "validation part, which is empty: set config.task.split_sizes[1] > 0.")
  if task.tuning_fraction or (task.tune and task.kind == "transfer"):
    if task.kind != "transfer":
      raise ConfigError("config.task.tuning_fraction sets part of a transfer task's data aside "
                        "for tuning; few-shot tasks tune on validation classes "
                        "(config.task.split_sizes).")
    _number("config.task.tuning_fraction", task.tuning_fraction, 0.0, 1.0, open_low=True,
            open_high=True, hint="config.task.tune runs on that part of the data.")
  if task.tune:
    for name, points in tune_points(full).items():
      base = full.methods[name]
      del full.methods[name]
      for variant, point in points:
        full.methods[variant] = ml_collections.ConfigDict(dict(base.to_dict(), **point))
  for name, method in full.methods.items():
    _check_method(f"config.methods.{name}", method, adapt)
    if method.steps < 0:
      method.steps = adapt.steps
  return full


def _number(what: str, value, low=None, high=None, *, open_low=False, open_high=False,
            integer=False, hint: str = "") -> None:
  """Refuses a non-number, a non-finite number or one outside ``[low, high]`` (open ends as said)."""
  kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  ok = not isinstance(value, bool) and isinstance(value, kinds) and np.isfinite(value)
  if ok and low is not None:
    ok = value > low if open_low else value >= low
  if ok and high is not None:
    ok = value < high if open_high else value <= high
  if not ok:
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
      bounds.append(f"{'>' if open_low else '>='} {low}")
    if high is not None:
      bounds.append(f"{'<' if open_high else '<='} {high}")
    where = f" {' and '.join(bounds)}" if bounds else ""
    raise ConfigError(f"{what} must be {kind}{where}, got {value!r}.{' ' + hint if hint else ''}")


def _check_ranges(full) -> None:
  """Every step count, batch size, learning rate and fraction of the run in its valid range."""
  pre, adapt, task = full.pretrain, full.adapt, full.task
  if not pre.init_checkpoint:
    _positive("config.pretrain.steps", pre.steps)
    _positive("config.pretrain.batch_size", pre.batch_size)
    _number("config.pretrain.learning_rate", pre.learning_rate, 0.0, open_low=True,
            hint="(a negative one trains away from the data)")
    _number("config.pretrain.weight_decay", pre.weight_decay, 0.0)
    _number("config.pretrain.val_fraction", pre.val_fraction, 0.0, 1.0, open_high=True)
  _positive("config.adapt.steps", adapt.steps)
  _number("config.adapt.batch_size", adapt.batch_size, 0, integer=True,
          hint="(0: the whole training set of a task every step)")
  _number("config.adapt.head_hidden", adapt.head_hidden, 0, integer=True,
          hint="(0: the feature width)")
  _number("config.adapt.temperature", adapt.temperature, 0.0, hint="(0: automatic)")
  _number("config.adapt.augment_shift", adapt.augment_shift, 0.0, 1.0, open_high=True)
  _number("config.adapt.augment_noise", adapt.augment_noise, 0.0)
  for where, data in (("config.data", full.data), ("config.pretrain.data", full.pretrain.data)):
    _number(f"{where}.max_examples", data.max_examples, 0, integer=True, hint="(0: all)")
  if task.kind == "transfer":
    _number("config.task.test_fraction", task.test_fraction, 0.0, 1.0, open_low=True,
            open_high=True)
    _number("config.task.train_examples", task.train_examples, 0, integer=True,
            hint="(0: all)")
  else:
    # Pre-trained on another dataset, a few-shot task needs no base part.
    elsewhere = full.pretrain.data.source or full.pretrain.init_checkpoint
    _check_sizes("config.task.split_sizes", tuple(task.split_sizes), "classes",
                 (2,) if elsewhere else (0, 2))
    if task.split_by == "class_and_group":
      groups = tuple(task.group_split)
      if len(groups) not in (2, 3):
        raise ConfigError(f"config.task.group_split = {groups} must give (pre-training, task) "
                          "groups, or (pre-training, tuning, task) groups.")
      _check_sizes("config.task.group_split", groups, "groups", tuple(range(len(groups))))


def _check_sizes(what: str, sizes: tuple, unit: str, needed: tuple) -> None:
  """Counts of ``unit`` per part (ints) or fractions summing to 1; parts ``needed`` non-empty."""
  for i, size in enumerate(sizes):
    _number(f"{what}[{i}]", size, 0.0)
  counts = all(isinstance(size, (int, np.integer)) for size in sizes)
  if not counts and abs(sum(sizes) - 1.0) > 1e-6:
    raise ConfigError(f"{what} = {sizes}: fractions must sum to 1 (or give whole numbers of "
                      f"{unit}).")
  if len(sizes) > max(needed) and any(not sizes[i] > 0 for i in needed):
    raise ConfigError(f"{what} = {sizes}: parts {needed} (pre-training and tasks) must not be "
                      "empty.")


def _positive(what: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"{what} must be a positive integer, got {value!r}.")


def _check_data(data, where: str) -> None:
  source = data.source
  if not source.startswith("tfds:"):
    _allowed(f"{where}.source", source, tuple(sources.SOURCES) + ("tfds:<name>",))
  _allowed(f"{where}.frontend", data.frontend, FRONTENDS)
  if data.corruption:
    from fwdgrad.data import corruptions  # pylint: disable=g-import-not-at-top
    _allowed(f"{where}.corruption", data.corruption, corruptions.CORRUPTIONS)
    _allowed(f"{where}.severity", data.severity, (1, 2, 3, 4, 5))
  path = data.kwargs.get("path")
  paths = () if path is None else tuple(path) if isinstance(path, (list, tuple)) else (path,)
  for one in paths:  # (A source may merge several folders or archives.)
    if not os.path.exists(os.path.expanduser(str(one))):
      raise ConfigError(f"{where}.kwargs.path = {one!r} does not exist; point it at your copy of "
                        f"the data (for the files shipped with the project, see the docstring "
                        "of the config you run).")


def _check_method(where: str, method, adapt) -> None:
  _allowed(f"{where}.kind", method.kind, adaptation.METHOD_KINDS)
  try:
    models.Precision.parse(method.precision)
  except ValueError as error:
    raise ConfigError(f"{where}.precision: {error}") from None
  _allowed(f"{where}.optimizer", method.optimizer, adaptation.OPTIMIZERS)
  distributions = estimators.DISTRIBUTIONS + ("binomial",)
  if not (callable(method.distribution) or method.distribution in distributions):
    _allowed(f"{where}.distribution", method.distribution, distributions)
  _check_enhancements(where, method)
  _positive(f"{where}.num_directions", method.num_directions)
  if method.kind != "zero_shot":
    steps = adapt.steps if method.steps < 0 else method.steps
    _positive(f"{where}.steps (or config.adapt.steps)", steps)
    if adapt.mode == "lp" and adapt.head in ("protonet", "simpleshot"):
      raise ConfigError(f"{where}: config.adapt.mode = 'lp' with head {adapt.head!r} leaves "
                       "nothing to train; use head 'linear' (LP-1) or 'mlp3' (LP-3).")
    _number(f"{where}.learning_rate", method.learning_rate, 0.0, open_low=True)
  if method.kind in ("spsa", "qzo_ff"):
    _number(f"{where}.epsilon", method.epsilon, 0.0, open_low=True,
            hint="(the perturbation size of the two forward calls)")
  if method.kind == "qzo_ff":
    weight_bits = models.Precision.parse(method.precision).weight_bits
    if weight_bits is None:
      raise ConfigError(f"{where}: qzo_ff runs on a fixed-point weight grid; set precision to "
                       "'16w8a' (or '8w8a', '<w>w<a>a').")
    if weight_bits > 16:
      raise ConfigError(f"{where}.precision = {method.precision!r}: qzo_ff holds weights in int16 "
                       "at most; use 2 to 16 weight bits, e.g. '16w8a'.")


def _check_enhancements(where: str, method) -> None:
  _number(f"{where}.head_range", method.head_range, 1.0,
          hint="1 keeps the head's initial range; 4 lets its weights grow 4-fold.")
  for field in ("momentum", "kernelwise"):
    if not isinstance(method[field], (bool, np.bool_)):
      raise ConfigError(f"{where}.{field} must be True or False, got {method[field]!r}.")
  radius = method.sharpness_radius
  if (isinstance(radius, bool) or not isinstance(radius, (int, float, np.number))
      or not 0.0 <= radius < float("inf")):
    raise ConfigError(f"{where}.sharpness_radius must be a finite float >= 0 (0: off), got "
                     f"{radius!r}.")
  for field, kinds in _ENHANCED_KINDS.items():
    if method[field] and method.kind not in kinds:
      raise ConfigError(f"{where}.{field} = {method[field]!r} does not apply to kind "
                       f"{method.kind!r}; it is an option of kinds {kinds} (set it to "
                       f"{False if field != 'sharpness_radius' else 0.0} or change the kind).")


def methods(config) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """``(name, method config)`` ordered by kind (zero-shot, backprop, ff, spsa, qzo_ff), then name.

  (A ConfigDict does not keep the order in which fields were written.)
  """
  order = {kind: i for i, kind in enumerate(adaptation.METHOD_KINDS)}
  yield from sorted(config.methods.items(), key=lambda item: (order[item[1].kind], item[0]))


def corrupt(dataset, data_config, seed: int = 0):
  """``dataset`` with ``data_config.corruption`` at ``data_config.severity`` (none: unchanged)."""
  if not data_config.corruption:
    return dataset
  from fwdgrad.data import corruptions  # pylint: disable=g-import-not-at-top
  return dataset._replace(inputs=corruptions.corrupt(
      dataset.inputs, data_config.corruption, data_config.severity, seed=seed))


def load_data(data_config, apply_corruption: bool = True):
  """Loads ``data_config.source`` and applies the frontend and ``max_examples``.

  With ``apply_corruption=False`` the corruption is left for the caller (:func:`corrupt`), which
  applies it to the adaptation part of a transfer task alone.
  """
  dataset = sources.load_dataset(data_config.source, **data_config.kwargs.to_dict())
  if data_config.max_examples and data_config.max_examples < dataset.num_examples:
    order = np.random.default_rng(0).permutation(dataset.num_examples)
    from fwdgrad.data import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
    dataset = dataset_lib.subset(dataset, np.sort(order[:data_config.max_examples]))
  if data_config.positive_classes:
    positive = [str(c) for c in data_config.positive_classes]
    unknown = sorted(set(positive) - set(dataset.class_names))
    if unknown:
      raise ConfigError(f"positive_classes {unknown} are not classes of {data_config.source!r}; "
                       f"its classes are {list(dataset.class_names)}.")
    is_positive = np.isin(np.asarray(dataset.class_names)[dataset.labels], positive)
    dataset = dataset._replace(labels=is_positive.astype(np.int32),
                               class_names=("other", "+".join(positive)))
  if apply_corruption:
    dataset = corrupt(dataset, data_config)
  if data_config.frontend == "log_mel":
    from fwdgrad.data import audio  # pylint: disable=g-import-not-at-top
    if dataset.inputs.ndim != 2:
      raise ConfigError(f"frontend 'log_mel' expects waveforms (examples, samples); the source "
                       f"gave inputs of shape {dataset.inputs.shape}.")
    features = np.concatenate([np.asarray(audio.embedding_features(chunk))
                               for chunk in np.array_split(dataset.inputs,
                                                           max(1, dataset.num_examples // 256))])
    dataset = dataset._replace(inputs=features.astype(np.float32))
  return dataset


def check_episodes(novel, task) -> None:
  """Fails before any training if the novel split cannot give the configured episodes."""
  if task.ways > novel.num_classes:
    raise ConfigError(f"config.task.ways = {task.ways} but the novel split has only "
                     f"{novel.num_classes} classes; lower ways or change config.task.split_sizes.")
  counts = np.bincount(novel.labels, minlength=novel.num_classes)
  need = task.shots + task.queries
  if counts.min() < need:
    raise ConfigError(f"config.task.shots + config.task.queries = {need} but a novel class has "
                     f"only {counts.min()} examples; lower shots or queries.")


def shrink_for_tests(config) -> ml_collections.ConfigDict:
  """Shrinks a config in place to seconds of work (few steps and tasks); the pipeline is the same."""
  config.progress = False
  config.pretrain.steps = 4
  config.pretrain.log_every = 2
  config.pretrain.checkpoint_every = 2
  config.pretrain.batch_size = 16
  config.task.num_tasks = 2
  config.task.queries = min(config.task.queries, 3)
  config.adapt.steps = 2
  config.adapt.eval_batch_size = 32
  return config
