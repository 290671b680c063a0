"""The OOD sweep: corruption families × severities × seeds on one pre-trained backbone per seed.

  python scripts/ood_sweep.py --backbone 'workdirs/fashion_backbone_s{seed}/backbone' \
      --seeds 0 1 2 --corruptions gaussian_noise gaussian_blur brightness contrast \
      --severities 1 3 5 --workdir workdirs/ood_sweep
  python scripts/ood_sweep.py --workdir workdirs/ood_sweep --report

Each case is one ``train.py`` run of ``configs/ood_fashion.py:sweep`` (its tuned methods) with
``--config.pretrain.init_checkpoint`` the seed's backbone (``{seed}`` in ``--backbone`` is
replaced; a backbone is the ``backbone`` directory of a ``train.py`` run of the same config and
seed), in ``<workdir>/<corruption>_<severity>/seed<k>``; a case already recorded is skipped, so an
interrupted sweep resumes. ``--report`` prints one table: per case and method the mean over seeds
of the per-seed mean accuracy with its Student-t 95% interval, and the headroom rule's verdict.
Compilations are cached on disk (``<workdir>/jax_cache``): every case compiles the same programs.
"""

import argparse
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHODS = ("zero_shot", "zero_shot_16w8a", "backprop", "ff", "qzo_ff_16w8a", "qzo_ff_8w8a")
FORWARD_GRADIENT = ("ff", "qzo_ff_16w8a", "qzo_ff_8w8a")


def _module(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from fwdgrad import train_lib  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  config_module = _module(os.path.join(REPO, "configs", "ood_fashion.py"), "ood_fashion")
  for corruption in args.corruptions:
    for severity in args.severities:
      for seed in args.seeds:
        workdir = os.path.join(args.workdir, f"{corruption}_{severity}", f"seed{seed}")
        if os.path.exists(os.path.join(workdir, "results.json")):
          continue
        config = config_module.get_config(args.variant)
        config.seed = seed
        config.progress = False
        config.data.corruption, config.data.severity = corruption, severity
        config.task.num_tasks = args.num_tasks
        config.pretrain.init_checkpoint = args.backbone.format(seed=seed)
        print(f"{corruption} {severity} seed {seed}", flush=True)
        train_lib.train_and_evaluate(config, workdir)


def report(workdir: str) -> str:
  """The sweep's table from the per-task records under ``workdir``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fwdgrad import reporting  # pylint: disable=g-import-not-at-top
  from fwdgrad.data import mean_confidence_interval  # pylint: disable=g-import-not-at-top
  seeds_lib = _module(os.path.join(REPO, "scripts", "seeds.py"), "seeds")
  cases = sorted(name for name in os.listdir(workdir)
                 if os.path.isdir(os.path.join(workdir, name)) and name != "jax_cache")
  header = ["corruption", "severity", "seeds"] + list(METHODS) + [
      "BP − zero-shot (headroom)", "FF − BP", "QZO-FF 16w8a − BP", "8w8a − 16w8a"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  evidence, counts = [], {"rows": 0, "beat": 0, "close": 0}
  for case in cases:
    corruption, severity = case.rsplit("_", 1)
    workdirs = sorted(os.path.join(workdir, case, d) for d in os.listdir(os.path.join(workdir, case)))
    table = seeds_lib.per_seed(workdirs)
    if not table:
      continue
    cells = [corruption, severity, str(len(workdirs))]
    for name in METHODS:
      values = table.get(name)
      if values is None:
        cells.append("-")
        continue
      mean, half = mean_confidence_interval(values)
      cells.append(f"{100 * mean:.1f} ± {100 * half:.1f}")

    def paired(a, b):
      if a not in table or b not in table:
        return "-"
      mean, half = mean_confidence_interval(np.subtract(table[a], table[b]))
      return f"{100 * mean:+.1f} ± {100 * half:.1f}"

    if "backprop" in table and "zero_shot" in table and len(workdirs) > 1:
      room = reporting.headroom(table["backprop"], table["zero_shot"])
      cells.append(f"{100 * room['gap']:+.1f} ± {100 * room['ci95']:.1f} "
                   f"({'meets' if room['meets'] else 'FAILS'})")
    else:
      cells.append("-")
    cells += [paired("ff", "backprop"), paired("qzo_ff_16w8a", "backprop"),
              paired("qzo_ff_8w8a", "qzo_ff_16w8a")]
    lines.append("| " + " | ".join(cells) + " |")
    if ("backprop" in table and "zero_shot" in table and len(workdirs) > 1
        and reporting.headroom(table["backprop"], table["zero_shot"])["meets"]):
      evidence.append(case)
      for name in FORWARD_GRADIENT:
        if name in table:
          low = np.subtract(table[name], table["zero_shot"])
          mean, half = mean_confidence_interval(low)
          counts["rows"] += 1
          counts["beat"] += int(mean - half > 0)
          counts["close"] += int(np.mean(np.subtract(table[name], table["backprop"])) >= -0.05)
  lines.append(f"\nCases that meet the headroom rule: {len(evidence)} of {len(lines) - 2} "
               f"({', '.join(evidence) or 'none'}). Over their forward-gradient rows "
               f"({', '.join(FORWARD_GRADIENT)}): beat zero-shot (paired interval above 0) in "
               f"{counts['beat']} of {counts['rows']}; within 5 points of BP (mean paired "
               f"difference ≥ −5) in {counts['close']} of {counts['rows']}.")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdirs/ood_sweep")
  parser.add_argument("--backbone", default="workdirs/fashion_backbone_s{seed}/backbone",
                      help="the seed's pre-trained backbone; '{seed}' is replaced")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--corruptions", nargs="+",
                      default=["gaussian_noise", "gaussian_blur", "brightness", "contrast"])
  parser.add_argument("--severities", type=int, nargs="+", default=[1, 3, 5])
  parser.add_argument("--num_tasks", type=int, default=1, help="tasks per seed and case")
  parser.add_argument("--variant", default="sweep", help="the variant of configs/ood_fashion.py")
  parser.add_argument("--report", action="store_true", help="print the table and stop")
  args = parser.parse_args(argv)
  if not args.report:
    run(args)
  print(report(args.workdir))


if __name__ == "__main__":
  main()
