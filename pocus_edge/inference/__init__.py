"""Inference: the one layer that runs an exported artifact (or the PyTorch reference).

``open_backend(model_path, backend="auto"|"ort"|"tensorrt"|"openvino"|"coreml"|"torch",
device="cpu")`` returns a :class:`Backend` (the contract is in :mod:`.base`). The streaming
runtime, export's parity check and golden vectors, the benchmark and the demo all open artifacts
here. This package sits below them: it imports nothing from ``export``, ``runtime``,
``benchmark`` or the commands, and no torch at import (a lean install runs an ONNX model; the
torch and TensorRT backends import torch when they are opened).

Modules: :mod:`.base` (the contract and shared helpers), :mod:`.registry` (the one table of
backends and :func:`open_backend`), one module per backend (:mod:`.ort`, :mod:`.tensorrt`,
:mod:`.openvino`, :mod:`.coreml`, :mod:`.pytorch`) and :mod:`.flops` (GFLOPs of an ONNX graph).
A new format is one row in export's artifact table (:data:`pocus_edge.export.formats.ARTIFACTS`)
and, for a new kind of artifact, one row in :data:`.registry.REGISTRY`.
"""

from .base import (
    Backend,
    check_segmenter_io,
    has_risk_output,
    named_outputs,
    precision_of,
    split_paths,
    to_frame_resolution,
    weight_map,
)
from .coreml import CoreMLBackend
from .flops import count_onnx_flops, graph_gflops
from .openvino import OPENVINO_HINTS, OpenVINOBackend, onnx_metadata_card, openvino_card
from .ort import ORT_PROVIDERS, OrtBackend, resolve_providers
from .pytorch import TorchBackend
from .registry import BACKENDS, REGISTRY, SUFFIX_BACKENDS, BackendSpec, accepts, backend_for, backend_spec, open_backend
from .tensorrt import TensorRTBackend, tensorrt_io

__all__ = [
    "BACKENDS", "Backend", "BackendSpec", "CoreMLBackend", "OPENVINO_HINTS", "ORT_PROVIDERS", "OpenVINOBackend",
    "OrtBackend", "REGISTRY", "SUFFIX_BACKENDS", "TensorRTBackend", "TorchBackend", "accepts", "backend_for",
    "backend_spec", "check_segmenter_io", "count_onnx_flops", "graph_gflops", "has_risk_output", "named_outputs", "onnx_metadata_card",
    "open_backend", "openvino_card", "precision_of", "resolve_providers", "split_paths", "tensorrt_io", "to_frame_resolution",
    "weight_map",
]
