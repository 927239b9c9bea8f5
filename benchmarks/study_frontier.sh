#!/usr/bin/env bash
# Target Dice against FPS for the models a study scored, measured on this machine: the fused
# teacher (the `mim` and `contrastive_uniform` branches of one seed + the fusion head) and the
# student distilled from it (`student_uniform`, same seed), each in the formats a user deploys.
# Dice per model is the study's (mean over seeds x patients, 95 % CI); FPS is `pocus-edge
# benchmark` at the study's input size, batch 1.
#
#   bash benchmarks/study_frontier.sh STUDY TARGET_SITE [OUT]      # e.g. on an otherwise idle machine
#
# STUDY: a study folder with fused_uniform and student_uniform evaluated (SEED: which seed's
# models are timed, default 0). Output in OUT (default benchmarks/notes): benchmark_study.json/.log
# and frontier_study.png.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=$1
TARGET=$2
DEST=${3:-benchmarks/notes}
SEED=${SEED:-0}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
THREADS=${THREADS:-2}
FORMATS=${FORMATS:-fused-fp32,torch-fp32,onnx-fp32,onnx-int8,openvino-fp32,openvino-int8}
mkdir -p "$DEST"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pocus-study-frontier.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1

model_of() {  # the model file a finished study unit recorded
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' "$STUDY/runs/$1@default/seed$SEED/done.json"
}
MIM=$(model_of mim)
CON=$(model_of contrastive_uniform)
STUDENT=$(model_of student_uniform)

echo "== $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null); seed $SEED"
"$PY" -m pocus_edge benchmark -g "$MIM" -c "$CON" --student-checkpoint "$STUDENT" --formats "$FORMATS" \
    --data "$TARGET" --max-frames "${MAX_FRAMES:-64}" --batch 1 --threads "$THREADS" --runs "${RUNS:-200}" \
    --warmup 10 --time-per-batch "${TIME_PER_BATCH:-20}" --format-timeout 900 --workdir "$WORK/bench" \
    --json "$DEST/benchmark_study.json" 2>&1 | tee "$DEST/benchmark_study.log"
"$PY" -m pocus_edge benchmark frontier "$DEST/benchmark_study.json" --dice "$STUDY/study.json" \
    --as fused_uniform@default=fused --as "student_uniform@default=${STUDENT_NAME:-mobilenetv3}" \
    --out "$DEST/frontier_study.png" --batch 1 --fps-goal "${FPS_GOAL:-30}"
echo "== $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
