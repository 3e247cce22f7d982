#!/usr/bin/env bash
# The product as a user gets it: the wheel built from this checkout, installed (not editable) into a
# fresh venv without torchcodec, then the default job, prediction and a user's own config folder, all
# from an empty folder. Run by .ci/run after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { "$@" 2>&1 | { grep -v "is ignored" || true; }; }  # hides the local mirror's harmless warnings
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
quiet "$work/venv/bin/python" -m pip install -q --upgrade pip
quiet "$work/venv/bin/python" -m pip wheel -q --no-deps . -w "$work/dist"
quiet "$work/venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
quiet "$work/venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "$work"/dist/anomaly-*.whl
if "$work/venv/bin/python" -c "import torchcodec" 2>/dev/null; then
    echo "check_wheel: torchcodec is installed in the wheel's venv; this check is for the PIL path" >&2
    exit 1
fi

mkdir "$work/empty" && cd "$work/empty"
"$work/venv/bin/anomaly-train" logger=csv trainer.enable_progress_bar=false
run=$(ls -d outputs/runs/patchcore/fabric/*/)
test -f "$run/model.safetensors" && test -f "$run/run.json"
"$work/venv/bin/anomaly-predict" model="$run" input=outputs/data/synthetic/fabric/test/good
test -f outputs/predictions/*/predictions.csv

mkdir -p "$work/my_configs/method"  # a user's own config folder, beside the shipped ones
printf 'defaults:\n  - padim\n  - _self_\nmodel:\n  n_features: 50\n' > "$work/my_configs/method/padim_small.yaml"
"$work/venv/bin/anomaly-train" --config-dir "$work/my_configs" method=padim_small --cfg job \
    | grep -q "n_features: 50"
echo "check_wheel: the wheel installs, and its commands run from an empty folder"
