#!/usr/bin/env bash
# GPU check: the torch engine and trainer steps on a CUDA GPU, and the vLLM engine where
# vLLM is installed; prints tokens/s and step times. Where there is no GPU it says what it
# skipped and exits 0.
#
#   scripts/gpu_check.sh                 # with the project's .venv, else python3
#   PYTHON=/path/to/python scripts/gpu_check.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Runs from the source tree, so a machine with torch but without the project installed works.
export PYTHONPATH="src:services/rollout:services/trainer${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
