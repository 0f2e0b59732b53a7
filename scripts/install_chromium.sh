#!/usr/bin/env bash
# Install Debian's headless-capable Chromium (system-wide, with apt) for the report browser test.
# Only run when asked: `EVOMERGE_BROWSER_TESTS=1 bash scripts/setup.sh` (CI does), or by hand.
# Idempotent and quiet; needs root. A no-op when /usr/bin/chromium is already there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_chromium.sh: /usr/bin/chromium is missing and installing it needs root; run 'sudo apt-get install -y chromium' (the report browser test skips without it)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# apt is chatty even with -qq (debconf notes); show its output only when it fails.
if ! log=$(apt-get update -qq 2>&1 && apt-get install -y -qq --no-install-recommends chromium 2>&1); then
  echo "$log" >&2
  exit 1
fi
