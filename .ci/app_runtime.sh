#!/usr/bin/env bash
# The Android app's onnxruntime, in CI: a small venv with only numpy and onnxruntime at the
# version the app pins (android_demo/onnxruntime.version, also read by app/build.gradle.kts)
# loads every artifact the app may load (fused fp32, student fp32 and int8, exported here by the
# full install) and checks it against golden vectors of the current pipeline.
#
#   VENV=.venv APP_ORT_VENV=.venv-app-ort bash .ci/app_runtime.sh   (what `make app-runtime-test` runs)
#
# The small venv is reused while the pinned version is unchanged. Ends with "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${VENV:-.venv}"
APP_ORT_VENV="${APP_ORT_VENV:-.venv-app-ort}"
version="$(tr -d '[:space:]' < android_demo/onnxruntime.version)"
stamp="$APP_ORT_VENV/.onnxruntime-$version"
if [ ! -f "$stamp" ]; then
    echo "== app runtime venv: $APP_ORT_VENV with onnxruntime==$version"
    rm -rf "$APP_ORT_VENV"
    "${PYTHON:-python3}" -m venv "$APP_ORT_VENV"
    # numpy as the development venv has it; onnxruntime as the app pins it (not constraints.txt's).
    "$APP_ORT_VENV/bin/python" -m pip install -q "onnxruntime==$version" \
        -c <(grep -v '^onnxruntime==' constraints.txt)
    touch "$stamp"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
OMP_NUM_THREADS=1 "$VENV/bin/python" .ci/app_runtime_models.py "$work"
# The small venv imports pocus_edge's golden reader (numpy only) from this checkout.
PYTHONPATH="$ROOT" "$APP_ORT_VENV/bin/python" .ci/app_runtime_checks.py "$work" "$version"
