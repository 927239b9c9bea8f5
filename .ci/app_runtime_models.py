"""Export what the Android app may load, with the full install, and write golden vectors of each.

    python .ci/app_runtime_models.py OUT

Random-weight ``tiny`` models (output layers spread so masks are about half bone; no training
needed to test a runtime): the fused teacher with its branch outputs, the default student in fp32
and in int8, as ONNX and as ORT format (for minimal builds), all with the uint8 input the app feeds
(docs/students.md, android_demo/README.md).
Each artifact's golden folder holds the probabilities the current onnxruntime computes, for
.ci/app_runtime_checks.py to compare in the app's onnxruntime.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pocus_edge.config import model_preset
from pocus_edge.export import parity as parity_mod
from pocus_edge.export.api import ExportOptions, export_model
from pocus_edge.export.golden import write_golden
from pocus_edge.export.parity import spread_head_logits
from pocus_edge.models.fused import FusedSegmenter, SingleSegmenter
from pocus_edge.models.students import build_student
from pocus_edge.models.transunet import TransUNet

STUDENT = "mobilenetv3"


def models():
    """(artifact name, exportable model, precision) of every artifact the app may load."""
    torch.manual_seed(0)
    frames, _ = parity_mod.parity_frames(None, 64, n=4, seed=1)
    cfg = model_preset("tiny")
    generative, contrastive = TransUNet(cfg).eval(), TransUNet(cfg).eval()
    for network in (generative, contrastive):
        spread_head_logits(network, frames, std=3.0)
    fused = FusedSegmenter(generative, contrastive, uint8_input=True, return_branches=True).eval()
    student_net = build_student(STUDENT, "tiny").eval().reparameterize()
    spread_head_logits(student_net, frames, std=3.0)
    student = SingleSegmenter(student_net, uint8_input=True, name="student").eval()
    return [("fused.onnx", fused, "fp32"), ("student.onnx", student, "fp32"), ("student-int8.onnx", student, "int8"),
            ("student-mobile.ort", student, "fp32"), ("student-mobile-int8.ort", student, "int8")]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    calibration = parity_mod.parity_frames(None, 64, n=16, uint8_input=True, seed=2)[0]
    written = []
    for name, model, precision in models():
        options = ExportOptions(target=Path(name).suffix[1:], batch=1, precision=precision,
                                calibration_frames=calibration if precision == "int8" else None)
        result = export_model(model, out / name, options)
        golden = out / (Path(name).stem + ".golden")
        write_golden(golden, model=result.artifact, n=4, seed=3, extra_sizes=())
        written.append({"artifact": name, "precision": precision, "golden": golden.name})
        print(f"exported {name} ({precision}) and its golden vectors")
    (out / "artifacts.json").write_text(json.dumps(written, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
