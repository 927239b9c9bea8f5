"""Precision lives in the graph: what each exported ONNX holds, read back from the file; the
TensorRT builder's version dispatch; engine model cards; the export table's staging (a failing
or interrupted export leaves nothing under its final name); a single network as an exportable
model. Tiny preset, random weights with rescaled heads (see test_export.py)."""

from __future__ import annotations

import ast
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pocus_edge.errors import ExportError, ToolchainUnavailable
from pocus_edge.export import parity as parity_mod
from pocus_edge.export.onnx import export_onnx
from pocus_edge.models.fused import FusedSegmenter, SingleSegmenter

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _branches(seed: int = 0):
    from test_export import make_branches  # the tiny random-weight branches with rescaled heads

    return make_branches("tiny", seed)


@pytest.fixture(scope="module")
def fused():
    return FusedSegmenter(*_branches()).eval()


@pytest.fixture(scope="module")
def graphs(fused, tmp_path_factory):
    """fp32, mixed fp16, CPU int8 and TensorRT int8 graphs of the same model."""
    from pocus_edge.export.quantize import ArrayCalibrationReader, convert_fp16, quantize_int8

    d = tmp_path_factory.mktemp("graphs")
    fp32 = export_onnx(fused, d / "f.onnx", batch=None, max_batch=8)
    calib = parity_mod.parity_frames(None, 64, n=8, seed=21)[0]
    return {
        "fp32": fp32,
        "fp16": convert_fp16(fp32, d / "f16.onnx"),
        "int8": quantize_int8(fp32, d / "i8.onnx", ArrayCalibrationReader(calib)),
        "int8-trt": quantize_int8(fp32, d / "i8t.onnx", ArrayCalibrationReader(calib), symmetric_activations=True),
    }


def _typed_graph(path):
    """(nodes, {tensor name: elem type}, consumers) with onnx shape inference's types."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types_ = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    types_.update({t.name: t.data_type for t in proto.graph.initializer})
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return proto, types_, consumers


def _downstream_of_sigmoids(proto) -> set[str]:
    """Names of the sigmoids and every node after them, computed here independently."""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen: set[str] = set()
    todo = [n for n in proto.graph.node if n.op_type == "Sigmoid"]
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for out in node.output:
            todo.extend(consumers.get(out, []))
    return seen


# Ops that only move data: onnxruntime's quantizer carries Q/DQ through them.
LAYOUT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "MaxPool")


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_fp16_graph_holds_fp16_branches_and_an_fp32_tail(graphs, fused):
    proto, types_, _ = _typed_graph(graphs["fp16"])
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    tail = _downstream_of_sigmoids(proto)
    assert sum(n.op_type == "Sigmoid" for n in proto.graph.node) == 2
    for node in proto.graph.node:
        if node.name in tail:  # sigmoids, confidences, normalization, fusion: fp32 in and out
            for name in [*node.input, *node.output]:
                if name and types_.get(name) in (F16,):
                    pytest.fail(f"{node.op_type} {node.name} touches fp16 tensor {name}")
    heavy = [n for n in proto.graph.node if n.op_type in ("Conv", "MatMul")]
    fp16_heavy = [n for n in heavy if types_.get(n.output[0]) == F16]
    assert len(fp16_heavy) >= 0.9 * len(heavy), f"{len(fp16_heavy)}/{len(heavy)} Conv/MatMul in fp16"
    assert proto.graph.input[0].type.tensor_type.elem_type == F32 and proto.graph.output[0].type.tensor_type.elem_type == F32
    x = parity_mod.parity_frames(None, 64, n=6, seed=5)[0]
    dice = parity_mod.dice_per_image(_ort(graphs["fp16"], x) > 0.5, _ort(graphs["fp32"], x) > 0.5)
    assert dice.mean() >= parity_mod.ParityBars().fp16_min_dice


def test_output_tail_of_the_fused_graph_is_everything_from_the_branch_sigmoids(graphs):
    """The fused graph has no sigmoid inside a network: its output tail (what fp16 and int8 keep
    fp32) is both branch sigmoids and every node after them."""
    from pocus_edge.export.quantize import _fusion_tail_nodes

    proto = onnx.load(str(graphs["fp32"]))
    tail = set(_fusion_tail_nodes(proto))
    assert tail == _downstream_of_sigmoids(proto)
    assert sum(n.op_type == "Sigmoid" for n in proto.graph.node if n.name in tail) == 2
    assert not any(n.op_type in ("Conv", "MatMul", "Gemm") for n in proto.graph.node if n.name in tail)


@pytest.mark.parametrize("which", ["int8", "int8-trt"])
def test_int8_graph_quantizes_only_matrix_ops_outside_the_fusion(graphs, which):
    proto, _, consumers = _typed_graph(graphs[which])
    inits = {t.name: t for t in proto.graph.initializer}
    tail = _downstream_of_sigmoids(proto)
    producers = {out: n for n in proto.graph.node for out in n.output}
    matrix = ("Conv", "MatMul", "Gemm", *LAYOUT_OPS)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert dq
    for node in dq:
        # Every Q/DQ pair sits at an input or an output of a quantized matrix op (through data
        # movement at most): int8 is where the int8 kernels are, nowhere else.
        readers = [c.op_type for c in consumers.get(node.output[0], [])]
        q = producers.get(node.input[0])
        source = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        assert any(r in matrix for r in readers) or (source is not None and source.op_type in matrix) or q is None, \
            f"Q/DQ between {source.op_type if source else 'input'} and {readers}"
        assert not any(c.name in tail for c in consumers.get(node.output[0], []))
    # The fusion never sees an int8 tensor: no Q/DQ node is in the tail or feeds a sigmoid.
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node if n.name in tail)
    # Each branch's output head (weights named ...decoder.head.weight) keeps fp32 weights.
    heads = [n for n in proto.graph.node if n.op_type == "Conv" and "decoder.head" in n.input[1]]
    assert len(heads) == 2 and all(n.input[1] not in producers for n in heads)
    zero_points = [onnx.numpy_helper.to_array(inits[n.input[2]]) for n in proto.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    if which == "int8-trt":  # TensorRT's explicit quantization: int8, zero point 0 everywhere
        assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    x = parity_mod.parity_frames(None, 64, n=6, seed=5)[0]
    dice = parity_mod.dice_per_image(_ort(graphs[which], x) > 0.5, _ort(graphs["fp32"], x) > 0.5)
    assert dice.mean() >= parity_mod.ParityBars().int8_min_dice


# --------------------------------------------------------------------------------------------
# TensorRT: version dispatch (never a stand-in for a build) and engine cards


def test_builder_is_strongly_typed_on_both_majors():
    from pocus_edge.export.tensorrt import build_plan, network_flags

    fake = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    ten, eleven = build_plan("10.13.3.9"), build_plan("11.4.0.7")
    assert (ten.major, eleven.major) == (10, 11)
    assert network_flags(fake, ten) == 1 << 1  # 10.x opts in with the STRONGLY_TYPED flag
    assert network_flags(fake, eleven) == 0  # 11.x is always strongly typed
    for bad in ("9.3.0", "12.0.1", "x"):
        with pytest.raises(ToolchainUnavailable):
            build_plan(bad)


def test_tensorrt_module_calls_no_removed_api():
    """No weak-typing builder flag, calibrator or calibration profile anywhere in the builder."""
    import pocus_edge.export.tensorrt as trt_mod

    tree = ast.parse(Path(trt_mod.__file__).read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    removed = {"BuilderFlag", "int8_calibrator", "set_calibration_profile", "IInt8EntropyCalibrator2", "IInt8Calibrator",
               "set_quantization_flag", "platform_has_fast_fp16", "platform_has_fast_int8"}
    assert not (names & removed)


def _engine_with_card(tmp_path, fused, graphs) -> tuple[Path, dict]:
    from pocus_edge.card import write_sidecar
    from pocus_edge.export.onnx import read_onnx_card
    from pocus_edge.export.tensorrt import engine_card

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine bytes")
    card = engine_card(read_onnx_card(graphs["fp16"]), engine, tensorrt_version="11.4.0", gpu={"name": "NVIDIA L40S"},
                       batch=None, max_batch=8)
    write_sidecar(engine, card)
    return engine, card


def _io_from(card: dict, sha: str) -> dict:
    shape = [-1, *card["input"]["shape"][1:]]
    return {"inputs": [{"name": card["input"]["name"], "dtype": card["input"]["dtype"], "shape": shape}],
            "outputs": [{"name": n, "dtype": "float32", "shape": [-1, 1, 64, 64]} for n in card["outputs"]], "sha256": sha}


def test_engine_sidecar_round_trip_and_refusals(tmp_path, fused, graphs):
    from pocus_edge.card import check_artifact_card, file_sha256, read_sidecar, sidecar_path

    engine, card = _engine_with_card(tmp_path, fused, graphs)
    assert sidecar_path(engine).name == "m.engine.json"
    back = read_sidecar(engine)
    assert back == json.loads(json.dumps(card))
    assert back["precision"] == "fp16" and back["gflops_per_frame"] > 0
    assert back["fusion"] == fused.fusion_settings and back["tensorrt"]["gpu"]["name"] == "NVIDIA L40S"
    assert back["input"]["layout"] == "NCHW" and back["batch"]["profile"] == [1, 1, 8]
    assert set(back["provenance"]) >= {"generative_sha256", "contrastive_sha256"}
    sha = file_sha256(engine)
    check_artifact_card(back, _io_from(back, sha), engine)  # consistent: no error
    cases = {
        "another file": _io_from(back, "0" * 64),
        "dtype": {**_io_from(back, sha), "inputs": [{"name": "frames", "dtype": "uint8", "shape": [-1, 1, 64, 64]}]},
        "shape": {**_io_from(back, sha), "inputs": [{"name": "frames", "dtype": "float32", "shape": [-1, 3, 96, 96]}]},
        "outputs": {**_io_from(back, sha), "outputs": [{"name": "prob", "dtype": "float32", "shape": [-1, 1, 64, 64]}]},
    }
    for why, io_spec in cases.items():
        with pytest.raises(ExportError, match="m.engine") as err:
            check_artifact_card(back, io_spec, engine)
        assert "\n" not in str(err.value), why


def test_runtime_refuses_an_unreadable_engine_card_before_any_gpu_work(tmp_path):
    from pocus_edge.inference import open_backend

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    (tmp_path / "m.engine.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"m\.engine\.json.*not valid JSON"):
        open_backend(engine, "auto")


# --------------------------------------------------------------------------------------------
# The export table: staging, parity before promotion, a single network


def _no_staging_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_failed_parity_leaves_nothing_under_the_final_name(fused, tmp_path):
    from pocus_edge.export.api import ExportOptions, export_model
    from pocus_edge.export.parity import ParityBars

    out = tmp_path / "fused.onnx"
    good = export_model(fused, out, ExportOptions(parity_frames=2))
    assert good.parity["passed"] and out.is_file()
    before = out.read_bytes()
    report_before = (tmp_path / "fused.onnx.parity.json").read_text()
    impossible = ParityBars(fp32_max_abs=-1.0)  # no graph can pass: the export must refuse
    with pytest.raises(ExportError, match="parity failed"):
        export_model(fused, out, ExportOptions(parity_frames=2, bars=impossible, batch=None))
    assert out.read_bytes() == before  # the good artifact is untouched
    assert (tmp_path / "fused.onnx.parity.json").read_text() == report_before
    failed = json.loads((tmp_path / "fused.onnx.parity-failed.json").read_text())
    assert failed["passed"] is False
    with pytest.raises(ExportError):
        export_model(fused, tmp_path / "new.onnx", ExportOptions(parity_frames=2, bars=impossible))
    assert not (tmp_path / "new.onnx").exists()
    assert _no_staging_left(tmp_path)


def test_interrupted_export_removes_its_staging_folder(fused, tmp_path, monkeypatch):
    from pocus_edge.export import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api.parity_mod, "parity_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.export_model(fused, tmp_path / "f.onnx", precision="fp16", parity_frames=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_folder_at_the_output_is_refused_before_work(fused, tmp_path):
    from pocus_edge.export.api import export_model

    (tmp_path / "taken.onnx").mkdir()
    (tmp_path / "taken.onnx" / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="existing folder"):
        export_model(fused, tmp_path / "taken.onnx")
    assert (tmp_path / "taken.onnx" / "keep.txt").read_text() == "user data"


def test_single_network_is_a_first_class_export(tmp_path):
    from pocus_edge.card import CARD_KEY
    from pocus_edge.export.api import export_model
    from pocus_edge.inference import open_backend

    network = _branches(seed=4)[0]
    model = SingleSegmenter(network, name="student").eval()
    result = export_model(model, tmp_path / "student.onnx", precision="fp16", parity_frames=4)
    assert result.parity["passed"]
    proto = onnx.load(str(tmp_path / "student.onnx"))
    assert [o.name for o in proto.graph.output] == ["prob"]
    card = json.loads(next(p.value for p in proto.metadata_props if p.key == CARD_KEY))
    assert card["kind"] == "single-network" and card["fusion"] is None and card["precision"] == "fp16"
    backend = open_backend(tmp_path / "student.onnx")
    x = parity_mod.parity_frames(None, 64, n=2, seed=3)[0]
    with torch.no_grad():
        expected = torch.sigmoid(network(torch.from_numpy(x))).numpy()
    assert parity_mod.dice_per_image(backend.infer(x) > 0.5, expected > 0.5).mean() >= 0.98
    assert backend.precision == "fp16" and backend.gflops_per_frame == pytest.approx(card["gflops_per_frame"])


def test_an_export_killed_midway_leaves_only_a_staging_folder_that_the_next_start_sweeps(tmp_path):
    """SIGTERM arrives in the middle of a library export (sent by the process to itself at the
    parity step, so the test is deterministic). Outside the CLI nothing catches it: the process
    dies, nothing is left under the final name, and the staging folder it leaves is removed by
    the next start's sweep of that folder (the CLI itself turns SIGTERM into a clean exit 143:
    tests/test_outputs.py)."""
    import os
    import signal
    import subprocess
    import sys

    from pocus_edge.io import sweep_stale_temps

    code = """
import os, signal, sys, time
from pocus_edge.config import model_preset
from pocus_edge.export import api
from pocus_edge.models.fused import FusedSegmenter
from pocus_edge.models.transunet import TransUNet

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

api.parity_mod.parity_report = killed
cfg = model_preset("tiny")
api.export_model(FusedSegmenter(TransUNet(cfg), TransUNet(cfg)), sys.argv[1], precision="fp16", parity_frames=1)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.onnx")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == -signal.SIGTERM, done.stderr[-1500:]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 1 and left[0].startswith(".f.onnx.") and left[0].endswith(".staging"), left
    sweep_stale_temps(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_exports_a_single_network_and_refuses_half_a_pair(tmp_path, capsys):
    from pocus_edge.cli import main
    from pocus_edge.config import to_dict
    from pocus_edge.models.weights import save_checkpoint

    network = _branches(seed=2)[0]
    card = {"format": "pocus-edge/1", "preset": "tiny", "model": to_dict(network.cfg), "out_channels": 1,
            "stage": "finetune", "hyperparameters": {}, "data": [], "init": None}
    ckpt = save_checkpoint(tmp_path / "student.safetensors", network, card)
    out = tmp_path / "student.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--parity-frames", "2"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["prob"]
    assert main(["export", "-g", str(ckpt), "--out", str(tmp_path / "half.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--contrastive" in err and len(err.splitlines()) == 1 and not (tmp_path / "half.onnx").exists()
