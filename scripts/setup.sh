#!/usr/bin/env bash
# Creates .venv (if missing) and installs anomaly (editable) with its test tools and torchcodec. Works
# offline against a local package mirror. torch/torchvision are installed first and pinned so that
# nothing pulls another torch; torchcodec 0.17.0 is the build for torch 2.14.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }  # hides the local mirror's harmless warnings
[ -x .venv/bin/python ] || python3 -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
quiet .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "torchcodec==0.17.0" -e ".[dev,fast-decode]"
.venv/bin/python -c "import anomaly, torch; print(f'anomaly {anomaly.__version__} ready (torch {torch.__version__})')"
