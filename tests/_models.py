"""Tiny stand-in models for tests of the receiving side (the runtime, its outputs), where the
model itself is not under test."""

from __future__ import annotations

from pathlib import Path


def mean_onnx(path: Path) -> Path:
    """A one-node ONNX graph: fused = the mean over the 3 input channels, 32x32, dynamic batch."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", 3, 32, 32])
    out = helper.make_tensor_value_info("fused", TensorProto.FLOAT, ["batch", 1, 32, 32])
    node = helper.make_node("ReduceMean", ["frames"], ["fused"], axes=[1], keepdims=1)
    model = helper.make_model(helper.make_graph([node], "mean", [inp], [out]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
