"""TensorRT engines from the exported ONNX graph.

Two halves:

* Everywhere: ``check_tensorrt_ops`` checks every node of an ONNX file against the operator
  list of TensorRT's ONNX parser (kept below as data), and ``trtexec_command`` prints the
  equivalent command line, so a machine without TensorRT still tells the user whether the graph
  will parse and how to build it on the target.
* Where ``tensorrt`` imports and a CUDA GPU exists: ``build_engine`` (TensorRT 10 Python API:
  builder, network from the ONNX parser, an optimization profile over the batch range, FP16 /
  INT8 flags, a persistent timing cache, the serialized engine written atomically).
  Elsewhere it raises ToolchainUnavailable (exit code 3).
"""

from __future__ import annotations

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


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    input_name: str,
    input_shape: tuple[int, ...],
    precision: str = "fp16",
    batch: int | None = None,
    max_batch: int = 8,
    timing_cache: str | os.PathLike | None = None,
) -> str:
    """The equivalent ``trtexec`` line (TensorRT 10) for building the engine elsewhere."""
    lo, opt, hi = batch_profile(batch, max_batch)
    rest = tuple(input_shape[1:])
    parts = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={input_name}:{_shape(lo, rest)}",
        f"--optShapes={input_name}:{_shape(opt, rest)}",
        f"--maxShapes={input_name}:{_shape(hi, rest)}",
    ]
    if precision in ("fp16", "int8"):
        parts.append("--fp16")
    if precision == "int8":
        parts.append("--int8")  # the Q/DQ graph carries the scales (explicit quantization)
    if timing_cache is not None:
        parts.append(f"--timingCacheFile={timing_cache}")
    return " ".join(parts)


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) where ``tensorrt`` imports and a CUDA GPU is visible, else (False, why)."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        return False, f"the tensorrt Python package is not installed ({exc.__class__.__name__}); pip install 'pocus-edge[tensorrt]' on a machine with an NVIDIA GPU"
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_gpu = False
    if not has_gpu:
        return False, "no CUDA GPU visible (TensorRT builds engines for the GPU it runs on)"
    return True, trt.__version__


def _onnx_input(onnx_path) -> tuple[str, tuple[int, ...]]:
    """Name and (1, C, H, W) shape of the graph's single input (symbolic batch read as 1)."""
    from .onnx import onnx_io

    first = onnx_io(onnx_path)["inputs"][0]
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in first["shape"]]
    return first["name"], (1, *dims[1:])


def _has_qdq(onnx_path) -> bool:
    import onnx

    proto = onnx.load_model(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)


def _entropy_calibrator(trt, frames, batch_size: int, cache_path: Path | None):
    """TensorRT implicit-quantization calibrator over preprocessed frames (N, C, S, S) float32,
    used when int8 is asked for from an fp32 ONNX (no Q/DQ nodes). Device memory via torch."""
    import numpy as np
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.position = 0
            self.device_batch = None

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            if self.position + batch_size > len(frames):
                return None
            chunk = np.ascontiguousarray(frames[self.position : self.position + batch_size], dtype=np.float32)
            self.position += batch_size
            self.device_batch = torch.from_numpy(chunk).cuda()
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self):
            if cache_path is not None and cache_path.is_file():
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache) -> None:
            if cache_path is not None:
                write_bytes_atomic(cache_path, bytes(cache))

    return Calibrator()


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    batch: int | None = None,
    max_batch: int = 8,
    input_name: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: float = 4.0,
    calibration=None,
    calibration_cache: str | os.PathLike | None = None,
) -> Path:
    """Build and serialize a TensorRT engine from an ONNX export (TensorRT 10 Python API).

    ``precision``: fp32 | fp16 | int8. int8 from a Q/DQ-quantized ONNX uses explicit
    quantization (the scales come from the graph); int8 from an fp32 ONNX needs
    ``calibration`` (float32 frames (N, C, S, S) of the target site) for TensorRT's entropy
    calibrator. FP16 is enabled with int8 so unquantized layers run in half precision. The
    input name/shape default to the ONNX's; the timing cache is read from and written back to
    ``timing_cache`` so rebuilds on the same GPU are fast.
    """
    ok, why = tensorrt_available()
    if not ok:
        raise ToolchainUnavailable(f"TensorRT engine not built: {why}")
    import tensorrt as trt

    if input_name is None or input_shape is None:
        found_name, found_shape = _onnx_input(onnx_path)
        input_name = input_name or found_name
        input_shape = input_shape or found_shape
    explicit_int8 = precision == "int8" and _has_qdq(onnx_path)
    if precision == "int8" and not explicit_int8 and calibration is None:
        raise ExportError(f"{onnx_path}: int8 from an fp32 ONNX needs calibration frames (or pass the Q/DQ int8 ONNX)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data files relative to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    lo, opt, hi = batch_profile(batch, max_batch)
    rest = tuple(input_shape[1:])
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)
    if precision == "int8" and not explicit_int8:
        cache = Path(calibration_cache) if calibration_cache is not None else Path(str(engine_path) + ".calib.cache")
        config.int8_calibrator = _entropy_calibrator(trt, calibration, opt, cache)
        config.set_calibration_profile(profile)
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
    return Path(engine_path)
