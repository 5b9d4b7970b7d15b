#!/usr/bin/env bash
# One command on a fresh machine: set everything up, then run the test suite (fast tiny-model tests plus a few
# tests on the real embedded models; the model conversion is cached in ~/.cache/safegene between runs).
# Extra arguments go to pytest (e.g. -m "not real_model" for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
