"""The formats `pocus-edge benchmark` measures, one :class:`FormatSpec` each.

A spec says whether its toolchain is present here (``check`` returns a skip reason or None)
and how to turn the fp32 :class:`~pocus_edge.export.fused.FusedSegmenter` into something that
runs (``prepare`` returns a :class:`Prepared`: build the artifact with the export package, open it
with the runtime package). The runner owns timing, accuracy and error handling, so a spec holds
no measurement code and a failing spec cannot take the others down.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .machine import native_bf16_cpu

# Mask Dice agreement with the fp32 PyTorch reference that each precision must reach for its
# row to count as ok: fp32 formats differ from the reference only by summation order; bf16/fp16
# round every activation to 8/11 significant bits; int8 quantizes weights and activations.
AGREEMENT_BARS = {"fp32": 0.99, "bf16": 0.95, "fp16": 0.95, "int8": 0.90}


@dataclass
class BenchContext:
    """What every format's ``prepare`` may use."""

    fused: torch.nn.Module  # FusedSegmenter, fp32, eval mode, on ``device``
    device: torch.device
    img_size: int
    workdir: Path  # artifacts (ONNX files, engines) go here
    calibration: np.ndarray  # float32 (N,3,S,S) frames for int8 calibration
    checkpoints: tuple[Path, Path] | None = None  # the two safetensors files, when given
    max_batch: int = 64
    threads: int | None = None
    compile_mode: str | None = None  # torch.compile mode; None = the device's default
    compile_backend: str = "inductor"  # "aot_eager" traces without code generation (tests)
    cache: dict[str, Any] = field(default_factory=dict)  # artifacts shared between formats


@dataclass
class Prepared:
    """A ready-to-run format. ``infer`` is what gets timed: native input -> native output,
    finished (CUDA synchronized). ``to_input``/``to_numpy`` convert outside the timed region."""

    infer: Callable[[Any], Any]
    to_input: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    artifact_bytes: int | None
    close: Callable[[], None] | None = None


@dataclass(frozen=True)
class FormatSpec:
    name: str
    precision: str
    engine: str
    summary: str
    check: Callable[[BenchContext], str | None]
    prepare: Callable[[BenchContext], Prepared]

    @property
    def agreement_bar(self) -> float:
        return AGREEMENT_BARS[self.precision]


# ---------------------------------------------------------------------------------------------
# PyTorch formats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the weights a deployment ships (parameters and buffers), as stored now."""
    total = 0
    for module in modules:
        for tensor in module.state_dict().values():
            total += tensor.numel() * tensor.element_size()
    return total


def _checkpoint_bytes(ctx: BenchContext) -> int:
    """The two safetensors files when given, else the weights' in-memory size (random init)."""
    if ctx.checkpoints:
        return sum(Path(p).stat().st_size for p in ctx.checkpoints)
    return _state_bytes(ctx.fused.generative, ctx.fused.contrastive)


def _torch_io(ctx: BenchContext) -> tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    def to_input(frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).to(ctx.device)

    def to_numpy(out: torch.Tensor) -> np.ndarray:
        return out.detach().float().cpu().numpy()

    return to_input, to_numpy


def _autocast(ctx: BenchContext, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=dtype)


def _eager_two_model(ctx: BenchContext) -> Prepared:
    """The paper's way: two separate networks, sigmoid, then fusion in Python."""
    from ..models.fusion import fuse

    fused = ctx.fused
    generative, contrastive = fused.generative, fused.contrastive
    fusion = dict(method=fused.method, norm=fused.norm, formula=fused.formula)

    def infer(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            p_generative = torch.sigmoid(generative(x))
            p_contrastive = torch.sigmoid(contrastive(x))
            out = fuse(p_generative, p_contrastive, **fusion)
        _sync(ctx.device)
        return out

    to_input, to_numpy = _torch_io(ctx)
    return Prepared(infer, to_input, to_numpy, _checkpoint_bytes(ctx))


def fold_weight_standardization(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every timm ``StdConv2d`` by a plain ``Conv2d`` holding its standardized weight.

    A StdConv2d re-standardizes its weight (a batch-norm over each filter) on every call: pure
    overhead at inference, about a sixth of the paper preset's fp32 CPU time, and it keeps the
    weights fp32. Folded, the weights can be stored in bf16/fp16 once instead of being cast by
    autocast on every call. In place; returns ``model``."""
    import torch.nn.functional as F
    from timm.layers import StdConv2d

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not StdConv2d:
                continue
            with torch.no_grad():
                # The same expression as StdConv2d.forward, evaluated once.
                weight = F.batch_norm(
                    child.weight.reshape(1, child.out_channels, -1), None, None, training=True, momentum=0.0, eps=child.eps
                ).reshape_as(child.weight)
                conv = torch.nn.Conv2d(
                    child.in_channels, child.out_channels, child.kernel_size, stride=child.stride, padding=child.padding,
                    dilation=child.dilation, groups=child.groups, bias=child.bias is not None, padding_mode=child.padding_mode,
                ).to(device=weight.device, dtype=weight.dtype)
                conv.weight.copy_(weight)
                if child.bias is not None:
                    conv.bias.copy_(child.bias)
            setattr(parent, name, conv)
    return model


def inference_copy(model: torch.nn.Module, dtype: torch.dtype | None, *, channels_last: bool) -> torch.nn.Module:
    """A deployment-style copy of the fused module: weight standardization folded, convolution and
    linear weights stored in ``dtype`` (norms stay fp32; autocast picks the op precisions), NHWC
    layout on request. The shared fp32 module stays untouched: it is the paper's baseline."""
    import copy

    prepared = fold_weight_standardization(copy.deepcopy(model))
    if dtype is not None:
        for module in prepared.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.to(dtype)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    return prepared.eval()


def _fused_eager(dtype: torch.dtype | None, *, optimized: bool = False) -> Callable[[BenchContext], Prepared]:
    """The FusedSegmenter in eager PyTorch, optionally under autocast. ``optimized`` runs an
    :func:`inference_copy` (folded weight standardization, weights pre-cast to ``dtype``, and on
    CPU the NHWC layout that oneDNN's convolutions prefer)."""

    def prepare(ctx: BenchContext) -> Prepared:
        model = ctx.fused
        nhwc = optimized and ctx.device.type == "cpu"
        size = _checkpoint_bytes(ctx)
        if optimized:
            model = inference_copy(model, dtype, channels_last=nhwc)
            size = _state_bytes(model)  # what this format holds: reduced-precision weights

        def infer(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), _autocast(ctx, dtype):
                out = model(x)
            _sync(ctx.device)
            return out.float()

        to_input, to_numpy = _torch_io(ctx)
        if nhwc:
            plain_input = to_input

            def to_input(frames: np.ndarray) -> torch.Tensor:
                return plain_input(frames).contiguous(memory_format=torch.channels_last)

        return Prepared(infer, to_input, to_numpy, size)

    return prepare


def _compiled(dtype: torch.dtype | None) -> Callable[[BenchContext], Prepared]:
    """torch.compile of the fused module (static shapes: one compilation per batch size).

    CUDA: mode "reduce-overhead" by default, i.e. CUDA graphs, one launch per batch instead of
    hundreds of kernels. CPU: the inductor default with weight freezing, which constant-folds the
    weight standardization of every StdConv and lets oneDNN pre-pack the weights. Compilation
    happens in the runner's warm-up calls, which are timed separately from the runs."""

    def prepare(ctx: BenchContext) -> Prepared:
        import torch._inductor.config as inductor_config

        # Folded weight standardization and pre-cast weights: on CUDA (no freezing) this saves
        # re-standardizing and casting 2 x 105 M weights on every call.
        model = inference_copy(ctx.fused, dtype, channels_last=False)
        cuda = ctx.device.type == "cuda"
        mode = ctx.compile_mode or ("reduce-overhead" if cuda else "default")
        graphs = cuda and mode == "reduce-overhead"

        def forward(x: torch.Tensor) -> torch.Tensor:
            with _autocast(ctx, dtype):
                return model(x).float()

        if ctx.compile_backend == "inductor":
            compiled = torch.compile(forward, mode=mode, dynamic=False)
        else:  # modes are inductor options; other backends take none
            compiled = torch.compile(forward, backend=ctx.compile_backend, dynamic=False)

        def infer(x: torch.Tensor) -> torch.Tensor:
            # Freezing is read when a graph is compiled (the first call per batch size).
            with torch.inference_mode(), inductor_config.patch(freezing=not cuda):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = compiled(x)
                if graphs:
                    out = out.clone()  # a CUDA graph's output is overwritten by its next replay
            _sync(ctx.device)
            return out

        to_input, to_numpy = _torch_io(ctx)
        return Prepared(infer, to_input, to_numpy, _state_bytes(model), close=torch._dynamo.reset)

    return prepare


def _always(ctx: BenchContext) -> str | None:
    return None


def _check_bf16(ctx: BenchContext) -> str | None:
    if ctx.device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support"
    if ctx.device.type == "cpu" and not native_bf16_cpu():
        return "CPU lacks native bf16 (avx512_bf16 / amx_bf16 / Arm bf16): it would be emulated, slower than fp32"
    return None


def _check_fp16_torch(ctx: BenchContext) -> str | None:
    if ctx.device.type != "cuda":
        return "PyTorch fp16 autocast is a CUDA path; on CPU see onnx-fp16"
    return None


def _compiler_reason(ctx: BenchContext) -> str | None:
    if ctx.device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton, which is not installed"
        return None
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++/clang++), none on PATH"
    return None


def _check_compile_bf16(ctx: BenchContext) -> str | None:
    return _compiler_reason(ctx) or _check_bf16(ctx)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime formats (artifacts from pocus_edge.export, sessions from pocus_edge.runtime)


def _ort_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _check_ort(ctx: BenchContext) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    if ctx.device.type == "cuda" and "CUDAExecutionProvider" not in _ort_providers():
        return "onnxruntime here has no CUDAExecutionProvider (CPU-only build); run with --device cpu for its CPU rows"
    return None


def _onnx_fp32_path(ctx: BenchContext) -> Path:
    """Export the fp32 ONNX once per benchmark; the fp16 and int8 formats derive from it."""
    if "onnx-fp32" not in ctx.cache:
        from ..export.onnx import export_onnx

        fused_cpu = ctx.fused if ctx.device.type == "cpu" else _cpu_copy(ctx.fused)
        ctx.cache["onnx-fp32"] = export_onnx(fused_cpu, ctx.workdir / "fused-fp32.onnx", max_batch=ctx.max_batch)
    return ctx.cache["onnx-fp32"]


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to("cpu")


def _onnx_artifact(precision: str) -> Callable[[BenchContext], Path]:
    def build(ctx: BenchContext) -> Path:
        src = _onnx_fp32_path(ctx)
        if precision == "fp32":
            return src
        if precision == "fp16":
            from ..export.quantize import convert_fp16

            return convert_fp16(src, ctx.workdir / "fused-fp16.onnx")
        from ..export.quantize import ArrayCalibrationReader, quantize_int8

        reader = ArrayCalibrationReader(ctx.calibration, source="benchmark frames")
        return quantize_int8(src, ctx.workdir / "fused-int8.onnx", reader)

    return build


def _file_bytes(path: Path) -> int:
    """An ONNX file plus its external-data sidecar files, if any."""
    path = Path(path)
    total = path.stat().st_size
    for sidecar in path.parent.glob(path.name + ".*data"):
        total += sidecar.stat().st_size
    return total


def _ort(precision: str) -> Callable[[BenchContext], Prepared]:
    build = _onnx_artifact(precision)

    def prepare(ctx: BenchContext) -> Prepared:
        from ..runtime.backends import open_backend

        path = build(ctx)
        backend = open_backend(path, "ort", device=ctx.device.type, threads=ctx.threads)

        def to_input(frames: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(frames, dtype=np.float32)

        def to_numpy(out: np.ndarray) -> np.ndarray:
            return np.asarray(out, dtype=np.float32)

        return Prepared(backend.infer, to_input, to_numpy, _file_bytes(path), close=getattr(backend, "close", None))

    return prepare


# ---------------------------------------------------------------------------------------------
# TensorRT and Core ML


def _check_tensorrt(ctx: BenchContext) -> str | None:
    from ..export.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        return why
    if ctx.device.type != "cuda":
        return "TensorRT rows run with --device cuda"
    return None


def _tensorrt(precision: str) -> Callable[[BenchContext], Prepared]:
    """An engine built from the fp32 ONNX export (int8: TensorRT's entropy calibrator on the
    benchmark frames), run by the runtime's TensorRT backend."""

    def prepare(ctx: BenchContext) -> Prepared:
        from ..export.tensorrt import build_engine
        from ..runtime.backends import open_backend

        src = _onnx_fp32_path(ctx)
        engine = build_engine(
            src,
            ctx.workdir / f"fused-{precision}.engine",
            precision=precision,
            max_batch=ctx.max_batch,
            calibration=ctx.calibration if precision == "int8" else None,
        )
        backend = open_backend(engine, "tensorrt", device=str(ctx.device))

        def to_input(frames: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(frames, dtype=np.float32)

        return Prepared(backend.infer, to_input, np.asarray, Path(engine).stat().st_size, close=getattr(backend, "close", None))

    return prepare


def _check_coreml(ctx: BenchContext) -> str | None:
    if platform.system() != "Darwin":  # answered without importing coremltools (noisy off macOS)
        return f"Core ML prediction needs macOS (this is {platform.system()}); coremltools only converts here"
    from ..export.coreml import coremltools_status

    importable, can_predict, message = coremltools_status()
    return None if (importable and can_predict) else message


def _coreml(ctx: BenchContext) -> Prepared:
    """The Core ML package (fp16 ML Program, grayscale image input of batch 1) predicted with
    coremltools on macOS; a batch is run frame by frame, as an app would."""
    import coremltools as ct
    from PIL import Image

    from ..export.coreml import INPUT_NAME, OUTPUT_NAME, export_coreml

    package = export_coreml(_cpu_copy(ctx.fused), ctx.workdir / "fused-fp16.mlpackage")
    model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.ALL)

    def to_input(frames: np.ndarray) -> list:
        gray = np.clip(np.rint(frames[:, 0] * 255.0), 0, 255).astype(np.uint8)
        return [Image.fromarray(g, mode="L") for g in gray]

    def infer(images: list) -> np.ndarray:
        return np.concatenate([np.asarray(model.predict({INPUT_NAME: im})[OUTPUT_NAME]) for im in images])

    size = sum(f.stat().st_size for f in Path(package).rglob("*") if f.is_file())
    return Prepared(infer, to_input, lambda out: np.asarray(out, dtype=np.float32), size)


# ---------------------------------------------------------------------------------------------
# The registry, in the order rows are printed. The first is the paper's way: the baseline that
# speed ratios are taken against and whose fp32 masks are the agreement reference.

BASELINE = "eager-2model"

FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec(BASELINE, "fp32", "torch", "two separate networks + Python fusion (the paper's way)", _always, _eager_two_model),
        FormatSpec("fused-fp32", "fp32", "torch", "FusedSegmenter, one module", _always, _fused_eager(None)),
        FormatSpec("fused-bf16", "bf16", "torch", "FusedSegmenter, bf16 weights + autocast, folded weight standardization (NHWC on CPU)", _check_bf16, _fused_eager(torch.bfloat16, optimized=True)),
        FormatSpec("fused-fp16", "fp16", "torch", "FusedSegmenter, fp16 weights + autocast, folded weight standardization", _check_fp16_torch, _fused_eager(torch.float16, optimized=True)),
        FormatSpec("compile-fp32", "fp32", "torch.compile", "torch.compile of the folded FusedSegmenter (CUDA graphs on CUDA, frozen weights on CPU)", _compiler_reason, _compiled(None)),
        FormatSpec("compile-bf16", "bf16", "torch.compile", "as compile-fp32, bf16 weights + autocast", _check_compile_bf16, _compiled(torch.bfloat16)),
        FormatSpec("onnx-fp32", "fp32", "onnxruntime", "ONNX export in onnxruntime", _check_ort, _ort("fp32")),
        FormatSpec("onnx-fp16", "fp16", "onnxruntime", "ONNX fp16 weights/activations in onnxruntime", _check_ort, _ort("fp16")),
        FormatSpec("onnx-int8", "int8", "onnxruntime", "ONNX static int8 (QDQ) in onnxruntime", _check_ort, _ort("int8")),
        FormatSpec("tensorrt-fp16", "fp16", "tensorrt", "TensorRT engine, fp16", _check_tensorrt, _tensorrt("fp16")),
        FormatSpec("tensorrt-int8", "int8", "tensorrt", "TensorRT engine, int8", _check_tensorrt, _tensorrt("int8")),
        FormatSpec("coreml-fp16", "fp16", "coreml", "Core ML package (Neural Engine / GPU / CPU)", _check_coreml, _coreml),
    )
}


def resolve_formats(names: list[str] | None) -> list[FormatSpec]:
    """The specs for ``names`` (None/empty = all, registry order); unknown names raise ConfigError."""
    from ..errors import ConfigError

    if not names:
        return list(FORMATS.values())
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return [FORMATS[n] for n in FORMATS if n in names]


def env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS")
    return int(value) if value and value.isdigit() else None
