"""Export: an exportable model (both branches plus the fusion head as ONE graph, or a single
network) to precision-explicit ONNX (fp32 / mixed fp16 / int8 Q/DQ), TensorRT engines, OpenVINO
IR and Core ML, with a parity report next to every artifact.

Modules import torch/onnx lazily where they can; import what you need:
``pocus_edge.export.api.export_model`` / ``export_checkpoints`` / ``ExportOptions``,
``pocus_edge.export.formats.ARTIFACTS`` (the format table the benchmark shares),
``pocus_edge.export.onnx.read_onnx_card``. The models live in :mod:`pocus_edge.models.fused`.
"""

from __future__ import annotations

__all__ = ["ExportOptions", "FusedSegmenter", "SingleSegmenter", "load_fused", "read_onnx_card", "export_checkpoints", "export_model"]


def __getattr__(name: str):
    # Lazy re-exports: `import pocus_edge.export` stays cheap (the CLI imports it for --help).
    if name in ("FusedSegmenter", "SingleSegmenter", "load_fused"):
        from ..models import fused

        return getattr(fused, name)
    if name == "read_onnx_card":
        from .onnx import read_onnx_card

        return read_onnx_card
    if name in ("export_checkpoints", "export_model", "ExportOptions"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
