"""Core ML: an ``.mlpackage`` (ML Program, FP16 compute) whose input is a grayscale image of
the probe's frame shape, so an iOS app hands over the camera/probe buffer as is.

Inside the package: zero-pad bottom/right to a square, bilinear resize (half-pixel centres, no
antialiasing) to the model size, then both branches and the fusion. ``ImageType`` scales
pixels by 1/255, so the graph sees [0, 1] like ``preprocess_frame``. (The Python pipeline
resizes the uint8 frame with OpenCV and then scales; resizing after scaling differs from it by
at most half a grey level of rounding.)

Conversion path under torch 2.14 (coremltools 9.0 is tested up to torch 2.7):
``torch.export.export(...).run_decompositions({})`` -> ``coremltools.convert``; where that
fails, ``torch.jit.trace`` at the fixed frame shape. Both convert the TransUNet + fusion graph
here (checked on the tiny and paper presets). Prediction needs macOS (coremltools' native
library does not exist on Linux), so on Linux the saved spec is inspected instead.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..card import RISK_OUTPUT_NAME
from ..errors import ExportError, ToolchainUnavailable
from ..io import atomic_path
from .onnx import CARD_KEY

INPUT_NAME = "frame"
OUTPUT_NAME = "fused"  # the fused pair's output; a single network (a student) keeps its own, "prob"
MIN_DEPLOYMENT = "iOS16"  # FP16 ML Program with float32 outputs and grayscale image input


class ProbeFrameModel(nn.Module):
    """(1, 1, H, W) float frame in [0, 1] of the probe's shape -> fused probability (1, 1, S, S);
    for a model with the risk output, the pair (probability, risk (1, 1))."""

    def __init__(self, fused: nn.Module, frame_height: int, frame_width: int):
        super().__init__()
        if getattr(fused, "uint8_input", False):
            raise ExportError("Core ML export takes the float FusedSegmenter (the image input does the scaling)")
        self.fused = fused
        self.frame_height, self.frame_width = int(frame_height), int(frame_width)
        self.side = max(self.frame_height, self.frame_width)
        self.img_size = int(fused.img_size)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        x = frame
        pad_bottom, pad_right = self.side - self.frame_height, self.side - self.frame_width
        if pad_bottom or pad_right:  # static Python ints: the shapes are fixed at conversion time
            x = F.pad(x, (0, pad_right, 0, pad_bottom))
        if self.side != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False, antialias=False)
        out = self.fused(x.expand(-1, 3, -1, -1))
        if not isinstance(out, tuple):
            return out
        # The probability, and the risk (always the model's last output) where it has one.
        return (out[0], out[-1]) if getattr(self.fused, "risk", False) else out[0]


def coremltools_status() -> tuple[bool, bool, str]:
    """(importable, can_predict, message). Prediction needs macOS and the native library."""
    import platform

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools as ct
    except ImportError as exc:
        return False, False, f"coremltools is not installed ({exc.__class__.__name__}); pip install 'pocus-edge[coreml]'"
    if platform.system() != "Darwin":
        return True, False, f"coremltools {ct.__version__} converts here, but Core ML prediction needs macOS (this is {platform.system()})"
    return True, True, f"coremltools {ct.__version__} on macOS"


def _convert(source, ct, frame_height: int, frame_width: int, output_names: list[str]):
    import numpy as np

    return ct.convert(
        source,
        inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, 1, frame_height, frame_width),
                             color_layout=ct.colorlayout.GRAYSCALE, scale=1.0 / 255.0)],
        outputs=[ct.TensorType(name=name, dtype=np.float32) for name in output_names],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=getattr(ct.target, MIN_DEPLOYMENT),
    )


def export_coreml(
    fused: nn.Module,
    path: str | os.PathLike,
    *,
    frame_shape: tuple[int, int] | None = None,
    card: dict[str, Any] | None = None,
    method: str = "export",
) -> Path:
    """Convert a (float-input) FusedSegmenter or SingleSegmenter (e.g. a student) to ``path``
    (.mlpackage, written atomically); the output keeps the model's name ("fused" or "prob").

    ``frame_shape``: (height, width) of the probe frames the app feeds (default: the model's
    square input size). ``method``: "export" (torch.export) or "trace" (torch.jit.trace);
    "export" falls back to "trace" when the converter rejects the exported program.
    """
    ok, _, message = coremltools_status()
    if not ok:
        raise ToolchainUnavailable(f"Core ML export unavailable: {message}")
    import coremltools as ct

    final = Path(path)
    if final.suffix != ".mlpackage":
        raise ExportError(f"{final}: a Core ML ML Program is saved as a .mlpackage folder; name it *.mlpackage")
    height, width = frame_shape or (fused.img_size, fused.img_size)
    if height < 1 or width < 1:
        raise ExportError(f"frame shape {height}x{width} is empty")
    wrapper = ProbeFrameModel(fused.eval(), height, width).eval()
    output_name = fused.output_names()[0] if hasattr(fused, "output_names") else OUTPUT_NAME
    output_names = [output_name] + ([RISK_OUTPUT_NAME] if getattr(fused, "risk", False) else [])
    example = torch.rand(1, 1, height, width)
    attempts = ["export", "trace"] if method == "export" else ["trace"]
    errors: list[str] = []
    model = None
    used = None
    for attempt in attempts:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                if attempt == "export":
                    source = torch.export.export(wrapper, (example,)).run_decompositions({})
                else:
                    source = torch.jit.trace(wrapper, example)
                model = _convert(source, ct, height, width, output_names)
            used = attempt
            break
        except Exception as exc:  # the converter raises many types; keep the first line of each
            errors.append(f"{attempt}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}")
    if model is None:
        raise ExportError(f"{final}: coremltools could not convert the model ({'; '.join(errors)})")
    card = dict(card or {})
    card.update({"precision": "fp16", "coreml": {
        "input": {"name": INPUT_NAME, "type": "grayscale image", "height": height, "width": width,
                  "scale": "1/255", "in_graph": ["zero-pad bottom/right to square", f"bilinear resize to {fused.img_size}", "repeat to 3 channels"]},
        "output": output_name, "outputs": output_names, "compute_precision": "FLOAT16", "minimum_deployment_target": MIN_DEPLOYMENT,
        "conversion": used, "coremltools": ct.__version__,
    }})
    kind = getattr(fused, "kind", "fused-two-branch")
    model.short_description = {
        "fused-two-branch": "pocus-edge fused bone segmenter (generative + contrastive TransUNet, confidence-aware fusion)",
        "student": f"pocus-edge compact bone segmenter (student {getattr(fused.cfg, 'name', '')})",
    }.get(kind, "pocus-edge bone segmenter (one network)")
    model.input_description[INPUT_NAME] = f"grayscale probe frame {height}x{width}"
    model.output_description[output_name] = f"bone probability (1,1,{fused.img_size},{fused.img_size}); threshold 0.5"
    if RISK_OUTPUT_NAME in output_names:
        model.output_description[RISK_OUTPUT_NAME] = "per-frame risk (1,1): higher = the mask is less to be trusted"
    model.user_defined_metadata[CARD_KEY] = json.dumps(card, sort_keys=True, default=str)
    with atomic_path(final, kind="dir", replaces=lambda p: (p / "Manifest.json").is_file()) as tmp:  # only an .mlpackage is replaced
        model.save(str(tmp))
    return final


def inspect_mlpackage(path: str | os.PathLike) -> dict[str, Any]:
    """What the saved package declares: inputs, outputs, op-type counts, weight precision, card."""
    import collections

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
        from coremltools.proto import FeatureTypes_pb2, MIL_pb2

    spec = ct.utils.load_spec(str(path))
    inputs = []
    for feature in spec.description.input:
        kind = feature.type.WhichOneof("Type")
        entry: dict[str, Any] = {"name": feature.name, "type": kind}
        if kind == "imageType":
            image = feature.type.imageType
            entry.update(width=image.width, height=image.height,
                         color=FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace))
        inputs.append(entry)
    outputs = []
    for feature in spec.description.output:
        kind = feature.type.WhichOneof("Type")
        entry = {"name": feature.name, "type": kind}
        if kind == "multiArrayType":
            arr = feature.type.multiArrayType
            entry.update(shape=list(arr.shape), dtype=FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType))
        outputs.append(entry)
    ops: collections.Counter = collections.Counter()
    const_dtypes: collections.Counter = collections.Counter()
    if spec.WhichOneof("Type") == "mlProgram":
        main = spec.mlProgram.functions["main"]
        block = main.block_specializations[main.opset]

        def visit(blk) -> None:
            for op in blk.operations:
                ops[op.type] += 1
                if op.type == "const":
                    for out in op.outputs:
                        if out.type.WhichOneof("type") == "tensorType":
                            const_dtypes[MIL_pb2.DataType.Name(out.type.tensorType.dataType)] += 1
                for inner in op.blocks:
                    visit(inner)

        visit(block)
    meta = dict(spec.description.metadata.userDefined)
    return {
        "model_type": spec.WhichOneof("Type"),
        "specification_version": spec.specificationVersion,
        "inputs": inputs,
        "outputs": outputs,
        "ops": dict(ops),
        "const_dtypes": dict(const_dtypes),
        "card": json.loads(meta[CARD_KEY]) if CARD_KEY in meta else None,
    }
