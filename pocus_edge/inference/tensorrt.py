"""TensorRT: a serialized engine with its model-card sidecar, on an NVIDIA GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..card import check_artifact_card, file_sha256, read_sidecar
from ..errors import ExportError, ToolchainUnavailable
from .base import Backend, check_segmenter_io, has_risk_output, named_outputs, precision_of


def tensorrt_io(engine, trt, path: Path) -> dict[str, Any]:
    """An engine's I/O as the card checker reads it: names, numpy dtypes, shapes (-1 = dynamic),
    and the engine file's SHA-256."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]

    def entry(name: str) -> dict[str, Any]:
        return {"name": name, "dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name,
                "shape": [int(d) for d in engine.get_tensor_shape(name)]}

    return {
        "inputs": [entry(n) for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT],
        "outputs": [entry(n) for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT],
        "sha256": file_sha256(path),
    }


class TensorRTBackend(Backend):
    """A serialized TensorRT engine (``.engine``/``.plan``) run with the named-tensor API
    (TensorRT 10 and 11) on torch CUDA buffers. Its model card is the ``<engine>.json`` sidecar
    the exporter writes; the card is checked against the engine's own I/O and file hash, and a
    mismatch is refused. An engine without a sidecar (built by hand with trtexec) runs with
    precision "unknown" and no GFLOPs."""

    name = "tensorrt"

    def __init__(self, path: str | Path, *, device: str = "cuda"):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: engine file not found")
        card = read_sidecar(self.path)  # a broken card is refused before any GPU work
        try:
            import tensorrt as trt
        except ImportError:
            raise ToolchainUnavailable(f"{path}: TensorRT is not installed here (pip install 'pocus-edge[tensorrt]' on a machine with an NVIDIA GPU)") from None
        try:
            import torch
        except ImportError:
            raise ToolchainUnavailable(f"{path}: the TensorRT backend allocates CUDA buffers with torch, which is not installed") from None
        if not torch.cuda.is_available():
            raise ToolchainUnavailable(f"{path}: TensorRT needs a CUDA GPU and none is visible")
        self._torch = torch
        self.device = device if device.startswith("cuda") else "cuda"
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(f"{self.path}: TensorRT cannot deserialize this engine (built by another TensorRT version or GPU?)")
        io_spec = tensorrt_io(self.engine, trt, self.path)
        if card is not None:
            check_artifact_card(card, io_spec, self.path)
        self.card = card or {}
        self.context = self.engine.create_execution_context()
        self.inputs = [e["name"] for e in io_spec["inputs"]]
        self.outputs = [e["name"] for e in io_spec["outputs"]]
        self._trt = trt
        self.input_dtype = io_spec["inputs"][0]["dtype"]
        self.img_size = check_segmenter_io(self.path, io_spec["inputs"], io_spec["outputs"], self.card)
        profile_max = self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0]
        self.max_batch = int(profile_max) if profile_max > 0 else None
        self.has_weight_map = all(n in self.outputs for n in ("c_generative", "c_contrastive"))
        self.has_risk = has_risk_output(self.outputs)
        self.precision = precision_of(self.card, self.input_dtype, default="unknown")
        self.threshold = float(self.card.get("threshold", 0.5))
        self._stream = torch.cuda.Stream()

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        trt = self._trt
        in_name = self.inputs[0]
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        self.context.set_input_shape(in_name, tuple(x.shape))
        self.context.set_tensor_address(in_name, x.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dt = torch.from_numpy(np.zeros(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outs[name] = torch.empty(shape, dtype=dt, device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise ExportError(f"{self.path}: TensorRT execution failed")
        self._stream.synchronize()
        return named_outputs({k: v.float().cpu().numpy() for k, v in outs.items()}, self.has_weight_map)

