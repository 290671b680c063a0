#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it.
#
#   bash scripts/test.sh [pytest args...]
#
# Creates .venv (if missing) with the package and its dev extras, the CPU build of PyTorch (the
# reference for the checkpoint-import tests), the real test assets that package registries ship
# (Fashion-MNIST from Debian, openWakeWord's pre-trained speech embedding from PyPI), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned, so nothing later resolves a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"

# Real data from the registries (tests that need them skip locally without them; in CI they must exist).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    >/dev/null || echo "warning: could not install dataset-fashion-mnist" >&2
fi
export FWDGRAD_OPENWAKEWORD_DIR=${FWDGRAD_OPENWAKEWORD_DIR:-$PWD/.cache/openwakeword}
if ! ls "$FWDGRAD_OPENWAKEWORD_DIR"/pyopen_wakeword-1.1.0-*.whl >/dev/null 2>&1; then
  python -m pip download -q --no-deps "pyopen-wakeword==1.1.0" -d "$FWDGRAD_OPENWAKEWORD_DIR"
fi

export FWDGRAD_DATA_DIR=${FWDGRAD_DATA_DIR:-$PWD/../shared/data}
# One worker per core (FWDGRAD_TEST_WORKERS=0 runs in this process); most tests are single-threaded
# XLA compiles. loadgroup keeps tests that share an expensive module fixture on one worker.
python -m pytest -q -n "${FWDGRAD_TEST_WORKERS:-2}" --dist loadgroup "$@"
