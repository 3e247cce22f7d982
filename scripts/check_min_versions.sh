#!/usr/bin/env bash
# The test suite against the lowest supported versions (scripts/min_versions.txt), without torchcodec, in
# a fresh venv of the given Python (default python3.12). Downloads a CUDA torch 2.11 (several GB): not
# part of CI, run it when a lower bound in pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3.12}
venv=$(mktemp -d)/venv
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r scripts/min_versions.txt
"$venv/bin/python" -m pip install -q --no-deps -e .
"$venv/bin/python" -m pytest -q -p no:cacheprovider
