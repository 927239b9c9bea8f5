"""`pocus-edge export --target ort`: onnxruntime's own converter writes the ORT format model and
the required-operators config a minimal build is compiled from; the .ort carries the model card,
passes the same parity check as every format, and runs through the runtime like an .onnx file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocus_edge.errors import ExportError
from pocus_edge.export import parity as parity_mod
from pocus_edge.export.api import ExportOptions, export_model
from pocus_edge.export.formats import ARTIFACTS
from pocus_edge.export.ort import config_path, convert_to_ort, required_operators

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def student():
    from pocus_edge.export.parity import spread_head_logits
    from pocus_edge.models.fused import SingleSegmenter
    from pocus_edge.models.students import build_student

    torch.manual_seed(0)
    network = build_student("mobilenetv3", "tiny").eval().reparameterize()
    spread_head_logits(network, parity_mod.parity_frames(None, 64, n=4, seed=1)[0], std=3.0)
    return SingleSegmenter(network, uint8_input=True, name="student").eval()


def test_ort_rows_in_the_artifact_table():
    assert {p for t, p in ARTIFACTS if t == "ort"} == {"fp32", "fp16", "int8"}
    assert all(ARTIFACTS[("ort", p)].suffix == ".ort" and ARTIFACTS[("ort", p)].backend == "ort" for p in ("fp32", "int8"))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_ort_export_writes_the_model_its_config_and_a_passing_parity_report(student, tmp_path, precision):
    calibration = parity_mod.parity_frames(None, 64, n=16, uint8_input=True, seed=2)[0]
    out = tmp_path / "student.ort"
    result = export_model(student, out, ExportOptions(target="ort", precision=precision, batch=1,
                                                      calibration_frames=calibration if precision == "int8" else None))
    assert result.artifact == out and out.is_file() and result.parity["passed"]
    graph = tmp_path / "student.onnx"  # the precision-explicit graph it was converted from, kept beside
    config = config_path(out)
    assert config == tmp_path / "student.required_operators.config" and config.is_file()
    assert "student.ort" in config.read_text() and "staging" not in config.read_text()
    # The .ort runs in onnxruntime, carries the card, and computes what its ONNX graph computes.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    card = json.loads(session.get_modelmeta().custom_metadata_map["pocus_edge_card"])
    assert card["ort_format"] == {"onnxruntime": ort.__version__} and card["precision"] == precision
    reference = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 256, (1, 1, 64, 64), dtype=np.uint8)
    np.testing.assert_allclose(session.run(None, {"frames": x})[0], reference.run(None, {"frames": x})[0], atol=1e-5)
    # The config lists the standard operators the graph uses (optimizations fuse some into
    # com.microsoft kernels, which it lists too, and int8 layout passes add Transposes), nothing else.
    ops = required_operators(config)
    standard = {op for by_opset in (ops.get("ai.onnx") or {}).values() for op in by_opset}
    graph_ops = {node.op_type for node in onnx.load(str(graph)).graph.node}
    assert "Conv" in standard and standard <= graph_ops | {"Transpose"}
    if precision == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} & (standard | {op for d in ops.values() for v in d.values() for op in v})


def test_the_runtime_streams_an_ort_file_like_an_onnx_file(student, tmp_path):
    from pocus_edge.inference import open_backend

    out = tmp_path / "student.ort"
    export_model(student, out, ExportOptions(target="ort", batch=1))
    backend = open_backend(out)  # auto: by the .ort suffix
    onnx_backend = open_backend(tmp_path / "student.onnx")
    frame = np.random.default_rng(1).integers(0, 256, (90, 120), dtype=np.uint8)
    assert backend.name == "ort" and backend.img_size == 64 and backend.input_dtype == "uint8"
    np.testing.assert_allclose(backend.run(backend.prepare(frame)[None])["prob"],
                               onnx_backend.run(onnx_backend.prepare(frame)[None])["prob"], atol=1e-5)


def test_conversion_refusals_are_one_line(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ExportError) as info:
        convert_to_ort(broken, tmp_path / "broken.ort")
    assert "cannot convert it to ORT format" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "broken.ort").exists()
    with pytest.raises(ExportError, match=r"\*\.ort file"):
        convert_to_ort(broken, tmp_path / "broken.bin")
