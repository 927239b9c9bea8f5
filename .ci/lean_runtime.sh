#!/usr/bin/env bash
# The lean install, proved: a second venv with ONLY the core dependencies (no torch) streams a
# TeleMED .tvd.h5 recording and a raw-protocol (PEF1) stream, over stdin and TCP, through an ONNX
# model that the full install trained and exported, gets the same masks as the full install, and
# runs `pocus-edge benchmark`'s onnxruntime rows on that model.
#
#   VENV=.venv LEAN_VENV=.venv-lean bash .ci/lean_runtime.sh      (what `make lean-test` runs)
#
# The lean venv uses Python 3.10 (JetPack 6's) when the machine has one, else python3
# (LEAN_PYTHON overrides), and installs with constraints-lean.txt. It is reused between runs;
# the project itself is reinstalled every time (a plain, non-editable install).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
VENV="$(absolute "${VENV:-.venv}")"
LEAN_VENV="$(absolute "${LEAN_VENV:-.venv-lean}")"
# A PYTHONPATH (a development checkout) applies to the full install only: the lean venv must run
# its own installed copy.
export FULL_PYTHONPATH="${PYTHONPATH:-}"
unset PYTHONPATH

pick_python() {
    local candidate
    for candidate in "${LEAN_PYTHON:-}" python3.10 "$HOME"/.pyenv/versions/3.10*/bin/python3.10 /usr/bin/python3.10 python3; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c 'import sys, venv; assert sys.version_info >= (3, 10)' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: no Python >= 3.10 found for the lean venv (set LEAN_PYTHON)" >&2
    return 1
}

[ -x "$VENV/bin/pocus-edge" ] || { echo "error: $VENV has no pocus-edge; run 'make setup' first" >&2; exit 1; }
STAMP="$LEAN_VENV/.deps-stamp"
if [ ! -x "$LEAN_VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ constraints-lean.txt -nt "$STAMP" ]; then
    PY="$(pick_python)"
    echo "== lean venv: $LEAN_VENV with $("$PY" --version 2>&1)"
    rm -rf "$LEAN_VENV"
    "$PY" -m venv "$LEAN_VENV"
    "$LEAN_VENV/bin/python" -m pip install -q --upgrade pip
    touch "$STAMP"
fi
# The core install as a user gets it: `pip install pocus-edge` (no extras) from this checkout
# (pip rebuilds a local project on every install, so code changes are always picked up).
"$LEAN_VENV/bin/python" -m pip install -q -c constraints-lean.txt .
echo "== lean venv packages: $("$LEAN_VENV/bin/python" -m pip freeze | grep -v '^#' | tr '\n' ' ')"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# A model from the full install: simulate, fine-tune two tiny branches briefly, export one graph.
export OMP_NUM_THREADS=1
full() { PYTHONPATH="$FULL_PYTHONPATH" "$VENV/bin/pocus-edge" "$@"; }
full simulate "$WORK/data" --data-preset tiny --seed 0 --no-progress >/dev/null
for branch in 0 1; do
    full finetune --data "$WORK/data/source" --out "$WORK/runs/branch$branch" --preset tiny --seed "$branch" \
        --max-steps 60 --device cpu >/dev/null
done
full export -g "$WORK/runs/branch0/model.safetensors" -c "$WORK/runs/branch1/model.safetensors" \
    --target onnx --out "$WORK/fused.onnx" --branches --parity-site "$WORK/data/target" >/dev/null
echo "== exported $WORK/fused.onnx with the full install"

# Everything else runs in the lean venv (from outside the checkout, so the installed copy is used).
cd "$WORK"
"$LEAN_VENV/bin/python" "$ROOT/.ci/lean_checks.py" "$WORK" "$VENV/bin/pocus-edge"
