#!/usr/bin/env bash
# Create .venv with CPU torch and evomerge (+ dev extra). Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
source .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel is pinned here only; pyproject.toml declares a range so GPU users get CUDA builds.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e '.[dev]'
# Headless Chromium for the report's browser test; the test skips cleanly without it.
bash scripts/install_chromium.sh || echo "warning: chromium could not be installed; the browser test will skip" >&2
