#!/usr/bin/env bash
# One command on a fresh machine: set everything up, then run the main job on the embedded default model.
# Extra arguments go to `safegene demo` (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
exec .venv/bin/safegene demo "$@"
