"""Aggregates train.py runs of one config over seeds: a table with t-based intervals over seeds.

  python scripts/seeds.py workdirs/ood_fashion_s0 workdirs/ood_fashion_s1 workdirs/ood_fashion_s2

Each workdir is one ``train.py`` run (``--config.seed=k``). The unit of replication is the seed:
per method, the mean over seeds of the per-seed mean accuracy (from ``tasks/<method>.jsonl``) with
its Student-t 95% interval, and the paired per-seed differences to zero-shot and to backprop with
theirs; then the headroom rule (``fwdgrad.reporting.headroom``).
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fwdgrad import reporting  # pylint: disable=g-import-not-at-top,wrong-import-position
from fwdgrad.data import mean_confidence_interval  # pylint: disable=g-import-not-at-top,wrong-import-position


# The paper's comparisons: (row, against, what it measures).
PAIRS = (
    ("zero_shot_16w8a", "zero_shot", "what fixed-point inference alone costs (zero-shot at 16w8a)"),
    ("qzo_ff_16w8a", "spsa", "16w8a against float (the same sign-m-SPSA estimator)"),
    ("qzo_ff_16w8a", "ff", "16w8a against float FF (jvp)"),
    ("qzo_ff_8w8a", "qzo_ff_16w8a", "8w8a against 16w8a"),
    ("qzo_ff_16w8a", "qzo_ff_16w8a_m1", "m = 3 against m = 1"),
    ("qzo_ff_16w8a_momentum", "qzo_ff_16w8a", "enhancement: momentum-guided sampling"),
    ("qzo_ff_16w8a_sharpness", "qzo_ff_16w8a", "enhancement: sharpness-aware"),
    ("qzo_ff_16w8a_kernelwise", "qzo_ff_16w8a", "enhancement: kernel-wise"),
    ("qzo_ff_16w8a_sharpness_kernelwise", "qzo_ff_16w8a",
     "enhancement: sharpness-aware + kernel-wise"),
)


def per_seed(workdirs):
  """{method: [per-seed mean accuracy]} over the methods every workdir finished."""
  table = {}
  for workdir in workdirs:
    folder = os.path.join(workdir, "tasks")
    for name in sorted(os.listdir(folder)):
      with open(os.path.join(folder, name)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
      accuracies = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
      if accuracies and not any(r.get("diverged") for r in rows):
        table.setdefault(name[:-len(".jsonl")], []).append(float(np.mean(accuracies)))
  return {k: v for k, v in table.items() if len(v) == len(workdirs)}


def _low(diffs) -> float:
  mean, half = mean_confidence_interval(diffs)
  return mean - half


def method_configs(workdir) -> dict:
  """{method: its fields} from the run's ``config.json`` (steps filled in), {} if absent."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    config = json.load(f)
  return config.get("methods", {})


def markdown(workdirs) -> str:
  table = per_seed(workdirs)
  zero, bp = table.get("zero_shot"), table.get("backprop")
  fields = method_configs(workdirs[0])

  def paired(values, reference):
    if reference is None or values is reference:
      return "-"
    mean, half = mean_confidence_interval(np.subtract(values, reference))
    return f"{100 * mean:+.2f} ± {100 * half:.2f}"

  lines = ["| method | steps | forward calls / task | acc. % ± t-95% CI over seeds | per seed | "
           "Δ vs zero-shot | Δ vs BP |", "|---|---|---|---|---|---|---|"]
  for name, values in table.items():
    mean, half = mean_confidence_interval(values)
    method = fields.get(name, {})
    steps = 0 if method.get("kind") == "zero_shot" else method.get("steps", "")
    calls = reporting.forward_calls(method, steps) if method else ""
    lines.append(f"| {name} | {steps} | {calls} | {100 * mean:.2f} ± {100 * half:.2f} "
                 f"(n={len(values)}) | "
                 f"{' / '.join(f'{100 * v:.1f}' for v in values)} | {paired(values, zero)} | "
                 f"{paired(values, bp)} |")
  fg = [name for name in table
        if fields.get(name, {}).get("kind") in ("ff", "spsa", "qzo_ff")]
  if zero and bp and fg and len(bp) > 1:
    beats = [n for n in fg if _low(np.subtract(table[n], zero)) > 0]
    close = [n for n in fg if np.mean(np.subtract(table[n], bp)) >= -0.05]
    lines.append(f"\nSummary over the {len(fg)} forward-gradient rows: beat zero-shot (paired "
                 f"interval above 0) in {len(beats)} of {len(fg)}; within 5 points of BP (mean "
                 f"paired difference ≥ −5) in {len(close)} of {len(fg)}"
                 + (f" ({', '.join(close)})" if close else "") + ".")
  comparisons = [(a, b, what) for a, b, what in PAIRS if a in table and b in table]
  if comparisons and len(bp or zero or [0]) > 1:
    lines.append("\nPaired differences over seeds (points, t-95%):")
    for a, b, what in comparisons:
      mean, half = mean_confidence_interval(np.subtract(table[a], table[b]))
      lines.append(f"- {what}: {a} − {b} = {100 * mean:+.2f} ± {100 * half:.2f}")
    enhanced = [a for a, b, what in comparisons if what.startswith("enhancement")]
    if enhanced:
      best = max(enhanced, key=lambda a: np.mean(table[a]))
      gain = np.mean(np.subtract(table[best], table["qzo_ff_16w8a"]))
      lines.append(f"- the enhancement that closes the gap most: {best} ({100 * gain:+.2f} points "
                   "against plain QZO-FF 16w8a)")
  if zero and bp and len(bp) > 1:
    room = reporting.headroom(bp, zero)
    lines.append(f"\nHeadroom: backprop − zero-shot = {100 * room['gap']:+.2f} ± "
                 f"{100 * room['ci95']:.2f} points ({'meets' if room['meets'] else 'FAILS'} the "
                 "rule: at least 3 points, interval above 0).")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  print(markdown(sys.argv[1:]))
