"""The compact student as a first-class exported model: its checkpoint (safetensors + a
``kind: student`` card) loads through the same loader as a TransUNet branch, exports to every
target through the same table (reparameterized, with its card in the metadata and a parity
check), streams through the runtime, and gets its own benchmark rows. Also: int8 and fp16 keep
only the graph's *output* end fp32, so a student with sigmoid-gated squeeze-excite blocks is
still quantized. Tiny preset, random weights with a rescaled output head (see test_export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pocus_edge.cli import main
from pocus_edge.errors import CheckpointError
from pocus_edge.export import parity as parity_mod
from pocus_edge.export.parity import spread_head_logits
from pocus_edge.models.flops import count_flops, student_size
from pocus_edge.models.fused import SingleSegmenter, load_single
from pocus_edge.models.students import build_student, student_config
from pocus_edge.models.weights import build_segmenter, read_checkpoint, save_student

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _randomize_batchnorm(model):
    from test_students import _randomize_batchnorm as randomize  # non-trivial BN statistics

    randomize(model)


def _decisive(network, size: int = 64, seed: int = 11):
    """Rescale a random network's head so its masks are about half bone (see spread_head_logits)."""
    frames, _ = parity_mod.parity_frames(None, size, n=4, seed=seed)
    spread_head_logits(network, frames)
    return network


def _target_frames(site_dir, size: int, n: int) -> np.ndarray:
    return parity_mod.parity_frames(site_dir, size, n=n)[0]


# --------------------------------------------------------------------------------------------
# Checkpoint


def test_student_checkpoint_round_trips_in_both_forms(tmp_path):
    from pocus_edge.io import sha256_file

    torch.manual_seed(0)
    student = build_student("fastvit", "tiny")  # reparameterizable: the two forms differ
    _randomize_batchnorm(student)
    _decisive(student.eval())
    path = save_student(tmp_path / "fastvit.safetensors", student)
    state, card = read_checkpoint(path)
    assert card["kind"] == "student" and card["student"] == "fastvit" and card["preset"] == "tiny"
    assert card["model"] == json.loads(json.dumps(student.cfg.to_dict())) and card["form"] == "training"
    assert card["out_channels"] == 1 and card["stage"] == "init"
    assert card["gflops_per_frame"] == pytest.approx(student_size(student.cfg)["gflops"], rel=1e-3)
    assert card["gflops_per_frame"] == pytest.approx(count_flops(student.reparameterize(), (1, 3, 64, 64)) / 1e9, rel=1e-3)

    rebuilt, _ = build_segmenter(path)  # the same loader family as a TransUNet branch
    assert type(rebuilt).__name__ == "StudentNet" and not rebuilt.reparameterized
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in student.state_dict().items())

    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.sigmoid(student(x))
    single = load_single(path)
    assert single.kind == "student" and single.network.reparameterized
    assert len(single.network.state_dict()) < len(student.state_dict())  # the fused inference form
    assert single.cards["student"] == card and single.checkpoint_sha256["student"] == sha256_file(path)
    with torch.no_grad():
        torch.testing.assert_close(single(x), expected, rtol=1e-4, atol=1e-4)

    deployed_path = save_student(tmp_path / "fastvit-deployed.safetensors", student.reparameterize())
    assert read_checkpoint(deployed_path)[1]["form"] == "deployed"
    deployed, _ = build_segmenter(deployed_path)
    assert deployed.reparameterized
    with torch.no_grad():
        torch.testing.assert_close(load_single(deployed_path)(x), expected, rtol=1e-4, atol=1e-4)


def test_student_checkpoint_that_does_not_fit_its_card_is_refused(tmp_path):
    from pocus_edge.models.weights import save_checkpoint

    student = build_student("mobilenetv3", "tiny")
    path = save_student(tmp_path / "s.safetensors", student)
    state, card = read_checkpoint(path)
    card["model"]["decoder_channels"] = [16, 8, 8, 4]  # the card now describes another decoder
    save_checkpoint(tmp_path / "wrong.safetensors", state, card)
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors: does not fit StudentNet\('mobilenetv3' at preset 'tiny'\).*shape") as info:
        load_single(tmp_path / "wrong.safetensors")
    assert "\n" not in str(info.value)
    save_checkpoint(tmp_path / "bare.safetensors", state, {"kind": "student"})
    with pytest.raises(CheckpointError, match="lacks 'model'"):
        build_segmenter(tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="save_student takes a StudentNet"):
        save_student(tmp_path / "x.safetensors", torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Checkpoint -> export (fp32, int8) -> parity -> stream -> benchmark rows


@pytest.fixture(scope="module")
def exported(tiny_sites, tmp_path_factory):
    """A tiny MobileNetV3 student checkpoint exported by the CLI to ONNX fp32 and int8
    (calibrated on the target site), parity checked on its test frames."""
    _, target = tiny_sites
    root = tmp_path_factory.mktemp("student")
    torch.manual_seed(1)
    student = build_student("mobilenetv3", "tiny").eval()
    spread_head_logits(student, _target_frames(target, 64, 4))
    ckpt = save_student(root / "student.safetensors", student)
    out = {"ckpt": ckpt, "student": student, "target": target, "root": root}
    for precision in ("fp32", "int8"):
        path = root / f"student-{precision}.onnx"
        code = main(["export", "--checkpoint", str(ckpt), "--target", "onnx", "--precision", precision,
                     "--calib", str(target), "--calib-frames", "16", "--parity-frames", "6", "--out", str(path)])
        assert code == 0 and path.is_file()
        out[precision] = path
    return out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_student_exports_with_its_card_and_passes_parity(exported, precision):
    from pocus_edge.export.onnx import read_onnx_card

    path = exported[precision]
    card = read_onnx_card(path)
    cfg = exported["student"].cfg
    assert card["kind"] == "student" and card["student"] == "mobilenetv3" and card["preset"] == "tiny"
    assert card["model"] == json.loads(json.dumps(cfg.to_dict())) and card["form"] == "deployed"
    assert card["outputs"] == ["prob"] and card["fusion"] is None and card["precision"] == precision
    assert card["branches"]["student"] == read_checkpoint(exported["ckpt"])[1]
    assert card["gflops_per_frame"] == pytest.approx(student_size(cfg)["gflops"], rel=1e-3)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["prob"]
    report = json.loads(path.with_name(path.name + ".parity.json").read_text())
    assert report["passed"] and "site target" in report["frames"]["source"]
    if precision == "fp32":
        assert report["max_abs_diff"] <= 1e-4
    else:
        assert report["mask_dice_mean"] >= 0.95
        assert card["int8"]["calibration"]["site"] == "target" and card["int8"]["calibration"]["labels_used"] is False
        quantized = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"]
        assert quantized, "the int8 student holds no quantized tensors"
    # The ONNX agrees with the student's own PyTorch forward (training form) on target frames.
    frames = _target_frames(exported["target"], 64, 6)
    with torch.no_grad():
        expected = exported["student"].predict(torch.from_numpy(frames)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"frames": frames[i : i + 1]})[0] for i in range(len(frames))])  # batch-1 graph
    if precision == "fp32":
        np.testing.assert_allclose(got, expected, atol=1e-4)
    else:
        assert parity_mod.dice_per_image(got > 0.5, expected > 0.5).mean() >= 0.95


def _recording(site_dir, path: Path, n: int) -> tuple[Path, np.ndarray]:
    """A TeleMED .tvd.h5 of ``n`` target test frames (non-square: cropped to 48x64)."""
    from pocus_edge.data.layout import load_site
    from pocus_edge.runtime.sources import write_tvd_h5

    site = load_site(site_dir)
    records = site.select("test")[:n]
    frames = np.stack([site.read_image(r)[:48] for r in records])
    return write_tvd_h5(path, frames, np.arange(len(frames)) * 33.0), frames


@pytest.mark.parametrize("which", ["int8", "ckpt"])
def test_student_streams_through_the_runtime(exported, tmp_path, capsys, which):
    """`pocus-edge stream` runs the exported int8 student (onnxruntime) and the checkpoint itself
    (torch backend); masks are the backend's own probabilities thresholded at frame resolution,
    GFLOPs come from the card."""
    from pocus_edge.inference import open_backend
    from pocus_edge.metrics import binarize
    from pocus_edge.runtime.overlay import to_frame_resolution

    recording, frames = _recording(exported["target"], tmp_path / "sweep.tvd.h5", 5)
    model = exported[which]
    report_path, masks_path = tmp_path / "report.json", tmp_path / "masks.npz"
    capsys.readouterr()  # whatever the fixture printed
    assert main(["stream", str(recording), "--model", str(model), "--report", str(report_path),
                 "--masks", str(masks_path), "--no-drop", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads(report_path.read_text())
    assert printed["frames_processed"] == report["frames_processed"] == len(frames)
    assert report["backend"] == ("ort" if which == "int8" else "torch")
    card_gflops = read_checkpoint(exported["ckpt"])[1]["gflops_per_frame"]
    assert report["gflops_per_frame"] == pytest.approx(card_gflops, rel=1e-3)
    backend = open_backend(model)
    stored = np.load(masks_path)
    for i, frame in enumerate(frames):
        prob = backend.run(backend.prepare(frame)[None])["prob"][0, 0]
        expected = binarize(to_frame_resolution(prob, frame.shape), backend.threshold)
        np.testing.assert_array_equal(stored[f"frame_{i:07d}"] > 0, expected)
    assert 0 < sum(stored[k].mean() for k in stored.files)  # not an all-background stream


def test_student_checkpoint_gets_its_own_benchmark_rows(exported, tmp_path):
    from pocus_edge.benchmark import BenchmarkOptions, run_benchmark
    from pocus_edge.benchmark.plot import plot_data
    from pocus_edge.metrics import dice_iou_per_image

    opts = BenchmarkOptions(student_checkpoints=(exported["ckpt"],), teacher=False, data=exported["target"],
                            formats=["torch-fp32", "onnx-fp32", "onnx-int8"], batches=(1, 2), runs=3, warmup=1,
                            max_frames=6, probe=False, workdir=tmp_path)
    report = run_benchmark(opts)
    rows = {r["format"]: r for r in report["rows"]}
    assert list(rows) == ["torch-fp32", "onnx-fp32", "onnx-int8"]
    assert all(r["model"] == "mobilenetv3" and r["status"] == "ok" for r in rows.values()), [r["reason"] for r in rows.values()]
    gflops = read_checkpoint(exported["ckpt"])[1]["gflops_per_frame"]
    assert all(r["gflops_per_frame"] == pytest.approx(gflops, rel=1e-3) for r in rows.values())
    assert report["students"][0]["name"] == "mobilenetv3" and report["students"][0]["weights"] == str(exported["ckpt"])
    # The torch row's Dice, recomputed here from the student itself on the same labeled frames.
    from pocus_edge.data.layout import load_site
    from pocus_edge.data.transforms import preprocess_frame, preprocess_mask

    site = load_site(exported["target"])
    records = site.select("test", labeled=True)[:6]
    assert report["data"]["frames"] == len(records)
    x = np.stack([preprocess_frame(site.read_image(r), 64) for r in records])
    masks = np.stack([preprocess_mask(site.read_mask(r), 64) for r in records])
    with torch.no_grad():
        prob = exported["student"].predict(torch.from_numpy(x)).numpy()
    dice, _ = dice_iou_per_image(prob, masks)
    # (abs 1e-3: another batch size may move a pixel sitting at the threshold; a wrong Dice moves more)
    assert rows["torch-fp32"]["dice"] == pytest.approx(float(dice.mean()), abs=1e-3)
    assert rows["onnx-fp32"]["agreement_dice"] >= 0.99 and rows["onnx-int8"]["agreement_dice"] >= 0.9
    assert rows["onnx-int8"]["artifact_bytes"] < rows["onnx-fp32"]["artifact_bytes"]
    labels = plot_data([report], ["r"], batch=2)["formats"]
    assert labels == ["mobilenetv3 torch-fp32", "mobilenetv3 onnx-fp32", "mobilenetv3 onnx-int8"]
    # The exported artifact benchmarked as it is: its rows are named after the student in its card.
    artifact = run_benchmark(BenchmarkOptions(model=exported["int8"], batches=(1,), runs=2, warmup=1, max_frames=2, probe=False))
    assert {r["model"] for r in artifact["rows"]} == {"mobilenetv3"} and artifact["rows"][0]["status"] == "ok"


# --------------------------------------------------------------------------------------------
# Other targets


def test_student_tensorrt_export_writes_the_checked_onnx_where_tensorrt_is_missing(exported, tmp_path):
    from pocus_edge.export.api import ExportOptions, ToolchainMissing, export_checkpoints
    from pocus_edge.export.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    if ok:
        pytest.skip("TensorRT is available here: the engine build is tested by test_export.py")
    out = tmp_path / "student.engine"
    with pytest.raises(ToolchainMissing) as info:
        export_checkpoints(exported["ckpt"], None, out, ExportOptions(target="tensorrt", precision="fp16", parity_frames=4))
    result = info.value.result
    assert result.onnx_path.is_file() and result.tensorrt_ops["compatible"], result.tensorrt_ops
    assert result.parity["passed"] and not out.exists()
    print(f"TensorRT engine not built here: {why}")


def test_student_openvino_int8_meets_its_bar(exported, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from pocus_edge.export.api import ExportOptions, export_checkpoints
    from pocus_edge.inference import open_backend

    out = tmp_path / "student.xml"
    result = export_checkpoints(exported["ckpt"], None, out, ExportOptions(target="openvino", precision="int8",
                                                                           calib=exported["target"], calib_frames=8, parity_frames=4))
    assert result.parity["passed"] and result.parity["backend"] == "openvino"
    backend = open_backend(out)
    assert backend.card["kind"] == "student" and backend.gflops_per_frame == pytest.approx(
        read_checkpoint(exported["ckpt"])[1]["gflops_per_frame"], rel=1e-3)


@pytest.mark.slow
def test_student_coreml_package_converts_and_passes_parity_off_macos(tmp_path):
    from pocus_edge.export.coreml import coremltools_status

    importable, can_predict, message = coremltools_status()
    if not importable:
        pytest.skip(message)
    from pocus_edge.export.api import export_model
    from pocus_edge.export.coreml import inspect_mlpackage

    torch.manual_seed(2)
    model = SingleSegmenter(_decisive(build_student("mobilenetv3", "tiny").eval()).reparameterize()).eval()
    out = tmp_path / "student.mlpackage"
    result = export_model(model, out, target="coreml", precision="fp16", frame_shape=(48, 64), parity_frames=4)
    spec = inspect_mlpackage(out)
    assert spec["outputs"][0]["name"] == "prob" and spec["outputs"][0]["shape"] == [1, 1, 64, 64]
    assert spec["inputs"][0]["height"] == 48 and spec["inputs"][0]["width"] == 64
    assert spec["card"]["kind"] == "student" and spec["card"]["coreml"]["output"] == "prob"
    assert spec["ops"].get("conv", 0) > 0 and spec["ops"].get("sigmoid", 0) == 1
    assert result.parity["passed"]
    if not can_predict:
        assert "ProbeFrameModel" in result.parity["backend"]
        print(f"Core ML prediction not run: {message}")


# --------------------------------------------------------------------------------------------
# Reduced precision keeps only the output end fp32: sigmoid-gated students still quantize


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A student on TinyNet-E (EfficientNet family: SiLU activations and sigmoid-gated
    squeeze-excite, both exported as Sigmoid nodes) and its fp32 ONNX."""
    from pocus_edge.export.onnx import export_onnx

    torch.manual_seed(3)
    network = build_student(student_config("mobilenetv3", "tiny", encoder="tinynet_e")).eval()
    _randomize_batchnorm(network)
    _decisive(network)
    model = SingleSegmenter(network).eval()
    fp32 = export_onnx(model, tmp_path_factory.mktemp("gated") / "gated.onnx", batch=None, max_batch=4)
    return model, fp32


def _last_sigmoid(proto):
    outputs = {o.name for o in proto.graph.output}
    return [n for n in proto.graph.node if n.op_type == "Sigmoid" and set(n.output) & outputs]


def test_output_tail_of_a_gated_student_is_its_final_sigmoid(gated):
    from pocus_edge.export.quantize import _fusion_tail_nodes

    proto = onnx.load(str(gated[1]))
    sigmoids = [n for n in proto.graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoids) > 10  # SE gates and SiLUs inside the network
    assert _fusion_tail_nodes(proto) == [n.name for n in _last_sigmoid(proto)]


def test_sigmoid_gated_student_quantizes_to_int8(gated, tmp_path):
    from pocus_edge.export.quantize import ArrayCalibrationReader, _precision_sensitive_convs, quantize_int8

    model, fp32 = gated
    calib = parity_mod.parity_frames(None, 64, n=8, seed=21)[0]
    int8 = quantize_int8(fp32, tmp_path / "gated-int8.onnx", ArrayCalibrationReader(calib))
    proto = onnx.load(str(int8))
    producers = {out: n for n in proto.graph.node for out in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    kept = set(_precision_sensitive_convs(onnx.load(str(fp32))))
    quantized = [n for n in convs if n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"]
    # Every conv but the head and last decoder block takes int8 weights, those after the first
    # SE gate included (the old rule left everything downstream of any Sigmoid in fp32).
    assert len(quantized) == len(convs) - len(kept) and len(kept) <= 4, (len(quantized), len(convs), len(kept))
    x = parity_mod.parity_frames(None, 64, n=6, seed=5)[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    dice = parity_mod.dice_per_image(session.run(None, {"frames": x})[0] > 0.5, reference > 0.5)
    assert dice.mean() >= parity_mod.ParityBars().int8_min_dice


def test_sigmoid_gated_student_converts_to_fp16(gated, tmp_path):
    from pocus_edge.export.quantize import convert_fp16

    fp16 = convert_fp16(gated[1], tmp_path / "gated-fp16.onnx")
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(fp16)))
    types_ = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.value_info) + list(proto.graph.output)}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    fp16_convs = [n for n in convs if types_.get(n.output[0]) == onnx.TensorProto.FLOAT16]
    assert len(fp16_convs) >= 0.9 * len(convs), f"{len(fp16_convs)}/{len(convs)} convs in fp16"
    last = _last_sigmoid(proto)[0]
    assert types_.get(last.output[0]) == onnx.TensorProto.FLOAT and types_.get(last.input[0]) == onnx.TensorProto.FLOAT


def test_openvino_int8_scope_of_a_gated_student_is_its_final_sigmoid(gated):
    ov = pytest.importorskip("openvino")
    from pocus_edge.export.openvino import fp32_scope

    model = ov.convert_model(str(gated[1]))
    kept = set(fp32_scope(model))
    ops = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    assert sum(t == "Sigmoid" for t in ops.values()) > 10
    assert [ops[name] for name in kept] == ["Sigmoid"]
