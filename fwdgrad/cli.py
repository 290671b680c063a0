"""What the launchers (``train.py``, ``landscape.py``) share: one-line errors for bad input.

A bad command line, config field or data file ends a run with one ``config error: ...`` line that
names the problem and the fix; ``--verbose`` shows the traceback behind it. Libraries' INFO logs
(orbax's per-save lines, JAX's backend probing) are hidden unless ``--verbose``: warnings, the
progress bars and the results table are what a run prints.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags
from absl import logging

from fwdgrad import experiment

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the tracebacks behind one-line errors, and "
                             "INFO logs.")
_VERBOSE_ARGS = ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")


def _fail(kind: str, message: str, error: BaseException, verbose: bool):
  if verbose:
    raise error
  raise SystemExit(f"{kind}: {message}")


def _key_error_text(error: BaseException) -> str:
  """ml_collections' "'stepz'\\nDid you mean "steps"..." as one line."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  return " ".join(text.split())


def _config_error_in(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, experiment.ConfigError):
      return error
    error = error.__cause__ or error.__context__
  return None


def _one_line(error: BaseException, hint: str = "") -> str:
  """The message of ``error`` on one line (config_flags keeps a config file's error as text)."""
  cause = _config_error_in(error)
  text = str(cause if cause is not None else error)
  if "ConfigError: " in text:
    return " ".join(text.rsplit("ConfigError: ", 1)[1].split())
  if "Traceback (most recent call last)" in text:  # Any other failure of the file: its last line.
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return f"the config file failed: {' '.join(last.split())} (--verbose shows the traceback)"
  return " ".join(f"{text}{hint}".split())


def parse_flags(argv):
  """absl's flag parsing (``app.run(..., flags_parser=parse_flags)``), failing in one line."""
  verbose = any(arg in _VERBOSE_ARGS for arg in argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:  # A field the config does not have.
    overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
    _fail("config error", f"{' '.join(overrides) or 'an override'} names a field the config does "
          f"not have: {_key_error_text(error)}", error, verbose)
  except Exception as error:  # pylint: disable=broad-except
    # A wrong type (steps=abc), a missing or unknown flag, a config file that failed (an unknown
    # variant), ml_collections' type checks on overrides.
    _fail("config error", _one_line(error, " (fix the command line; --helpfull lists the flags)"
                                    if isinstance(error, flags.Error) else ""), error, verbose)


def run_main(work: Callable[[], object], workdir: str) -> None:
  """Runs ``work()``, turning the errors a user can fix into one line (and Ctrl-C into a hint)."""
  from fwdgrad import train_lib  # pylint: disable=g-import-not-at-top
  verbose = _VERBOSE.value
  if not verbose:
    logging.set_verbosity(logging.WARNING)
  try:
    work()
  except experiment.ConfigError as error:
    _fail("config error", " ".join(str(error).split()), error, verbose)
  except train_lib.WorkdirBusyError as error:
    _fail("workdir busy", str(error), error, verbose)
  except train_lib.DivergedError as error:
    _fail("diverged", str(error), error, verbose)
  except KeyboardInterrupt:
    sys.stderr.write(f"\ninterrupted: what was finished is saved in {workdir}; run the same "
                     "command again to resume.\n")
    raise SystemExit(130) from None
