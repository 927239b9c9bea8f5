"""OpenVINO: an IR (``.xml`` + ``.bin``) or an ONNX file compiled by OpenVINO for a CPU, GPU or NPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..card import CARD_KEY, parse_card
from ..errors import ExportError, PocusError, ToolchainUnavailable
from .base import Backend, check_segmenter_io, has_risk_output, named_outputs
from .flops import graph_gflops

# The precision a card names -> OpenVINO's inference precision hint. fp32 and int8 pin f32:
# on CPUs with native bf16 (AMX, AVX-512 BF16) the CPU plugin otherwise runs fp32 layers in bf16.
OPENVINO_HINTS = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}


def openvino_card(model, path: Path) -> dict | None:
    """The card an OpenVINO model carries (IR ``rt_info``, or an ONNX file's metadata)."""
    if model.has_rt_info([CARD_KEY]):
        return parse_card(model.get_rt_info([CARD_KEY]).astype(str), path)
    if path.suffix == ".onnx":
        return onnx_metadata_card(path)
    return None


def onnx_metadata_card(path: Path) -> dict | None:
    """An ONNX file's card without loading its weights (None when the onnx package is absent)."""
    try:
        import onnx
    except ImportError:
        return None
    proto = onnx.load_model(str(path), load_external_data=False)
    return parse_card(next((p.value for p in proto.metadata_props if p.key == CARD_KEY), None), path)


class OpenVINOBackend(Backend):
    """An OpenVINO IR (``.xml`` + ``.bin``) or an ONNX file compiled by OpenVINO (CPU, GPU, NPU).
    The inference precision comes from the model card (fp32 / bf16 / int8; bf16 is an OpenVINO
    inference-precision hint on an fp32 IR) unless ``precision`` overrides it."""

    name = "openvino"

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None, precision: str | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ToolchainUnavailable(f"{path}: OpenVINO is not installed here (pip install 'pocus-edge[openvino]')") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: OpenVINO model not found")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{self.path}: OpenVINO cannot read this model ({first[:200]})") from None
        self.card = openvino_card(model, self.path) or {}
        describe = lambda ports: [{"name": p.get_any_name(), "dtype": _ov_dtype(p.get_element_type()),
                                   "shape": [d.get_length() if d.is_static else -1 for d in p.get_partial_shape()]} for p in ports]
        inputs, outputs = describe(model.inputs), describe(model.outputs)
        self.img_size = check_segmenter_io(self.path, inputs, outputs, self.card)
        self.input_name = inputs[0]["name"]
        self.input_dtype = inputs[0]["dtype"]
        self.output_names = [o["name"] for o in outputs]
        self.max_batch = inputs[0]["shape"][0] if inputs[0]["shape"][0] > 0 else None
        self.has_weight_map = all(n in self.output_names for n in ("c_generative", "c_contrastive"))
        self.has_risk = has_risk_output(self.output_names)
        self.precision = precision or str(self.card.get("precision") or "fp32")
        if self.precision not in OPENVINO_HINTS:
            raise PocusError(f"{self.path}: OpenVINO precision {self.precision!r}; choose one of {', '.join(OPENVINO_HINTS)}")
        ov_device = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}.get(device.lower(), device.upper())
        if ov_device not in core.available_devices and ov_device.split(".")[0] not in core.available_devices:
            raise ToolchainUnavailable(f"{self.path}: OpenVINO device {ov_device} not available here ({', '.join(core.available_devices)})")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OPENVINO_HINTS[self.precision]}
        if threads and ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, ov_device, config)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ToolchainUnavailable(f"{self.path}: OpenVINO cannot compile it for {ov_device} at {self.precision} ({first[:200]})") from None
        self.device = device
        self.request = self.compiled.create_infer_request()
        self.threshold = float(self.card.get("threshold", 0.5))
        self._counted_gflops: float | None = None

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({0: batch})
        named = {name: np.asarray(results[self.compiled.output(i)]) for i, name in enumerate(self.output_names)}
        return named_outputs(named, self.has_weight_map)

    @property
    def gflops_per_frame(self) -> float | None:
        from_card = super().gflops_per_frame
        if from_card is not None or self.path.suffix != ".onnx":
            return from_card
        if self._counted_gflops is None:
            self._counted_gflops = graph_gflops(self.path)
        return self._counted_gflops


def _ov_dtype(element_type) -> str:
    return {"f32": "float32", "f16": "float16", "u8": "uint8", "bf16": "bfloat16"}.get(element_type.get_type_name(), element_type.get_type_name())

