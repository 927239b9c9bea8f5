"""Moved: the exportable models live in :mod:`pocus_edge.models.fused` (they are models, not
export steps). This name stays importable for existing scripts."""

from ..models.fused import ExportableSegmenter, FusedSegmenter, SingleSegmenter, load_fused, load_single

__all__ = ["ExportableSegmenter", "FusedSegmenter", "SingleSegmenter", "load_fused", "load_single"]
