"""The formats `pocus-edge benchmark` measures, one :class:`FormatSpec` each.

A spec says whether its toolchain is present here (``check`` returns a skip reason or None)
and how to turn the fp32 exportable model (the :class:`~pocus_edge.models.fused.FusedSegmenter`,
or a compact student's :class:`~pocus_edge.models.fused.SingleSegmenter`) into something that
runs (``prepare`` returns a :class:`Prepared`). :data:`FORMATS` are the teacher's rows,
:data:`STUDENT_FORMATS` a student's: the same exported formats, its own eager PyTorch rows, no
two-model baseline.

The exported rows (ONNX, OpenVINO, TensorRT, Core ML) are built from the export package's
artifact table (:data:`pocus_edge.export.formats.ARTIFACTS`, every row marked ``benchmarked``),
not from a list of their own: each is built by ``export_model`` with the same steps and graphs as
``pocus-edge export`` (the TensorRT rows by the same strongly typed builder) and opened by the
inference backend the table names (:func:`pocus_edge.inference.open_backend`). Adding a format is
one row in that table plus, for a new kind of artifact, one row in the inference registry
(:data:`pocus_edge.inference.REGISTRY`); nothing here changes. The runner owns timing, accuracy
and error handling, so a spec holds no measurement code and a failing spec cannot take the
others down. torch is imported only by the formats that use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .machine import native_bf16_cpu

if TYPE_CHECKING:
    from ..export.formats import ArtifactFormat

# Mask Dice agreement with the fp32 PyTorch reference that each precision must reach for its
# row to count as ok: fp32 formats differ from the reference only by summation order; bf16/fp16
# round every activation to 8/11 significant bits; int8 quantizes weights and activations.
AGREEMENT_BARS = {"fp32": 0.99, "bf16": 0.95, "fp16": 0.95, "int8": 0.90, "unknown": 0.90}


@dataclass
class BenchContext:
    """What every format's ``prepare`` may use."""

    fused: Any  # the exportable model (FusedSegmenter, or a student's SingleSegmenter), fp32, eval mode, on ``device``; None for an artifact benchmark
    device: Any  # torch.device, or anything with ``.type`` ("cpu") when torch is absent
    img_size: int
    workdir: Path  # artifacts (ONNX files, engines) go here
    calibration: np.ndarray  # float32 (N,3,S,S) frames for int8 calibration
    checkpoints: tuple[Path, ...] | None = None  # the safetensors file(s) the model came from, when given
    max_batch: int = 64
    threads: int | None = None
    compile_mode: str | None = None  # torch.compile mode; None = the device's default
    compile_backend: str = "inductor"  # "aot_eager" traces without code generation (tests)
    cache: dict[str, Any] = field(default_factory=dict)  # artifacts shared between formats
    providers: list[str] | None = None  # onnxruntime execution providers for the ort rows
    artifact: Path | None = None  # an exported model benchmarked as is (``--model``)
    label: str = "fused"  # file-name prefix of this model's artifacts in ``workdir`` (one per model)


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


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _state_bytes(*modules) -> int:
    """Bytes of the weights a deployment ships (parameters and buffers), as stored now."""
    total = 0
    for module in modules:
        for tensor in module.state_dict().values():
            total += tensor.numel() * tensor.element_size()
    return total


def _checkpoint_bytes(ctx: BenchContext) -> int:
    """The safetensors file(s) when given, else the weights' in-memory size (random init)."""
    if ctx.checkpoints:
        return sum(Path(p).stat().st_size for p in ctx.checkpoints)
    return _state_bytes(*ctx.fused.networks())


def _torch_io(ctx: BenchContext) -> tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    import torch

    def to_input(frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).to(ctx.device)

    def to_numpy(out: torch.Tensor) -> np.ndarray:
        return out.detach().float().cpu().numpy()

    return to_input, to_numpy


def _autocast(ctx: BenchContext, dtype_name: str | None):
    if dtype_name is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=ctx.device.type, dtype=getattr(torch, dtype_name))


def _eager_two_model(ctx: BenchContext) -> Prepared:
    """The paper's way: two separate networks, sigmoid, then fusion in Python."""
    import torch

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


def fold_weight_standardization(model):
    """Replace every timm ``StdConv2d`` by a plain ``Conv2d`` holding its standardized weight.

    A StdConv2d re-standardizes its weight (a batch-norm over each filter) on every call: pure
    overhead at inference, about a sixth of the paper preset's fp32 CPU time, and it keeps the
    weights fp32. Folded, the weights can be stored in bf16/fp16 once instead of being cast by
    autocast on every call. In place; returns ``model``."""
    import torch
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


def inference_copy(model, dtype_name: str | None, *, channels_last: bool):
    """A deployment-style copy of the fused module: weight standardization folded, convolution and
    linear weights stored in ``dtype`` (norms stay fp32; autocast picks the op precisions), NHWC
    layout on request. The shared fp32 module stays untouched: it is the paper's baseline."""
    import copy

    import torch

    prepared = fold_weight_standardization(copy.deepcopy(model))
    if dtype_name is not None:
        for module in prepared.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.to(getattr(torch, dtype_name) if isinstance(dtype_name, str) else dtype_name)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    return prepared.eval()


def _fused_eager(dtype: str | None, *, optimized: bool = False) -> Callable[[BenchContext], Prepared]:
    """The FusedSegmenter in eager PyTorch, optionally under autocast. ``optimized`` runs an
    :func:`inference_copy` (folded weight standardization, weights pre-cast to ``dtype``, and on
    CPU the NHWC layout that oneDNN's convolutions prefer)."""

    def prepare(ctx: BenchContext) -> Prepared:
        import torch

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


def _compiled(dtype: str | None) -> Callable[[BenchContext], Prepared]:
    """torch.compile of the fused module (static shapes: one compilation per batch size).

    CUDA: mode "reduce-overhead" by default, i.e. CUDA graphs, one launch per batch instead of
    hundreds of kernels. CPU: the inductor default with weight freezing, which constant-folds the
    weight standardization of every StdConv and lets oneDNN pre-pack the weights. Compilation
    happens in the runner's warm-up calls, which are timed separately from the runs."""

    def prepare(ctx: BenchContext) -> Prepared:
        import torch
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
        import torch

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
# Exported formats: built by export_model from the shared artifact table, run by pocus_edge.inference


def _onnx_fp32_path(ctx: BenchContext) -> Path:
    """Export the fp32 ONNX once per benchmark; the other exported formats derive from it."""
    if "onnx-fp32" not in ctx.cache:
        from ..export.onnx import export_onnx

        fused_cpu = ctx.fused if ctx.device.type == "cpu" else _cpu_copy(ctx.fused)
        ctx.cache["onnx-fp32"] = export_onnx(fused_cpu, ctx.workdir / f"{ctx.label}-fp32.onnx", batch=None, max_batch=ctx.max_batch)
    return ctx.cache["onnx-fp32"]


def _cpu_copy(model):
    import copy

    return copy.deepcopy(model).to("cpu")


def _file_bytes(path: Path) -> int:
    """An artifact plus the files that travel with it (external data, OpenVINO weights)."""
    from ..export.staging import companions

    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size + sum(c.stat().st_size for c in companions(path) if c.suffix != ".json")


def _backend_prepared(backend, path: Path) -> Prepared:
    def to_input(frames: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(frames, dtype=np.float32)

    def to_numpy(out: np.ndarray) -> np.ndarray:
        return np.asarray(out, dtype=np.float32)

    return Prepared(backend.infer, to_input, to_numpy, _file_bytes(path), close=getattr(backend, "close", None))


def _exported(spec: ArtifactFormat) -> Callable[[BenchContext], Prepared]:
    """Build the table's artifact with export_model (no parity step: the runner measures
    agreement itself) and open it with the inference backend the table names."""

    def prepare(ctx: BenchContext) -> Prepared:
        from ..export.api import ExportOptions, export_model
        from ..inference import accepts, open_backend

        fp32 = _onnx_fp32_path(ctx) if spec.graph is not None else None
        if spec.target == "onnx" and spec.precision == "fp32":
            path = fp32
        else:
            options = ExportOptions(target=spec.target, precision=spec.precision, calibration_frames=ctx.calibration,
                                    parity_frames=0, batch=None, max_batch=ctx.max_batch, fp32_onnx=fp32)
            fused_cpu = ctx.fused if ctx.device.type == "cpu" else _cpu_copy(ctx.fused)
            path = export_model(fused_cpu, ctx.workdir / f"{ctx.label}-{spec.target}-{spec.precision}{spec.suffix}", options).artifact
        kwargs: dict[str, Any] = {"device": str(ctx.device), "threads": ctx.threads}
        if ctx.providers and accepts(spec.backend, "providers"):
            kwargs["providers"] = ctx.providers
        return _backend_prepared(open_backend(path, spec.backend, **kwargs), path)

    return prepare


def _check_exported(spec: ArtifactFormat) -> Callable[[BenchContext], str | None]:
    def check(ctx: BenchContext) -> str | None:
        if spec.target == "coreml" and platform.system() != "Darwin":  # answered without importing coremltools (noisy off macOS)
            return f"Core ML prediction needs macOS (this is {platform.system()}); coremltools only converts here"
        missing = spec.missing()
        if missing:
            return f"{missing} (pip install 'pocus-edge[{spec.target}]')" if spec.target != "onnx" else missing
        if spec.graph is not None and importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        if spec.backend == "ort":
            wanted = ctx.providers or (["cuda"] if ctx.device.type == "cuda" else ["cpu"])
            from ..inference import ORT_PROVIDERS

            names = [ORT_PROVIDERS.get(p.lower(), p) for p in wanted]
            absent = [n for n in names if n not in _ort_providers()]
            if absent:
                return f"onnxruntime here has no {', '.join(absent)} (available: {', '.join(_ort_providers())})"
        if spec.target == "tensorrt":
            from ..export.tensorrt import tensorrt_available

            ok, why = tensorrt_available()
            if not ok:
                return why
            if ctx.device.type != "cuda":
                return "TensorRT rows run with --device cuda"
        if spec.target == "openvino" and ctx.device.type == "cuda":
            return "OpenVINO rows run on the CPU (--device cpu)"
        if spec.precision == "bf16" and ctx.device.type == "cpu" and not native_bf16_cpu():
            return "CPU lacks native bf16 (avx512_bf16 / amx_bf16): OpenVINO would emulate it"
        if spec.target == "coreml":
            from ..export.coreml import coremltools_status

            importable, can_predict, message = coremltools_status()
            return None if (importable and can_predict) else message
        return None

    return check


def _ort_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


# ---------------------------------------------------------------------------------------------
# The registry, in the order rows are printed. The first is the paper's way: the baseline that
# speed ratios are taken against and whose fp32 masks are the agreement reference. The exported
# rows follow, one per benchmarked row of the artifact table, in its order.

BASELINE = "eager-2model"


def _exported_specs() -> list[FormatSpec]:
    from ..export.formats import ARTIFACTS
    from ..inference import backend_spec

    return [FormatSpec(spec.name, spec.precision, backend_spec(spec.backend).engine, spec.summary, _check_exported(spec), _exported(spec))
            for spec in ARTIFACTS.values() if spec.benchmarked]


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec(BASELINE, "fp32", "torch", "two separate networks + Python fusion (the paper's way)", _always, _eager_two_model),
        FormatSpec("fused-fp32", "fp32", "torch", "FusedSegmenter, one module", _always, _fused_eager(None)),
        FormatSpec("fused-bf16", "bf16", "torch", "FusedSegmenter, bf16 weights + autocast, folded weight standardization (NHWC on CPU)", _check_bf16, _fused_eager("bfloat16", optimized=True)),
        FormatSpec("fused-fp16", "fp16", "torch", "FusedSegmenter, fp16 weights + autocast, folded weight standardization", _check_fp16_torch, _fused_eager("float16", optimized=True)),
        FormatSpec("compile-fp32", "fp32", "torch.compile", "torch.compile of the folded FusedSegmenter (CUDA graphs on CUDA, frozen weights on CPU)", _compiler_reason, _compiled(None)),
        FormatSpec("compile-bf16", "bf16", "torch.compile", "as compile-fp32, bf16 weights + autocast", _check_compile_bf16, _compiled("bfloat16")),
        *_exported_specs(),
    )
}


# A compact student's rows: its eager PyTorch forms (named torch-*, as "fused" would be wrong),
# torch.compile, and every exported format of the teacher's table. Its own torch-fp32 output is
# the agreement reference; there is no two-model baseline.
STUDENT_BASELINE = "torch-fp32"
_STUDENT_EAGER = {
    "fused-fp32": (STUDENT_BASELINE, "the student in eager PyTorch (reparameterized inference form)"),
    "fused-bf16": ("torch-bf16", "the student, bf16 weights + autocast (NHWC on CPU)"),
    "fused-fp16": ("torch-fp16", "the student, fp16 weights + autocast"),
}
STUDENT_FORMATS: dict[str, FormatSpec] = {}
for _spec in FORMATS.values():
    if _spec.name == BASELINE:
        continue
    if _spec.name in _STUDENT_EAGER:
        _name, _summary = _STUDENT_EAGER[_spec.name]
        _spec = dataclasses.replace(_spec, name=_name, summary=_summary)
    elif _spec.engine == "torch.compile":
        _spec = dataclasses.replace(_spec, summary=_spec.summary.replace("the folded FusedSegmenter", "the student"))
    STUDENT_FORMATS[_spec.name] = _spec
del _spec


def resolve_formats(names: list[str] | None, registry: dict[str, FormatSpec] | None = None) -> list[FormatSpec]:
    """The specs of ``registry`` (default: the teacher's :data:`FORMATS`) for ``names``
    (None/empty = all, registry order); names known to neither registry raise ConfigError,
    names of the other registry are left out."""
    from ..errors import ConfigError

    registry = FORMATS if registry is None else registry
    if not names:
        return list(registry.values())
    known = {**FORMATS, **STUDENT_FORMATS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [registry[n] for n in registry if n in names]
