"""Tests of fwdgrad/landscape_study.py, configs/landscape.py and landscape.py."""

import importlib.util
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from fwdgrad import experiment
from fwdgrad import landscape
from fwdgrad import landscape_study
from fwdgrad import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg=None):
  spec = importlib.util.spec_from_file_location(
      "landscape_config", os.path.join(REPO, "configs", "landscape.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("landscape")
  summary = landscape_study.run_study(load_config("tiny"), str(workdir))
  return workdir, summary


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_study")  # one worker builds the shared study once
def test_tiny_study_writes_figures_grids_and_summary(tiny_study):
  workdir, summary = tiny_study
  out = workdir / "landscape"
  names = ("bp", "ff", "ff_16w8a", "ff_8w8a")
  assert set(summary["modes"]) == {"lp", "ft"}
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  for mode in ("lp", "ft"):
    assert set(summary["modes"][mode]) == set(names)
    image = matplotlib.image.imread(out / f"{mode}.png")
    assert image.shape[1] > 3 * image.shape[0]  # four panels side by side
    assert image[..., :3].std() > 0.05  # not a blank canvas
    for name in names:
      surface, metadata = landscape.load_surface(out / mode / f"{name}.npz")
      assert surface.losses.shape == (5, 5) and np.isfinite(surface.losses).all()
      assert metadata["mode"] == mode and metadata["method"] == name
      row = summary["modes"][mode][name]
      assert len(surface.trajectory) == 4  # the start and 6 steps recorded every 2
      # The trajectory ends at the centre of its PCA plane, where the grid loss is the final loss.
      if row["plane"] == "pca":
        chex.assert_trees_all_close(surface.trajectory[-1], np.zeros(2), atol=1e-6)
        assert 0.5 < sum(row["explained_variance_ratio"]) <= 1.0 + 1e-9
  on_disk = json.loads((out / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  assert "| ft | ff_8w8a | 8w8a |" in (out / "summary.md").read_text()
  assert (workdir / "backbone").is_dir()  # pre-trained by train_lib and saved for a rerun


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_study")
def test_eight_bit_probe_does_not_move_while_sixteen_bit_probe_trains(tiny_study):
  _, summary = tiny_study
  lp = summary["modes"]["lp"]
  sixteen, eight = lp["ff_16w8a"], lp["ff_8w8a"]
  assert sixteen["moved"] and sixteen["path_length"] > 0
  # 8-bit weights: epsilon rounds to zero on every leaf of the probe, so every sign is 0.
  assert eight["path_length"] == 0.0 and not eight["moved"]
  assert eight["plane"].startswith("random")
  assert eight["final_loss"] == eight["initial_loss"]
  for mode, rows in summary["modes"].items():
    assert rows["bp"]["final_loss"] < rows["bp"]["initial_loss"], mode
    assert rows["ff_16w8a"]["moved"], mode


def test_qzo_trajectories_in_lp_sixteen_versus_eight_bits():
  """Fast (no figure): recorded trajectories of the integer QZO-FF step on a real task."""
  config, study = landscape_study.validate_study_config(load_config("tiny"))
  splits = train_lib.make_splits(config)
  # A random (not pre-trained) backbone is enough: the probe is what moves.
  model, variables = train_lib._init_variables(  # pylint: disable=protected-access
      config, splits.pretrain.num_classes, splits.pretrain.inputs)
  del model
  backbone = {"params": {k: v for k, v in variables["params"].items() if k != "head"},
              "batch_stats": variables["batch_stats"]}
  task = train_lib.make_task(config, splits, 0)
  runs = {}
  for name in ("ff_16w8a", "ff_8w8a"):
    runs[name] = landscape_study.adapt_and_record(
        config, backbone, config.methods[name], "lp", task, jax.random.key(0), study.record_every)
  sixteen = landscape_study.step_statistics(runs["ff_16w8a"].trajectory)
  eight = landscape_study.step_statistics(runs["ff_8w8a"].trajectory)
  assert sixteen["path_length"] > 0 and sixteen["mean_step"] > 0
  assert eight["path_length"] == 0.0 and eight["displacement"] == 0.0
  assert len(runs["ff_16w8a"].losses) == config.methods.ff_16w8a.steps // study.record_every + 1
  # Same key, same run: the recorded trajectory is reproducible bit for bit.
  again = landscape_study.adapt_and_record(config, backbone, config.methods.ff_16w8a, "lp", task,
                                           jax.random.key(0), study.record_every)
  chex.assert_trees_all_equal(again.trajectory, runs["ff_16w8a"].trajectory)


def test_step_statistics_on_a_known_path():
  path = {"w": np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [6.0, 8.0]])}
  stats = landscape_study.step_statistics(path)
  chex.assert_trees_all_close(
      (stats["mean_step"], stats["max_step"], stats["path_length"], stats["displacement"],
       stats["straightness"]), (10.0 / 3, 5.0, 10.0, 10.0, 1.0), rtol=1e-12)
  still = landscape_study.step_statistics({"w": np.ones((3, 2))})
  assert not still["moved"] and still["straightness"] == 0.0


@pytest.mark.parametrize("field, value, message", [
    ("landscape.modes", ("lp", "sideways"), "config.landscape.modes"),
    ("landscape.modes", (), "config.landscape.modes"),
    ("landscape.resolution", 1, "config.landscape.resolution"),
    ("landscape.record_every", 0, "config.landscape.record_every"),
    ("landscape.task_index", 3, "config.landscape.task_index"),
    ("landscape.colour", "red", "config.landscape.colour is not a config field"),
    ("adapt.head", "protonet", "leaves nothing to train"),  # LP with a parameter-free head
    ("adapt.batch_size", 8, "config.adapt.batch_size"),
])
def test_config_errors_name_the_field(field, value, message):
  config = load_config("tiny")
  section, key = field.split(".")
  with config[section].ignore_type():
    config[section][key] = value
  with pytest.raises(experiment.ConfigError, match=message.replace(".", "\\.")):
    landscape_study.validate_study_config(config)


def test_config_errors_for_methods():
  config = load_config("tiny")
  config.methods.zero = experiment.method("zero_shot")
  with pytest.raises(experiment.ConfigError, match="config.methods.zero: a zero-shot"):
    landscape_study.validate_study_config(config)
  config = load_config("tiny")
  config.methods.bp.steps = 3  # record_every = 2: only 2 points
  with pytest.raises(experiment.ConfigError, match="fewer than 3 points"):
    landscape_study.validate_study_config(config)
  config = load_config("tiny")
  del config["landscape"]
  with pytest.raises(experiment.ConfigError, match="config.landscape is missing"):
    landscape_study.validate_study_config(config)
  with pytest.raises(ValueError, match="not a variant of this config"):
    load_config("huge")


@pytest.mark.parametrize("overrides, message", [
    (dict(dvpt=dict(bp=dict(learning_rate=1.0))), "names modes \\['dvpt'\\]"),
    (dict(ft=dict(sgd=dict(learning_rate=1.0))), "overrides.ft.sgd: no such method"),
    (dict(ft=dict(bp=dict(lr=1.0))), "overrides.ft.bp.lr is not a method field"),
    (dict(ft=dict(bp=dict(learning_rate=-1.0))), "config.methods.bp.learning_rate must be"),
])
def test_override_errors_name_the_field(overrides, message):
  config = load_config("tiny")
  config.landscape.overrides = overrides
  with pytest.raises(experiment.ConfigError, match=message):
    landscape_study.validate_study_config(config)


def test_overrides_apply_per_mode_only():
  config = load_config()
  config.landscape.overrides = dict(ft=dict(bp=dict(learning_rate=0.5)))
  checked, study = landscape_study.validate_study_config(config)
  base = landscape_study._mode_config(checked, "lp", {})  # pylint: disable=protected-access
  ft = landscape_study._mode_config(checked, "ft", study.overrides.ft)  # pylint: disable=protected-access
  assert ft.methods.bp.learning_rate == 0.5 and ft.adapt.mode == "ft"
  assert base.methods.bp.learning_rate == config.methods.bp.learning_rate
  assert config.methods.bp.learning_rate != 0.5  # the given config is not changed


def test_full_config_is_valid():
  config, study = landscape_study.validate_study_config(load_config())
  assert study.modes == ("lp", "ft") and study.random_plane
  assert {m.precision for m in config.methods.values()} == {"float", "16w8a", "8w8a"}
  # The three forward-gradient runs share a learning rate, so their step sizes compare directly.
  assert len({m.learning_rate for m in config.methods.values() if m.kind != "backprop"}) == 1


def test_command_line_reports_config_errors(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "landscape.py"),
       f"--config={os.path.join(REPO, 'configs', 'landscape.py')}:tiny",
       f"--workdir={tmp_path}", "--config.landscape.resolution=1"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert result.returncode != 0
  assert "config error: config.landscape.resolution" in result.stderr + result.stdout
