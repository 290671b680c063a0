"""Tests of train_lib / experiment: validation, a tiny end-to-end run, resume after interruption."""

import importlib.util
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fwdgrad
from fwdgrad import adaptation
from fwdgrad import experiment
from fwdgrad import models
from fwdgrad import reporting
from fwdgrad import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_quickstart():
  config = load_config("quickstart", "tiny")
  config.methods = dict(zero_shot=dict(kind="zero_shot"),
                        ff=dict(kind="ff", learning_rate=1e-2),
                        qzo=dict(kind="qzo_ff", precision="16w8a", learning_rate=1e-3))
  config.pretrain.steps = 6
  config.task.num_tasks = 3
  return config


def tiny_fewshot():
  """The quickstart's pipeline on few-shot tasks: 5-way 5-shot episodes of 7 unseen digits."""
  config = tiny_quickstart()
  config.data.corruption = ""
  config.task.kind = "fewshot"
  config.task.pretrain_fraction = 0.0
  config.task.split_sizes = (3, 0, 7)
  config.task.ways, config.task.shots, config.task.queries = 5, 5, 3
  config.adapt.mode, config.adapt.head = "ft", "protonet"
  return config


def test_a_transfer_task_pretrains_on_a_clean_part_it_never_scores():
  config = experiment.validate_config(tiny_quickstart())
  splits = train_lib.make_splits(config)
  clean = experiment.load_data(config.data, apply_corruption=False)
  def rows(dataset):
    return {row.tobytes() for row in np.asarray(dataset.inputs).reshape(dataset.num_examples, -1)}
  clean_rows = rows(clean)
  # Pre-training reads clean digits; the tasks read corrupted ones (no example is clean there);
  # no scored example is one pre-training saw (blurred or not, by index).
  assert rows(splits.pretrain) | rows(splits.pretrain_val) <= clean_rows
  assert not rows(splits.adapt) & clean_rows and not rows(splits.adapt_test) & clean_rows
  total = splits.pretrain.num_examples + splits.pretrain_val.num_examples
  assert total + splits.adapt.num_examples + splits.adapt_test.num_examples == clean.num_examples
  assert abs(total - 0.5 * clean.num_examples) <= 10


def _rows(dataset):
  return {row.tobytes() for row in np.asarray(dataset.inputs).reshape(dataset.num_examples, -1)}


def test_the_tuning_part_is_the_same_for_every_seed_and_no_reported_run_sees_it():
  config = tiny_quickstart()
  config.data.corruption = ""  # So that rows compare across the clean and adapted parts.
  config.task.tuning_fraction = 0.3
  tuning, reported, scored = [], [], []
  for seed in (0, 1, 2):
    config.seed = seed
    config.task.tune = True
    tune = train_lib.make_splits(experiment.validate_config(config))
    tuning.append(_rows(tune.adapt) | _rows(tune.adapt_test))
    assert not _rows(tune.adapt) & _rows(tune.adapt_test)
    assert tune.adapt_test.num_examples == pytest.approx(len(tuning[-1]) / 3, abs=10)
    config.task.tune = False
    run = train_lib.make_splits(experiment.validate_config(config))
    reported.append(set().union(*(_rows(part) for part in
                                  (run.pretrain, run.pretrain_val, run.adapt, run.adapt_test))))
    scored.append(_rows(run.adapt_test))
  assert tuning[0] == tuning[1] == tuning[2]
  assert len(tuning[0]) == pytest.approx(0.3 * 1797, abs=10)
  for seen in reported:
    assert not seen & tuning[0]
    assert len(seen) + len(tuning[0]) == 1797
  assert scored[0] != scored[1]  # The seeds still split the rest differently.


@pytest.mark.parametrize("split_by", ["class", "group"])
def test_fewshot_tuning_classes_are_the_same_for_every_seed_and_no_task_draws_from_them(split_by):
  config = tiny_fewshot()
  config.task.split_by = split_by
  data = experiment.load_data(config.data, apply_corruption=False)
  if split_by == "group":  # Digits have no groups: make five, two classes each.
    data = data._replace(groups=data.labels // 2)
    config.task.split_sizes = (2, 1, 2)
  else:
    config.task.split_sizes = (3, 2, 5)
  validation_classes, novel_classes = [], []
  for seed in (0, 1, 2):
    base, validation, novel = train_lib._fewshot_parts(data, config.task, seed)
    # Each part numbers its classes from 0: compare them by name.
    validation_classes.append(set(validation.class_names))
    novel_classes.append(set(novel.class_names))
    assert not validation_classes[-1] & novel_classes[-1]
    assert not set(base.class_names) & (validation_classes[-1] | novel_classes[-1])
    if split_by == "group":  # Whole groups: no group is in two parts.
      groups = [set(np.unique(part.groups)) for part in (base, validation, novel)]
      assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
  assert validation_classes[0] == validation_classes[1] == validation_classes[2]
  assert len({frozenset(c) for c in novel_classes}) > 1  # The seeds still split the rest.


def test_fewshot_tuning_without_a_validation_part_is_refused():
  config = tiny_fewshot()
  config.task.tune = True
  with pytest.raises(experiment.ConfigError, match="split_sizes"):
    experiment.validate_config(config)


def test_a_tuning_run_tries_every_grid_point_and_records_the_best(tmp_path):
  config = tiny_quickstart()
  config.task.tuning_fraction = 0.4
  config.task.tune = True
  config.tune_grid = dict(ff=dict(learning_rate=(1e-3, 3e-2), steps=(2, 4)))
  full = experiment.validate_config(config)
  names = {"ff@learning_rate=1e-3,steps=2", "ff@learning_rate=1e-3,steps=4",
           "ff@learning_rate=3e-2,steps=2", "ff@learning_rate=3e-2,steps=4"}
  assert set(full.methods) == names | {"zero_shot", "qzo"}
  assert full.methods["ff@learning_rate=3e-2,steps=4"].learning_rate == 3e-2
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert names <= set(results)
  chosen = json.load(open(tmp_path / "tuning.json"))
  best = max(sorted(names), key=lambda name: results[name]["accuracy"])
  assert results[chosen["ff"]["variant"]]["accuracy"] == results[best]["accuracy"]
  assert "tuning run" in open(tmp_path / "results.md").read()


def test_tuning_choice_skips_diverged_points_and_breaks_ties_by_grid_order():
  points = {"ff": [("a", {"learning_rate": 1.0}), ("b", {"learning_rate": 2.0}),
                   ("c", {"learning_rate": 3.0})]}
  results = {"a": {"accuracy": 0.5, "ci95": 0.0}, "b": {"accuracy": 0.5, "ci95": 0.0},
             "c": {"diverged": True, "step": 1, "task": 0}}
  assert reporting.tuning_choice(results, points)["ff"]["variant"] == "a"
  assert "DIVERGED" in reporting.tuning_table(results, points)
  assert experiment.grid_name("m", {"learning_rate": 0.0015, "steps": 10}) == (
      "m@learning_rate=1p5e-3,steps=10")


@pytest.mark.parametrize("edit, message", [
    (dict(task=dict(tune=True, tuning_fraction=0.3), tune_grid=dict(nope=dict(learning_rate=(1e-3,)))),
     "there is no method 'nope'"),
    (dict(tune_grid=dict(ff=dict(lr=(1e-3,)))), r"config\.tune_grid\.ff\.lr is not a method field"),
    (dict(tune_grid=dict(ff=dict(learning_rate=()))), "non-empty tuple"),
    (dict(task=dict(tune=True)), r"config\.task\.tuning_fraction must be"),
    (dict(task=dict(tuning_fraction=1.5)), r"config\.task\.tuning_fraction must be"),
])
def test_bad_tuning_fields_are_named(edit, message):
  config = tiny_quickstart()
  for section, fields in edit.items():
    if section == "tune_grid":
      config.tune_grid = fields
    else:
      config[section].update(fields)
  with pytest.raises(ValueError, match=message):
    experiment.validate_config(config)
  fewshot = tiny_fewshot()
  fewshot.task.tuning_fraction = 0.2
  with pytest.raises(ValueError, match="few-shot tasks tune on validation classes"):
    experiment.validate_config(fewshot)


def test_the_pretrained_head_is_the_zero_shot_classifier(tmp_path):
  config = tiny_quickstart()
  config.methods = dict(zero_shot=dict(kind="zero_shot"))
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  config = experiment.validate_config(config)
  splits = train_lib.make_splits(config)
  variables = train_lib.load_backbone(str(tmp_path / "backbone"))
  model = models.get_model("conv4", num_classes=10, **config.model.kwargs.to_dict())
  full = {"params": {**variables["params"], "head": variables["head"]["params"]},
          "batch_stats": variables["batch_stats"]}
  logits = model.apply(full, jnp.asarray(splits.adapt_test.inputs))
  expected = float(np.mean(np.argmax(logits, -1) == splits.adapt_test.labels))
  np.testing.assert_allclose(results["zero_shot"]["accuracy"], expected, atol=1e-6)
  # A head that does not fit the task's classes is refused by name.
  variables["head"]["params"]["kernel"] = variables["head"]["params"]["kernel"][:, :3]
  with pytest.raises(ValueError, match="pre-trained classifier has 3 classes but the task has 10"):
    adaptation.Adapter("conv4", config.model.kwargs.to_dict(), variables,
                       config.methods.zero_shot, config.adapt, 10, 0)


def test_a_random_decoder_is_the_zero_shot_of_cross_domain_and_each_task_draws_its_own(tmp_path):
  config = tiny_quickstart()
  config.adapt.head = "random"
  config.task.num_tasks = 4
  config.methods = dict(zero_shot=dict(kind="zero_shot"),
                        backprop=dict(kind="backprop", learning_rate=1e-2, optimizer="adam",
                                      steps=40))
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  zero = [row["accuracy"] for row in reporting.read_metrics(tmp_path / "tasks" / "zero_shot.jsonl")]
  assert len(set(zero)) > 1  # Not one decoder (nor ProtoNets, the same for every task's set).
  assert results["zero_shot"]["accuracy"] < 0.4  # About chance for 10 classes.
  assert results["backprop"]["accuracy"] > results["zero_shot"]["accuracy"] + 0.05


def test_a_pretraining_that_falls_short_warns_and_says_so_in_the_report(tmp_path):
  config = tiny_quickstart()
  config.methods = dict(zero_shot=dict(kind="zero_shot"))
  config.pretrain.min_val_accuracy = 0.999  # 4 steps of a tiny net cannot reach it.
  with pytest.warns(train_lib.PretrainingWarning, match="PRE-TRAINING FELL SHORT"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert "FELL SHORT" in open(tmp_path / "results.md").read()
  health = json.load(open(tmp_path / "pretrain" / "health.json"))
  assert health["healthy"] is False and health["min_val_accuracy"] == 0.999


def test_tiny_run_writes_everything_a_person_looks_at(tmp_path):
  results = train_lib.train_and_evaluate(tiny_quickstart(), str(tmp_path))
  assert set(results) == {"zero_shot", "ff", "qzo"}
  for row in results.values():
    assert 0.0 <= row["accuracy"] <= 1.0 and row["tasks"] == 3
  for name in ("results.json", "results.md", "config.json", "plots/pretrain.png",
               "plots/adaptation.png", "pretrain/metrics.jsonl", "tasks/ff.jsonl"):
    assert os.path.exists(tmp_path / name), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "pretrain"))
  rows = [json.loads(l) for l in open(tmp_path / "pretrain" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert "| qzo | 16w8a |" in open(tmp_path / "results.md").read()
  # The adaptation loss curve has one value per step, for the methods that train.
  task = json.loads(open(tmp_path / "tasks" / "ff.jsonl").readline())
  assert len(task["losses"]) == 2


class Interrupt(Exception):
  pass


def test_resume_after_interruption_ends_like_an_uninterrupted_run(tmp_path, monkeypatch):
  config = tiny_quickstart()
  reference = train_lib.train_and_evaluate(config, str(tmp_path / "reference"))

  # Interrupt once pre-training has checkpointed step 2 of 6 (inside the step loop) ...
  original_save = train_lib.ocp.CheckpointManager.save
  def failing_save(self, step, *args, **kwargs):
    result = original_save(self, step, *args, **kwargs)
    if step == 4:
      self.wait_until_finished()
      raise Interrupt
    return result
  monkeypatch.setattr(train_lib.ocp.CheckpointManager, "save", failing_save)
  with pytest.raises(Interrupt):
    train_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(train_lib.ocp.CheckpointManager, "save", original_save)

  # ... and once in the middle of the adaptation tasks.
  original_call = train_lib.adaptation.Adapter.__call__
  calls = []
  def failing_call(self, task, key):
    calls.append(1)
    if len(calls) == 5:
      raise Interrupt
    return original_call(self, task, key)
  monkeypatch.setattr(train_lib.adaptation.Adapter, "__call__", failing_call)
  with pytest.raises(Interrupt):
    train_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(train_lib.adaptation.Adapter, "__call__", original_call)
  done = [json.loads(l) for l in open(tmp_path / "resumed" / "tasks" / "ff.jsonl")]
  assert len(done) == 1  # zero_shot's 3 tasks and ff's first were kept.

  resumed = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
  for name in reference:
    np.testing.assert_allclose(resumed[name]["accuracy"], reference[name]["accuracy"], atol=1e-7)
  steps = [json.loads(l)["step"] for l in open(tmp_path / "resumed" / "pretrain" / "metrics.jsonl")]
  assert steps == [2, 4, 6]
  first = [json.loads(l) for l in open(tmp_path / "reference" / "tasks" / "qzo.jsonl")]
  again = [json.loads(l) for l in open(tmp_path / "resumed" / "tasks" / "qzo.jsonl")]
  assert [r["accuracy"] for r in first] == [r["accuracy"] for r in again]
  assert [r["losses"] for r in first] == [r["losses"] for r in again]


def test_saved_backbone_is_reused_by_a_later_run(tmp_path):
  config = tiny_quickstart()
  train_lib.train_and_evaluate(config, str(tmp_path / "a"))
  config.pretrain.init_checkpoint = str(tmp_path / "a" / "backbone")
  config.pretrain.steps = 10 ** 6  # Would take forever if it pre-trained again.
  results = train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "pretrain")
  assert results["zero_shot"]["tasks"] == 3


@pytest.mark.parametrize("field,value,message", [
    ("model.name", "resnet50", "config.model.name = 'resnet50' is not allowed; use one of"),
    ("data.source", "imagenet", "config.data.source = 'imagenet' is not allowed"),
    ("adapt.mode", "bitfit", "config.adapt.mode = 'bitfit' is not allowed; use one of"),
    ("adapt.head", "knn", "config.adapt.head"),
    ("task.ways", 0, "config.task.ways must be a positive integer"),
    ("adapt.sparsity", 1.0, "config.adapt.sparsity = 1.0 must lie in"),
    ("pretrain.checkpoint_every", 3, "multiple of config.pretrain.log_every"),
    ("data.corruption", "fog", "config.data.corruption = 'fog' is not allowed"),
])
def test_bad_fields_are_named_with_the_allowed_values(field, value, message):
  config = tiny_quickstart()
  section, key = field.split(".")
  with config[section].ignore_type():
    config[section][key] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    experiment.validate_config(config)


def test_typo_in_a_field_name_is_caught():
  config = tiny_quickstart()
  config.adapt.stpes = 5
  with pytest.raises(ValueError, match=r"config\.adapt\.stpes is not a config field"):
    experiment.validate_config(config)


def test_bad_methods_are_caught():
  config = tiny_quickstart()
  config.methods.ff.kind = "adjoint"
  with pytest.raises(ValueError, match=r"config\.methods\.ff\.kind = 'adjoint'"):
    experiment.validate_config(config)
  config = tiny_quickstart()
  config.methods.qzo.precision = "16w"
  with pytest.raises(ValueError, match=r"config\.methods\.qzo\.precision"):
    experiment.validate_config(config)
  config = tiny_quickstart()
  config.methods.qzo.precision = "float"
  with pytest.raises(ValueError, match="fixed-point weight grid"):
    experiment.validate_config(config)
  config = tiny_fewshot()
  config.adapt.mode = "lp"
  with pytest.raises(ValueError, match="leaves nothing to train"):
    experiment.validate_config(config)


def test_missing_data_path_stops_before_any_work(tmp_path):
  config = load_config("fewshot_vision", "tiny")
  # The default reads two archives (a tuple): the missing one stops the run, not only the first.
  present = tmp_path / "images_background_small1.zip"
  present.write_bytes(b"")
  config.data.kwargs.path = (str(present), str(tmp_path / "nowhere" / "omniglot.zip"))
  with pytest.raises(ValueError,
                     match=r"config\.data\.kwargs\.path = .*nowhere.* does not exist"):
    train_lib.train_and_evaluate(config, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work")


def test_impossible_episode_shapes_stop_before_training(tmp_path):
  config = tiny_fewshot()
  config.task.ways = 9  # The novel split has 7 classes.
  with pytest.raises(ValueError, match=r"config\.task\.ways = 9 but the novel split has only 7"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  config = tiny_fewshot()
  config.task.queries = 500
  with pytest.raises(ValueError, match="shots \\+ config.task.queries"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "pretrain")


def test_train_py_runs_and_accepts_overrides(tmp_path):
  command = [sys.executable, os.path.join(REPO, "train.py"),
             f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}:tiny",
             f"--workdir={tmp_path}", "--config.task.num_tasks=1",
             "--config.methods.qzo_ff_8w8a.steps=1"]
  completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "| qzo_ff_16w8a | 16w8a |" in completed.stdout
  # A quiet main job: libraries' INFO logs (orbax's per save) hidden, the table last.
  output = (completed.stderr + completed.stdout).splitlines()
  assert not [line for line in output if line.startswith("I1") or " INFO " in line], output[:5]
  assert len(output) <= 25, output
  assert completed.stdout.rstrip().splitlines()[-1].startswith("pre-training: validation")
  results = json.load(open(tmp_path / "results.json"))
  assert results["zero_shot"]["tasks"] == 1
  bad = subprocess.run(command[:4] + ["--config.adapt.mode=bitfit"], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
  assert bad.returncode != 0
  assert "config error: config.adapt.mode = 'bitfit' is not allowed" in bad.stderr
  assert "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------
# The paper's enhancements as method fields.


def _quadratic_problem():
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (4, 3)),
                      "bias": jnp.linspace(-0.5, 0.5, 3)}}
  target = jax.tree_util.tree_map(lambda p: 0.5 * p + 0.1, params)
  value_fn = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(
      jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target)))
  return params, value_fn


def _one_update(tx, params, value_fn):
  state = tx.init(params)
  updates, state = tx.update(params, state, params, value_fn=value_fn)
  return updates, state


@pytest.mark.parametrize("fields", [
    dict(momentum=True), dict(sharpness_radius=0.05), dict(kernelwise=True),
    dict(momentum=True, sharpness_radius=0.05, kernelwise=True, distribution="binomial")])
def test_spsa_enhancement_fields_build_the_enhanced_chain(fields):
  params, value_fn = _quadratic_problem()
  key = jax.random.key(3)
  method = experiment.method("spsa", learning_rate=0.1, num_directions=2, **fields)
  got, state = _one_update(adaptation.make_transform(method, key), params, value_fn)
  momentum = fwdgrad.MomentumGuidedSampling() if fields.get("momentum") else None
  estimate = fwdgrad.enhanced_forward_gradient(
      key=key, num_directions=2, epsilon=1e-3, sign=True,
      distribution="rademacher" if "distribution" in fields else "irwin_hall",
      momentum=momentum, sharpness_radius=fields.get("sharpness_radius"))
  normalize = [fwdgrad.kernelwise_normalize()] if fields.get("kernelwise") else []
  expected, _ = _one_update(optax.chain(estimate, *normalize, optax.sgd(0.1)), params, value_fn)
  chex.assert_trees_all_close(got, expected, atol=0.0, rtol=0.0)
  _, plain_state = _one_update(adaptation.make_transform(experiment.method(
      "spsa", learning_rate=0.1, num_directions=2), key), params, value_fn)
  if fields.get("kernelwise"):  # Each leaf moves by exactly η ‖w^i‖.
    norms = jax.tree_util.tree_map(lambda u, w: jnp.linalg.norm(u) / jnp.linalg.norm(w), got,
                                   params)
    chex.assert_trees_all_close(norms, jax.tree_util.tree_map(lambda _: 0.1, norms), rtol=1e-5)
  # The sharpness-aware estimate is taken at the ascended point, where the loss is higher.
  loss, plain_loss = fwdgrad.step_loss(state), fwdgrad.step_loss(plain_state)
  if fields.get("sharpness_radius"):
    assert loss > plain_loss
  elif not fields.get("momentum"):
    assert loss == plain_loss


@pytest.mark.parametrize("fields", [
    dict(momentum=True), dict(sharpness_radius=0.05), dict(kernelwise=True),
    dict(momentum=True, sharpness_radius=0.05, kernelwise=True, distribution="binomial")])
def test_qzo_ff_enhancement_fields_reach_the_integer_step(fields):
  params, value_fn = _quadratic_problem()
  key = jax.random.key(4)
  method = experiment.method("qzo_ff", precision="16w8a", learning_rate=1e-2, **fields)
  got, state = _one_update(adaptation.make_transform(method, key), params, value_fn)
  expected, _ = _one_update(fwdgrad.qzo_ff(
      1e-2, key=key, num_directions=3, epsilon=1e-3, weight_bits=16,
      distribution=fields.get("distribution", "irwin_hall"),
      momentum=fwdgrad.MomentumGuidedSampling() if fields.get("momentum") else None,
      sharpness_radius=fields.get("sharpness_radius"), kernelwise=fields.get("kernelwise", False)),
      params, value_fn)
  chex.assert_trees_all_close(got, expected, atol=0.0, rtol=0.0)
  assert (state.previous_directions != ()) == bool(fields.get("momentum"))


@pytest.mark.parametrize("fields, message", [
    (dict(kind="ff", momentum=True), r"\.ff\.momentum = True does not apply to kind 'ff'"),
    (dict(kind="ff", sharpness_radius=0.1), r"\.ff\.sharpness_radius = 0\.1 does not apply"),
    (dict(kind="backprop", kernelwise=True), r"\.ff\.kernelwise = True does not apply"),
    (dict(kind="spsa", sharpness_radius=-0.1), r"\.ff\.sharpness_radius must be a finite float"),
    (dict(kind="spsa", momentum="yes"), r"\.ff\.momentum must be True or False"),
    (dict(kind="spsa", distribution="poisson"), r"\.ff\.distribution = 'poisson'"),
])
def test_bad_enhancement_fields_are_named(fields, message):
  config = tiny_quickstart()
  config.methods.ff = fields
  with pytest.raises(ValueError, match=message):
    experiment.validate_config(config)


def test_tiny_run_with_every_enhancement(tmp_path):
  config = tiny_quickstart()
  config.task.num_tasks = 1
  config.adapt.sparsity = 0.9
  everything = dict(momentum=True, sharpness_radius=0.01, kernelwise=True, distribution="binomial")
  config.methods = dict(
      spsa=dict(kind="spsa", learning_rate=1e-3, **everything),
      qzo=dict(kind="qzo_ff", precision="16w8a", learning_rate=1e-3, **everything))
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  for name in ("spsa", "qzo"):
    assert 0.0 <= results[name]["accuracy"] <= 1.0
    row = json.loads(open(tmp_path / "tasks" / f"{name}.jsonl").readline())
    assert len(row["losses"]) == config.adapt.steps and np.all(np.isfinite(row["losses"]))


def _one_shot_task():
  rng = np.random.RandomState(0)
  inputs = rng.rand(20, 16, 16, 1).astype(np.float32)
  return adaptation.Task(inputs[:5], np.arange(5), inputs[5:], np.repeat(np.arange(5), 3))


def test_augmented_views_shift_within_reach_and_add_scaled_noise():
  inputs = jnp.arange(2 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 3)
  views = adaptation.augmented_views(inputs, jax.random.key(0), axes=(1,), shift=0.2, noise=0.0)
  for x, v in zip(np.asarray(inputs), np.asarray(views)):  # Rolled rows, columns untouched.
    assert any(np.array_equal(np.roll(x, k, axis=0), v) for k in range(-2, 3))
  noisy = adaptation.augmented_views(inputs, jax.random.key(0), axes=(1,), shift=0.0, noise=0.5)
  np.testing.assert_allclose(np.std(noisy - inputs), 0.5 * np.std(inputs), rtol=0.3)


def test_one_shot_episode_loss_on_views_is_not_degenerate():
  """At 1 shot the support set scores itself perfectly at any weights: the 'support' objective
  only spreads the prototypes; the views objective is a loss the backbone has to earn."""
  config = experiment.default_config()
  config.adapt.head, config.adapt.augment_axes = "protonet", (1, 2)
  model = models.get_model("conv4", num_classes=None, features=(8, 8, 8, 8))
  task = _one_shot_task()
  variables = model.init(jax.random.key(0), task.support_inputs[:1])
  method = experiment.method("backprop", learning_rate=1e-2, optimizer="adam", steps=15)
  losses = {}
  for objective in ("support", "views"):
    config.adapt.objective = objective
    adapter = adaptation.Adapter("conv4", dict(features=(8, 8, 8, 8)), variables, method,
                                 config.adapt, 5, 0)
    losses[objective] = adapter(task, jax.random.key(1)).losses
  # Each example is its own prototype: the support loss goes to 0 whatever the features mean.
  assert losses["support"][-1] < 0.05
  assert losses["views"][-1] > 5 * losses["support"][-1]
  assert losses["views"][-5:].mean() < losses["views"][0]  # And still lowers it.


def test_views_objective_needs_an_episode_head_on_a_trained_backbone():
  config = tiny_fewshot()
  config.adapt.objective = "views"
  config.adapt.mode, config.adapt.head = "lp", "linear"
  with pytest.raises(experiment.ConfigError, match="objective = 'views'"):
    experiment.validate_config(config)


def test_backprop_stepping_from_python_is_the_scanned_program():
  config = experiment.default_config()
  model = models.get_model("conv4", num_classes=None, features=(8, 8, 8, 8))
  task = _one_shot_task()
  variables = model.init(jax.random.key(0), task.support_inputs[:1])
  method = experiment.method("backprop", learning_rate=1e-2, optimizer="adam", steps=5)
  adapter = adaptation.Adapter("conv4", dict(features=(8, 8, 8, 8)), variables, method,
                               config.adapt, 5, 0)
  assert adapter._run == adapter._adapt_and_evaluate_stepwise
  stepwise = adapter(task, jax.random.key(1))
  scanned = jax.jit(adapter._adapt_and_evaluate)(adapter.trainable_backbone, adapter.frozen,
                                                 adaptation.Task(*map(jnp.asarray, task)),
                                                 jax.random.key(1))
  np.testing.assert_allclose(stepwise.losses, scanned[1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stepwise.accuracy, scanned[0])


def test_class_and_group_tuning_holds_out_the_same_speakers_for_every_seed():
  config = tiny_fewshot()
  config.task.split_by = "class_and_group"
  config.task.split_sizes = (5, 0, 5)
  config.task.group_split = (2, 1, 3)
  data = experiment.load_data(config.data, apply_corruption=False)
  data = data._replace(groups=np.arange(data.num_examples) % 6)  # Six "speakers".
  held = []
  for seed in (0, 1, 2):
    base, validation, novel = train_lib._fewshot_parts(data, config.task, seed)
    tuning_groups = set(np.unique(validation.groups))
    held.append(tuning_groups)
    assert len(tuning_groups) == 1
    assert not tuning_groups & (set(np.unique(base.groups)) | set(np.unique(novel.groups)))
    assert set(validation.class_names) == set(novel.class_names)  # New classes, as the tasks.
    assert not set(base.class_names) & set(novel.class_names)
  assert held[0] == held[1] == held[2]
  config.task.group_split = (0.5, 0.5)
  config.task.tune = True
  with pytest.raises(experiment.ConfigError, match="three parts"):
    experiment.validate_config(config)
