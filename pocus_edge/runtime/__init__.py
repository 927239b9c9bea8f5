"""Streaming runtime: frame sources -> shared preprocessing -> backend (onnxruntime, TensorRT,
PyTorch) -> threshold -> sinks (overlay video, masks, JSON report), with per-stage latency,
FPS and GFLOPs. See ``pocus-edge stream --help`` and docs/streaming.md."""

from .backends import Backend, open_backend
from .pipeline import StreamOptions, run_stream
from .sources import FrameSource, open_source

__all__ = ["Backend", "FrameSource", "StreamOptions", "open_backend", "open_source", "run_stream"]
