"""Shared pytest fixtures.

Pre-trained speech embedding (tests/test_speech_embedding.py, tests/test_audio.py): the tests read
openWakeWord's ``embedding_model.tflite`` and ``melspectrogram.tflite`` from the directory named by
$FWDGRAD_OPENWAKEWORD_DIR, filled with::

  pip download --no-deps pyopen-wakeword==1.1.0 -d "$FWDGRAD_OPENWAKEWORD_DIR"

and run the original models with the TFLite interpreter of ``ai-edge-litert`` as the reference. FSDD
clips come from $FWDGRAD_DATA_DIR/fsdd/recordings (default ``../shared/data`` beside the
repository). Where any of these is missing the tests are skipped, saying how to provide it, except
under CI=true, where they fail.
"""

import os

# Most of the suite's time is XLA compiling small programs once; LLVM's optimisation passes cost
# more than they save at test sizes. HLO passes (fusion, buffer assignment, so every memory
# measurement) are unchanged; values agree to float rounding. Set before anything imports jax;
# subprocesses (train.py, notebooks) inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENWAKEWORD_ENV = "FWDGRAD_OPENWAKEWORD_DIR"


def skip_or_fail(message: str) -> None:
  """Skips the test, or fails it when the environment variable CI is "true"."""
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(f"{message} (CI=true, so this is a failure, not a skip)")
  pytest.skip(message)


@pytest.fixture(scope="session")
def openwakeword_dir():
  """The directory holding the pyopen-wakeword 1.1.0 wheel (or its .tflite files)."""
  path = os.environ.get(OPENWAKEWORD_ENV)
  if not path or not os.path.isdir(path):
    skip_or_fail(
        f"${OPENWAKEWORD_ENV} is {'unset' if not path else repr(path) + ', not a directory'}; run "
        f"`pip download --no-deps pyopen-wakeword==1.1.0 -d DIR` and set {OPENWAKEWORD_ENV}=DIR.")
  return path


@pytest.fixture(scope="session")
def fsdd_dir():
  """The Free Spoken Digit Dataset recordings (8 kHz WAVs)."""
  default = os.path.join(os.path.dirname(REPO), "shared", "data")
  shared = os.environ.get("FWDGRAD_DATA_DIR", default)
  path = os.path.join(shared, "fsdd", "recordings")
  if not os.path.isdir(path):
    skip_or_fail(
        f"{path} is absent; set FWDGRAD_DATA_DIR to the folder holding fsdd/recordings.")
  return path


@pytest.fixture(scope="session")
def run_tflite(openwakeword_dir):
  """``run(filename, inputs) -> outputs``: the original model run by a real TFLite interpreter."""
  try:
    from ai_edge_litert import interpreter as litert
  except ImportError:
    skip_or_fail(
        "the reference TFLite interpreter is missing; `pip install ai-edge-litert==2.3.0`.")
  from fwdgrad.models import tflite_import

  interpreters = {}

  def run(filename: str, inputs: np.ndarray) -> np.ndarray:
    if filename not in interpreters:
      content = tflite_import.find_tflite(openwakeword_dir, filename)
      interpreters[filename] = litert.Interpreter(model_content=content)
    interpreter = interpreters[filename]
    inputs = np.ascontiguousarray(inputs, np.float32)
    interpreter.resize_tensor_input(0, list(inputs.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], inputs)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()

  return run
