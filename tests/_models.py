"""Tiny stand-in models for tests of the receiving side (the runtime, its outputs), where the
model itself is not under test."""

from __future__ import annotations

from pathlib import Path

from pocus_edge.runtime.sources import FrameSource


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


def risk_onnx(path: Path, card: dict | None = None, *, size: int = 32) -> Path:
    """The mean model plus a per-frame ``risk`` output (N, 1), last among the outputs as an
    exported graph with its risk output has it: risk = the frame's mean intensity in [0, 1]
    (the mean of ``fused`` over the frame), so a test sets each frame's risk through its gray
    level. ``card`` goes into the ``pocus_edge_card`` metadata (``risk: {formula, threshold,
    drift}`` and the rest of a model card)."""
    import json

    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", 3, size, size])
    fused = helper.make_tensor_value_info("fused", TensorProto.FLOAT, ["batch", 1, size, size])
    risk = helper.make_tensor_value_info("risk", TensorProto.FLOAT, ["batch", 1])
    nodes = [
        helper.make_node("ReduceMean", ["frames"], ["fused"], axes=[1], keepdims=1),
        helper.make_node("ReduceMean", ["fused"], ["risk_4d"], axes=[2, 3], keepdims=1),
        helper.make_node("Flatten", ["risk_4d"], ["risk"], axis=1),
    ]
    model = helper.make_model(helper.make_graph(nodes, "mean_risk", [inp], [fused, risk]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if card is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "pocus_edge_card", json.dumps(card)
    onnx.save(model, str(path))
    return path


def ort_passes_risk_through(monkeypatch) -> None:
    """Until the inference backends return the graph's ``risk`` output themselves (the backend
    contract: ``run(batch)["risk"]`` (N, 1), ``has_risk``), make the onnxruntime backend do so
    for the stand-in models. Does nothing once the backends do."""
    import numpy as np

    from pocus_edge.inference import Backend
    from pocus_edge.inference.ort import OrtBackend

    if hasattr(Backend, "has_risk"):
        return
    plain_run = OrtBackend._run

    def _run(self, batch):
        out = plain_run(self, batch)
        if "risk" in self.output_names:
            values = self.session.run(["risk"], {self.input_name: batch})[0]
            out["risk"] = np.asarray(values, dtype=np.float32).reshape(-1, 1)
        return out

    monkeypatch.setattr(OrtBackend, "_run", _run)


class ListSource(FrameSource):
    """A finite source over in-memory frames: frame i at i * period_ms; ``live`` as a camera is."""

    def __init__(self, frames, period_ms=10.0, live=False):
        super().__init__()
        self.frames, self.period, self.live = frames, period_ms, live
        self.name = "list"

    def __len__(self):
        return len(self.frames)

    def __iter__(self):
        for i, f in enumerate(self.frames):
            yield f, i * self.period, i
