"""Every config in configs/ loads, validates, and runs end to end at a tiny size."""

import glob
import os

import pytest

from fwdgrad import experiment
from fwdgrad import reporting
from fwdgrad import train_lib

from test_train_lib import REPO, load_config

# configs/landscape.py configures the landscape study, tested in tests/test_landscape_study.py.
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if os.path.basename(p) != "landscape.py")
DATA_DIR = os.environ.get("FWDGRAD_DATA_DIR", os.path.join(REPO, "..", "shared", "data"))
# (config, variant) pairs run end to end; every variant named in a config docstring is covered.
TINY_RUNS = [("quickstart", "tiny"), ("fewshot_vision", "tiny"), ("fewshot_vision", "indomain_tiny"),
             ("fewshot_audio", "tiny"),
             ("cross_domain", "tiny"), ("cross_domain", "tiny_dvpt"), ("ood", "tiny"),
             ("ood", "tiny_sparse_lp3"), ("ood_fashion", "tiny")]


def _with_local_data(config):
  """Points the config's ``data/`` paths at the local data directory."""
  def local(path):
    if path.startswith("data" + os.sep):
      return os.path.join(DATA_DIR, path[len("data" + os.sep):])
    return path
  for data in (config.data, config.pretrain.data):
    path = data.kwargs.get("path")
    if isinstance(path, (list, tuple)):  # A source merging several folders or archives.
      data.kwargs.path = tuple(local(p) for p in path)
    elif path:
      data.kwargs.path = local(path)
  return config


def _require_data(config):
  for data in (config.data, config.pretrain.data):
    path = data.kwargs.get("path")
    for one in path if isinstance(path, (list, tuple)) else (path,) if path else ():
      if not os.path.exists(one):
        if os.environ.get("CI") == "true":
          pytest.fail(f"CI must provide {one}")
        pytest.skip(f"{one} is not on this machine (see the config's docstring)")


def test_there_is_a_config_per_experiment():
  assert {"quickstart", "fewshot_vision", "fewshot_audio", "cross_domain", "ood"} <= set(CONFIGS)
  assert {name for name, _ in TINY_RUNS} == set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates_with_its_command_in_the_docstring(name):
  config = _with_local_data(load_config(name))
  with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
    assert f"--config configs/{name}.py" in f.read()
  for data in (config.data, config.pretrain.data):
    if "path" in data.kwargs:
      del data.kwargs["path"]  # Paths are checked in the end-to-end runs.
  validated = experiment.validate_config(config)
  assert validated.methods


@pytest.mark.parametrize("name,arg", [("fewshot_vision", "steps"), ("fewshot_vision", "enhance"),
                                      ("fewshot_audio", "steps"), ("fewshot_audio", "shot1")])
def test_tuning_and_row_variants_validate(name, arg):
  config = _with_local_data(load_config(name, arg))
  validated = experiment.validate_config(config)
  assert set(validated.tune_grid) <= set(validated.methods)
  if arg == "enhance":  # m = 1 and the four enhancements next to the plain QZO-FF row.
    assert {"qzo_ff_16w8a", "qzo_ff_16w8a_m1", "qzo_ff_16w8a_momentum", "qzo_ff_16w8a_sharpness",
            "qzo_ff_16w8a_kernelwise", "qzo_ff_16w8a_sharpness_kernelwise"} <= set(validated.methods)
    assert validated.methods.qzo_ff_16w8a_m1.num_directions == 1


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", TINY_RUNS)
def test_config_runs_end_to_end_at_a_tiny_size(name, arg, tmp_path):
  config = _with_local_data(load_config(name, arg))
  _require_data(config)
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert set(results) == set(config.methods)
  for row in results.values():
    assert 0.0 <= row["accuracy"] <= 1.0
  assert os.path.exists(tmp_path / "results.md")


@pytest.mark.slow
# (config, steps, QZO-FF learning rate, required loss ratio): few-shot fine-tuning of a backbone
# pre-trained for 20 steps starts near log(5) with nearly equal features and moves slower than a
# linear probe; its episode loss is deterministic (the whole support set), so any drop is real.
@pytest.mark.parametrize("name,steps,qzo_learning_rate,ratio",
                         [("ood_fashion", 60, 1e-2, 0.9), ("cross_domain", 60, 1e-2, 0.9),
                          ("fewshot_vision", 150, 3e-2, 0.95)])
def test_adaptation_lowers_the_training_loss_on_the_evidence_configs(name, steps,
                                                                     qzo_learning_rate, ratio,
                                                                     tmp_path):
  """The experiment configs' pipelines train: BP and QZO-FF 16w8a lower the task loss."""
  config = _with_local_data(load_config(name, "tiny"))
  _require_data(config)
  config.pretrain.steps = 20
  config.task.num_tasks = 1
  config.methods = {key: config.methods[key] for key in ("zero_shot", "backprop", "qzo_ff_16w8a")}
  for method, learning_rate in (("backprop", 1e-2), ("qzo_ff_16w8a", qzo_learning_rate)):
    config.methods[method].learning_rate = learning_rate
    config.methods[method].steps = steps
  train_lib.train_and_evaluate(config, str(tmp_path))
  for method in ("backprop", "qzo_ff_16w8a"):
    losses = reporting.read_metrics(tmp_path / "tasks" / f"{method}.jsonl")[0]["losses"]
    assert len(losses) == steps
    assert sum(losses[-10:]) / 10 < ratio * losses[0], (method, losses[0], losses[-10:])


@pytest.mark.slow
def test_the_quickstart_default_run_shows_the_method_working(tmp_path):
  """The README's main job: headroom, FF and QZO-FF 16w8a near backprop, 8w8a behind 16w8a."""
  results = train_lib.train_and_evaluate(load_config("quickstart"), str(tmp_path))
  acc = {name: 100 * row["accuracy"] for name, row in results.items()}
  assert acc["backprop"] - acc["zero_shot"] >= 10
  assert acc["backprop"] - acc["ff"] <= 3 and acc["backprop"] - acc["qzo_ff_16w8a"] <= 3
  assert acc["qzo_ff_16w8a"] - acc["qzo_ff_8w8a"] >= 10
