"""The Android app's onnxruntime as an export target: one pinned version (android_demo/
onnxruntime.version) that the Gradle build and the export checks share, and a one-line refusal
of any graph stamped newer than that onnxruntime reads (IR version, opset of a used domain).
`make app-runtime-test` loads the exported artifacts in that onnxruntime itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pocus_edge.errors import ExportError
from pocus_edge.export import compat

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_one_pinned_version_for_the_app_and_the_export_checks():
    pinned = (REPO / "android_demo" / "onnxruntime.version").read_text().strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned)
    assert compat.APP_ONNXRUNTIME == pinned
    gradle = (REPO / "android_demo" / "app" / "build.gradle.kts").read_text()
    assert 'rootProject.file("onnxruntime.version")' in gradle
    assert "onnxruntime-android:$onnxruntimeVersion" in gradle
    assert not re.search(r"onnxruntime-android:\d", gradle), "the version must come from the file only"


def _model(ir_version: int, opsets: dict[str, int], op_domain: str = "") -> "onnx.ModelProto":
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    node = helper.make_node("Relu" if not op_domain else "FusedGemm", ["x"], ["y"], domain=op_domain)
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = ir_version
    return model


def test_refuses_newer_ir_and_opsets_of_used_domains_only():
    assert compat.app_runtime_issues(_model(10, {"": 21})) == []
    assert compat.app_runtime_issues(_model(11, {"": 21})) == ["IR version 11 (at most 10)"]
    assert compat.app_runtime_issues(_model(10, {"": 22})) == ["ai.onnx opset 22 (at most 21)"]
    # Quantization tools import domains no node uses: onnxruntime never resolves them.
    assert compat.app_runtime_issues(_model(10, {"": 18, "ai.onnx.ml": 5})) == []
    used = _model(10, {"": 18, "com.microsoft": 2}, op_domain="com.microsoft")
    assert compat.app_runtime_issues(used) == ["com.microsoft opset 2 (at most 1)"]


def test_saving_a_graph_the_app_cannot_load_is_refused_in_one_line(tmp_path):
    from pocus_edge.export.onnx import save_onnx_atomic

    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError) as info:
        save_onnx_atomic(_model(11, {"": 22}), out)
    message = str(info.value)
    assert "\n" not in message and str(out) in message and "1.19.2" in message
    assert "IR version 11" in message and "opset 22" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []
    save_onnx_atomic(_model(10, {"": 21}), out)
    assert onnx.load(str(out)).ir_version == 10


def test_export_refuses_a_newer_opset_before_any_work_and_stamps_what_the_app_reads(tmp_path):
    import torch

    from pocus_edge.export.onnx import export_onnx
    from pocus_edge.models.fused import SingleSegmenter
    from pocus_edge.models.students import build_student

    torch.manual_seed(0)
    model = SingleSegmenter(build_student("mobilenetv3", "tiny").eval().reparameterize(), name="student").eval()
    with pytest.raises(ExportError, match=r"opset 22 is newer than onnxruntime 1\.19\.2"):
        export_onnx(model, tmp_path / "s22.onnx", batch=1, opset=22)
    assert not any(tmp_path.iterdir())
    path = export_onnx(model, tmp_path / "s.onnx", batch=1)
    proto = onnx.load(str(path))
    assert proto.ir_version <= compat.MAX_IR_VERSION
    assert all(o.version <= 21 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
