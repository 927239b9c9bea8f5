#!/usr/bin/env bash
# Compile the pure-Kotlin core and its tests with kotlinc (no Gradle, no Android SDK) and run
# them. Arguments go to the test runner: [--golden DIR]... [--interpolation nearest|align-corners].
# Needs Debian's `kotlin` and a JDK (apt-get install -y kotlin default-jdk-headless).
set -euo pipefail
cd "$(dirname "$0")"
build="${CORE_BUILD_DIR:-build/kotlinc}"
mkdir -p "$build"
jar="$build/core-tests.jar"
# Recompile only when a source changed (the old compiler takes ~20 s).
if [ ! -f "$jar" ] || [ -n "$(find src/main/kotlin src/test/kotlin -name '*.kt' -newer "$jar" -print -quit)" ]; then
    kotlinc src/main/kotlin src/test/kotlin -include-runtime -d "$jar" 2>&1 \
        | grep -v -e 'Options -Xverify:none and -noverify were deprecated' || true
    test -f "$jar"
fi
exec java -cp "$jar" org.pocusedge.core.TestMainKt "$@"
