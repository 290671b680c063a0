"""The paper's accuracy findings on the real data we ship: a sweep over methods, seeds and tasks.

  FWDGRAD_DATA_DIR=/path/to/data FWDGRAD_OPENWAKEWORD_DIR=/path/to/wheel_dir \
      python scripts/findings.py --task digits --seeds 0 1 2 [--only NAME ...] [--num_tasks 5]
  python scripts/findings.py --report            # the tables and the summary counts from what
                                                 # has been run (fsdd: --fsdd_tasks 20)

Tasks:
  digits  the quickstart (configs/quickstart.py): scikit-learn digits, Conv4 pre-trained with
          backprop on a clean half, the other half blurred (OOD); LP-1 from the pre-trained
          classifier on 300 blurred examples per task, scored on 449 others.
  fsdd    configs/fewshot_audio.py:shot1_embedding: the Free Spoken Digit Dataset, openWakeWord's
          pre-trained speech embedding (real weights, no pre-training here), 5-way 1-shot episodes
          of digits and speakers not in the base split, linear probing with a 3-layer head (LP-3,
          random init, trained with cross-entropy on the 5 support examples).

Each seed pre-trains its own backbone (digits) and draws its own tasks; every variant of a seed
adapts on the same tasks. Results go to ``<workdir>/<task>/seed<k>/<group>/tasks/<variant>.jsonl``
(one line per task, as ``train.py`` writes them); a run that is started again skips the tasks
already done. ``--report`` aggregates them over seeds, the unit of replication: the mean of the
per-seed mean accuracies with its Student-t 95% interval, the paired per-seed differences to
zero-shot and to backprop with theirs, the steps and forward calls per task, and the adaptation
loss (on the training set) at the first and the last step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORKDIR = os.path.join(REPO, "workdirs", "findings")

# (name, method fields, config.adapt overrides, what the row shows). Variants with the same adapt
# overrides share one adaptation group (one Adapter config).
_Q16 = dict(kind="qzo_ff", precision="16w8a")
# Every row below was measured with jax.random.normal directions, before the configs took the
# library's default law ("irwin_hall"); the rows keep it, so that their commands reproduce them.
ROW_DEFAULTS = dict(distribution="gaussian")
VARIANTS = {
    # The quickstart (OOD: blurred digits, LP-1 from the pre-trained head). Learning rates from
    # its validation grid (configs/quickstart.py); forward gradients get 600 steps, BP 100.
    "digits": [
        ("zero_shot", dict(kind="zero_shot"), {}, "no adaptation (pre-trained classifier)"),
        ("backprop", dict(kind="backprop", optimizer="adam", learning_rate=3e-3, steps=100), {},
         "BP, Adam, 100 steps"),
        ("backprop_sgd600", dict(kind="backprop", optimizer="sgd", learning_rate=3e-3), {},
         "BP, SGD at FF's η and steps"),
        ("ff_jvp_m3", dict(kind="ff", learning_rate=3e-3, num_directions=3), {}, "float FF (jvp)"),
        ("ff_jvp_m1", dict(kind="ff", learning_rate=3e-3, num_directions=1), {}, "float FF, m=1"),
        ("spsa_sign_m3", dict(kind="spsa", learning_rate=3e-3, num_directions=3), {},
         "float sign-m-SPSA"),
        ("spsa_sign_m1", dict(kind="spsa", learning_rate=3e-3, num_directions=1), {},
         "float sign-SPSA, m=1"),
        ("qzo_16w8a_m3", dict(_Q16, learning_rate=3e-3, num_directions=3), {}, "QZO-FF 16w8a"),
        ("qzo_16w8a_m1", dict(_Q16, learning_rate=3e-3, num_directions=1), {}, "QZO-FF 16w8a, m=1"),
        ("qzo_8w8a_m3", dict(kind="qzo_ff", precision="8w8a", learning_rate=3e-3,
                             num_directions=3), {}, "QZO-FF 8w8a"),
        # The paper's 8w8a failure needs ε/Δ_w < 1/2 (ε_q = 0): at ε = 1e-3 the pre-trained
        # heads have w_max ≈ 0.22 < 2·127·ε, so ε_q = 1; at half the ε it rounds to 0.
        ("qzo_8w8a_m3_eps5e-4", dict(kind="qzo_ff", precision="8w8a", learning_rate=3e-3,
                                     num_directions=3, epsilon=5e-4), {}, "QZO-FF 8w8a, ε/2"),
        ("qzo_16w8a_m3_eps5e-4", dict(_Q16, learning_rate=3e-3, num_directions=3, epsilon=5e-4),
         {}, "QZO-FF 16w8a, ε/2"),
        ("qzo_16w8a_momentum", dict(_Q16, learning_rate=3e-3, momentum=True), {},
         "+ momentum-guided sampling"),
        ("qzo_16w8a_sharpness", dict(_Q16, learning_rate=3e-3, sharpness_radius=0.05), {},
         "+ sharpness-aware (ρ=0.05)"),
        ("qzo_16w8a_kernelwise", dict(_Q16, learning_rate=3e-2, kernelwise=True), {},
         "+ kernel-wise normalization"),
        ("qzo_16w8a_sharpness_kernelwise", dict(_Q16, learning_rate=3e-2, sharpness_radius=0.05,
                                                kernelwise=True), {},
         "+ sharpness-aware + kernel-wise"),
        ("zero_shot_16w8a", dict(kind="zero_shot", precision="16w8a"), {},
         "no adaptation, backbone at 16w8a"),
        ("zero_shot_8w8a", dict(kind="zero_shot", precision="8w8a"), {},
         "no adaptation, backbone at 8w8a"),
    ],
    "fsdd": [
        # Zero-shot is the ProtoNets classifier of the support set (the LP-3 head starts random).
        ("zero_shot", dict(kind="zero_shot"), dict(head="protonet"), "no adaptation (ProtoNets)"),
        ("backprop", dict(kind="backprop", optimizer="adam", learning_rate=1e-3), {}, "BP, Adam"),
        ("ff_jvp_m3", dict(kind="ff", learning_rate=1e-3, num_directions=3), {}, "float FF (jvp)"),
        ("spsa_sign_m3", dict(kind="spsa", learning_rate=1e-2, num_directions=3), {},
         "float sign-m-SPSA"),
        ("qzo_16w8a_m3", dict(_Q16, learning_rate=1e-2, num_directions=3), {}, "QZO-FF 16w8a"),
        ("qzo_16w8a_m1", dict(_Q16, learning_rate=1e-2, num_directions=1), {}, "QZO-FF 16w8a, m=1"),
        ("qzo_8w8a_m3", dict(kind="qzo_ff", precision="8w8a", learning_rate=1e-2,
                             num_directions=3), {}, "QZO-FF 8w8a"),
        ("qzo_16w8a_sharpness", dict(_Q16, learning_rate=1e-2, sharpness_radius=0.05), {},
         "+ sharpness-aware (ρ=0.05)"),
    ],
}


def _load_config(task: str):
  sys.path.insert(0, REPO)
  path, arg = {"digits": ("quickstart.py", None),
               "fsdd": ("fewshot_audio.py", "shot1_embedding")}[task]
  spec = importlib.util.spec_from_file_location("config", os.path.join(REPO, "configs", path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  if task == "fsdd":
    # LP-3: with 1 shot the LP-1 head, which starts as the ProtoNets classifier of the support
    # set, already fits the 5 support examples (support loss ~0, nothing trains); the 3-layer
    # head starts at random. (Fine-tuning the 20-layer embedding is too slow for this sweep.)
    config.adapt.mode = "lp"
    config.adapt.head = "mlp3"
    config.adapt.objective = "support"  # (A head on frozen features: no views to compute.)
    config.task.group_split = (0.5, 0.5)  # The speaker split these findings were run with.
    config.adapt.steps = 60  # The head starts at random: it needs more steps than FT.
  config.progress = False
  return config


def _group_name(overrides: dict) -> str:
  return "_".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "default"


def run(task: str, seeds, only, num_tasks: int, workdir: str, steps: int = 0) -> None:
  from fwdgrad import experiment  # pylint: disable=g-import-not-at-top
  from fwdgrad import train_lib  # pylint: disable=g-import-not-at-top
  variants = [v for v in VARIANTS[task] if not only or v[0] in only]
  unknown = sorted(set(only or ()) - {v[0] for v in VARIANTS[task]})
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; the {task} variants are "
                     f"{[v[0] for v in VARIANTS[task]]}.")
  for seed in seeds:
    base = _load_config(task)
    base.seed = seed
    base.task.num_tasks = num_tasks
    if steps:
      base.adapt.steps = steps
    seed_dir = os.path.join(workdir, task, f"seed{seed}")
    os.makedirs(seed_dir, exist_ok=True)
    base.methods = {"zero_shot": dict(kind="zero_shot")}
    config = experiment.validate_config(base)
    start = time.perf_counter()
    splits = train_lib.make_splits(config)
    variables = train_lib.pretrain(config, splits, seed_dir)
    groups = {}
    for name, fields, overrides, _ in variants:
      groups.setdefault(_group_name(overrides), (overrides, {}))[1][name] = {**ROW_DEFAULTS,
                                                                              **fields}
    for group, (overrides, methods) in groups.items():
      grouped = _load_config(task)
      grouped.seed, grouped.task.num_tasks = seed, num_tasks
      if steps:
        grouped.adapt.steps = steps
      for key, value in overrides.items():
        grouped.adapt[key] = value
      grouped.methods = methods
      grouped = experiment.validate_config(grouped)
      group_dir = os.path.join(seed_dir, group)
      with open(os.path.join(seed_dir, f"config_{group}.json"), "w") as f:
        f.write(grouped.to_json(indent=2))
      for name in methods:
        t0 = time.perf_counter()
        single = experiment.validate_config(grouped)
        single.methods = {name: grouped.methods[name]}
        train_lib.adapt_all(single, splits, variables, group_dir)
        print(f"[{task} seed {seed}] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"[{task} seed {seed}] done in {time.perf_counter() - start:.1f} s", flush=True)


def _rows(path: str):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _t_interval(values):
  """Mean and Student-t 95% half-width (nan for one value): seeds are the replicates."""
  from fwdgrad.data import mean_confidence_interval  # pylint: disable=g-import-not-at-top
  return mean_confidence_interval(values)


def aggregate(task: str, workdir: str, num_tasks: int):
  """Per variant: seeds, per-seed means, loss start/end, steps, seconds per task."""
  sys.path.insert(0, REPO)
  from fwdgrad import reporting  # pylint: disable=g-import-not-at-top
  table = []
  for name, fields, overrides, what in VARIANTS[task]:
    per_seed, first, last, seconds, seeds, steps = {}, [], [], [], [], 0
    diverged = []
    task_dir = os.path.join(workdir, task)
    if not os.path.isdir(task_dir):
      continue
    for seed_name in sorted(os.listdir(task_dir)):
      path = os.path.join(task_dir, seed_name, _group_name(overrides), "tasks", f"{name}.jsonl")
      if not os.path.exists(path):
        continue
      rows = {r["task"]: r for r in _rows(path)}
      bad = [r for r in rows.values() if r.get("diverged")]
      if bad:  # train.py stops a method at its first diverged task.
        diverged.append(f"seed {seed_name[4:]}: task {bad[0]['task']}, step {bad[0]['step']}")
        continue
      if len(rows) < num_tasks:
        continue
      rows = [rows[i] for i in range(num_tasks)]
      seed = int(seed_name[4:])
      seeds.append(seed)
      per_seed[seed] = float(np.mean([r["accuracy"] for r in rows]))
      seconds.extend(r["seconds"] for r in rows[1:])
      for r in rows:
        if r["losses"]:
          steps = len(r["losses"])
          first.append(r["losses"][0])
          last.append(r["losses"][-1])
    if diverged:
      table.append(dict(name=name, what=what, fields=fields, overrides=overrides, seeds=[],
                        per_seed={}, diverged=diverged))
      continue
    if not per_seed:
      continue
    mean, half = _t_interval(list(per_seed.values()))
    table.append(dict(
        name=name, what=what, fields=fields, overrides=overrides, seeds=seeds,
        per_seed=per_seed, mean=mean, ci95=half, steps=steps, calls=reporting.forward_calls(fields, steps),
        loss_first=float(np.mean(first)) if first else None,
        loss_last=float(np.mean(last)) if last else None,
        seconds=float(np.median(seconds)) if seconds else None))
  return table


def _fields_text(fields: dict, overrides: dict) -> str:
  shown = {k: v for k, v in fields.items() if k != "kind"}
  text = ", ".join(f"{k}={v}" for k, v in shown.items())
  adapt = ", ".join(f"adapt.{k}={v}" for k, v in overrides.items())
  return "; ".join(t for t in (text, adapt) if t) or "-"


def _paired(row, reference) -> str:
  """Mean per-seed difference to ``reference`` (same seeds, same tasks) ± its t interval."""
  if reference is None or row is reference:
    return "-"
  common = sorted(set(row["per_seed"]) & set(reference["per_seed"]))
  diffs = [row["per_seed"][k] - reference["per_seed"][k] for k in common]
  mean, half = _t_interval(diffs)
  return f"{100 * mean:+.2f} ± {100 * half:.2f}"


def markdown(task: str, workdir: str, num_tasks: int) -> str:
  table = aggregate(task, workdir, num_tasks)
  by_name = {row["name"]: row for row in table}
  zero, bp = by_name.get("zero_shot"), by_name.get("backprop")
  lines = ["| variant | what | method fields | steps | forward calls / task | acc. % ± t-95% CI "
           "over seeds | Δ vs zero-shot (paired) | Δ vs BP (paired) | training loss first → "
           "last step (drop) | s/task | command |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in table:
    if row.get("diverged"):
      lines.append(f"| {row['name']} | {row['what']} | "
                   f"{_fields_text(row['fields'], row['overrides'])} | - | - | DIVERGED "
                   f"({'; '.join(row['diverged'])}) | - | - | - | - | `python scripts/findings.py "
                   f"--task {task} --only {row['name']}` |")
      continue
    loss = ("-" if row["loss_first"] is None
            else f"{row['loss_first']:.3f} → {row['loss_last']:.3f} "
            f"({100 * (1 - row['loss_last'] / row['loss_first']):.0f}%)")
    seconds = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
    seeds = " ".join(str(s) for s in row["seeds"])
    command = (f"`python scripts/findings.py --task {task} --seeds {seeds} --num_tasks "
               f"{num_tasks} --only {row['name']}`")
    lines.append(f"| {row['name']} | {row['what']} | {_fields_text(row['fields'], row['overrides'])}"
                 f" | {row['steps']} | {row['calls']} | {100 * row['mean']:.2f} ± "
                 f"{100 * row['ci95']:.2f} (n={len(row['seeds'])}) | {_paired(row, zero)} | "
                 f"{_paired(row, bp)} | {loss} | {seconds} | {command} |")
  common = sorted(set(bp["per_seed"]) & set(zero["per_seed"])) if zero and bp else []
  if len(common) > 1:
    from fwdgrad import reporting  # pylint: disable=g-import-not-at-top
    room = reporting.headroom([bp["per_seed"][k] for k in common],
                              [zero["per_seed"][k] for k in common])
    lines.append(f"\nHeadroom: backprop − zero-shot = {100 * room['gap']:+.2f} ± "
                 f"{100 * room['ci95']:.2f} points ({'meets' if room['meets'] else 'FAILS'} the "
                 "rule: at least 3 points, interval above 0).")
  return "\n".join(lines)


_FORWARD_KINDS = ("ff", "spsa", "qzo_ff")
_ENHANCEMENTS = ("momentum", "sharpness_radius", "kernelwise")


def _diff(row, reference):
  """(mean, t half-width) of the per-seed differences ``row - reference``, or None."""
  if row is None or reference is None:
    return None
  common = sorted(set(row["per_seed"]) & set(reference["per_seed"]))
  if not common:
    return None
  return _t_interval([row["per_seed"][k] - reference["per_seed"][k] for k in common])


def _points(diff) -> str:
  return "n/a" if diff is None else f"{100 * diff[0]:+.2f} ± {100 * diff[1]:.2f}"


def summary(task: str, workdir: str, num_tasks: int) -> dict:
  """The paper's findings, counted over one task's rows: {finding: text}. Nothing is typed in.

  A forward-gradient row "beats zero-shot" when its paired difference's t interval lies above 0,
  and is "within 5 points of BP" when the mean paired difference to BP is at least -5 points;
  8w8a "converges" when its training loss falls by at least 5%. Diverged rows are named and left
  out of the counts.
  """
  table = aggregate(task, workdir, num_tasks)
  diverged = [row["name"] for row in table if row.get("diverged")]
  table = [row for row in table if not row.get("diverged")]
  by_name = {row["name"]: row for row in table}
  zero, bp = by_name.get("zero_shot"), by_name.get("backprop")
  forward = [row for row in table if row["fields"].get("kind") in _FORWARD_KINDS]
  out = {}
  if diverged:
    out["diverged (left out of the counts)"] = ", ".join(diverged)
  if not forward or zero is None or bp is None:
    return out
  versus_zero = {row["name"]: _diff(row, zero) for row in forward}
  versus_bp = {row["name"]: _diff(row, bp) for row in forward}
  beats = [n for n, d in versus_zero.items() if d and d[0] - d[1] > 0]
  losers = sorted(set(versus_zero) - set(beats))
  out["FF beats zero-shot"] = (f"{len(beats)} of {len(forward)} forward-gradient rows (interval "
                               f"above 0)" + (f"; not: {', '.join(losers)}" if losers else ""))
  close = [n for n, d in versus_bp.items() if d and d[0] >= -0.05]
  far = sorted(set(versus_bp) - set(close))
  out["FF within 5 points of BP"] = (f"{len(close)} of {len(forward)} (the paper: 26 of 30 "
                                     "vision, 11 of 16 audio)"
                                     + (f"; not: {', '.join(far)}" if far else ""))
  q16, ff = by_name.get("qzo_16w8a_m3"), by_name.get("ff_jvp_m3")
  if q16 and ff:
    d = _diff(q16, ff)
    out["16w8a within 1 point of float FF"] = (
        f"{'yes' if abs(d[0]) <= 0.01 else 'no'}: QZO-FF 16w8a − float FF = {_points(d)} points")
  eight = [row for row in forward if row["fields"].get("precision") == "8w8a"]
  if eight:
    parts = []
    for row in eight:  # Converging is the training loss falling (at least 5%).
      d = versus_zero[row["name"]]
      moved = row["loss_first"] is not None and row["loss_last"] < 0.95 * row["loss_first"]
      drop = ("-" if row["loss_first"] is None
              else f"{100 * (1 - row['loss_last'] / row['loss_first']):.0f}%")
      parts.append(f"{row['name']}: {'converges' if moved else 'FAILS'} (training loss drop "
                   f"{drop}; accuracy vs zero-shot {_points(d)})")
    out["8w8a fails to converge"] = "; ".join(parts)
  pairs = [(by_name[n], by_name[n[:-1] + "1"]) for n in by_name
           if n.endswith("_m3") and n[:-1] + "1" in by_name]
  if pairs:
    diffs = [(a["name"][:-3], _diff(a, b)) for a, b in pairs]
    wins = [n for n, d in diffs if d and d[0] > 0]
    out["m = 3 beats m = 1"] = (f"{len(wins)} of {len(pairs)} estimators: " + ", ".join(
        f"{n} {_points(d)}" for n, d in diffs))
  enhanced = [row for row in forward if any(row["fields"].get(k) for k in _ENHANCEMENTS)]
  if enhanced and q16:
    base = versus_bp.get("qzo_16w8a_m3")
    best = max(enhanced, key=lambda row: versus_bp[row["name"]][0])
    gain = _diff(best, q16)
    out["which enhancement closes the gap most"] = (
        f"{best['name']} ({_points(versus_bp[best['name']])} vs BP, against "
        f"{_points(base)} for plain QZO-FF 16w8a: {_points(gain)} points)")
  return out


def summary_markdown(workdir: str, num_tasks_by_task: dict) -> str:
  tasks = list(num_tasks_by_task)
  counted = {task: summary(task, workdir, n) for task, n in num_tasks_by_task.items()}
  findings = []
  for task in tasks:
    findings += [f for f in counted[task] if f not in findings]
  lines = ["| paper's finding | " + " | ".join(tasks) + " |",
           "|---" * (len(tasks) + 1) + "|"]
  for finding in findings:
    lines.append(f"| {finding} | " + " | ".join(counted[t].get(finding, "-") for t in tasks)
                 + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", choices=sorted(VARIANTS), default="digits")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
  parser.add_argument("--num_tasks", type=int, default=5)
  parser.add_argument("--steps", type=int, default=0, help="adaptation steps (0: the config's)")
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
  parser.add_argument("--report", action="store_true", help="print the tables and exit")
  parser.add_argument("--fsdd_tasks", type=int, default=20,
                      help="tasks per seed of the fsdd runs, for --report")
  args = parser.parse_args()
  if args.report:
    tasks = {"digits": args.num_tasks, "fsdd": args.fsdd_tasks}
    for task, num_tasks in tasks.items():
      print(f"### {task}\n\n{markdown(task, args.workdir, num_tasks)}\n")
    print(f"### Summary against the paper\n\n{summary_markdown(args.workdir, tasks)}\n")
    return
  run(args.task, args.seeds, args.only, args.num_tasks, args.workdir, args.steps)


if __name__ == "__main__":
  main()
