"""Reduced-precision variants of an exported fp32 ONNX graph.

* fp16: onnxconverter-common's float16 pass with float32 graph inputs/outputs kept (the app
  feeds and reads float32 without casts of its own); the fusion tail (log-entropy confidence,
  min-max normalization, division) stays fp32 because fp16 rounding near p = 0/1 moves it.
* int8: onnxruntime's static quantizer, QDQ format, per-channel symmetric int8 weights,
  calibrated on UNLABELED frames of the target site: the method's own premise (target images
  are available, target labels are not), so the calibration reader never opens a mask.
  Only the matrix ops (Conv, MatMul, Gemm) are quantized; LayerNorm, Softmax, GELU (Erf), the
  sigmoid and the fusion tail stay fp32 (quantizing them costs accuracy and buys no speed on
  CPU, where the win is in the int8 GEMM/conv kernels).

The tail both passes keep fp32 is the graph's *output* end: the sigmoids that turn a network's
logit into its probability and every node after them (``output_tail``). A sigmoid inside a
network (a squeeze-excite gate, a SiLU) is followed by more convolutions and is not part of it,
so a student with sigmoid-gated blocks is quantized and converted like any other network.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .._compat import chdir
from ..errors import DataError, ExportError
from .onnx import CARD_KEY, check_onnx, read_onnx_card, save_onnx_atomic, set_card
from .staging import staging_dir

# Op types the int8 pass quantizes: where the time goes, and where int8 kernels exist.
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
# Op types kept out of fp16 wherever they occur (none: the output sigmoids, whose outputs feed
# the entropy confidence where fp16 rounds 1 - 1e-6 to 1 and log(0) turns into NaN, are kept
# fp32 by name as part of the output tail; sigmoids inside a network may run in fp16).
FP16_BLOCK_OPS: tuple[str, ...] = ()
# Ops after which a sigmoid is not the graph's output end (a learned layer still follows).
MATRIX_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# onnxconverter-common's warning for a tensor whose values it clamps into fp16's range.
_FP16_CLAMP_WARNING = "will be truncated to"


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike, *, keep_io_types: bool = True,
                 op_block_list: tuple[str, ...] | None = FP16_BLOCK_OPS) -> Path:
    """fp32 ONNX -> fp16 ONNX (weights and most activations fp16, I/O kept float32); the
    output sigmoids and every node after them (confidence, normalization, fusion) stay fp32."""
    import onnx
    from onnxconverter_common import float16

    proto = onnx.load_model(str(src))
    card = read_onnx_card(src)
    # The converter's default block list (ops without fp16 kernels in onnxruntime) plus ours.
    block = list(float16.DEFAULT_OP_BLOCK_LIST) + list(op_block_list or ())
    tail = _fusion_tail_nodes(proto)
    private = _private_tail_constants(proto, set(tail))
    relays = _relay_fp32_outputs(proto, set(tail), set(block))
    # The converter warns for every tensor holding values outside fp16's range, which it clamps
    # (its defaults: |x| < 1e-7 -> +-1e-7, |x| > 1e4 -> +-1e4): hundreds of lines on a real network. Count
    # them into the card (underflow is harmless; overflow would change results) instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            proto, keep_io_types=keep_io_types, op_block_list=block, node_block_list=tail
        )
    clamps = {"underflow": 0, "overflow": 0}
    for w in caught:
        text = str(w.message)
        if issubclass(w.category, UserWarning) and _FP16_CLAMP_WARNING in text:
            clamps["overflow" if _clamp_target(text) >= 1.0 else "underflow"] += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    _restore_fp32_constants(converted, private)
    _drop_relays(converted, relays)
    _drop_fp16_round_trips(converted)
    if keep_io_types:
        _fp32_outputs(converted)
    import onnxslim

    converted = onnxslim.slim(converted)  # folds the Identity nodes left by the bypass
    card = dict(card, precision="fp16", fp16={
        "keep_io_types": keep_io_types, "fp32_ops": sorted(set(op_block_list or ())), "fp32_tail_nodes": len(tail),
        "tensors_clamped": clamps,
    })
    set_card(converted, card)
    save_onnx_atomic(converted, dst)
    check_onnx(dst)
    return Path(dst)


def _clamp_target(message: str) -> float:
    """|value| a converter warning clamps to ("the float32 number X will be truncated to Y" -> |Y|)."""
    try:
        return abs(float(message.rsplit(_FP16_CLAMP_WARNING, 1)[1].strip()))
    except ValueError:
        return 0.0


def _private_tail_constants(proto, fp32_nodes: set[str]) -> set[str]:
    """Give the nodes that stay fp32 their own copies of the constants they read.

    onnxslim de-duplicates equal constants, so the fusion tail and the encoder may share one
    initializer (e.g. a 1.0); the float16 converter then leaves one of its two consumers with
    the wrong type. Private copies make the conversion consistent; returns the copies' names.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    copies: dict[str, str] = {}
    for node in proto.graph.node:
        if node.name not in fp32_nodes:
            continue
        for i, name in enumerate(node.input):
            if name not in inits:
                continue
            if name not in copies:
                copies[name] = f"{name}__fp32"
                proto.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[name]), copies[name]))
            node.input[i] = copies[name]
    return set(copies.values())


def _relay_fp32_outputs(proto, fp32_nodes: set[str], fp32_ops: set[str]) -> list[str]:
    """Put an Identity between every node kept fp32 and the graph output it writes.

    onnxconverter-common (1.14) casts a kept-fp32 node's output to fp16 and, with
    keep_io_types, casts the graph output back to fp32 right after: a Cast->Cast pair with no
    node behind it, which its clean-up pass refuses ("The downstream node of the second cast
    node should be graph output"). A student's graph ends in exactly that (its output sigmoid
    writes ``prob``). The relay, converted like any node, keeps the two casts apart; it is
    removed again after the conversion (:func:`_drop_relays`). Returns the relays' names."""
    from onnx import helper

    outputs = {o.name for o in proto.graph.output}
    relays = []
    for node in list(proto.graph.node):
        if node.name not in fp32_nodes and node.op_type not in fp32_ops:
            continue
        for i, name in enumerate(node.output):
            if name in outputs:
                node.output[i] = f"{name}__fp32"
                relay = helper.make_node("Identity", [node.output[i]], [name], name=f"{name}__relay")
                proto.graph.node.append(relay)  # after every producer: the graph stays sorted
                relays.append(relay.name)
    return relays


def _drop_relays(proto, relays: list[str]) -> None:
    """Remove the relays of :func:`_relay_fp32_outputs`: their readers (the converter's cast back
    to fp32 for the graph output) read the relay's input instead, the cast down to fp16, and
    ``_drop_fp16_round_trips`` then bypasses the pair. A relay that still writes a graph output
    itself (no cast behind it) stays: the output keeps its name."""
    outputs = {o.name for o in proto.graph.output}
    for relay in [n for n in proto.graph.node if n.name in set(relays)]:
        source, target = relay.input[0], relay.output[0]
        if target in outputs:
            continue
        for node in proto.graph.node:
            for i, name in enumerate(node.input):
                if name == target:
                    node.input[i] = source
        proto.graph.node.remove(relay)


def _drop_fp16_round_trips(proto) -> int:
    """Remove Cast(fp32->fp16)->Cast(fp16->fp32) chains the converter puts between two nodes it
    kept fp32: the round trip silently rounds the fusion tail to fp16 (1 - 1e-6 becomes 1,
    and log(0) = -inf poisons the entropy). Returns the number of chains bypassed."""
    import onnx

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producer = {out: node for node in proto.graph.node for out in node.output}
    bypassed = 0
    for node in proto.graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        inner = producer.get(node.input[0])
        if inner is None or cast_to(inner) != onnx.TensorProto.FLOAT16:
            continue
        source = producer.get(inner.input[0])
        if source is not None and source.op_type == "Cast" and cast_to(source) != onnx.TensorProto.FLOAT:
            continue  # the fp16 value did not come from an fp32 tensor
        # Read the fp32 original instead of its fp16 copy (the now-unused casts are dropped below).
        node.op_type = "Identity"
        del node.attribute[:]
        node.input[0] = inner.input[0]
        bypassed += 1
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    keep = [n for n in proto.graph.node if not (n.op_type == "Cast" and all(o not in used for o in n.output))]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return bypassed


def _fp32_outputs(proto) -> None:
    """Graph outputs the converter left fp16 (it casts the fp32 fusion tail's result down to
    fp16 right before the output, even with keep_io_types) become fp32 again: the cast is
    turned into an fp32 Identity, so the fused probability leaves the graph unrounded."""
    import onnx

    producer = {out: node for node in proto.graph.node for out in node.output}
    for output in proto.graph.output:
        tensor_type = output.type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producer.get(output.name)
        if node is None or node.op_type != "Cast":
            continue
        node.op_type = "Identity"
        del node.attribute[:]
        tensor_type.elem_type = onnx.TensorProto.FLOAT
    keep = [v for v in proto.graph.value_info if v.name not in {o.name for o in proto.graph.output}]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)


def _restore_fp32_constants(proto, names: set[str]) -> None:
    """Turn the private tail constants back to fp32 if the converter made them fp16."""
    import onnx
    from onnx import numpy_helper

    for k, tensor in enumerate(proto.graph.initializer):
        if tensor.name in names and tensor.data_type == onnx.TensorProto.FLOAT16:
            arr = numpy_helper.to_array(tensor).astype(np.float32)
            proto.graph.initializer[k].CopyFrom(numpy_helper.from_array(arr, tensor.name))


try:  # onnxruntime is a hard dependency; the guard only keeps import errors readable
    from onnxruntime.quantization import CalibrationDataReader as _CalibrationDataReader
except ImportError:  # pragma: no cover
    _CalibrationDataReader = object  # type: ignore[misc,assignment]


def calibration_records(site, n_frames: int, seed: int = 0):
    """Unlabeled calibration frames of a target site: its SSL ``train`` split (images only),
    else every frame; ``n_frames`` drawn without replacement by a seeded generator."""
    records = site.select("train") or list(site.records)
    if not records:
        raise DataError(f"{site.root}: no frames to calibrate on")
    rng = np.random.default_rng(seed)
    take = min(n_frames, len(records))
    idx = np.sort(rng.choice(len(records), size=take, replace=False))
    return [records[i] for i in idx]


class SiteCalibrationReader(_CalibrationDataReader):
    """onnxruntime CalibrationDataReader over unlabeled frames of ONE target site.

    Frames go through ``preprocess_gray`` / ``preprocess_frame``, the same function as training
    and the runtime; masks are never read (the site may have none).
    """

    def __init__(self, site_dir: str | os.PathLike, img_size: int, *, input_name: str = "frames",
                 n_frames: int = 64, uint8_input: bool = False, batch_size: int = 1, seed: int = 0):
        from ..data.layout import load_site

        # Absolute: quantize_int8 calls the reader from inside its staging folder.
        self.site = load_site(Path(site_dir).resolve(), check_masks=False)
        self.records = calibration_records(self.site, n_frames, seed)
        self.img_size = int(img_size)
        self.input_name = input_name
        self.uint8_input = uint8_input
        self.batch_size = max(1, int(batch_size))
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def describe(self) -> dict[str, Any]:
        split = "train" if self.site.select("train") else "all"
        return {"site": self.site.name, "split": split, "frames": len(self.records),
                "manifest_sha256": self.site.manifest_sha256(), "labels_used": False}

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        from ..data.transforms import preprocess_frame, preprocess_gray

        for i in range(0, len(self.records), self.batch_size):
            chunk = self.records[i : i + self.batch_size]
            if self.uint8_input:
                arr = np.stack([preprocess_gray(self.site.read_image(r), self.img_size)[None] for r in chunk])
            else:
                arr = np.stack([preprocess_frame(self.site.read_image(r), self.img_size) for r in chunk])
            yield {self.input_name: arr}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


class ArrayCalibrationReader(_CalibrationDataReader):
    """CalibrationDataReader over an in-memory array (benchmarks and no-site exports)."""

    def __init__(self, frames: np.ndarray, *, input_name: str = "frames", batch_size: int = 1, source: str = "array"):
        self.frames = frames
        self.input_name = input_name
        self.batch_size = max(1, int(batch_size))
        self.source = source
        self._pos = 0

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "frames": int(len(self.frames)), "labels_used": False}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.frames):
            return None
        batch = self.frames[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._pos = 0


def _precision_sensitive_convs(proto) -> list[str]:
    """Conv nodes of the decoder's last up-block and the segmentation head of each branch.

    They run at full resolution with the fewest channels (16 and 1 in the paper preset), so
    per-channel int8 error there lands directly on the logits; measured on the tiny preset,
    keeping them fp32 lifts the int8 mask Dice from 0.958 to 0.973. Found through the weight
    names the exporter keeps (``<branch>.decoder.head.weight``).
    """
    weight_of = {n.name: n.input[1] for n in proto.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    blocks = sorted({w.split("decoder.blocks.")[1].split(".")[0] for w in weight_of.values() if "decoder.blocks." in w})
    last = f"decoder.blocks.{blocks[-1]}." if blocks else None
    return sorted(n for n, w in weight_of.items() if "decoder.head." in w or (last is not None and last in w))


def output_tail(nodes, *, name, op_type, successors, matrix_ops=MATRIX_OPS, gate: str = "Sigmoid") -> list[str]:
    """Names of a graph's output sigmoids and of every node after them, for any graph API.

    An output sigmoid is a ``gate`` op from which no ``matrix_ops`` node can be reached: the
    sigmoid that turns a network's logit into its probability (in the fused graph, each
    branch's, followed by the confidences, their normalization and the fusion). A sigmoid that
    a convolution or matmul follows (a squeeze-excite gate, a SiLU) is inside a network and is
    not part of the tail. ``nodes`` in topological order (ONNX graphs, OpenVINO's ordered ops);
    ``name``/``op_type``/``successors`` read a node."""
    order = list(nodes)
    feeds_matrix: dict[str, bool] = {}
    for node in reversed(order):  # successors first
        feeds_matrix[name(node)] = any(op_type(s) in matrix_ops or feeds_matrix.get(name(s), False) for s in successors(node))
    tail: set[str] = set()
    frontier = [n for n in order if op_type(n) == gate and not feeds_matrix[name(n)]]
    while frontier:
        node = frontier.pop()
        if name(node) in tail:
            continue
        tail.add(name(node))
        frontier.extend(successors(node))
    return sorted(tail)


def _fusion_tail_nodes(proto) -> list[str]:
    """Names of the ONNX graph's output sigmoids and the nodes after them (confidence,
    normalization, fusion): :func:`output_tail` on a ModelProto."""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    return output_tail(proto.graph.node, name=lambda n: n.name, op_type=lambda n: n.op_type,
                       successors=lambda n: [c for out in n.output for c in consumers.get(out, [])])


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    reader,
    *,
    per_channel: bool = True,
    op_types: tuple[str, ...] = INT8_OP_TYPES,
    symmetric_activations: bool = False,
    calibrate_method: str = "minmax",
    exclude_nodes: list[str] | None = None,
    keep_head_fp32: bool = True,
) -> Path:
    """Static int8 quantization (QDQ) of an fp32 ONNX export, calibrated by ``reader``.

    ``keep_head_fp32`` keeps each branch's last decoder block and head in fp32 (see
    ``_precision_sensitive_convs``). ``symmetric_activations=True`` gives int8 activations with zero point 0: what TensorRT's
    explicit quantization requires (its parser rejects non-zero zero points). Default (CPU):
    uint8 activations with a fitted zero point (onnxruntime's fast u8s8 kernels).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise ExportError(f"unknown calibration method {calibrate_method!r}; choose one of {', '.join(methods)}")
    card = read_onnx_card(src)
    dst = Path(dst)
    with staging_dir(dst) as staging:
        # onnxruntime's pre-processing and calibration write scratch files (a uuid-named external
        # data file, sym_shape_infer_temp.onnx) into the *current* directory: run them from the
        # staging folder so nothing leaks into the user's folder.
        src = Path(src).resolve()
        try:
            with chdir(staging):
                prepared = staging / "prepared.onnx"
                # Shape inference + graph cleanup recommended by onnxruntime before quantization. Its
                # symbolic shape inference gives up on some exporter patterns (dynamic-batch Reshape
                # chains); onnx's own shape inference is then enough for QDQ placement.
                try:
                    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=False)
                except Exception:
                    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
                proto = onnx.load_model(str(prepared))
                excluded = set(_fusion_tail_nodes(proto)) | set(exclude_nodes or [])
                if keep_head_fp32:
                    excluded |= set(_precision_sensitive_convs(proto))
                excluded = sorted(excluded)
                quantized = staging / "quantized.onnx"
                quantize_static(
                    str(prepared),
                    str(quantized),
                    calibration_data_reader=reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(op_types),
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=methods[calibrate_method],
                    extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
                )
                out = onnx.load_model(str(quantized))
        except (ExportError, DataError):
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{src}: int8 quantization failed: {first[:300]}") from None
    calib = reader.describe() if hasattr(reader, "describe") else {}
    card = dict(card, precision="int8", int8={
        "format": "QDQ", "per_channel": per_channel, "weights": "int8 symmetric",
        "activations": "int8 symmetric" if symmetric_activations else "uint8 asymmetric",
        "op_types": list(op_types), "calibrate_method": calibrate_method,
        "fp32_nodes": len(excluded), "head_fp32": keep_head_fp32, "calibration": calib,
    })
    set_card(out, card)
    save_onnx_atomic(out, dst)
    check_onnx(dst)
    return dst


__all__ = [
    "CARD_KEY", "ArrayCalibrationReader", "SiteCalibrationReader", "calibration_records",
    "convert_fp16", "output_tail", "quantize_int8",
]
