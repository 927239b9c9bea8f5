#!/usr/bin/env bash
# One prepared benchmark run for a machine with one NVIDIA GPU (e.g. an H100) whose Python already
# has torch, timm, onnx, onnxruntime, rich, typer, opencv and pyyaml (no network needed).
#
#   bash benchmarks/gpu_run.sh            # from the repository root
#
# Paper preset, random weights (speed only: the GFLOPs and the code paths are those of the
# trained model), batch 1 and 32: the eager two-model fp32 baseline (the paper's way), fused fp32,
# fused bf16 and fp16, torch.compile bf16 with CUDA graphs ("reduce-overhead"), and every other
# row that imports here: TensorRT fp16/int8 engines built by the export builder (strongly typed,
# TensorRT 10.x or 11.x, precision from the mixed fp16 / Q/DQ int8 ONNX), ONNX Runtime rows when
# the image has a CUDA execution provider (set PROVIDERS=tensorrt,cuda for onnxruntime-gpu's
# TensorRT EP); rows whose toolchain is absent say why. Every row reports its fraction of the
# matmul peak the run measures per precision, and the machine record carries the NVML driver,
# clocks and power limit where nvidia-ml-py is installed. Budget: under 3.5 minutes in total. Each format
# has a hard time limit and the JSON report is rewritten after every format, so a slow or broken
# format costs only its own row; the table is printed last, from the JSON, whatever happened.
#
# Output: $OUT/gpu_benchmark.json when OUT names an output folder, else benchmarks/gpu_benchmark.json.
#
# Part 3 (PARTS=study, or PARTS="benchmark study" for both; default both) is the study's 2x2
# factorial on the small preset: random vs MIM init x default vs paper recipe x 3 paired seeds
# (`pocus-edge study --budget gpu`: MIM 2,000 x 128 steps, fine-tuning 1,000 x 32, fixed counts),
# about 5 minutes on one H200 after a ~20 s simulation. It writes $DEST/study.{md,json,png}.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks}
mkdir -p "$DEST"
JSON="$DEST/gpu_benchmark.json"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works even if the editable install fails
# Dry run on a CPU: PRESET=tiny DEVICE=cpu SKIP_INSTALL=1 PYTHON=.venv/bin/python bash benchmarks/gpu_run.sh
PRESET=${PRESET:-paper}
DEVICE=${DEVICE:-cuda}
PARTS=${PARTS:-benchmark study}
# Dry run of the study part on a CPU: PARTS=study STUDY_PRESET=tiny STUDY_BUDGET=smoke STUDY_SIM=tiny DEVICE=cpu ...
STUDY_PRESET=${STUDY_PRESET:-small}
STUDY_BUDGET=${STUDY_BUDGET:-gpu}
STUDY_SIM=${STUDY_SIM:-study}

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
# The machine's Python has torch/timm/onnx/onnxruntime/typer/opencv/h5py/safetensors/scipy/rich/pyyaml:
# install only the project itself, without dependencies, so that its CUDA build of torch stays.
[ -n "${SKIP_INSTALL:-}" ] || $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
$PY -c "import pocus_edge, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1

if [[ " $PARTS " == *" benchmark "* ]]; then
# 1) The measured rows. Batch 32 is timed first: torch.compile compiles once per batch size, and
#    if its time limit (120 s) ends the row during the batch-1 compilation, the batch-32 figures
#    are kept. The whole command is bounded at 185 s so that the script ends inside its budget
#    even if a limit misfires (the JSON is rewritten after every format).
timeout -k 10 185 $PY -m pocus_edge benchmark \
    --preset "$PRESET" \
    --device "$DEVICE" \
    --formats "${FORMATS:-eager-2model,fused-fp32,fused-bf16,fused-fp16,compile-bf16,onnx-fp32,onnx-fp16,onnx-int8,tensorrt-fp16,tensorrt-int8,coreml-fp16}" \
    --batch 32,1 \
    --runs 50 \
    --warmup 3 \
    --time-per-batch 5 \
    --format-timeout 120 \
    --max-frames 32 \
    ${PROVIDERS:+--providers "$PROVIDERS"} \
    --report "$JSON" > "$DEST/gpu_benchmark.log" 2>&1
STATUS=$?
tail -n 25 "$DEST/gpu_benchmark.log" | grep -v "^[┃│┏┡└]" || true
echo "== benchmark exit status $STATUS after $(( $(date +%s) - START )) s"

# 2) The table, last, from whatever JSON was written (partial if the run was cut short).
$PY - "$JSON" <<'EOF'
import json, sys
from rich.console import Console
from pocus_edge.benchmark import render_report
from pocus_edge.benchmark.compare import compare_reports, render_comparison
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no report: {exc}")
console = Console(width=200)
# Compute floor and fraction of the datasheet peak for every ok row (devices.yaml).
render_comparison(compare_reports([report], labels=["gpu"]), console)
render_report(report, console)
EOF
fi

# 3) The study's 2x2 factorial: does MIM init help under either recipe? Runs and data stay outside
#    $DEST, which holds only the small report files (what to copy off a remote GPU machine).
if [[ " $PARTS " == *" study "* ]]; then
    SDATA=${STUDY_DATA:-/tmp/pocus_study_data}
    SRUNS=${STUDY_RUNS:-/tmp/pocus_study_gpu}
    [ -f "$SDATA/target/manifest.csv" ] || timeout -k 10 120 $PY -m pocus_edge simulate "$SDATA" --data-preset "$STUDY_SIM" \
        --workers "$(nproc)" --no-progress --overwrite > "$DEST/study_simulate.log" 2>&1
    timeout -k 10 480 $PY -m pocus_edge study --source "$SDATA/source" --target "$SDATA/target" --out "$SRUNS" \
        --arms lower,mim,lower@paper,mim@paper --seeds 3 --budget "$STUDY_BUDGET" --preset "$STUDY_PRESET" \
        --device "$DEVICE" --no-progress > "$DEST/study.log" 2>&1
    echo "== study exit status $? after $(( $(date +%s) - START )) s"
    cp "$SRUNS"/study.md "$SRUNS"/study.json "$SRUNS"/study.png "$DEST"/ 2>/dev/null
    grep -A 12 "^## Paired differences" "$SRUNS/study.md" 2>/dev/null || tail -n 20 "$DEST/study.log"
fi
echo "== total $(( $(date +%s) - START )) s; report: $JSON"
