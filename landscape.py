"""Draws the loss landscapes of BP, FF, FF 16w8a and FF 8w8a adapting one task, in LP and FT.

  python landscape.py --config configs/landscape.py --workdir workdirs/landscape

Override any field from the command line, e.g. ``--config.landscape.modes=ft,``. All logic lives
in ``fwdgrad.landscape_study.run_study``; the figures, raw grids and summary go to
``<workdir>/landscape/``.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from fwdgrad import cli
from fwdgrad import landscape_study

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the backbone, grids and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run_main(lambda: landscape_study.run_study(_CONFIG.value, _WORKDIR.value), _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
