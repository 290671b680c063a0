"""The paper's accuracy findings on the real data we ship: a sweep over methods, seeds and tasks.

  FWDGRAD_DATA_DIR=/path/to/data FWDGRAD_OPENWAKEWORD_DIR=/path/to/wheel_dir \
      python scripts/findings.py --task digits --seeds 0 1 2 [--only NAME ...] [--num_tasks 20]
  python scripts/findings.py --report            # the markdown tables from what has been run

Tasks:
  digits  the quickstart (configs/quickstart.py): scikit-learn digits, Conv4 pre-trained with
          backprop on 3 classes, 5-way 5-shot episodes of the other 7, full fine-tuning (FT),
          ProtoNets head.
  fsdd    configs/fewshot_audio.py:speech_embedding: the Free Spoken Digit Dataset, openWakeWord's
          pre-trained speech embedding (real weights, no pre-training here), 5-way 1-shot episodes
          of digits and speakers not in the base split, linear probing with a 3-layer head (LP-3,
          random init, trained with cross-entropy on the 5 support examples).

Each seed pre-trains its own backbone (digits) and draws its own tasks; every variant of a seed
adapts on the same tasks. Results go to ``<workdir>/<task>/seed<k>/<group>/tasks/<variant>.jsonl``
(one line per task, as ``train.py`` writes them); a run that is started again skips the tasks
already done. ``--report`` aggregates them over seeds: the mean and standard deviation of the
per-seed mean accuracies, the 95% confidence interval over all tasks of all seeds, and the
adaptation loss (on the support set) at the first and the last step.
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
VARIANTS = {
    "digits": [
        ("zero_shot", dict(kind="zero_shot"), {}, "no adaptation"),
        ("backprop", dict(kind="backprop", optimizer="adam", learning_rate=1e-3), {}, "BP, Adam"),
        ("ff_jvp_m3", dict(kind="ff", learning_rate=1e-2, num_directions=3), {}, "float FF (jvp)"),
        ("ff_jvp_m1", dict(kind="ff", learning_rate=1e-2, num_directions=1), {}, "float FF, m=1"),
        ("spsa_sign_m3", dict(kind="spsa", learning_rate=1e-2, num_directions=3), {},
         "float sign-m-SPSA"),
        ("spsa_sign_m1", dict(kind="spsa", learning_rate=1e-2, num_directions=1), {},
         "float sign-SPSA, m=1"),
        ("qzo_16w8a_m3", dict(_Q16, learning_rate=1e-2, num_directions=3), {}, "QZO-FF 16w8a"),
        ("qzo_16w8a_m1", dict(_Q16, learning_rate=1e-2, num_directions=1), {}, "QZO-FF 16w8a, m=1"),
        ("qzo_8w8a_m3", dict(kind="qzo_ff", precision="8w8a", learning_rate=1e-2,
                             num_directions=3), {}, "QZO-FF 8w8a"),
        ("qzo_8w8a_m3_lr0p1", dict(kind="qzo_ff", precision="8w8a", learning_rate=1e-1,
                                   num_directions=3), {}, "QZO-FF 8w8a, 10x η"),
        ("qzo_16w8a_momentum", dict(_Q16, learning_rate=1e-2, momentum=True), {},
         "+ momentum-guided sampling"),
        ("qzo_16w8a_sharpness", dict(_Q16, learning_rate=1e-2, sharpness_radius=0.05), {},
         "+ sharpness-aware (ρ=0.05)"),
        ("qzo_16w8a_kernelwise", dict(_Q16, learning_rate=1e-1, kernelwise=True), {},
         "+ kernel-wise normalization"),
        ("qzo_16w8a_sharpness_kernelwise", dict(_Q16, learning_rate=1e-1, sharpness_radius=0.05,
                                                kernelwise=True), {},
         "+ sharpness-aware + kernel-wise"),
        ("qzo_16w8a_binomial", dict(_Q16, learning_rate=1e-2, distribution="binomial"), {},
         "binomial (±1) z"),
        ("qzo_16w8a_sparse90", dict(_Q16, learning_rate=1e-2), dict(sparsity=0.9),
         "90%-sparse update (top-k magnitude)"),
        ("backprop_sparse90", dict(kind="backprop", optimizer="adam", learning_rate=1e-3),
         dict(sparsity=0.9), "BP, 90%-sparse"),
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
               "fsdd": ("fewshot_audio.py", "speech_embedding")}[task]
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
      groups.setdefault(_group_name(overrides), (overrides, {}))[1][name] = fields
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


def aggregate(task: str, workdir: str, num_tasks: int):
  """Per variant: seeds, per-seed means, pooled CI, loss start/end, seconds per task."""
  table = []
  for name, fields, overrides, what in VARIANTS[task]:
    per_seed, pooled, first, last, seconds, seeds, by_task = [], [], [], [], [], [], {}
    task_dir = os.path.join(workdir, task)
    if not os.path.isdir(task_dir):
      continue
    for seed_name in sorted(os.listdir(task_dir)):
      path = os.path.join(task_dir, seed_name, _group_name(overrides), "tasks", f"{name}.jsonl")
      if not os.path.exists(path):
        continue
      rows = {r["task"]: r for r in _rows(path)}
      if len(rows) < num_tasks:
        continue
      rows = [rows[i] for i in range(num_tasks)]
      accuracy = [r["accuracy"] for r in rows]
      seeds.append(int(seed_name[4:]))
      by_task.update({(seeds[-1], i): a for i, a in enumerate(accuracy)})
      per_seed.append(float(np.mean(accuracy)))
      pooled.extend(accuracy)
      seconds.extend(r["seconds"] for r in rows[1:])
      for r in rows:
        if r["losses"]:
          first.append(r["losses"][0])
          last.append(r["losses"][-1])
    if not per_seed:
      continue
    ci95 = 1.96 * float(np.std(pooled, ddof=1)) / math.sqrt(len(pooled)) if len(pooled) > 1 else 0
    table.append(dict(
        name=name, what=what, fields=fields, overrides=overrides, seeds=seeds,
        by_task=by_task, mean=float(np.mean(per_seed)), std=float(np.std(per_seed, ddof=1)) if len(per_seed) > 1
        else 0.0, ci95=ci95, tasks=len(pooled),
        loss_first=float(np.mean(first)) if first else None,
        loss_last=float(np.mean(last)) if last else None,
        seconds=float(np.median(seconds)) if seconds else None))
  return table


def _fields_text(fields: dict, overrides: dict) -> str:
  shown = {k: v for k, v in fields.items() if k != "kind"}
  text = ", ".join(f"{k}={v}" for k, v in shown.items())
  adapt = ", ".join(f"adapt.{k}={v}" for k, v in overrides.items())
  return "; ".join(t for t in (text, adapt) if t) or "-"


def markdown(task: str, workdir: str, num_tasks: int) -> str:
  table = aggregate(task, workdir, num_tasks)
  reference = {row["name"]: row for row in table}.get("zero_shot")
  lines = ["| variant | what | method fields | acc. % (mean ± std over seeds) | 95% CI over "
           "tasks | paired Δ vs zero-shot ± 95% CI | support loss first → last step (drop) | s/task | command |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in table:
    delta = "-"
    if reference is not None and row is not reference:
      # Paired over the same tasks (same seed, same episode): the noise of the tasks cancels.
      common = sorted(set(row["by_task"]) & set(reference["by_task"]))
      diffs = np.asarray([row["by_task"][k] - reference["by_task"][k] for k in common])
      half = 1.96 * diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
      delta = f"{100 * diffs.mean():+.2f} ± {100 * half:.2f}"
    loss = ("-" if row["loss_first"] is None
            else f"{row['loss_first']:.3f} → {row['loss_last']:.3f} "
            f"({100 * (1 - row['loss_last'] / row['loss_first']):.0f}%)")
    seconds = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
    seeds = " ".join(str(s) for s in row["seeds"])
    command = (f"`python scripts/findings.py --task {task} --seeds {seeds} --num_tasks "
               f"{num_tasks} --only {row['name']}`")
    lines.append(f"| {row['name']} | {row['what']} | {_fields_text(row['fields'], row['overrides'])}"
                 f" | {100 * row['mean']:.2f} ± {100 * row['std']:.2f} (n={len(row['seeds'])}) | "
                 f"± {100 * row['ci95']:.2f} ({row['tasks']} tasks) | {delta} | {loss} | "
                 f"{seconds} | {command} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", choices=sorted(VARIANTS), default="digits")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
  parser.add_argument("--num_tasks", type=int, default=20)
  parser.add_argument("--steps", type=int, default=0, help="adaptation steps (0: the config's)")
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
  parser.add_argument("--report", action="store_true", help="print the tables and exit")
  args = parser.parse_args()
  if args.report:
    for task in VARIANTS:
      print(f"### {task}\n\n{markdown(task, args.workdir, args.num_tasks)}\n")
    return
  run(args.task, args.seeds, args.only, args.num_tasks, args.workdir, args.steps)


if __name__ == "__main__":
  main()
