#!/usr/bin/env bash
# Creates .venv (if missing) and installs anomaly (editable) with its test tools and torchcodec. Works
# offline against a local package mirror. torch/torchvision are installed first and pinned so that
# nothing pulls another torch; torchcodec 0.17.0 is the build for torch 2.14. Prints one line on success
# (pip's notices, e.g. setuptools' editable-install banner, are no news), pip's whole output on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
quietly() {  # runs the command with its output held back in $log, which is shown if it fails
  "$@" >"$log" 2>&1 || { local status=$?; cat "$log" >&2; echo "scripts/setup.sh failed: $*" >&2; exit "$status"; }
}
[ -x .venv/bin/python ] || quietly python3 -m venv .venv
quietly .venv/bin/python -m pip install --upgrade pip
quietly .venv/bin/python -m pip install "torch==2.14.1" "torchvision==0.29.1"
quietly .venv/bin/python -m pip install "torch==2.14.1" "torchvision==0.29.1" "torchcodec==0.17.0" -e ".[dev,fast-decode]"
.venv/bin/python -c "import anomaly, torch; print(f'anomaly {anomaly.__version__} ready (torch {torch.__version__})')"
