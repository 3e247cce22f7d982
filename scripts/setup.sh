#!/usr/bin/env bash
# Creates .venv (if missing) and installs anomaly with its test tools. Works offline against a local
# package mirror. torch/torchvision are installed first and pinned so nothing pulls another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }  # hides the local mirror's harmless warnings
[ -x .venv/bin/python ] || python3 -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
quiet .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
.venv/bin/python -c "import anomaly, torch; print(f'anomaly {anomaly.__version__} ready (torch {torch.__version__})')"
