#!/usr/bin/env bash
# The test command (README and .ci/run): the whole suite on CPU; GPU-only tests skip themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q --timeout=900 "$@"
