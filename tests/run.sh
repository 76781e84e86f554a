#!/usr/bin/env bash
# The test command (README, .ci/run): install the package with its test extras, then run
# the whole suite. Any failed *or skipped* test fails the run (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e '.[dev]'
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
exec python -m pytest "$@"
