#!/usr/bin/env bash
# The compact students on this CPU at the paper input (224 px), batch 1, 2 threads:
#  1. their rows of `pocus-edge benchmark` (every format of the export table, random weights with
#     rescaled heads: speed and agreement; GFLOPs and code paths are a trained student's);
#  2. `pocus-edge stream` FPS of the exported student over a simulated TeleMED recording (.tvd.h5):
#     decode + ROI crop + preprocess + infer + threshold, end to end, for ONNX fp32/int8 in
#     onnxruntime and OpenVINO fp32/int8.
# The teacher's rows come from benchmarks/cpu_run.sh (same settings).
#
#   bash benchmarks/student_cpu_run.sh                                    # on an otherwise idle machine
#   STUDENTS=mobilenetv3 PRESET=tiny RUNS=5 FRAMES=40 OUT=/tmp/smoke bash benchmarks/student_cpu_run.sh   # smoke test
#
# Output in $OUT (default benchmarks/notes): benchmark_students_$PRESET.json/.log/.png and
# stream_student_<name>_<format>.json (one per streamed artifact) + stream_students_$PRESET.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-paper}
STUDENTS=${STUDENTS:-all}
STREAM_STUDENT=${STREAM_STUDENT:-mobilenetv3}
DEST=${OUT:-benchmarks/notes}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
THREADS=${THREADS:-2}
mkdir -p "$DEST"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pocus-students-$PRESET.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1
JSON="$DEST/benchmark_students_$PRESET.json"

echo "== $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
$PY -m pocus_edge benchmark --no-teacher --student "$STUDENTS" --student-preset "$PRESET" \
    --batch 1 --threads "$THREADS" --runs "${RUNS:-200}" --warmup 10 --time-per-batch 30 \
    --format-timeout 900 --max-frames 8 --workdir "$WORK/bench" --report "$JSON" 2>&1 | tee "$DEST/benchmark_students_$PRESET.log"
STATUS=${PIPESTATUS[0]}
[ -f "$JSON" ] && $PY -m pocus_edge benchmark plot "$JSON" --out "$DEST/benchmark_students_$PRESET.png" --batch 1

# A simulated TeleMED recording (the demo preset's target test frames, video by video, repeated
# to $FRAMES frames at 30 FPS, inside a larger screen with the B-mode ROI recorded as the probe's
# software does) and one student checkpoint (random weights, head rescaled on target frames),
# exported to each streamed format with its parity check.
$PY -m pocus_edge simulate "$WORK/sim" --data-preset demo --no-progress >/dev/null
$PY - "$WORK" "$STREAM_STUDENT" "$PRESET" "${FRAMES:-600}" <<'PYTHON'
import sys
from pathlib import Path

import numpy as np
import torch

from pocus_edge.data.layout import load_site
from pocus_edge.export.parity import parity_frames, spread_head_logits
from pocus_edge.models.students import build_student
from pocus_edge.models.weights import save_student
from pocus_edge.runtime.sources import write_tvd_h5

work, name, preset, count = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
site = load_site(work / "sim" / "target")
records = sorted(site.select("test"), key=lambda r: (r.videoname, r.framenum))
frames = [site.read_image(r) for r in records]
frames = [f for f in frames if f.shape == frames[0].shape]
h, w = frames[0].shape
screen = np.full((count, h + 48, w + 48), 12, dtype=np.uint8)
for k in range(count):
    screen[k, 40 : 40 + h, 40 : 40 + w] = frames[k % len(frames)]
write_tvd_h5(work / "sweep.tvd.h5", screen, np.arange(count) * 1000.0 / 30.0, roi=(41, 40 + w, 41, 40 + h))
print(f"recording: {count} frames of {h}x{w} (the B-mode ROI of a {h + 48}x{w + 48} screen)")
torch.manual_seed(0)
student = build_student(name, preset).eval()
spread_head_logits(student, parity_frames(work / "sim" / "target", student.img_size, n=8)[0])
save_student(work / "student.safetensors", student)
PYTHON

stream_all() {
    local rc=0 target precision suffix artifact
    for spec in onnx:fp32:onnx onnx:int8:onnx openvino:fp32:xml openvino:int8:xml; do
        IFS=: read -r target precision suffix <<< "$spec"
        artifact="$WORK/student-$target-$precision.$suffix"
        $PY -m pocus_edge export --checkpoint "$WORK/student.safetensors" --target "$target" --precision "$precision" \
            --calib "$WORK/sim/target" --out "$artifact" || { rc=1; continue; }
        echo "== stream $target-$precision, load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
        $PY -m pocus_edge stream "$WORK/sweep.tvd.h5" --model "$artifact" --threads "$THREADS" --no-drop --no-progress \
            --report "$DEST/stream_student_${STREAM_STUDENT}_$target-$precision.json" || rc=1
    done
    return $rc
}
stream_all 2>&1 | tee "$DEST/stream_students_$PRESET.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
echo "== $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null); exit status $STATUS"
exit "$STATUS"
