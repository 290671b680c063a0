"""Pre-trains a backbone and adapts it with forward gradients in fixed point.

  python train.py --config configs/quickstart.py --workdir workdirs/quickstart

Override any field from the command line, e.g. ``--config.task.num_tasks=5``. All logic lives in
``fwdgrad.train_lib.train_and_evaluate``; started again with the same ``--workdir``, a run resumes
(after a crash, a kill or Ctrl-C alike). A bad config, command line or data file stops the run with
one ``config error:`` line; ``--verbose`` shows the traceback behind it.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from fwdgrad import cli
from fwdgrad import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_main(lambda: train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value),
               _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
