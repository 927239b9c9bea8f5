"""Streaming runtime: frame sources -> shared preprocessing -> inference backend
(:mod:`pocus_edge.inference`: onnxruntime, TensorRT, OpenVINO, Core ML, PyTorch) -> threshold ->
sinks (overlay video, masks, JSON report), with per-stage latency, FPS and GFLOPs. See
``pocus-edge stream --help`` and docs/streaming.md.

Modules: :mod:`.base` (the frame source, frame result and sink types every other module shares),
:mod:`.sources`, :mod:`.igtl`, :mod:`.protocol` (frames in), :mod:`.pipeline` (the run),
:mod:`.sinks` and :mod:`.overlay` (outputs), :mod:`.stats`. ``open_backend`` and ``Backend`` are
:mod:`pocus_edge.inference`'s, re-exported here."""

from ..inference import Backend, open_backend
from .base import FrameSource
from .pipeline import StreamOptions, run_stream
from .sources import open_source

__all__ = ["Backend", "FrameSource", "StreamOptions", "open_backend", "open_source", "run_stream"]
