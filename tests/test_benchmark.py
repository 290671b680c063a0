"""The benchmark command runs end to end and writes the tables the README quotes."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_writes_json_and_markdown(tmp_path):
  command = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--models", "mlp",
             "--modes", "ft", "--batch", "4", "--directions", "1",
             "--distributions", "fast_rademacher", "--warmup", "1", "--repeats", "1",
             "--scaling", "1,2", "--no-torch", "--out", str(tmp_path)]
  done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu",
                                 PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "compiled mlp ft spsa m=1 fast_rademacher for memory" in done.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  rows = {r["step"]: r for r in results["steps"]}
  assert set(rows) == {"inference", "inference 16w8a", "backprop", "jvp m=1 fast_rademacher",
                       "spsa m=1 fast_rademacher", "fused m=1 fast_rademacher",
                       "qzo_ff 16w8a m=1 fast_rademacher"}
  assert rows["inference"]["memory_ratio"] == 1.0
  # The fused step trains at inference memory; every timed step took some time.
  assert rows["fused m=1 fast_rademacher"]["memory_ratio"] <= 1.2
  assert all(r["seconds"] > 0 for r in rows.values())
  assert [(r["devices"], r["num_directions"]) for r in results["scaling"]] == [(1, 1), (2, 1)]
  table = (tmp_path / "results.md").read_text()
  assert "| mlp | ft | spsa m=1 fast_rademacher |" in table
  assert "Perturbation-parallel step" in table


def test_benchmark_rejects_scaling_only_without_devices(tmp_path):
  command = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--scaling-only",
             "--no-scaling", "--out", str(tmp_path)]
  done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
  assert done.returncode != 0
  assert "--scaling-only needs device counts" in done.stderr
