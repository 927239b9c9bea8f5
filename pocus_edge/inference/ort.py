"""onnxruntime: an ONNX file on the CPU or an execution provider (CUDA, TensorRT, OpenVINO,
Core ML, DirectML) picked with ``providers``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..card import CARD_KEY, parse_card
from ..errors import ExportError, PocusError, ToolchainUnavailable
from .base import Backend, check_segmenter_io, has_risk_output, named_outputs, precision_of
from .flops import graph_gflops

# Short names users pass to --providers -> onnxruntime execution providers.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
}


def resolve_providers(providers, device: str, available: list[str], path) -> list:
    """onnxruntime providers for ``--providers`` short names (cpu, cuda, tensorrt, openvino,
    coreml, directml) or full names; default from ``device``. CPU is always the fallback.
    ToolchainUnavailable (one line) when a requested provider is not in this onnxruntime."""
    if providers:
        wanted = [ORT_PROVIDERS.get(str(p).strip().lower(), str(p).strip()) for p in providers if str(p).strip()]
    elif device.startswith("cuda"):
        wanted = ["CUDAExecutionProvider"]
    elif device == "cpu":
        wanted = ["CPUExecutionProvider"]
    else:
        raise PocusError(f"unknown device {device!r} for the ort backend (cpu, cuda, cuda:N)")
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ToolchainUnavailable(
            f"{path}: onnxruntime here has no {', '.join(missing)} (available: {', '.join(available)}; "
            "onnxruntime-gpu brings CUDA/TensorRT, onnxruntime-openvino brings OpenVINO)"
        )
    dev_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    resolved: list = []
    for name in wanted:
        if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            resolved.append((name, {"device_id": dev_id}))
        else:
            resolved.append(name)
    if "CPUExecutionProvider" not in wanted:
        resolved.append("CPUExecutionProvider")
    return resolved



_ORT_DTYPES = {"tensor(uint8)": "uint8", "tensor(float16)": "float16", "tensor(float)": "float32"}


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: ONNX model not found")
        chosen = resolve_providers(providers, device, ort.get_available_providers(), self.path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=chosen)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{self.path}: onnxruntime cannot load this model ({first[:200]})") from None
        self.providers = self.session.get_providers()
        gpu = any(p in self.providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
        self.device = device if (device == "cpu" or gpu) else "cpu"
        self.card = parse_card(self.session.get_modelmeta().custom_metadata_map.get(CARD_KEY), self.path) or {}
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = _ORT_DTYPES.get(inp.type, "float32")
        describe = lambda values: [{"name": v.name, "dtype": _ORT_DTYPES.get(v.type, v.type), "shape": list(v.shape)} for v in values]
        self.img_size = check_segmenter_io(self.path, describe(self.session.get_inputs()), describe(self.session.get_outputs()), self.card)
        shape = list(inp.shape)
        self.max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.has_weight_map = all(n in self.output_names for n in ("c_generative", "c_contrastive")) or len(self.output_names) == 5
        self.has_risk = has_risk_output(self.output_names)
        self.threshold = float(self.card.get("threshold", 0.5))
        self.precision = precision_of(self.card, self.input_dtype)
        self._counted_gflops: float | None = None

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        x = super().prepare(frame)
        return x.astype(np.float16) if self.input_dtype == "float16" else x

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return named_outputs(dict(zip(self.output_names, self.session.run(None, {self.input_name: batch}))), self.has_weight_map)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": list(self.providers)}

    @property
    def gflops_per_frame(self) -> float | None:
        from_card = super().gflops_per_frame
        if from_card is not None:
            return from_card
        if self._counted_gflops is None:
            self._counted_gflops = graph_gflops(self.path)
        return self._counted_gflops


