#!/usr/bin/env bash
# The test command (README, .ci/run): install the package with its test extras, then run
# the whole suite. Any failed *or skipped* test fails the run (see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e '.[dev]'
# pycocoevalcap's METEOR and PTB tokenizer run Java: install a JRE once if there is none
if ! command -v java >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends default-jre-headless
  else
    echo "tests/run.sh: java is missing; install a JRE (apt-get install default-jre-headless) for the caption metrics" >&2
    exit 1
  fi
fi
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
exec python -m pytest "$@"
