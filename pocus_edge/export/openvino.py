"""OpenVINO IR (``.xml`` + ``.bin``) from the fp32 ONNX export: the format an Intel laptop or
mini PC driving a USB probe runs best (CPU, integrated GPU, NPU).

* fp32: ``openvino.convert_model`` of the fp32 graph, weights kept fp32 (``save_model`` would
  compress them to fp16 by default).
* bf16: the same fp32 IR; bf16 is OpenVINO's inference-precision hint, applied when the model
  is compiled on a CPU with native bf16 (AVX-512 BF16 / AMX). The card says ``bf16`` and the
  inference backend sets the hint from it.
* int8: NNCF post-training quantization of the IR, calibrated on unlabeled frames of the target
  site (as the ONNX int8 graph), with the branch sigmoids, everything after them (confidences,
  normalization, fusion) and each branch's last decoder block and head kept fp32.

The model card travels in the IR's ``rt_info`` under ``pocus_edge_card``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..card import CARD_KEY
from ..errors import ExportError, ToolchainUnavailable
from ..io import output_error
from .staging import promote, staging_dir

PRECISIONS = ("fp32", "bf16", "int8")


def openvino_status() -> tuple[bool, str]:
    """(importable, message)."""
    try:
        import openvino as ov
    except ImportError:
        return False, "OpenVINO is not installed (pip install 'pocus-edge[openvino]')"
    return True, f"OpenVINO {ov.__version__}"


# OpenVINO's matrix ops: a sigmoid one of them follows is inside a network, not its output end.
OPENVINO_MATRIX_OPS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul")


def fp32_scope(model, onnx_proto=None) -> list[str]:
    """Names of the OpenVINO ops int8 must not touch: the output sigmoids and every op after
    them (the fusion tail; :func:`pocus_edge.export.quantize.output_tail`: a squeeze-excite or
    SiLU sigmoid inside a network is quantized around as usual), and, when the ONNX graph is
    given, each branch's precision-sensitive last decoder block and head (the ONNX importer
    keeps node names)."""
    from .quantize import output_tail

    def successors(op):
        return [target.get_node() for output in op.outputs() for target in output.get_target_inputs()
                if target.get_node().get_type_name() != "Result"]

    keep = set(output_tail(model.get_ordered_ops(), name=lambda op: op.get_friendly_name(),
                           op_type=lambda op: op.get_type_name(), successors=successors,
                           matrix_ops=OPENVINO_MATRIX_OPS))
    if onnx_proto is not None:
        from .quantize import _precision_sensitive_convs

        keep |= set(_precision_sensitive_convs(onnx_proto))
    return sorted(keep)


def export_openvino(
    onnx_path: str | os.PathLike,
    xml_path: str | os.PathLike,
    *,
    precision: str = "fp32",
    card: dict[str, Any] | None = None,
    calibration: Iterable[np.ndarray] | None = None,
    calibration_info: dict[str, Any] | None = None,
) -> Path:
    """Convert a fp32 ONNX export to an OpenVINO IR at ``xml_path`` (``.bin`` beside it),
    written through a staging folder. int8 needs ``calibration``: model-input batches of
    unlabeled target frames."""
    ok, message = openvino_status()
    if not ok:
        raise ToolchainUnavailable(f"OpenVINO export unavailable: {message}")
    import openvino as ov

    final = Path(xml_path)
    if final.suffix != ".xml":
        raise ExportError(f"{final}: an OpenVINO IR is written as NAME.xml (+ NAME.bin)")
    if precision not in PRECISIONS:
        raise ExportError(f"OpenVINO export: precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    model = ov.convert_model(str(onnx_path))
    details: dict[str, Any] = {"openvino": ov.__version__, "weights": "fp32",
                               "inference_precision_hint": {"bf16": "bf16"}.get(precision, "f32")}
    if precision == "int8":
        model, details["int8"] = _quantize(model, onnx_path, calibration, calibration_info)
    card = dict(card or {}, precision=precision, openvino=details)
    model.set_rt_info(json.dumps(card, sort_keys=True, default=str), [CARD_KEY])
    with staging_dir(final) as staging:
        staged = staging / final.name
        try:
            ov.save_model(model, str(staged), compress_to_fp16=False)
        except RuntimeError as exc:  # OpenVINO's writer reports a full disk as a bare iostream error
            raise output_error(final, _save_error(staging, exc)) from None
        promote(staged, final)
    return final


def _save_error(folder: Path, exc: Exception) -> OSError:
    """The OSError behind a failed ``save_model``: disk full when the folder's file system has
    (next to) no space left, else an I/O error carrying OpenVINO's own first line."""
    import errno
    import shutil

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    try:
        full = shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, "No space left on device")
    return OSError(errno.EIO, f"OpenVINO could not write the IR: {first[:200]}")


def _quantize(model, onnx_path, calibration, calibration_info):
    if calibration is None:
        raise ExportError("OpenVINO int8 needs calibration frames (--calib TARGET_SITE)")
    try:
        import nncf
    except ImportError:
        raise ToolchainUnavailable("OpenVINO int8 needs NNCF (pip install 'pocus-edge[openvino]')") from None
    import logging

    import onnx

    nncf.set_log_level(logging.ERROR)  # one INFO line per op otherwise
    frames = [np.ascontiguousarray(batch) for batch in calibration]
    if not frames:
        raise ExportError("OpenVINO int8: no calibration frames")
    keep = fp32_scope(model, onnx.load_model(str(onnx_path), load_external_data=False))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(frames),
        subset_size=sum(len(f) for f in frames),
        model_type=nncf.ModelType.TRANSFORMER,  # hybrid ViT: quantize matmuls/convs, keep norms and softmax
        ignored_scope=nncf.IgnoredScope(names=keep, validate=False),
    )
    return quantized, {"tool": f"nncf {nncf.__version__}", "fp32_ops": len(keep),
                       "kept_fp32": "output sigmoids, fusion tail, last decoder block and head of each network",
                       "calibration": calibration_info or {"frames": int(sum(len(f) for f in frames))}}
