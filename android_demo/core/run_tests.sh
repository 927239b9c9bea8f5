#!/usr/bin/env bash
# Compile the pure-Kotlin core and its tests with kotlinc (no Gradle, no Android SDK) and run
# them. Arguments go to the test runner: [--golden DIR]... [--interpolation nearest|align-corners].
# Needs Debian's `kotlin` and a JDK (apt-get install -y kotlin default-jdk-headless).
set -euo pipefail
# --golden folders are given relative to the caller's directory: make them absolute first.
args=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--golden" ] && [ $# -ge 2 ]; then
        args+=("--golden" "$(cd "$2" 2>/dev/null && pwd || echo "$2")")
        shift 2
    else
        args+=("$1")
        shift
    fi
done
build="${CORE_BUILD_DIR:-build/kotlinc}"
case "$build" in /*) ;; *) build="$(cd "$(dirname "$0")" && pwd)/$build" ;; esac
cd "$(dirname "$0")"
mkdir -p "$build"
jar="$build/core-tests.jar"
# Recompile only when a source changed (the old compiler takes ~20 s).
if [ ! -f "$jar" ] || [ -n "$(find src/main/kotlin src/test/kotlin -name '*.kt' -newer "$jar" -print -quit)" ]; then
    rm -f "$jar"  # never run a stale jar if this compile fails
    kotlinc src/main/kotlin src/test/kotlin -include-runtime -d "$jar" 2>&1 \
        | grep -v -e 'Options -Xverify:none and -noverify were deprecated' || true
    test -f "$jar"
fi
exec java -cp "$jar" org.pocusedge.core.TestMainKt ${args[@]+"${args[@]}"}
