"""Pre-trains a backbone and adapts it with forward gradients in fixed point.

  python train.py --config configs/quickstart.py --workdir workdirs/quickstart

Override any field from the command line, e.g. ``--config.task.num_tasks=5``. All logic lives in
``fwdgrad.train_lib.train_and_evaluate``; started again with the same ``--workdir``, a run resumes.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from fwdgrad import experiment
from fwdgrad import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except experiment.ConfigError as error:
    raise SystemExit(f"config error: {error}") from None


if __name__ == "__main__":
  app.run(main)
