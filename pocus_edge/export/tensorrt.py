"""TensorRT engines from the exported ONNX graph.

Two halves:

* Everywhere: ``check_tensorrt_ops`` checks every node of an ONNX file against the operator
  list of TensorRT's ONNX parser (kept below as data), and ``trtexec_command`` prints the
  equivalent command line, so a machine without TensorRT still tells the user whether the graph
  will parse and how to build it on the target.
* Where ``tensorrt`` (10.x or 11.x) imports and a CUDA GPU exists: ``build_engine`` parses the
  precision-explicit ONNX into a STRONGLY TYPED network (every layer runs at the type the graph
  gives it: fp16 from the mixed-precision graph, int8 from its Q/DQ nodes), adds an
  optimization profile over the batch range and a persistent timing cache, serializes the
  engine atomically and writes its model card next to it. No precision builder flag and no
  calibrator on either version: TensorRT 11 removed them, and on 10.x a strongly typed network
  does not accept them. Elsewhere it raises ToolchainUnavailable (exit code 3).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, ToolchainUnavailable
from ..io import atomic_path, write_bytes_atomic

# Operators TensorRT's ONNX parser supports ("Y" rows of the operator support matrix in
# onnx/onnx-tensorrt docs/operators.md for TensorRT 10.15, opsets 9..24; the release-10.x
# branch). Kept as data so the check runs without TensorRT installed.
TRT_ONNX_SOURCE = "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 (opset 9-24)"
TRT_MIN_OPSET, TRT_MAX_OPSET = 9, 24
TRT_SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
    Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
    Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
# Listed "N" in the same table (named in the report so users see it is a known gap, not a typo).
TRT_UNSUPPORTED_OPS = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im
    CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear
    ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial
    NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
    QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase
    SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """.split()
)
_STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class OpIssue:
    node: str
    op_type: str
    domain: str
    reason: str


def check_tensorrt_ops(onnx_path_or_proto) -> dict[str, Any]:
    """Check every node (subgraphs included) against TensorRT's ONNX parser.

    Returns ``{"compatible": bool, "issues": [OpIssue as dict], "op_counts": {...},
    "source": TRT_ONNX_SOURCE}``. Besides the op list it checks the documented restrictions that
    bite exported segmenters: Q/DQ zero points must be 0, Resize without antialiasing, opset range.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx_path_or_proto
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load_model(str(onnx_path_or_proto), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    issues: list[OpIssue] = []
    counts: dict[str, int] = {}
    opset = next((o.version for o in proto.opset_import if o.domain in _STANDARD_DOMAINS), None)
    if opset is not None and not (TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET):
        issues.append(OpIssue("<model>", "", "", f"opset {opset} outside TensorRT's {TRT_MIN_OPSET}..{TRT_MAX_OPSET}"))

    def zero_point_nonzero(name: str) -> bool:
        t = inits.get(name)
        return t is not None and bool((numpy_helper.to_array(t) != 0).any())

    def visit(graph) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            label = node.name or f"<unnamed {node.op_type}>"
            if node.domain not in _STANDARD_DOMAINS:
                issues.append(OpIssue(label, node.op_type, node.domain, f"custom domain {node.domain!r} needs a TensorRT plugin"))
            elif node.op_type not in TRT_SUPPORTED_OPS:
                why = "listed unsupported" if node.op_type in TRT_UNSUPPORTED_OPS else "not in the parser's operator list"
                issues.append(OpIssue(label, node.op_type, node.domain, why))
            elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and zero_point_nonzero(node.input[2]):
                issues.append(OpIssue(label, node.op_type, node.domain, "non-zero zero point (TensorRT needs symmetric quantization)"))
            elif node.op_type == "Resize":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                if attrs.get("antialias", 0):
                    issues.append(OpIssue(label, node.op_type, node.domain, "antialiased Resize is unsupported"))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(proto.graph)
    return {
        "compatible": not issues,
        "issues": [issue.__dict__ for issue in issues],
        "op_counts": dict(sorted(counts.items())),
        "source": TRT_ONNX_SOURCE,
    }


def describe_op_issues(report: dict[str, Any], limit: int = 5) -> str:
    """One line: which ops TensorRT would reject."""
    if report["compatible"]:
        return f"all {sum(report['op_counts'].values())} nodes are supported by TensorRT's ONNX parser ({report['source']})"
    shown = "; ".join(f"{i['op_type'] or 'model'} ({i['node']}): {i['reason']}" for i in report["issues"][:limit])
    more = f" (+{len(report['issues']) - limit} more)" if len(report["issues"]) > limit else ""
    return f"{len(report['issues'])} node(s) TensorRT cannot parse: {shown}{more}"


def _shape(batch: int, rest: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in (batch, *rest))


def batch_profile(batch: int | None, max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimization profile: fixed batch -> all equal; dynamic ->
    1..max_batch, tuned for the streaming case (batch 1)."""
    if batch is not None:
        return batch, batch, batch
    return 1, 1, max_batch


# TensorRT major versions this builder supports. Both build strongly typed networks; they differ
# only in how that is asked for.
SUPPORTED_MAJORS = (10, 11)


@dataclass(frozen=True)
class BuildPlan:
    """How to ask a given TensorRT for a strongly typed build."""

    version: str
    major: int
    strongly_typed_flag: bool  # pass NetworkDefinitionCreationFlag.STRONGLY_TYPED to create_network
    trtexec_flags: tuple[str, ...]


def build_plan(version: str) -> BuildPlan:
    """The strongly typed build for TensorRT ``version``: 10.x opts in with the STRONGLY_TYPED
    network flag (``--stronglyTyped`` for trtexec); 11.x is always strongly typed and takes no
    flag. Other majors raise ToolchainUnavailable naming the supported range."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ToolchainUnavailable(f"cannot read the TensorRT version {version!r}") from None
    if major not in SUPPORTED_MAJORS:
        raise ToolchainUnavailable(
            f"TensorRT {version} is not supported: pocus-edge builds with TensorRT 10.x or 11.x (pip install 'pocus-edge[tensorrt]')"
        )
    if major == 10:
        return BuildPlan(str(version), major, True, ("--stronglyTyped",))
    return BuildPlan(str(version), major, False, ())


def network_flags(trt, plan: BuildPlan) -> int:
    """The ``create_network`` flags of ``plan`` with the installed module's enum."""
    if plan.strongly_typed_flag:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def installed_tensorrt_version() -> str | None:
    """The importable TensorRT's version (None when it is not installed)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    input_name: str,
    input_shape: tuple[int, ...],
    batch: int | None = None,
    max_batch: int = 8,
    timing_cache: str | os.PathLike | None = None,
    tensorrt_version: str = "10",
) -> str:
    """The ``trtexec`` line that builds the same engine with TensorRT ``tensorrt_version``: the
    precision comes from the ONNX (no --fp16/--int8, which 11.x removed)."""
    plan = build_plan(tensorrt_version)
    lo, opt, hi = batch_profile(batch, max_batch)
    rest = tuple(input_shape[1:])
    parts = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        *plan.trtexec_flags,
        f"--minShapes={input_name}:{_shape(lo, rest)}",
        f"--optShapes={input_name}:{_shape(opt, rest)}",
        f"--maxShapes={input_name}:{_shape(hi, rest)}",
    ]
    if timing_cache is not None:
        parts.append(f"--timingCacheFile={timing_cache}")
    return " ".join(parts)


def trtexec_lines(onnx_path, engine_path, **kwargs: Any) -> list[str]:
    """The trtexec line for the installed TensorRT; without one, the lines for 10.x and 11.x."""
    installed = installed_tensorrt_version()
    if installed is not None:
        with contextlib.suppress(ToolchainUnavailable):
            return [f"trtexec equivalent (TensorRT {installed}): {trtexec_command(onnx_path, engine_path, tensorrt_version=installed, **kwargs)}"]
    return [f"trtexec equivalent (TensorRT {major}.x): {trtexec_command(onnx_path, engine_path, tensorrt_version=str(major), **kwargs)}"
            for major in SUPPORTED_MAJORS]


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) where a supported ``tensorrt`` imports and a CUDA GPU is visible, else (False, why)."""
    version = installed_tensorrt_version()
    if version is None:
        return False, "the tensorrt Python package is not installed; pip install 'pocus-edge[tensorrt]' on a machine with an NVIDIA GPU"
    try:
        build_plan(version)
    except ToolchainUnavailable as exc:
        return False, str(exc)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        return False, "no CUDA GPU visible (TensorRT builds engines for the GPU it runs on)"
    return True, version


def _onnx_input(onnx_path) -> tuple[str, tuple[int, ...]]:
    """Name and (1, C, H, W) shape of the graph's single input (symbolic batch read as 1)."""
    from .onnx import onnx_io

    first = onnx_io(onnx_path)["inputs"][0]
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in first["shape"]]
    return first["name"], (1, *dims[1:])


def engine_card(card: dict[str, Any] | None, engine_path: str | os.PathLike, *, tensorrt_version: str,
                gpu: dict[str, Any] | None, batch: int | None, max_batch: int) -> dict[str, Any]:
    """The card an engine carries in its sidecar: the precision-explicit ONNX's card (precision,
    GFLOPs, input spec, fusion settings, provenance of both branches) plus what the engine is
    bound to: the TensorRT version and GPU it was built on, its batch profile and its file hash."""
    from ..card import file_sha256

    lo, opt, hi = batch_profile(batch, max_batch)
    out = dict(card or {})
    out["batch"] = {"dynamic": batch is None, "size": batch, "max": hi, "profile": [lo, opt, hi]}
    out["tensorrt"] = {"version": tensorrt_version, "strongly_typed": True, "gpu": gpu}
    out["artifact"] = {"file": Path(engine_path).name, "sha256": file_sha256(engine_path),
                       "bytes": Path(engine_path).stat().st_size}
    return out


def _gpu_description() -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}"}


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    batch: int | None = None,
    max_batch: int = 8,
    input_name: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: float = 4.0,
    card: dict[str, Any] | None = None,
) -> Path:
    """Build a strongly typed TensorRT engine from a precision-explicit ONNX (see the module
    docstring) and write it, then its model card (``<engine>.json``), atomically.

    The input name/shape default to the ONNX's; the timing cache is read from and written back
    to ``timing_cache`` so rebuilds on the same GPU are fast. ``card``: the ONNX's card (read
    from the file when not given).
    """
    ok, why = tensorrt_available()
    if not ok:
        raise ToolchainUnavailable(f"TensorRT engine not built: {why}")
    import tensorrt as trt

    from ..card import write_sidecar

    plan = build_plan(trt.__version__)
    if input_name is None or input_shape is None:
        found_name, found_shape = _onnx_input(onnx_path)
        input_name = input_name or found_name
        input_shape = input_shape or found_shape
    if card is None:
        from .onnx import read_onnx_card

        card = read_onnx_card(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data files relative to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    lo, opt, hi = batch_profile(batch, max_batch)
    rest = tuple(input_shape[1:])
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    timing = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(memoryview(serialized))
    if cache_path is not None:
        write_bytes_atomic(cache_path, memoryview(config.get_timing_cache().serialize()).tobytes())
    write_sidecar(engine_path, engine_card(card, engine_path, tensorrt_version=plan.version, gpu=_gpu_description(),
                                           batch=batch, max_batch=max_batch))
    return Path(engine_path)
