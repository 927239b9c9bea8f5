"""Inference backends behind one interface.

``open_backend(model_path, backend="ort"|"tensorrt"|"torch", device="cpu")`` returns a
:class:`Backend`:

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

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ExportError, PocusError, ToolchainUnavailable

CARD_KEY = "pocus_edge_card"
BACKENDS = ("ort", "tensorrt", "torch")
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


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: ONNX model not found")
        available = ort.get_available_providers()
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise ToolchainUnavailable(f"{self.path}: device {device!r} asked for, but onnxruntime here has no CUDAExecutionProvider (available: {', '.join(available)})")
            dev_id = int(device.split(":")[1]) if ":" in device else 0
            providers: list = [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise PocusError(f"unknown device {device!r} for the ort backend (cpu, cuda, cuda:N)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{self.path}: onnxruntime cannot load this model ({first[:200]})") from None
        used = self.session.get_providers()
        self.device = device if (device == "cpu" or "CUDAExecutionProvider" in used) else "cpu"
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.card = json.loads(meta[CARD_KEY]) if CARD_KEY in meta else {}
        except json.JSONDecodeError:
            raise ExportError(f"{self.path}: metadata {CARD_KEY!r} is not valid JSON") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = {"tensor(uint8)": "uint8", "tensor(float16)": "float16"}.get(inp.type, "float32")
        shape = list(inp.shape)
        size = shape[-1] if isinstance(shape[-1], int) else None
        self.img_size = int(self.card.get("img_size") or size or 0)
        if not self.img_size:
            raise ExportError(f"{self.path}: cannot tell the input size (no model card, dynamic spatial axes)")
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
        outs = self.session.run(None, {self.input_name: batch})
        named = dict(zip(self.output_names, outs))
        prob = np.asarray(named.get("fused", outs[0]), dtype=np.float32)
        result = {"prob": prob}
        if self.has_weight_map:
            c_g = named.get("c_generative", outs[3] if len(outs) == 5 else None)
            c_c = named.get("c_contrastive", outs[4] if len(outs) == 5 else None)
            result["weight"] = _weight_map(np.asarray(c_g, np.float32), np.asarray(c_c, np.float32))
        return result

    @property
    def gflops_per_frame(self) -> float | None:
        from_card = super().gflops_per_frame
        if from_card is not None:
            return from_card
        if self._counted_gflops is None:
            self._counted_gflops = count_onnx_flops(self.path) / 1e9
        return self._counted_gflops


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


class TensorRTBackend(Backend):
    """A serialized TensorRT engine (``.engine``/``.plan``), run with the TensorRT 10 named-tensor
    API on torch CUDA buffers. The model card is read from a ``<engine>.json`` sidecar written by
    the exporter, when present."""

    name = "tensorrt"

    def __init__(self, path: str | Path, *, device: str = "cuda"):
        try:
            import tensorrt as trt
        except ImportError:
            raise ToolchainUnavailable(f"{path}: TensorRT is not installed here (pip install tensorrt, needs an NVIDIA GPU)") from None
        import torch

        if not torch.cuda.is_available():
            raise ToolchainUnavailable(f"{path}: TensorRT needs a CUDA GPU and none is visible")
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: engine file not found")
        self._torch = torch
        self.device = device if device.startswith("cuda") else "cuda"
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(f"{self.path}: TensorRT cannot deserialize this engine (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.card = {}
        sidecar = self.path.with_suffix(self.path.suffix + ".json")
        if sidecar.is_file():
            try:
                self.card = json.loads(sidecar.read_text())
            except json.JSONDecodeError:
                self.card = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        in_name = self.inputs[0]
        self._trt = trt
        dtype = self.engine.get_tensor_dtype(in_name)
        self.input_dtype = "uint8" if dtype == trt.DataType.UINT8 else ("float16" if dtype == trt.DataType.HALF else "float32")
        shape = list(self.engine.get_tensor_shape(in_name))
        self.img_size = int(self.card.get("img_size") or shape[-1])
        self.max_batch = shape[0] if shape[0] > 0 else None
        self.has_weight_map = all(n in self.outputs for n in ("c_generative", "c_contrastive"))
        self.precision = str(self.card.get("precision") or "fp16")
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
        host = {k: v.float().cpu().numpy() for k, v in outs.items()}
        prob = host.get("fused", host[self.outputs[0]])
        result = {"prob": prob}
        if self.has_weight_map:
            result["weight"] = _weight_map(host["c_generative"], host["c_contrastive"])
        return result


# ---------------------------------------------------------------------------------------------
# PyTorch (reference)


class TorchBackend(Backend):
    """Reference backend: two fine-tuned checkpoints (``GEN,CON``) -> FusedSegmenter, or one
    checkpoint -> that single TransUNet."""

    name = "torch"

    def __init__(self, model_path: str | Path | tuple | list, *, device: str = "cpu", fusion: dict | None = None):
        import torch

        self._torch = torch
        paths = _split_paths(model_path)
        self.device = device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ToolchainUnavailable(f"device {device!r} asked for, but no CUDA GPU is visible")
        if len(paths) == 2:
            from ..export.fused import load_fused

            model = load_fused(paths[0], paths[1], return_branches=True, **(fusion or {}))
            self.has_weight_map = True
            self.card = {"preset": model.generative.cfg.name, "fusion": model.fusion_settings}
            self.img_size = int(model.img_size)
            self._fused = True
        elif len(paths) == 1:
            from ..models.weights import build_segmenter

            model, card = build_segmenter(paths[0])
            self.card = {"preset": card.get("preset"), "stage": card.get("stage")}
            self.img_size = int(model.cfg.img_size)
            self._fused = False
        else:
            raise CheckpointError(f"{model_path}: the torch backend takes one checkpoint or two (GEN,CON)")
        self.model = model.eval().to(device)
        self.precision = "fp32"
        self._counted: float | None = None

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if self._fused:
                fused, _, _, c_g, c_c = self.model(x)
                return {"prob": fused.float().cpu().numpy(), "weight": _weight_map(c_g.float().cpu().numpy(), c_c.float().cpu().numpy())}
            return {"prob": self.model.predict(x).float().cpu().numpy()}

    @property
    def gflops_per_frame(self) -> float | None:
        if self._counted is None:
            from ..models.flops import count_flops

            self._counted = count_flops(self.model, (1, 3, self.img_size, self.img_size)) / 1e9
        return self._counted


def _split_paths(model_path) -> list[Path]:
    if isinstance(model_path, (list, tuple)):
        return [Path(p) for p in model_path]
    return [Path(p) for p in str(model_path).split(",") if p]


def open_backend(model_path: str | os.PathLike | tuple, backend: str = "ort", *, device: str = "cpu", threads: int | None = None) -> Backend:
    """Open ``model_path`` with the named backend (``ort``: .onnx; ``tensorrt``: an engine;
    ``torch``: one or two (``GEN,CON``) safetensors checkpoints)."""
    if backend == "ort":
        return OrtBackend(model_path, device=device, threads=threads)
    if backend == "tensorrt":
        return TensorRTBackend(model_path, device=device if device != "cpu" else "cuda")
    if backend == "torch":
        return TorchBackend(model_path, device=device)
    raise PocusError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
