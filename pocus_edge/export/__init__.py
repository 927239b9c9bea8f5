"""Export: both branches plus the fusion head as ONE graph, to ONNX (fp32/fp16/int8), TensorRT
and Core ML, with a parity report next to every artifact.

Modules import torch/onnx lazily where they can; import what you need:
``pocus_edge.export.fused.FusedSegmenter``, ``pocus_edge.export.onnx.read_onnx_card``,
``pocus_edge.export.api.export_checkpoints``.
"""

from __future__ import annotations

__all__ = ["FusedSegmenter", "load_fused", "read_onnx_card", "export_checkpoints", "export_model"]


def __getattr__(name: str):
    # Lazy re-exports: `import pocus_edge.export` stays cheap (the CLI imports it for --help).
    if name in ("FusedSegmenter", "load_fused"):
        from . import fused

        return getattr(fused, name)
    if name == "read_onnx_card":
        from .onnx import read_onnx_card

        return read_onnx_card
    if name in ("export_checkpoints", "export_model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
