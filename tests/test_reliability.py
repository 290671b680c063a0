"""Bad input stopped up front in one line; resume through kills, torn writes and corrupt files."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

import fwdgrad
from fwdgrad import experiment
from fwdgrad import reporting
from fwdgrad import train_lib
from fwdgrad.data import audio
from fwdgrad.data import images
from fwdgrad.data import sources

from test_train_lib import REPO, tiny_quickstart

TRAIN = os.path.join(REPO, "train.py")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


def _config_error(config, match):
  with pytest.raises(experiment.ConfigError, match=match):
    experiment.validate_config(config)


# ---------------------------------------------------------------------------------------------
# The whole config is checked before any work.


@pytest.mark.parametrize("field,value,match", [
    ("pretrain.steps", 0, r"config\.pretrain\.steps must be a positive integer, got 0"),
    ("pretrain.steps", -5, r"config\.pretrain\.steps must be a positive integer, got -5"),
    ("pretrain.batch_size", 0, r"config\.pretrain\.batch_size must be a positive integer"),
    ("pretrain.learning_rate", -1e-3, r"pretrain\.learning_rate must be a finite number > 0"),
    ("pretrain.learning_rate", float("nan"), r"pretrain\.learning_rate must be a finite number"),
    ("pretrain.val_fraction", 1.0, r"pretrain\.val_fraction must be a finite number >= 0\.0 "),
    ("adapt.batch_size", -1, r"config\.adapt\.batch_size must be an integer >= 0, got -1"),
    ("adapt.steps", 0, r"config\.adapt\.steps must be a positive integer"),
    ("adapt.temperature", -1.0, r"config\.adapt\.temperature must be a finite number >= 0"),
    ("task.test_fraction", 1.0, r"config\.task\.test_fraction must be a finite number > 0\.0"),
    ("task.train_examples", -3, r"config\.task\.train_examples must be an integer >= 0"),
    ("data.max_examples", -1, r"config\.data\.max_examples must be an integer >= 0"),
    ("methods.qzo.epsilon", 0.0, r"config\.methods\.qzo\.epsilon must be a finite number > 0"),
    ("methods.qzo.epsilon", -1e-3, r"config\.methods\.qzo\.epsilon must be a finite number > 0"),
    ("methods.qzo.precision", "32w8a", r"qzo_ff holds weights in int16 at most"),
    ("methods.qzo.learning_rate", float("inf"), r"qzo\.learning_rate must be a finite number"),
])
def test_a_value_out_of_range_is_a_config_error_naming_the_field(field, value, match):
  config = tiny_quickstart()
  config.methods.qzo.epsilon = 1e-3
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  with node.ignore_type():
    node[leaf] = value
  _config_error(config, match)


def test_spsa_with_a_zero_epsilon_is_a_config_error():
  config = tiny_quickstart()
  config.methods.spsa = dict(kind="spsa", learning_rate=1e-3, epsilon=0.0, steps=2)
  _config_error(config, r"config\.methods\.spsa\.epsilon must be a finite number > 0")


def test_fewshot_split_fractions_are_checked():
  from test_train_lib import tiny_fewshot  # pylint: disable=g-import-not-at-top
  config = tiny_fewshot()
  config.task.split_sizes = (0.6, 0.2, 0.5)
  _config_error(config, r"split_sizes = \(0\.6, 0\.2, 0\.5\): fractions must sum to 1")
  config.task.split_sizes = (3, 0, 0)
  _config_error(config, r"split_sizes = \(3, 0, 0\): parts \(0, 2\) .* must not be empty")
  config = tiny_fewshot()
  config.task.split_by = "class_and_group"
  config.task.group_split = (0.5, -1.5)
  _config_error(config, r"config\.task\.group_split\[1\] must be a finite number >= 0\.0")


def test_a_batch_larger_than_the_pretraining_data_is_refused(tmp_path):
  config = tiny_quickstart()
  config.pretrain.batch_size = 100_000
  with pytest.raises(experiment.ConfigError, match=r"batch_size = 100000 is larger than the \d+ "
                     r"pre-training examples"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "pretrain")


def test_an_unknown_config_variant_lists_the_variants():
  with pytest.raises(experiment.ConfigError, match=r"'tinyy' is not a variant .* \('tiny',\)"):
    experiment.config_variant("tinyy", ("tiny",), "configs/quickstart.py")
  assert experiment.config_variant("tiny_sparse", ("tiny", "sparse"), "x", combinable=True) == (
      "tiny", "sparse")
  with pytest.raises(experiment.ConfigError, match="'spars' is not a variant"):
    experiment.config_variant("tiny_spars", ("tiny", "sparse"), "x", combinable=True)


def _train_py(*args, cwd):
  return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                        timeout=300, cwd=cwd)


def test_train_py_turns_bad_command_lines_into_one_config_error_line(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  cases = [
      ([f"--config={QUICKSTART}:tinyy"], "config error: ", "'tinyy' is not a variant"),
      ([f"--config={QUICKSTART}:tiny", "--config.adapt.stepz=3"], "config error: ",
       'Did you mean "steps"'),
      ([f"--config={QUICKSTART}:tiny", "--config.adapt.steps=abc"], "config error: ",
       "--config.adapt.steps=abc"),
      ([f"--config={QUICKSTART}:tiny", "--config.adapt.steps=1.5"], "config error: ",
       "--config.adapt.steps=1.5"),
      ([f"--config={QUICKSTART}:tiny", f"--workdir={afile}"], "config error: ",
       "is a file, not a folder"),
      ([f"--config={QUICKSTART}:tiny", f"--workdir={afile / 'sub'}"], "config error: ",
       "which is a file"),
      ([f"--config={QUICKSTART}:tiny", "--workdir="], "config error: ", "--workdir is empty"),
  ]
  for args, prefix, words in cases:
    if not any(arg.startswith("--workdir") for arg in args):
      args = args + [f"--workdir={tmp_path / 'work'}"]
    completed = _train_py(*args, cwd=tmp_path)
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert completed.returncode != 0, args
    assert lines and lines[-1].startswith(prefix) and words in lines[-1], (args, lines[-3:])
    assert "Traceback" not in completed.stderr, (args, completed.stderr[-2000:])
  assert not os.listdir(tmp_path / "work") if os.path.exists(tmp_path / "work") else True
  verbose = _train_py(f"--config={QUICKSTART}:tiny", "--config.adapt.stepz=3", "--verbose",
                      f"--workdir={tmp_path / 'work'}", cwd=tmp_path)
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_workdir_checks(tmp_path):
  with pytest.raises(experiment.ConfigError, match="--workdir is empty"):
    train_lib.check_workdir("")
  (tmp_path / "f").write_text("x")
  with pytest.raises(experiment.ConfigError, match="is a file, not a folder"):
    train_lib.check_workdir(str(tmp_path / "f"))
  with pytest.raises(experiment.ConfigError, match="lies under .* which is a file"):
    train_lib.check_workdir(str(tmp_path / "f" / "run"))
  assert train_lib.check_workdir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
  assert os.path.isdir(tmp_path / "new" / "run")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_an_unwritable_workdir_is_a_config_error(tmp_path):
  if os.geteuid() == 0:  # Root writes into any folder with its mode bits; /proc takes no folders.
    with pytest.raises(experiment.ConfigError, match="cannot be written"):
      train_lib.check_workdir("/proc/fwdgrad-run")
    return
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    with pytest.raises(experiment.ConfigError, match="cannot be written"):
      train_lib.check_workdir(str(locked / "run"))
  finally:
    locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# Corrupt or unreadable data files: one line naming the file.


def test_corrupt_data_files_give_one_line_naming_the_file(tmp_path):
  text = tmp_path / "labels-idx1-ubyte.gz"
  text.write_text("not gzip at all")
  with pytest.raises(ValueError, match=r"labels-idx1-ubyte\.gz' is not a readable gzip file"):
    sources.read_idx(text)
  whole = tmp_path / "whole-idx1-ubyte.gz"
  sources.write_idx(whole, np.arange(5000, dtype=np.uint8))
  cut = tmp_path / "cut-idx1-ubyte.gz"
  cut.write_bytes(whole.read_bytes()[:40])
  with pytest.raises(ValueError, match=r"cut-idx1-ubyte\.gz' is a truncated gzip file"):
    sources.read_idx(cut)

  empty = tmp_path / "empty.wav"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.wav is empty \(0 bytes\)"):
    audio.read_wav(empty)
  fake = tmp_path / "fake.wav"
  fake.write_text("hello, not a wav")
  with pytest.raises(ValueError, match=r"fake\.wav is not a readable PCM WAV file"):
    audio.read_wav(fake)

  archive = tmp_path / "images.zip"
  from PIL import Image  # pylint: disable=g-import-not-at-top
  png = tmp_path / "a.png"
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(png)
  with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
    for i in range(2):
      z.write(png, f"root/alpha/c{i}/{i}.png")
  data = bytearray(archive.read_bytes())
  offset = data.index(b"root/alpha/c0/0.png") + len("root/alpha/c0/0.png")
  for i in range(offset + 5, offset + 25):  # Inside the first member's compressed bytes.
    data[i] ^= 0xFF
  archive.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"images\.zip': the zip member 'root/alpha/c0/0\.png' is "
                     "corrupt"):
    images.load_image_folder(str(archive), layout="group/class")
  notzip = tmp_path / "notzip.zip"
  notzip.write_text("plain text")
  with pytest.raises(ValueError, match="is a file but not a zip archive"):
    images.load_image_folder(str(notzip))


def test_a_corrupt_data_file_stops_the_run_with_a_config_error(tmp_path):
  folder = tmp_path / "clips"
  folder.mkdir()
  (folder / "0_ann_0.wav").write_bytes(b"")
  config = tiny_quickstart()
  config.data.source = "wav_folder"
  config.data.corruption = ""
  config.data.kwargs = dict(path=str(folder))
  with pytest.raises(experiment.ConfigError, match=r"0_ann_0\.wav is empty"):
    train_lib.train_and_evaluate(config, str(tmp_path / "work"))


# ---------------------------------------------------------------------------------------------
# Records, checkpoints and the backbone survive torn writes and corruption.


def test_a_torn_last_record_is_dropped_and_the_file_repaired(tmp_path):
  path = tmp_path / "tasks.jsonl"
  path.write_text('{"task": 0, "accuracy": 0.5}\n{"task": 1, "accur')
  with pytest.warns(reporting.TornRecordWarning, match="torn last line"):
    rows = reporting.read_metrics(str(path))
  assert rows == [{"task": 0, "accuracy": 0.5}]
  assert path.read_text() == '{"task": 0, "accuracy": 0.5}\n'  # An append now starts a line.
  reporting.append_record(str(path), {"task": 1, "accuracy": 0.25})
  assert [r["task"] for r in reporting.read_metrics(str(path))] == [0, 1]
  path.write_text('{"task": 0}\n{"ta\n{"task": 2}\n')
  with pytest.raises(ValueError, match=r"tasks\.jsonl, line 2, is not JSON"):
    reporting.read_metrics(str(path))


def _quiet(config):
  config.methods = dict(zero_shot=dict(kind="zero_shot"),
                        backprop=dict(kind="backprop", learning_rate=1e-2, steps=2))
  config.task.num_tasks = 2
  return config


def _accuracies(results):
  return {name: row.get("accuracy") for name, row in results.items()}


def _biggest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def test_corrupt_checkpoints_and_backbone_fall_back_and_end_the_same(tmp_path):
  config = _quiet(tiny_quickstart())
  work = tmp_path / "work"
  reference = train_lib.train_and_evaluate(config, str(work))
  checkpoints = work / "pretrain" / "checkpoints"
  steps = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())
  assert len(steps) == 2, steps
  # The latest checkpoint cut to nothing, the backbone gone: pre-training restarts from the
  # one before, warns, and ends with the same backbone.
  open(_biggest_file(checkpoints / str(steps[-1])), "w").close()
  shutil.rmtree(work / "backbone")
  os.remove(work / "tasks" / "backprop.jsonl")
  with pytest.warns(train_lib.CheckpointWarning, match=f"checkpoint {steps[-1]} .* cannot be read"):
    again = train_lib.train_and_evaluate(config, str(work))
  assert _accuracies(again) == _accuracies(reference)
  # A truncated backbone file: the backbone is made again from the pre-training checkpoints.
  biggest = _biggest_file(work / "backbone")
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  os.remove(work / "tasks" / "backprop.jsonl")
  with pytest.warns(train_lib.CheckpointWarning, match="saved backbone .* cannot be read"):
    third = train_lib.train_and_evaluate(config, str(work))
  assert _accuracies(third) == _accuracies(reference)


# ---------------------------------------------------------------------------------------------
# Divergence is reported, never an accuracy.


def test_a_diverging_method_is_reported_as_diverged(tmp_path):
  config = _quiet(tiny_quickstart())
  config.methods.backprop.learning_rate = 1e6
  config.methods.backprop.optimizer = "adam"
  with pytest.warns(train_lib.DivergenceWarning, match=r"method 'backprop' diverged: .* "
                    r"adaptation step \d+ of task 0 \(learning rate 1e\+06\)\. Lower config\."
                    r"methods\.backprop\.learning_rate"):
    results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert results["backprop"]["diverged"] and "accuracy" not in results["backprop"]
  assert 0.0 <= results["zero_shot"]["accuracy"] <= 1.0
  table = (tmp_path / "results.md").read_text()
  assert "| backprop | float | DIVERGED (step" in table
  # Run again with a sane learning rate on the same workdir: the method is tried again.
  config.methods.backprop.learning_rate = 1e-3
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= results["backprop"]["accuracy"] <= 1.0


def test_a_diverging_pretraining_stops_with_the_step_and_the_fix(tmp_path):
  config = _quiet(tiny_quickstart())
  config.pretrain.learning_rate = 1e6
  with pytest.raises(train_lib.DivergedError, match=r"pre-training diverged: the loss is .* at "
                     r"step \d+ \(config\.pretrain\.learning_rate = 1e\+06\)\. Lower"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "results.json")


def test_apply_if_finite_keeps_training_through_a_nonfinite_estimate():
  params = {"w": jnp.ones((3,))}

  def value_fn(p):
    return jnp.sum(p["w"] ** 2)

  # apply_if_finite checks the updates it is given, so it goes after the estimator.
  tx = optax.chain(
      fwdgrad.forward_gradient("spsa", key=jax.random.key(0), num_directions=2, epsilon=1e-3),
      optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3))
  state = tx.init(params)
  bad = lambda p: value_fn(p) * jnp.nan
  updates, state = tx.update(params, state, params, value_fn=bad)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))
  assert int(state[1].notfinite_count) == 1
  updates, state = tx.update(params, state, params, value_fn=value_fn)
  new = optax.apply_updates(params, updates)
  assert float(value_fn(new)) < float(value_fn(params))


# ---------------------------------------------------------------------------------------------
# One run per workdir.


def test_a_second_run_on_a_busy_workdir_stops_at_once(tmp_path):
  work = train_lib.check_workdir(str(tmp_path / "work"))
  with train_lib.workdir_lock(work):
    start = time.perf_counter()
    with pytest.raises(train_lib.WorkdirBusyError, match=rf"in use by run pid {os.getpid()}"):
      train_lib.train_and_evaluate(_quiet(tiny_quickstart()), work)
    assert time.perf_counter() - start < 5
  # A run killed while holding the lock does not block the next one.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
       "from fwdgrad import train_lib; lock = train_lib.workdir_lock(sys.argv[2]); lock.__enter__();"
       "print('locked', flush=True); time.sleep(600)", REPO, work],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(train_lib.WorkdirBusyError):
    with train_lib.workdir_lock(work):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with train_lib.workdir_lock(work):  # The dead run's lock file is still there; it is free.
    assert os.path.exists(os.path.join(work, ".lock"))


# ---------------------------------------------------------------------------------------------
# SIGKILL at random points, and Ctrl-C: the resumed run ends like an uninterrupted one.

_KILL_CONFIG = '''
import importlib.util
spec = importlib.util.spec_from_file_location("quickstart", {quickstart!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)


def get_config():
  config = module.get_config("tiny")
  config.methods = dict(
      zero_shot=dict(kind="zero_shot"),
      backprop=dict(kind="backprop", learning_rate=1e-2, steps=3),
      qzo=dict(kind="qzo_ff", precision="16w8a", learning_rate=1e-3, steps=3))
  config.pretrain.steps = 40
  config.pretrain.log_every = 2
  config.pretrain.checkpoint_every = 4
  config.task.num_tasks = 8
  return config
'''


def _state(work):
  """(pre-training rows, checkpoint writes under way, task records) now in ``work``."""
  def lines(path):
    try:
      with open(path) as f:
        return f.read().count("\n")
    except OSError:
      return 0
  tasks = os.path.join(work, "tasks")
  records = sum(lines(os.path.join(tasks, f)) for f in os.listdir(tasks)) if os.path.isdir(
      tasks) else 0
  checkpoints = os.path.join(work, "pretrain", "checkpoints")
  writing = any("tmp" in name for name in os.listdir(checkpoints)) if os.path.isdir(
      checkpoints) else False
  return lines(os.path.join(work, "pretrain", "metrics.jsonl")), writing, records


def _run_until(command, work, trigger, rng, signum=signal.SIGKILL, timeout=240, env=None):
  """Starts ``command``; once ``trigger(state at start, state now)`` holds, waits a random bit and
  sends ``signum``. Returns (what the kill interrupted, the return code, the run's stderr)."""
  before = _state(work)
  # stderr goes to a file: a pipe nobody reads while polling fills up and blocks the run.
  with tempfile.TemporaryFile("w+") as log:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True,
                               env=env)
    deadline = time.time() + timeout
    phase = None
    try:
      while process.poll() is None and time.time() < deadline:
        phase = trigger(before, _state(work))
        if phase:
          time.sleep(rng.uniform(0.0, 0.03 if phase != "pre-training" else 0.15))
          process.send_signal(signum)
          break
        time.sleep(0.005)
      process.wait(timeout=timeout)
    finally:
      if process.poll() is None:
        process.kill()
    log.seek(0)
    return phase, process.returncode, log.read()


def _comparable(path):
  results = json.load(open(path))
  for row in results.values():
    row.pop("seconds_per_task", None)
  return results


@pytest.mark.slow
def test_random_sigkills_and_ctrl_c_end_like_an_uninterrupted_run(tmp_path):
  config_file = tmp_path / "kill_config.py"
  config_file.write_text(_KILL_CONFIG.format(quickstart=QUICKSTART))
  def command(work):
    return [sys.executable, TRAIN, f"--config={config_file}", f"--workdir={work}",
            "--config.progress=False"]

  # Runs share a compilation cache, as a user's repeated runs may: a restart then costs its
  # start-up, not its compiles.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  reference = tmp_path / "reference"
  done = subprocess.run(command(reference), capture_output=True, text=True, timeout=600, env=env)
  assert done.returncode == 0, done.stderr[-3000:]

  work = tmp_path / "work"
  rng = random.Random(0)
  triggers = {
      "pre-training": lambda a, b: "pre-training" if b[0] > a[0] and not b[2] else None,
      "checkpoint": lambda a, b: "checkpoint" if b[1] and b[0] > a[0] and not b[2] else None,
      "adaptation": lambda a, b: "adaptation" if b[2] > a[2] else None,
  }
  # Four kills in pre-training (two during a checkpoint write), then adaptation until ten; the
  # tenth is a Ctrl-C.
  plan = ["pre-training", "checkpoint", "pre-training", "checkpoint"] + ["adaptation"] * 12
  killed = []
  for phase in plan:
    if len(killed) == 10:
      break
    signum = signal.SIGINT if len(killed) == 9 else signal.SIGKILL
    got, code, stderr = _run_until(command(work), str(work), triggers[phase], rng, signum,
                                   env=env)
    if got is None:  # The phase had passed: the run finished it.
      assert code == 0, stderr[-3000:]
      if phase == "adaptation":
        break
      continue
    killed.append(got)
    if signum == signal.SIGINT:
      assert code == 130, stderr[-3000:]
      assert "run the same command again to resume" in stderr
    else:
      assert code == -signal.SIGKILL
  assert len(killed) >= 10, killed
  assert {"pre-training", "adaptation"} <= set(killed), killed
  final = subprocess.run(command(work), capture_output=True, text=True, timeout=600, env=env)
  assert final.returncode == 0, final.stderr[-3000:]
  assert _comparable(work / "results.json") == _comparable(reference / "results.json")
