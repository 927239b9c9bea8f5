#!/usr/bin/env bash
# Every format of `pocus-edge benchmark` on this CPU in ONE run (the figures of RESULTS.md
# section 6): paper preset, random weights with rescaled heads (speed and agreement; the GFLOPs
# and code paths are the trained model's), batch 1, 2 threads. PyTorch eager two-model (the
# baseline), fused fp32/bf16, torch.compile fp32/bf16, ONNX fp32/fp16/int8 in onnxruntime,
# OpenVINO fp32/bf16/int8; TensorRT and Core ML rows say why they are skipped on a CPU machine.
# Every row reports its fraction of the matmul peak this run measures per precision.
#
#   bash benchmarks/cpu_run.sh                      # run on an otherwise idle machine
#   PRESET=tiny OUT=/tmp/smoke bash benchmarks/cpu_run.sh   # smoke test (about 4 minutes)
#
# Output: $OUT/benchmark_cpu_$PRESET.json (+ .log and the figure .png); OUT defaults to
# benchmarks/notes. Each format has a hard time limit and the JSON is rewritten after each one.
set -uo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-paper}
DEST=${OUT:-benchmarks/notes}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
THREADS=${THREADS:-2}
mkdir -p "$DEST"
JSON="$DEST/benchmark_cpu_$PRESET.json"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pocus-bench-$PRESET.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1

echo "== $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
$PY -m pocus_edge benchmark \
    --preset "$PRESET" \
    --batch 1 \
    --threads "$THREADS" \
    --runs "${RUNS:-10}" \
    --warmup 1 \
    --time-per-batch 40 \
    --format-timeout 900 \
    --max-frames 2 \
    --workdir "$WORK" \
    --report "$JSON" 2>&1 | tee "$DEST/benchmark_cpu_$PRESET.log"
STATUS=${PIPESTATUS[0]}
echo "== $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null); benchmark exit status $STATUS"
[ -f "$JSON" ] && $PY -m pocus_edge benchmark plot "$JSON" --out "$DEST/benchmark_cpu_$PRESET.png" --batch 1
exit "$STATUS"
