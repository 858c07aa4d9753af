#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with leukoscope and everything its tests need.
# Usage: bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# PyTorch first, pinned to the releases this project is tested with.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[all,dev]"
# Debian's Chromium drives the web page's browser tests (Playwright uses it; no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ||
      echo "setup.sh: could not install chromium; the browser tests will fail" >&2
  else
    echo "setup.sh: install Debian's 'chromium' package for the browser tests (sudo apt-get install chromium)" >&2
  fi
fi
echo "leukoscope is set up: .venv/bin/leukoscope --help"
