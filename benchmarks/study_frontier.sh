#!/usr/bin/env bash
# Target Dice against FPS for the models a study scored, measured on this machine: the fused
# teacher (the `mim` and `contrastive_uniform` branches of one seed + the fusion head) and the
# student distilled from it (`student_uniform`, same seed), each in the formats a user deploys,
# and each single network (`lower`, `mim`, `contrastive_uniform`) exported alone to ONNX fp32.
# Dice per model is the study's (mean over seeds x patients, 95 % CI); FPS is `pocus-edge
# benchmark` at the study's input size, batch 1.
#
#   bash benchmarks/study_frontier.sh STUDY TARGET_SITE [OUT]      # e.g. on an otherwise idle machine
#
# STUDY: a study folder with fused_uniform and student_uniform evaluated (SEED: which seed's
# models are timed, default 0). Output in OUT (default benchmarks/notes): benchmark_study.json/.log,
# benchmark_study_<arm>.json (one per single network) and frontier_study.png.
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
    --report "$DEST/benchmark_study.json" 2>&1 | tee "$DEST/benchmark_study.log" || [ "${PIPESTATUS[0]}" -eq 1 ]
# (exit status 1: a row failed its bar or its run; the report says which, and the script goes on)
SINGLE=()
for arm in lower mim contrastive_uniform; do
    "$PY" -m pocus_edge export --checkpoint "$(model_of $arm)" --target onnx --out "$WORK/$arm.onnx" >/dev/null
    "$PY" -m pocus_edge benchmark --model "$WORK/$arm.onnx" --model-name "$arm" --data "$TARGET" \
        --max-frames "${MAX_FRAMES:-64}" --batch 1 --threads "$THREADS" --runs "${RUNS:-200}" --warmup 10 \
        --time-per-batch "${TIME_PER_BATCH:-20}" --report "$DEST/benchmark_study_$arm.json" 2>&1 | tee -a "$DEST/benchmark_study.log" \
        || [ "${PIPESTATUS[0]}" -eq 1 ]
    SINGLE+=("$DEST/benchmark_study_$arm.json")
done
# One machine, one frontier: the single networks' rows join the teacher's and student's report.
"$PY" - "$DEST/benchmark_study.json" "${SINGLE[@]}" <<'PYTHON'
import json, sys
main = json.load(open(sys.argv[1]))
for extra in sys.argv[2:]:
    main["rows"] += [r for r in json.load(open(extra))["rows"] if r["status"] == "ok"]
json.dump(main, open(sys.argv[1].replace(".json", "_all.json"), "w"), indent=1)
PYTHON
"$PY" -m pocus_edge benchmark frontier "$DEST/benchmark_study_all.json" --dice "$STUDY/study.json" \
    --as fused_uniform@default=fused --as "student_uniform@default=${STUDENT_NAME:-mobilenetv3}" \
    --as lower@default=lower --as mim@default=mim --as contrastive_uniform@default=contrastive_uniform \
    --out "$DEST/frontier_study.png" --batch 1 --fps-goal "${FPS_GOAL:-30}"
echo "== $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
