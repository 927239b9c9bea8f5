"""The seam between export and runtime: the runtime (and the benchmark of an exported model)
runs with torch and the exporter made unimportable, and refuses graphs it cannot drive with
one line naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pocus_edge.errors import ExportError

onnx = pytest.importorskip("onnx")
REPO = Path(__file__).resolve().parents[1]

# A meta-path hook that makes torch (and friends) and the exporter unimportable, as on a lean
# install; it must be the first thing the child process runs.
BLOCK = textwrap.dedent(
    """
    import importlib.abc, os, sys
    BLOCKED = tuple(os.environ["POCUS_TEST_BLOCKED"].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def _mean_channel_onnx(path: Path, size: int = 32, *, out_shape=None, in_channels: int = 3, card: dict | None = None) -> Path:
    """probability = mean of the input channels (a stand-in model with a pocus-edge card)."""
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, in_channels, 1, 1], [1 / in_channels] * in_channels)
    nodes = [helper.make_node("Conv", ["frames", "w"], ["fused"])]
    out_dims = [None, 1, size, size]
    if out_shape == "rank3":
        shape = helper.make_tensor("s", TensorProto.INT64, [3], [-1, size, size])
        nodes = [helper.make_node("Conv", ["frames", "w"], ["c"]), helper.make_node("Reshape", ["c", "s"], ["fused"])]
        out_dims = [None, size, size]
        inits = [weight, shape]
    else:
        inits = [weight]
    graph = helper.make_graph(nodes, "mean", [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", in_channels, size, size])],
                              [helper.make_tensor_value_info("fused", TensorProto.FLOAT, out_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.append(onnx.StringStringEntryProto(key="pocus_edge_card", value=json.dumps(
        card or {"img_size": size, "precision": "fp32", "gflops_per_frame": 1.25})))
    onnx.save(model, str(path))
    return path


LEAN = ("torch", "torchvision", "timm", "pocus_edge.models", "pocus_edge.train")  # what a lean install lacks
RUNTIME_ONLY = LEAN + ("pocus_edge.export",)  # the runtime must not even reach for the exporter


def _run_blocked(code: str, *args: str, blocked: tuple[str, ...] = RUNTIME_ONLY, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), POCUS_TEST_BLOCKED=",".join(blocked))
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def test_the_block_itself_works():
    """The hook really makes torch and the exporter unimportable (else the tests below prove nothing)."""
    done = _run_blocked("""
        for name in ("torch", "pocus_edge.export.onnx", "pocus_edge.models.fused"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                continue
            raise SystemExit(f"{name} imported")
    """)
    assert done.returncode == 0, done.stderr


def test_runtime_streams_without_torch_or_the_exporter(tmp_path):
    model = _mean_channel_onnx(tmp_path / "m.onnx")
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(frames / f"f{i}.png"), (rng.random((40, 50)) * 255).astype(np.uint8))
    done = _run_blocked("""
        import json, sys
        import numpy as np
        import pocus_edge.runtime, pocus_edge.runtime.backends, pocus_edge.inference, pocus_edge.runtime.pipeline, pocus_edge.card
        import pocus_edge.data.transforms
        from pocus_edge.inference import open_backend
        from pocus_edge.cli import main

        backend = open_backend(sys.argv[1])
        out = backend.infer(np.full((2, 3, 32, 32), 0.25, np.float32))
        assert out.shape == (2, 1, 32, 32) and abs(float(out.mean()) - 0.25) < 1e-6
        code = main(["stream", sys.argv[2], "--model", sys.argv[1], "--no-drop", "--no-progress", "--report", sys.argv[3]])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm") or m.startswith("pocus_edge.export"))
        print(json.dumps({"code": code, "loaded": loaded, "gflops": backend.gflops_per_frame, "precision": backend.precision}))
    """, str(model), str(frames), str(tmp_path / "report.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["loaded"] == [] and result["precision"] == "fp32"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frames_processed"] == 3 and report["gflops_per_frame"] == pytest.approx(result["gflops"])


def test_gflops_of_a_cardless_graph_counted_with_onnx_and_unknown_without(tmp_path):
    """The core install has onnxruntime but not onnx: a graph whose card gives no GFLOPs then
    reports none (instead of failing); with onnx the count is 2 x MACs of its one 1x1 conv."""
    model = _mean_channel_onnx(tmp_path / "m.onnx", card={"img_size": 32, "precision": "fp32"})
    code = """
        import json, sys
        from pocus_edge.inference import open_backend
        print(json.dumps(open_backend(sys.argv[1]).gflops_per_frame))
    """
    without = _run_blocked(code, str(model), blocked=RUNTIME_ONLY + ("onnx",))
    assert without.returncode == 0, without.stderr[-2000:]
    assert json.loads(without.stdout.strip().splitlines()[-1]) is None
    counted = _run_blocked(code, str(model))
    assert counted.returncode == 0, counted.stderr[-2000:]
    assert json.loads(counted.stdout.strip().splitlines()[-1]) == pytest.approx(2 * 3 * 32 * 32 / 1e9)


def test_benchmark_an_exported_model_without_torch(tmp_path):
    model = _mean_channel_onnx(tmp_path / "m.onnx")
    done = _run_blocked("""
        import sys
        from pocus_edge.cli import main
        code = main(["benchmark", "--model", sys.argv[1], "--batch", "1,2", "--runs", "2", "--warmup", "1",
                     "--threads", "1", "--report", sys.argv[2]])
        # the format table is shared with export; nothing that builds artifacts is loaded
        builders = [m for m in sys.modules if m.startswith("pocus_edge.export.") and m not in ("pocus_edge.export.formats", "pocus_edge.export.staging")]
        assert not builders, builders
        raise SystemExit(code)
    """, str(model), str(tmp_path / "b.json"), blocked=LEAN)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    report = json.loads((tmp_path / "b.json").read_text())
    assert "hostname" not in report["machine"]
    rows = {r["format"]: r for r in report["rows"]}
    assert rows["ort-fp32"]["status"] == "ok" and rows["ort-fp32"]["agreement_dice"] == pytest.approx(1.0)
    for row in rows.values():
        if row["status"] == "ok":
            assert row["agreement_dice"] >= row["agreement_bar"]
            for lat in row["latency"]:
                peak = report["machine"]["matmul_gflops"][row["precision"]]
                assert lat["fraction_of_peak"] == pytest.approx(lat["fps"] * row["gflops_per_frame"] / peak)


@pytest.mark.parametrize("case, message", [
    ("rank3", "rank 3"),
    ("channels", "5 channels"),
])
def test_foreign_onnx_is_refused_with_one_line(tmp_path, capsys, case, message):
    from pocus_edge.cli import main
    from pocus_edge.inference import open_backend

    if case == "rank3":
        path = _mean_channel_onnx(tmp_path / "foreign.onnx", out_shape="rank3")
    else:
        path = _mean_channel_onnx(tmp_path / "foreign.onnx", in_channels=5)
    with pytest.raises(ExportError, match=message) as err:
        open_backend(path)
    assert "foreign.onnx" in str(err.value)
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    cv2.imwrite(str(frames / "f.png"), np.zeros((20, 20), np.uint8))
    assert main(["stream", str(frames), "--model", str(path), "--no-progress"]) == 2
    err_text = capsys.readouterr().err.strip()
    assert "foreign.onnx" in err_text and len(err_text.splitlines()) == 1 and "Traceback" not in err_text


def test_providers_are_resolved_or_refused(tmp_path):
    from pocus_edge.errors import ToolchainUnavailable
    from pocus_edge.inference import open_backend, resolve_providers

    available = ["CPUExecutionProvider", "OpenVINOExecutionProvider"]
    assert resolve_providers(["openvino"], "cpu", available, "m") == ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, "cpu", available, "m") == ["CPUExecutionProvider"]
    with pytest.raises(ToolchainUnavailable, match="CUDAExecutionProvider"):
        resolve_providers(["cuda"], "cpu", available, "m")
    model = _mean_channel_onnx(tmp_path / "m.onnx")
    backend = open_backend(model, providers=["cpu"])
    assert backend.describe()["providers"] == ["CPUExecutionProvider"]
