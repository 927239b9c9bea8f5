"""Inference backends behind one interface.

``open_backend(model_path, backend="auto"|"ort"|"tensorrt"|"openvino"|"coreml"|"torch",
device="cpu")`` returns a :class:`Backend`. This module is the one place that runs an exported
artifact: the streaming pipeline, export's parity check, the golden-vector writer and the
benchmark all open artifacts here. It imports no torch and nothing from ``pocus_edge.export``
(a lean install streams an exported model); the torch backend imports torch when opened.

* ``prepare(frame uint8 HxW) -> model input for one frame``: the training preprocessing
  (``preprocess_frame``), or ``preprocess_gray`` for graphs exported with uint8 input (they
  scale and repeat channels inside the graph).
* ``infer(x float32 (N,3,S,S)) -> fused probability (N,1,S,S)``: the cross-team contract.
* ``run(batch) -> {"prob": (N,1,S,S), "weight": (N,1,S,S) or absent}`` on prepared inputs;
  ``weight`` is the generative branch's share of the fusion, c_g / (c_g + c_c), when the
  graph exports its branch outputs.

Attributes: ``name``, ``img_size``, ``precision``, ``device``, ``input_dtype``, ``card`` and
``gflops_per_frame`` (from the model card, else counted from the graph).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..card import CARD_KEY, check_artifact_card, file_sha256, parse_card, read_sidecar
from ..errors import CheckpointError, ExportError, PocusError, ToolchainUnavailable

BACKENDS = ("auto", "ort", "tensorrt", "openvino", "coreml", "torch")
# File suffix -> backend, for backend="auto".
SUFFIX_BACKENDS = {".onnx": "ort", ".ort": "ort", ".engine": "tensorrt", ".plan": "tensorrt", ".trt": "tensorrt",
                   ".xml": "openvino", ".mlpackage": "coreml", ".safetensors": "torch"}
# Short names users pass to --providers -> onnxruntime execution providers.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
}
BRANCH_OUTPUTS = ("fused", "p_generative", "p_contrastive", "c_generative", "c_contrastive")


class Backend:
    name = "backend"
    img_size: int
    precision: str = "fp32"
    device: str = "cpu"
    input_dtype: str = "float32"  # or "uint8": input (N,1,S,S) of preprocess_gray pixels
    card: dict
    threshold: float = 0.5
    has_weight_map: bool = False
    max_batch: int | None = None  # a graph with a fixed batch size runs in chunks of it

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        from ..data.transforms import preprocess_frame, preprocess_gray

        if self.input_dtype == "uint8":
            return preprocess_gray(frame, self.img_size)[None]
        return preprocess_frame(frame, self.img_size)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            parts = [self._run(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def infer(self, x: np.ndarray) -> np.ndarray:
        """float32 (N,3,S,S) in [0,1] -> fused probability (N,1,S,S)."""
        x = np.asarray(x)
        if self.input_dtype == "uint8" and x.dtype != np.uint8:
            # The same pixels the uint8 graph would get: undo the /255 of preprocess_frame.
            x = np.clip(np.rint(x[:, :1] * 255.0), 0, 255).astype(np.uint8)
        elif self.input_dtype == "float16":
            x = x.astype(np.float16)
        return self.run(np.ascontiguousarray(x))["prob"]

    @property
    def gflops_per_frame(self) -> float | None:
        value = (self.card or {}).get("gflops_per_frame")
        return float(value) if value is not None else None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": self.device,
            "img_size": self.img_size,
            "input_dtype": self.input_dtype,
            "gflops_per_frame": self.gflops_per_frame,
        }

    def close(self) -> None:
        pass


def _weight_map(c_g: np.ndarray, c_c: np.ndarray) -> np.ndarray:
    return (c_g / (c_g + c_c + 1e-6)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# onnxruntime


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


def check_segmenter_io(path, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], card: dict | None) -> int:
    """Refuse, with one line naming the file, a graph the runtime cannot drive: one input of
    rank 4 (N, 3, S, S) float or (N, 1, S, S) uint8, square and of the card's size, and a first
    output of rank 4 with one channel. Returns the input size S."""
    if len(inputs) != 1:
        raise ExportError(f"{path}: the graph has {len(inputs)} inputs; a segmenter takes one (N,C,S,S) frame batch")
    shape, dtype = list(inputs[0]["shape"]), inputs[0]["dtype"]
    static = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(shape) != 4:
        raise ExportError(f"{path}: input {inputs[0]['name']!r} has rank {len(shape)}; expected 4 (N,C,S,S)")
    channels = 1 if dtype == "uint8" else 3
    if static[1] is not None and static[1] != channels:
        raise ExportError(f"{path}: input {inputs[0]['name']!r} has {static[1]} channels; a {dtype} input needs {channels}")
    if static[2] is not None and static[3] is not None and static[2] != static[3]:
        raise ExportError(f"{path}: input {inputs[0]['name']!r} is {static[2]}x{static[3]}; the runtime feeds square frames")
    size = int((card or {}).get("img_size") or static[3] or 0)
    if not size:
        raise ExportError(f"{path}: cannot tell the input size (no model card, dynamic spatial axes)")
    if static[3] is not None and static[3] != size:
        raise ExportError(f"{path}: input is {static[3]} wide but its model card says img_size {size}")
    if not outputs:
        raise ExportError(f"{path}: the graph has no outputs")
    out_shape = list(outputs[0]["shape"])
    if len(out_shape) != 4:
        raise ExportError(f"{path}: output {outputs[0]['name']!r} has rank {len(out_shape)}; expected a probability map (N,1,S,S)")
    if isinstance(out_shape[1], int) and out_shape[1] > 0 and out_shape[1] != 1:
        raise ExportError(f"{path}: output {outputs[0]['name']!r} has {out_shape[1]} channels; expected 1 (bone probability)")
    return size


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
        self.threshold = float(self.card.get("threshold", 0.5))
        self.precision = str(self.card.get("precision") or "fp32")
        self._counted_gflops: float | None = None

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        x = super().prepare(frame)
        return x.astype(np.float16) if self.input_dtype == "float16" else x

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return _named_outputs(dict(zip(self.output_names, self.session.run(None, {self.input_name: batch}))), self.has_weight_map)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": list(self.providers)}

    @property
    def gflops_per_frame(self) -> float | None:
        from_card = super().gflops_per_frame
        if from_card is not None:
            return from_card
        if self._counted_gflops is None:
            self._counted_gflops = _graph_gflops(self.path)
        return self._counted_gflops


def _named_outputs(named: dict[str, Any], has_weight_map: bool) -> dict[str, np.ndarray]:
    """The backend contract from a graph's named outputs: ``prob`` = "fused" (the fused pair),
    "prob" (a single network) or else the first output; ``weight`` from the confidences."""
    values = list(named.values())
    prob = named.get("fused", named.get("prob", values[0]))
    result = {"prob": np.asarray(prob, dtype=np.float32)}
    if has_weight_map:
        c_g = named.get("c_generative", values[3] if len(values) == 5 else None)
        c_c = named.get("c_contrastive", values[4] if len(values) == 5 else None)
        result["weight"] = _weight_map(np.asarray(c_g, np.float32), np.asarray(c_c, np.float32))
    return result


def _graph_gflops(path: str | Path) -> float | None:
    """GFLOPs per frame counted on the ONNX graph; None on the core install, which has
    onnxruntime but not onnx (a card without GFLOPs then reports none rather than failing)."""
    try:
        return count_onnx_flops(path) / 1e9
    except ModuleNotFoundError:
        return None


def count_onnx_flops(path: str | Path, batch: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass of an ONNX graph at ``batch``, counted over
    Conv, ConvTranspose, MatMul and Gemm - the ops torch.utils.flop_counter counts for these
    models - with shapes from ONNX shape inference (the batch axis fixed to ``batch``)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load_model(str(path), load_external_data=False)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = batch
    model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.dim_value else -1 for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    def attr(node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    total = 0
    for node in model.graph.node:
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            w = shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            x = shapes.get(node.input[0])
            if not w or not out or min(out) < 0 or not x or min(x) < 0:
                continue
            kernel = int(np.prod(w[2:]))
            if op == "Conv":  # w: (Cout, Cin/groups, k...)
                total += 2 * int(np.prod(out)) * w[1] * kernel
            else:  # w: (Cin, Cout/groups, k...): every input pixel scatters into Cout/groups * k outputs
                total += 2 * int(np.prod(x)) * w[1] * kernel
        elif op in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if not a or not b or not out or min(out) < 0 or min(a) < 0:
                continue
            if op == "Gemm":
                k = a[0] if attr(node, "transA", 0) else a[-1]
            else:
                k = a[-1]
            total += 2 * int(np.prod(out)) * int(k)
    return total


# ---------------------------------------------------------------------------------------------
# TensorRT


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
        self.precision = str(self.card.get("precision") or "unknown")
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
        return _named_outputs({k: v.float().cpu().numpy() for k, v in outs.items()}, self.has_weight_map)


# ---------------------------------------------------------------------------------------------
# OpenVINO

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
        return _named_outputs(named, self.has_weight_map)

    @property
    def gflops_per_frame(self) -> float | None:
        from_card = super().gflops_per_frame
        if from_card is not None or self.path.suffix != ".onnx":
            return from_card
        if self._counted_gflops is None:
            self._counted_gflops = _graph_gflops(self.path)
        return self._counted_gflops


def _ov_dtype(element_type) -> str:
    return {"f32": "float32", "f16": "float16", "u8": "uint8", "bf16": "bfloat16"}.get(element_type.get_type_name(), element_type.get_type_name())


# ---------------------------------------------------------------------------------------------
# Core ML


class CoreMLBackend(Backend):
    """A Core ML package (``.mlpackage``, grayscale image input of the probe's frame shape)
    predicted with coremltools; macOS only. ``prepare`` hands over the raw frame (the package
    pads and resizes in-graph); ``run`` predicts frame by frame, as an app does."""

    name = "coreml"
    input_dtype = "frame"

    def __init__(self, path: str | Path, *, device: str = "all"):
        import platform

        self.path = Path(path)
        if not self.path.is_dir():
            raise ExportError(f"{self.path}: Core ML package not found (a .mlpackage folder)")
        if platform.system() != "Darwin":
            raise ToolchainUnavailable(f"{self.path}: Core ML prediction needs macOS (this is {platform.system()})")
        try:
            import coremltools as ct
        except ImportError:
            raise ToolchainUnavailable(f"{self.path}: coremltools is not installed (pip install 'pocus-edge[coreml]')") from None
        self.model = ct.models.MLModel(str(self.path), compute_units=ct.ComputeUnit.ALL)
        spec = self.model.get_spec()
        self.card = parse_card(dict(spec.description.metadata.userDefined).get(CARD_KEY), self.path) or {}
        image = spec.description.input[0].type.imageType
        self.input_name = spec.description.input[0].name
        self.output_name = spec.description.output[0].name  # "fused" (the pair) or "prob" (one network)
        self.frame_shape = (int(image.height), int(image.width))
        self.img_size = int(self.card.get("img_size") or 0) or int(spec.description.output[0].type.multiArrayType.shape[-1])
        self.precision = str(self.card.get("precision") or "fp16")
        self.threshold = float(self.card.get("threshold", 0.5))
        self.device = device

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        if frame.shape != self.frame_shape:
            frame = cv2.resize(frame, self.frame_shape[::-1], interpolation=cv2.INTER_LINEAR)
        return frame

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Float frames (N,3,S,S) in [0,1] at the package's frame shape (its image input)."""
        gray = np.clip(np.rint(np.asarray(x)[:, 0] * 255.0), 0, 255).astype(np.uint8)
        return self.run(gray)["prob"]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        from PIL import Image

        out = [np.asarray(self.model.predict({self.input_name: Image.fromarray(np.asarray(f).reshape(self.frame_shape))})[self.output_name], dtype=np.float32)
               for f in batch]
        return {"prob": np.concatenate(out).reshape(len(batch), 1, self.img_size, self.img_size)}


# ---------------------------------------------------------------------------------------------
# PyTorch (reference)


class TorchBackend(Backend):
    """Reference backend: two fine-tuned checkpoints (``GEN,CON``) -> FusedSegmenter, or one
    checkpoint -> a SingleSegmenter. torch is imported here, when the backend is opened."""

    name = "torch"

    def __init__(self, model_path: str | Path | tuple | list, *, device: str = "cpu", fusion: dict | None = None):
        try:
            import torch
        except ImportError:
            raise ToolchainUnavailable("the torch backend needs PyTorch (pip install 'pocus-edge[train]')") from None
        from ..models.fused import load_fused, load_single

        self._torch = torch
        paths = _split_paths(model_path)
        self.device = device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ToolchainUnavailable(f"device {device!r} asked for, but no CUDA GPU is visible")
        if len(paths) == 2:
            model = load_fused(paths[0], paths[1], return_branches=True, **(fusion or {}))
            self.has_weight_map = True
            self.card = {"preset": model.generative.cfg.name, "fusion": model.fusion_settings}
        elif len(paths) == 1:
            model = load_single(paths[0])  # a student comes back reparameterized (its inference form)
            card = model.cards[model.name] or {}
            self.card = {"preset": card.get("preset"), "stage": card.get("stage"), "kind": model.kind}
            if model.kind == "student":
                # A student's checkpoint card carries its deployed GFLOPs per frame.
                self.card.update(student=card.get("student"), gflops_per_frame=card.get("gflops_per_frame"))
        else:
            raise CheckpointError(f"{model_path}: the torch backend takes one checkpoint or two (GEN,CON)")
        self.img_size = int(model.img_size)
        self.model = model.eval().to(device)
        self.precision = "fp32"
        self._counted: float | None = None

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            out = self.model(x)
            if self.has_weight_map:
                fused, _, _, c_g, c_c = out
                return {"prob": fused.float().cpu().numpy(), "weight": _weight_map(c_g.float().cpu().numpy(), c_c.float().cpu().numpy())}
            return {"prob": out.float().cpu().numpy()}

    @property
    def gflops_per_frame(self) -> float | None:
        from_card = super().gflops_per_frame
        if from_card is not None:
            return from_card
        if self._counted is None:
            from ..models.flops import count_flops

            self._counted = count_flops(self.model, (1, 3, self.img_size, self.img_size)) / 1e9
        return self._counted


def _split_paths(model_path) -> list[Path]:
    if isinstance(model_path, (list, tuple)):
        return [Path(p) for p in model_path]
    return [Path(p) for p in str(model_path).split(",") if p]


def backend_for(model_path) -> str:
    """The backend ``auto`` picks for a path: by suffix (two comma-separated checkpoints: torch)."""
    paths = _split_paths(model_path)
    if not paths:
        raise PocusError("no model path given")
    kind = SUFFIX_BACKENDS.get(paths[0].suffix.lower())
    if kind is None:
        raise PocusError(f"{paths[0]}: cannot tell the backend from the suffix {paths[0].suffix!r}; pass --backend "
                         f"({', '.join(b for b in BACKENDS if b != 'auto')})")
    return kind


def open_backend(
    model_path: str | os.PathLike | tuple,
    backend: str = "auto",
    *,
    device: str = "cpu",
    threads: int | None = None,
    providers: list[str] | None = None,
    precision: str | None = None,
) -> Backend:
    """Open ``model_path`` with the named backend. ``auto`` picks by suffix: ``.onnx`` ->
    onnxruntime (``providers``: cpu, cuda, tensorrt, openvino, coreml), ``.engine``/``.plan`` ->
    TensorRT, ``.xml`` -> OpenVINO (``precision`` overrides the card's inference precision),
    ``.mlpackage`` -> Core ML, ``.safetensors`` (one, or two as ``GEN,CON``) -> PyTorch."""
    if backend == "auto":
        backend = backend_for(model_path)
    if providers and backend != "ort":
        raise PocusError(f"--providers applies to the ort backend (onnxruntime), not {backend}")
    if backend == "ort":
        return OrtBackend(model_path, device=device, threads=threads, providers=providers)
    if backend == "tensorrt":
        return TensorRTBackend(model_path, device=device if device != "cpu" else "cuda")
    if backend == "openvino":
        return OpenVINOBackend(model_path, device=device, threads=threads, precision=precision)
    if backend == "coreml":
        return CoreMLBackend(model_path)
    if backend == "torch":
        return TorchBackend(model_path, device=device)
    raise PocusError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
