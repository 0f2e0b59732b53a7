#!/usr/bin/env bash
# Static checks `.ci/run` runs before the tests: lint, format, the import layers, types.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
ruff check .
ruff format --check .
lint-imports
mypy
