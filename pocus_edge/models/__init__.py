"""Networks: the TransUNet branch (timm ResNetV2 + ViT), pretraining wrappers, the fusion head,
the exportable segmenters (the fused two-branch model, a single network), checkpoint I/O (a
TransUNet branch's or a compact student's) and size reports. Import the submodules directly, e.g.
``from pocus_edge.models.transunet import TransUNet``; the names below are re-exported for
convenience."""

from .fused import ExportableSegmenter, FusedSegmenter, SingleSegmenter, load_fused, load_single
from .fusion import FusionHead, confidence, fuse
from .transunet import TransUNet
from .weights import build_segmenter, load_encoder, load_strict, read_checkpoint, save_checkpoint, save_student

__all__ = [
    "TransUNet",
    "ExportableSegmenter",
    "FusedSegmenter",
    "SingleSegmenter",
    "load_fused",
    "load_single",
    "FusionHead",
    "confidence",
    "fuse",
    "save_checkpoint",
    "read_checkpoint",
    "load_strict",
    "load_encoder",
    "build_segmenter",
    "save_student",
]
