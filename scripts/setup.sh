#!/usr/bin/env bash
# Create (or refresh) .venv: CPU torch 2.13.0, then gsr-plugin in editable mode
# with its test extras. Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: with nothing installed, a range would pull a CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
