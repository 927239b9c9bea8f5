#!/usr/bin/env bash
# The Android demo's Kotlin core tests as CI runs them (no Android SDK, no Gradle):
# install Debian's kotlin + a JDK if missing, regenerate golden vectors from the current
# Python pipeline into a temp folder (the default student the app ships, as the committed set,
# and the fused teacher), then compile and run the core tests against the committed golden set
# (what Android Studio users get) and the fresh ones (catches drift).
# Ends with the test runner's line "N passed, N failed"; non-zero exit on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
if ! command -v kotlinc >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: kotlinc/java missing; run: sudo apt-get install -y kotlin default-jdk-headless" >&2
        exit 1
    fi
    echo "installing kotlin + default-jdk-headless (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kotlin default-jdk-headless >/dev/null
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
OMP_NUM_THREADS=1 "$venv/bin/pocus-edge" golden --student mobilenetv3 --out "$tmp/golden"
OMP_NUM_THREADS=1 "$venv/bin/pocus-edge" golden --out "$tmp/golden-fused"
CORE_BUILD_DIR="$tmp/build" bash android_demo/core/run_tests.sh \
    --golden android_demo/core/src/test/resources/golden \
    --golden "$tmp/golden" \
    --golden "$tmp/golden-fused"
