"""FusedSegmenter -> one ONNX graph (opset >= 17, dynamic or fixed batch), simplified with
onnxslim, ``onnx.checker`` clean, carrying the model card in its metadata.

Exporter: torch 2.14's ``torch.export``-based exporter (``dynamo=True``). On our graphs it gives
a cleaner result than the legacy TorchScript exporter: weight standardization of the ResNetV2
convs is constant-folded, batch norm is exported in eval form, and onnxruntime matches PyTorch
to ~4e-6 (legacy: ~7e-5, and it exports batch_norm with training=True).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..card import CARD_KEY, export_card, parse_card
from ..card import EXPORT_INPUT_NAME as INPUT_NAME
from ..errors import ExportError
from ..io import atomic_path, find_write_error, output_error
from .compat import MAX_IR_VERSION, check_app_runtime, check_opset
from .staging import staging_dir

DEFAULT_OPSET = 18
MIN_OPSET = 17
DEFAULT_MAX_BATCH = 64
# protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000


def gflops_per_frame(model: "torch.nn.Module") -> float:
    """FLOPs (2 x MACs, torch.utils.flop_counter) of one frame through the whole exported graph,
    in GFLOPs to 6 significant digits (a tiny student has a few MFLOPs: decimals would erase it)."""
    from ..models.flops import count_flops

    return float(f"{count_flops(model, tuple(model.input_shape(1))) / 1e9:.6g}")


def build_card(model: "torch.nn.Module", **kwargs: Any) -> dict[str, Any]:
    """The model card stored under ``pocus_edge_card`` in every exported artifact
    (:func:`pocus_edge.card.export_card`)."""
    return export_card(model, **kwargs)


def set_card(model_proto, card: dict[str, Any]) -> None:
    """Write ``card`` (JSON) into the ModelProto's metadata, replacing an older one."""
    keep = [p for p in model_proto.metadata_props if p.key != CARD_KEY]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    entry = model_proto.metadata_props.add()
    entry.key = CARD_KEY
    entry.value = json.dumps(card, sort_keys=True, default=str)


def read_onnx_card(path: str | os.PathLike) -> dict[str, Any]:
    """The model card of an exported ONNX file (ExportError when absent or unreadable)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: ONNX file not found")
    try:
        proto = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / various on corrupt files
        raise ExportError(f"{p}: not a readable ONNX model ({type(exc).__name__})") from None
    for prop in proto.metadata_props:
        if prop.key == CARD_KEY:
            return parse_card(prop.value, p)
    raise ExportError(f"{p}: no {CARD_KEY!r} metadata (not exported by pocus-edge?)")


def _initializer_bytes(model_proto) -> int:
    return sum(len(t.raw_data) for t in model_proto.graph.initializer)


def save_onnx_atomic(model_proto, path: str | os.PathLike) -> Path:
    """Save a ModelProto atomically; models too big for one protobuf get an external data file
    ``<name>.data`` next to them (written first, so the .onnx never points at a missing file)."""
    import onnx

    final = Path(path)
    check_app_runtime(model_proto, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if _initializer_bytes(model_proto) < EXTERNAL_DATA_BYTES:
        with atomic_path(final) as tmp:
            onnx.save_model(model_proto, str(tmp))
        return final
    data_name = final.name + ".data"
    with staging_dir(final) as staging:
        onnx.save_model(
            model_proto, str(staging / final.name), save_as_external_data=True,
            all_tensors_to_one_file=True, location=data_name, size_threshold=1024,
        )
        os.replace(staging / data_name, final.parent / data_name)
        os.replace(staging / final.name, final)
    return final


def check_onnx(path: str | os.PathLike) -> None:
    """``onnx.checker`` with full shape inference; ExportError with the checker's first line."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: onnx.checker failed: {first}") from None


def export_onnx(
    model: "torch.nn.Module",
    path: str | os.PathLike,
    *,
    batch: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    card: dict[str, Any] | None = None,
) -> Path:
    """Export a FusedSegmenter to ONNX (fp32) at ``path``; returns the path.

    ``batch=None`` gives a dynamic batch axis (1..max_batch, named ``batch``); an int fixes it.
    The card (``build_card`` by default) goes into the metadata under ``pocus_edge_card``.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    check_opset(opset)
    if batch is not None and batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    model = model.eval()
    trace_batch = 2 if batch is None else int(batch)  # 2, not 1: torch.export specializes size-1 dims
    example = model.example_input(trace_batch)
    dynamic_shapes = None
    if batch is None:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=int(max_batch))},)
    final = Path(path)
    with staging_dir(final) as staging:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    model,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=model.output_names(),
                    dynamic_shapes=dynamic_shapes,
                    opset_version=int(opset),
                    optimize=True,
                    verbose=False,
                )
            raw_path = staging / "raw.onnx"
            program.save(str(raw_path))
            proto = onnx.load_model(str(raw_path))
        except ExportError:
            raise
        except Exception as exc:
            write_error = find_write_error(exc)  # a full disk is the output's problem, not the exporter's
            if write_error is not None:
                raise output_error(final, write_error) from None
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{final}: torch.onnx.export failed: {first[:300]}") from None
    # The exporter's own metadata (torch.export graph signature) is noise for a deployed model.
    del proto.metadata_props[:]
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto)
    # Stamp the IR version the app's onnxruntime reads: the exporter writes the newest its onnx
    # knows, while the graph (opset <= 21) uses nothing newer than IR 10.
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    proto.producer_name = "pocus-edge"
    import pocus_edge

    proto.producer_version = pocus_edge.__version__
    if card is None:
        card = build_card(model, precision="fp32", batch=batch, max_batch=max_batch, opset=opset,
                          gflops=gflops_per_frame(model))
    set_card(proto, card)
    save_onnx_atomic(proto, final)
    check_onnx(final)
    return final


def onnx_io(path: str | os.PathLike) -> dict[str, Any]:
    """Input/output names, dtypes and shapes (dims as ints or symbolic names)."""
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims})
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}
