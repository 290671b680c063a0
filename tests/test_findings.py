"""scripts/findings.py counts the paper's findings from result files (nothing typed in)."""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def findings():
  spec = importlib.util.spec_from_file_location(
      "findings", os.path.join(REPO, "scripts", "findings.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write(workdir, name, accuracies, losses=(1.0, 0.5)):
  """Per seed: 2 tasks of ``name`` at the given mean accuracy (paired across variants)."""
  for seed, accuracy in enumerate(accuracies):
    folder = os.path.join(workdir, "digits", f"seed{seed}", "default", "tasks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
      for task in range(2):
        f.write(json.dumps({"task": task, "accuracy": accuracy, "losses": list(losses),
                            "seconds": 0.1}) + "\n")


def test_summary_counts_follow_the_result_files(findings, tmp_path):
  workdir = str(tmp_path)
  _write(workdir, "zero_shot", [0.60, 0.62, 0.58], losses=())
  _write(workdir, "backprop", [0.95, 0.96, 0.94])
  _write(workdir, "ff_jvp_m3", [0.94, 0.95, 0.93])        # beats zero-shot, within 5 of BP
  _write(workdir, "ff_jvp_m1", [0.93, 0.94, 0.92])        # m = 3 beats m = 1
  _write(workdir, "qzo_16w8a_m3", [0.945, 0.955, 0.935])  # within 1 point of float FF
  _write(workdir, "qzo_16w8a_m1", [0.95, 0.96, 0.94])     # m = 1 beats m = 3 here
  _write(workdir, "qzo_8w8a_m3", [0.60, 0.63, 0.57], losses=(1.0, 1.0))  # does not train
  _write(workdir, "qzo_16w8a_sharpness", [0.948, 0.958, 0.938])
  counted = findings.summary("digits", workdir, 2)
  assert counted["FF beats zero-shot"].startswith("5 of 6 ")
  assert "not: qzo_8w8a_m3" in counted["FF beats zero-shot"]
  assert counted["FF within 5 points of BP"].startswith("5 of 6 ")
  assert counted["16w8a within 1 point of float FF"].startswith("yes: ")
  assert counted["8w8a fails to converge"].startswith("qzo_8w8a_m3: FAILS (training loss drop 0%")
  assert counted["m = 3 beats m = 1"].startswith("1 of 2 estimators")
  assert counted["which enhancement closes the gap most"].startswith("qzo_16w8a_sharpness")
  _write(workdir, "spsa_sign_m3", [0.5, 0.5, 0.5])
  folder = os.path.join(workdir, "digits", "seed1", "default", "tasks")
  with open(os.path.join(folder, "spsa_sign_m3.jsonl"), "a") as f:
    f.write(json.dumps({"task": 2, "accuracy": None, "losses": [1.0], "seconds": 0.1,
                        "diverged": True, "step": 4}) + "\n")
  counted = findings.summary("digits", workdir, 2)
  assert counted["diverged (left out of the counts)"] == "spsa_sign_m3"
  assert counted["FF beats zero-shot"].startswith("5 of 6 ")
  assert "DIVERGED (seed 1: task 2, step 4)" in findings.markdown("digits", workdir, 2)
  table = findings.summary_markdown(workdir, {"digits": 2})
  assert table.splitlines()[0] == "| paper's finding | digits |"
  assert len(table.splitlines()) == 2 + len(counted)


def test_seeds_script_aggregates_train_py_runs_over_seeds(tmp_path):
  spec = importlib.util.spec_from_file_location("seeds", os.path.join(REPO, "scripts", "seeds.py"))
  seeds = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(seeds)
  workdirs = []
  for seed, (zero, bp) in enumerate([(0.15, 0.80), (0.20, 0.78), (0.10, 0.79)]):
    folder = tmp_path / f"s{seed}" / "tasks"
    folder.mkdir(parents=True)
    for name, accuracy in (("zero_shot", zero), ("backprop", bp)):
      with open(folder / f"{name}.jsonl", "w") as f:
        for task in range(3):
          f.write(json.dumps({"task": task, "accuracy": accuracy, "losses": []}) + "\n")
    workdirs.append(str(tmp_path / f"s{seed}"))
  methods = {"zero_shot": {"kind": "zero_shot", "steps": 20},
             "backprop": {"kind": "backprop", "steps": 100}}
  (tmp_path / "s0" / "config.json").write_text(json.dumps({"methods": methods}))
  table = seeds.markdown(workdirs)
  assert ("| backprop | 100 | 100 fwd + 100 bwd | 79.00 ± 2.48 (n=3) | 80.0 / 78.0 / 79.0 | "
          "+64.00 ±") in table
  assert "| zero_shot | 0 | 0 | 15.00" in table
  assert "Headroom: backprop − zero-shot = +64.00" in table and "(meets the rule" in table


def test_ood_sweep_report_tabulates_each_case_over_seeds(tmp_path):
  spec = importlib.util.spec_from_file_location("ood_sweep",
                                                os.path.join(REPO, "scripts", "ood_sweep.py"))
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  per_method = {"zero_shot": (0.20, 0.25, 0.30), "backprop": (0.80, 0.82, 0.84),
                "ff": (0.75, 0.80, 0.82), "qzo_ff_16w8a": (0.74, 0.79, 0.81),
                "qzo_ff_8w8a": (0.20, 0.26, 0.30)}
  for seed in range(3):
    folder = tmp_path / "gaussian_noise_3" / f"seed{seed}" / "tasks"
    folder.mkdir(parents=True)
    for name, values in per_method.items():
      (folder / f"{name}.jsonl").write_text(
          json.dumps({"task": 0, "accuracy": values[seed], "losses": []}) + "\n")
  (tmp_path / "jax_cache").mkdir()
  lines = sweep.report(str(tmp_path)).splitlines()
  assert len(lines) == 5 and lines[3] == ""
  # The summary over the cases with headroom: 8w8a stays at zero-shot, FF and 16w8a do not.
  assert lines[4].startswith("Cases that meet the headroom rule: 1 of 1 (gaussian_noise_3).")
  assert "beat zero-shot (paired interval above 0) in 2 of 3" in lines[4]
  assert "within 5 points of BP (mean paired difference ≥ −5) in 2 of 3" in lines[4]
  cells = [cell.strip() for cell in lines[2].split("|")[1:-1]]
  assert cells[:3] == ["gaussian_noise", "3", "3"]
  assert cells[3] == "25.0 ± 12.4" and cells[4] == "-"  # zero_shot; no zero_shot_16w8a rows
  assert cells[9].startswith("+57.0 ± ") and cells[9].endswith("(meets)")
  assert cells[10].startswith("-3.0 ± ")  # FF − BP, paired per seed


def test_paper_methods_are_the_papers_rows_and_take_tuned_values():
  from fwdgrad import experiment  # pylint: disable=g-import-not-at-top
  rows = experiment.paper_methods(1e-2, ff=dict(learning_rate=3e-3, steps=50), spsa=None)
  assert "spsa" not in rows and rows["ff"].learning_rate == 3e-3 and rows["ff"].steps == 50
  assert rows["qzo_ff_16w8a"].learning_rate == 1e-2
  assert rows["qzo_ff_16w8a_m1"].num_directions == 1
  assert rows["qzo_ff_16w8a_sharpness_kernelwise"].kernelwise
  assert rows["zero_shot_16w8a"].precision == "16w8a"
  with pytest.raises(ValueError, match="there is no row 'fff'"):
    experiment.paper_methods(fff=dict(steps=1))
