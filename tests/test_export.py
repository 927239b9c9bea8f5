"""Export: fused graph to ONNX (fp32/fp16/int8), TensorRT op check / engine, Core ML package,
parity reports. Everything runs on the tiny preset with random weights whose head is rescaled
so the logits spread like a trained model's (raw random heads give p ~ 0.5 everywhere, where
thresholded masks and min-max normalized confidences are degenerate and parity means nothing).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pocus_edge.config import model_preset, to_dict
from pocus_edge.errors import ExportError
from pocus_edge.export import parity as parity_mod
from pocus_edge.export.onnx import CARD_KEY, INPUT_NAME, check_onnx, export_onnx, read_onnx_card
from pocus_edge.export.parity import spread_head_logits
from pocus_edge.models.fused import FusedSegmenter, load_fused
from pocus_edge.models.transunet import TransUNet

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def make_branches(preset: str = "tiny", seed: int = 0) -> tuple[TransUNet, TransUNet]:
    cfg = model_preset(preset)
    torch.manual_seed(seed)
    g, c = TransUNet(cfg).eval(), TransUNet(cfg).eval()
    frames, _ = parity_mod.parity_frames(None, cfg.img_size, n=4, seed=99)
    spread_head_logits(g, frames)
    spread_head_logits(c, frames)
    return g, c


def test_spread_head_logits_sets_median_and_spread():
    """The random-weight head rescaling used by the parity tests, the benchmark and the golden set:
    afterwards the branch's logits on the same frames have median 0 and the requested std."""
    cfg = model_preset("tiny")
    torch.manual_seed(3)
    branch = TransUNet(cfg).eval()
    frames, _ = parity_mod.parity_frames(None, cfg.img_size, n=3, seed=5)
    with torch.no_grad():
        before = branch(torch.from_numpy(frames)).double()
    assert float(before.std()) < 0.5  # raw random heads are indecisive
    spread_head_logits(branch, frames, std=4.0)
    with torch.no_grad():
        after = branch(torch.from_numpy(frames)).double()
    assert float(after.median()) == pytest.approx(0.0, abs=1e-4)
    assert float(after.std()) == pytest.approx(4.0, rel=1e-4)
    # an affine map of the old logits: the ranking of the pixels is unchanged
    gain = float(after.std() / before.std())
    np.testing.assert_allclose((after - after.median()).numpy(), (gain * (before - before.median())).numpy(), atol=1e-3)
    with pytest.raises(TypeError, match="output head"):
        spread_head_logits(torch.nn.Identity(), frames)


def ort_run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def branches():
    return make_branches()


@pytest.fixture(scope="module")
def fused(branches):
    return FusedSegmenter(*branches).eval()


@pytest.fixture(scope="module")
def fp32_onnx(fused, tmp_path_factory) -> Path:
    """One dynamic-batch fp32 export shared by the tests below (exports take ~15 s here)."""
    out = tmp_path_factory.mktemp("onnx") / "fused.onnx"
    return export_onnx(fused, out, batch=None, max_batch=8)


@pytest.fixture(scope="module")
def checkpoints(branches, tmp_path_factory) -> tuple[Path, Path]:
    from pocus_edge.models.weights import save_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    cfg = branches[0].cfg
    paths = []
    for name, branch in zip(("generative", "contrastive"), branches):
        card = {"format": "pocus-edge/1", "preset": cfg.name, "model": to_dict(cfg), "out_channels": 1,
                "stage": "finetune", "hyperparameters": {}, "data": [], "init": None}
        paths.append(save_checkpoint(root / f"{name}.safetensors", branch, card))
    return paths[0], paths[1]


def frames_of(n: int, size: int = 64, seed: int = 3) -> np.ndarray:
    return parity_mod.parity_frames(None, size, n=n, seed=seed)[0]


# --------------------------------------------------------------------------------------------
# ONNX fp32


def test_onnx_checker_clean_dynamic_batch_and_opset(fp32_onnx):
    check_onnx(fp32_onnx)  # raises ExportError if the checker objects
    proto = onnx.load(str(fp32_onnx))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: dynamic batch
    assert proto.graph.input[0].name == INPUT_NAME


@pytest.mark.parametrize("batch", [1, 4])
def test_onnxruntime_matches_pytorch(fused, fp32_onnx, batch):
    x = frames_of(batch)
    with torch.no_grad():
        expected = fused(torch.from_numpy(x)).numpy()
    got = ort_run(fp32_onnx, x)
    assert got.shape == (batch, 1, 64, 64)
    assert np.abs(got - expected).max() <= 1e-4
    assert 0.05 < (expected > 0.5).mean() < 0.95  # the masks are not trivially empty/full


def test_per_image_fusion_is_independent_of_batch_mates(fused, fp32_onnx, branches):
    x = frames_of(4, seed=11)
    alone = ort_run(fp32_onnx, x[:1])
    in_batch = ort_run(fp32_onnx, x)[:1]
    assert np.abs(alone - in_batch).max() <= 1e-6
    # The check can fail: with the released code's per-batch normalization a frame's output
    # moves with its batch mates (shown on low-confidence branches, where each frame's
    # confidence range differs), while per-image normalization stays put.
    torch.manual_seed(1)
    g, c = (TransUNet(branches[0].cfg).eval() for _ in range(2))
    for branch in (g, c):
        spread_head_logits(branch, x, std=0.05)
    mates = np.concatenate([x[:1], np.zeros_like(x[1:2]), x[2:]])
    with torch.no_grad():
        for norm, moves in (("batch", True), ("image", False)):
            model = FusedSegmenter(g, c, norm=norm).eval()
            a = model(torch.from_numpy(x[:1])).numpy()
            b = model(torch.from_numpy(mates)).numpy()[:1]
            assert (np.abs(a - b).max() > 1e-3) == moves, norm


def test_card_metadata(fused, fp32_onnx):
    from pocus_edge.data.transforms import INTERPOLATION
    from pocus_edge.models.flops import count_flops

    card = read_onnx_card(fp32_onnx)
    assert card["img_size"] == 64 and card["preset"] == "tiny"
    assert card["input"]["dtype"] == "float32" and card["input"]["shape"][0] == "batch"
    assert card["threshold"] == 0.5 and card["precision"] == "fp32"
    assert card["fusion"] == {"method": "entropy", "norm": "image", "formula": "weighted"}
    assert card["preprocessing"]["interpolation"] == INTERPOLATION
    assert card["gflops_per_frame"] == pytest.approx(count_flops(fused, (1, 3, 64, 64)) / 1e9, abs=1e-3)
    assert set(card["provenance"]) >= {"generative_sha256", "contrastive_sha256", "code_version"}


def test_read_onnx_card_refuses_foreign_model(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ExportError, match=CARD_KEY):
        read_onnx_card(path)
    with pytest.raises(ExportError, match="not found"):
        read_onnx_card(tmp_path / "missing.onnx")


def test_uint8_input_variant_equals_float_variant(branches, fp32_onnx, tmp_path):
    from pocus_edge.data.transforms import preprocess_frame, preprocess_gray

    model_u8 = FusedSegmenter(*branches, uint8_input=True).eval()
    path = export_onnx(model_u8, tmp_path / "u8.onnx", batch=1)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert read_onnx_card(path)["input"]["dtype"] == "uint8"
    rng = np.random.default_rng(0)
    raw = (rng.random((90, 120)) * 255).astype(np.uint8)  # non-square probe frame
    gray = preprocess_gray(raw, 64)[None, None]
    float_frame = preprocess_frame(raw, 64)[None]
    out_u8 = ort_run(path, gray)
    out_float = ort_run(fp32_onnx, float_frame)
    assert np.abs(out_u8 - out_float).max() <= 1e-6


def test_return_branches_outputs_fusion_inputs(branches):
    model = FusedSegmenter(*branches, return_branches=True).eval()
    x = torch.from_numpy(frames_of(2))
    with torch.no_grad():
        fused, p_g, p_c, c_g, c_c = model(x)
        assert torch.allclose(p_g, torch.sigmoid(branches[0](x)))
        assert torch.allclose(fused, (p_g * c_g + p_c * c_c) / (c_g + c_c + 1e-6), atol=1e-6)
        # per-image min-max normalization: every frame's confidence spans [0, 1]
        assert torch.allclose(c_g.amax(dim=(1, 2, 3)), torch.ones(2)) and torch.all(c_g.amin(dim=(1, 2, 3)) == 0)


def test_fp32_bar_excludes_only_ill_conditioned_fusion_pixels(fused):
    """Where both normalized confidences are ~0 the fusion ratio amplifies 1e-7 rounding to
    >1e-4 (the premise); the fp32 bar skips exactly those pixels and still catches a real error."""
    from pocus_edge.models.fusion import fuse

    # premise: a 1e-7 change of one branch's probability at p ~ 0.5 (confidence ~ 0 after the
    # per-image min-max) moves the fused output by far more than 1e-4
    p_g = torch.tensor([0.5, 0.9, 0.1, 0.4986]).reshape(1, 1, 2, 2)
    p_c = torch.tensor([0.5, 0.95, 0.05, 0.5002]).reshape(1, 1, 2, 2)
    moved = fuse(p_g + torch.tensor([0, 0, 0, 1e-6]).reshape(1, 1, 2, 2), p_c) - fuse(p_g, p_c)
    assert moved.abs().max() > 1e-4
    frames = frames_of(2, seed=8)
    reference, weight_sum = parity_mod.torch_reference_with_weights(fused, frames)
    with torch.no_grad():
        assert np.array_equal(reference, fused(torch.from_numpy(frames)).numpy())
    low = np.argwhere(weight_sum < parity_mod.WELL_CONDITIONED_MIN_WEIGHT)
    high = np.argwhere(weight_sum >= 0.5)
    assert len(high) > 0
    if len(low):
        noisy = reference.copy()
        noisy[tuple(low[0])] += 0.01
        stats = parity_mod.compare(reference, noisy, weight_sum=weight_sum)
        assert stats["max_abs_diff"] == pytest.approx(0.01, abs=1e-6)
        assert stats["max_abs_diff_well_conditioned"] == 0 and stats["ill_conditioned_pixels"] == len(low)
    broken = reference.copy()
    broken[tuple(high[0])] += 1e-3
    stats = parity_mod.compare(reference, broken, weight_sum=weight_sum)
    assert stats["max_abs_diff_well_conditioned"] == pytest.approx(1e-3, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Reduced precision


def test_fp16_conversion_parity(fused, fp32_onnx, tmp_path):
    from pocus_edge.export.quantize import convert_fp16

    # Plant values fp16 cannot hold in one weight: the converter clamps them, and convert_fp16
    # counts its per-tensor warnings into the card instead of printing them.
    planted = onnx.load(str(fp32_onnx))
    weight = next(t for t in planted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[:3] = [3e-9, -2e-8, 1e5]  # positive and negative underflow, positive overflow
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(planted, str(tmp_path / "planted.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that escapes fails the test
        clamped = read_onnx_card(convert_fp16(tmp_path / "planted.onnx", tmp_path / "planted.fp16.onnx"))["fp16"]
    baseline = read_onnx_card(convert_fp16(fp32_onnx, tmp_path / "base.fp16.onnx"))["fp16"]["tensors_clamped"]
    assert clamped["tensors_clamped"]["overflow"] == baseline["overflow"] + 1
    # the planted tensor may already have had underflowing values of either sign
    assert baseline["underflow"] <= clamped["tensors_clamped"]["underflow"] <= baseline["underflow"] + 2

    path = convert_fp16(fp32_onnx, tmp_path / "fused.fp16.onnx")
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O kept float32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert read_onnx_card(path)["precision"] == "fp16"
    frames = frames_of(6, seed=5)
    report = parity_mod.parity_report(path, fused, frames, precision="fp16", source="test")
    assert report["nonfinite_outputs"] == 0
    assert report["passed"] and report["mask_dice_mean"] >= 0.98
    assert report["max_abs_diff"] > 0  # it really is a different precision
    # fp16 does not meet the fp32 bar: the parity check can fail, and enforce() says so.
    strict = parity_mod.parity_report(path, fused, frames, precision="fp32", source="test")
    assert not strict["passed"]
    with pytest.raises(ExportError, match="parity failed"):
        parity_mod.enforce(strict)


def test_int8_static_quantization_calibrated_on_target_frames_without_masks(fused, fp32_onnx, tiny_sites, tmp_path, monkeypatch):
    from pocus_edge.data import layout
    from pocus_edge.export.quantize import SiteCalibrationReader, quantize_int8

    _, target = tiny_sites
    real_read = layout.read_gray_png

    def no_masks(path):
        assert layout.MASKS not in Path(path).parts, f"calibration opened a mask: {path}"
        return real_read(path)

    monkeypatch.setattr(layout, "read_gray_png", no_masks)
    reader = SiteCalibrationReader(target, 64, n_frames=24)
    assert all(r.split == "train" for r in reader.records)
    path = quantize_int8(fp32_onnx, tmp_path / "fused.int8.onnx", reader)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # per-channel weights: some DequantizeLinear has a vector scale
    inits = {t.name: t for t in proto.graph.initializer}
    assert any(n.op_type == "DequantizeLinear" and n.input[1] in inits and len(inits[n.input[1]].dims) == 1
               and inits[n.input[1]].dims[0] > 1 for n in proto.graph.node)
    card = read_onnx_card(path)
    assert card["precision"] == "int8" and card["int8"]["calibration"]["labels_used"] is False
    frames, source = parity_mod.parity_frames(target, 64, n=8)
    report = parity_mod.parity_report(path, fused, frames, precision="int8", source=source)
    assert report["passed"] and report["mask_dice_mean"] >= 0.95, report
    assert "site target" in report["frames"]["source"]


# --------------------------------------------------------------------------------------------
# TensorRT


def test_tensorrt_op_check_accepts_export_and_flags_planted_op(fp32_onnx):
    from onnx import helper

    from pocus_edge.export.tensorrt import check_tensorrt_ops

    clean = check_tensorrt_ops(fp32_onnx)
    assert clean["compatible"], clean["issues"]
    assert clean["op_counts"].get("Conv", 0) > 0
    proto = onnx.load(str(fp32_onnx))
    out = proto.graph.output[0].name
    proto.graph.node.append(helper.make_node("Unique", [out], ["planted_unique"], name="planted"))
    planted = check_tensorrt_ops(proto)
    assert not planted["compatible"]
    assert [(i["node"], i["op_type"]) for i in planted["issues"]] == [("planted", "Unique")]


def test_tensorrt_op_check_flags_asymmetric_quantization(fp32_onnx, tmp_path):
    """TensorRT needs zero points of 0: the CPU (uint8, asymmetric) int8 graph is flagged."""
    from pocus_edge.export.quantize import ArrayCalibrationReader, quantize_int8
    from pocus_edge.export.tensorrt import check_tensorrt_ops

    calib = frames_of(4, seed=21)
    asym = quantize_int8(fp32_onnx, tmp_path / "asym.onnx", ArrayCalibrationReader(calib))
    sym = quantize_int8(fp32_onnx, tmp_path / "sym.onnx", ArrayCalibrationReader(calib), symmetric_activations=True)
    assert any("zero point" in i["reason"] for i in check_tensorrt_ops(asym)["issues"])
    assert check_tensorrt_ops(sym)["compatible"]


def test_trtexec_command_line_follows_the_tensorrt_version():
    from pocus_edge.export.tensorrt import trtexec_command

    common = dict(input_name="frames", input_shape=(1, 3, 224, 224), batch=None, max_batch=8, timing_cache="t.cache")
    ten = trtexec_command("m.onnx", "m.engine", tensorrt_version="10.8.0.43", **common)
    eleven = trtexec_command("m.onnx", "m.engine", tensorrt_version="11.4.0", **common)
    for line in (ten, eleven):
        assert "--minShapes=frames:1x3x224x224" in line and "--maxShapes=frames:8x3x224x224" in line
        assert "--timingCacheFile=t.cache" in line
        # precision lives in the ONNX: no weak-typing flags (11.x removed them)
        assert not any(flag in line.split() for flag in ("--fp16", "--int8", "--bf16", "--best"))
    assert "--stronglyTyped" in ten.split() and "--stronglyTyped" not in eleven.split()


def test_tensorrt_engine_build(fp32_onnx, tmp_path):
    from pocus_edge.export.tensorrt import build_engine, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT engine build not testable here: {why}")
    engine = build_engine(fp32_onnx, tmp_path / "m.engine", input_name=INPUT_NAME, input_shape=(1, 3, 64, 64),
                          batch=None, max_batch=4, timing_cache=tmp_path / "t.cache")
    assert engine.stat().st_size > 0 and (tmp_path / "t.cache").stat().st_size > 0
    card = json.loads((tmp_path / "m.engine.json").read_text())
    assert card["precision"] == "fp32" and card["tensorrt"]["strongly_typed"]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_export_agrees_with_onnxruntime(checkpoints, tiny_sites, tmp_path, precision):
    """Where TensorRT and a GPU exist: fp16 and int8 engines through export (precision from the
    graph), run by the runtime backend, against the ONNX they were built from in onnxruntime."""
    from pocus_edge.export.api import ExportOptions, export_checkpoints
    from pocus_edge.export.tensorrt import tensorrt_available
    from pocus_edge.inference import open_backend

    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT engine build not testable here: {why}")
    _, target = tiny_sites
    out = tmp_path / f"f-{precision}.engine"
    result = export_checkpoints(*checkpoints, out, ExportOptions(target="tensorrt", precision=precision, calib=target,
                                                                 calib_frames=16, batch=None, max_batch=4))
    assert result.parity["passed"] and result.parity["backend"] == "tensorrt"
    engine = open_backend(out, "tensorrt")
    assert engine.precision == precision and engine.gflops_per_frame > 0
    frames = frames_of(4)
    agreement = parity_mod.dice_per_image(engine.infer(frames) > 0.5, ort_run(result.onnx_path, frames) > 0.5)
    assert agreement.mean() >= 0.98


def test_cli_tensorrt_without_toolchain_writes_onnx_and_exits_3(checkpoints, tiny_sites, tmp_path, capsys):
    from pocus_edge.cli import main
    from pocus_edge.export.tensorrt import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are present here: the exit-3 path does not apply")
    g, c = checkpoints
    _, target = tiny_sites
    out = tmp_path / "fused.engine"
    code = main(["export", "-g", str(g), "-c", str(c), "--target", "tensorrt", "--out", str(out),
                 "--precision", "int8", "--calib", str(target), "--calib-frames", "16", "--dynamic-batch"])
    captured = capsys.readouterr()
    assert code == 3
    assert "trtexec --onnx=" in captured.out and "--int8" not in captured.out and "--fp16" not in captured.out
    assert "TensorRT 10.x" in captured.out and "TensorRT 11.x" in captured.out  # no TensorRT here: both lines
    assert "TensorRT" in captured.err and "Traceback" not in captured.err
    onnx_path = out.with_suffix(".onnx")
    assert onnx_path.is_file() and not out.exists()
    ops = json.loads(Path(str(onnx_path) + ".tensorrt_ops.json").read_text())
    assert ops["compatible"]
    report = json.loads(Path(str(onnx_path) + ".parity.json").read_text())
    assert report["precision"] == "int8" and report["passed"]
    card = read_onnx_card(onnx_path)
    assert card["int8"]["activations"] == "int8 symmetric" and card["batch"]["dynamic"]
    assert card["provenance"]["generative_sha256"] == layout_sha(g)


def layout_sha(path: Path) -> str:
    from pocus_edge.io import sha256_file

    return sha256_file(path)


# --------------------------------------------------------------------------------------------
# Checkpoint loading and CLI errors


def test_load_fused_refuses_mixed_presets_and_mim_checkpoints(checkpoints, tmp_path):
    from pocus_edge.cli import main
    from pocus_edge.models.weights import save_checkpoint

    g, _ = checkpoints
    small = model_preset("small")
    mim = TransUNet(model_preset("tiny"), out_channels=3)
    save_checkpoint(tmp_path / "mim.safetensors", mim, {"model": to_dict(mim.cfg), "out_channels": 3, "stage": "pretrain-mim"})
    with pytest.raises(ExportError, match="output channels"):
        load_fused(g, tmp_path / "mim.safetensors")
    save_checkpoint(tmp_path / "small.safetensors", TransUNet(small), {"model": to_dict(small), "out_channels": 1, "preset": "small"})
    with pytest.raises(ExportError, match="different model configs"):
        load_fused(g, tmp_path / "small.safetensors")
    # CLI: one line, exit 2, for a missing file and for int8 without a calibration site
    assert main(["export", "-g", str(tmp_path / "nope.safetensors"), "-c", str(g), "--out", str(tmp_path / "x.onnx")]) == 2
    assert main(["export", "-g", str(g), "-c", str(g), "--out", str(tmp_path / "x.onnx"), "--precision", "int8"]) == 2


# --------------------------------------------------------------------------------------------
# Core ML


def _coremltools_or_skip():
    from pocus_edge.export.coreml import coremltools_status

    ok, can_predict, message = coremltools_status()
    if not ok:
        pytest.skip(message)
    return can_predict, message


@pytest.mark.slow
def test_coreml_package_spec(fused, tmp_path):
    _coremltools_or_skip()
    from pocus_edge.export.api import export_model
    from pocus_edge.export.coreml import inspect_mlpackage

    out = tmp_path / "fused.mlpackage"
    result = export_model(fused, out, target="coreml", precision="fp16", frame_shape=(48, 80), parity_frames=4)
    assert out.is_dir() and (out / "Manifest.json").is_file()
    spec = inspect_mlpackage(out)
    assert spec["model_type"] == "mlProgram"
    assert spec["inputs"] == [{"name": "frame", "type": "imageType", "width": 80, "height": 48, "color": "GRAYSCALE"}]
    assert spec["outputs"][0]["name"] == "fused" and spec["outputs"][0]["shape"] == [1, 1, 64, 64]
    ops = spec["ops"]
    for op in ("conv", "layer_norm", "softmax", "sigmoid", "log", "reduce_min", "reduce_max", "upsample_bilinear"):
        assert ops.get(op, 0) > 0, (op, ops)
    assert ops.get("pad", 0) > 0 or ops.get("constant_pad", 0) > 0  # bottom/right padding to square in-graph
    assert spec["const_dtypes"].get("FLOAT16", 0) > 0  # FP16 compute precision: fp16 weights
    assert spec["card"]["coreml"]["input"]["height"] == 48 and spec["card"]["fusion"]["norm"] == "image"
    assert result.parity["passed"] and result.parity_paths[0].is_file()


def test_coreml_prediction(tmp_path):
    can_predict, message = _coremltools_or_skip()
    if not can_predict:
        pytest.skip(message)
    from pocus_edge.export.api import export_model

    model = FusedSegmenter(*make_branches()).eval()
    result = export_model(model, tmp_path / "f.mlpackage", target="coreml", precision="fp16", parity_frames=4)
    assert result.parity["backend"].startswith("coreml") and result.parity["passed"]


# --------------------------------------------------------------------------------------------
# Paper preset


@pytest.mark.slow
def test_paper_preset_exports_and_runs(tmp_path):
    cfg = model_preset("paper")
    torch.manual_seed(0)
    model = FusedSegmenter(TransUNet(cfg), TransUNet(cfg)).eval()
    path = export_onnx(model, tmp_path / "paper.onnx", batch=1)
    size = path.stat().st_size + sum(p.stat().st_size for p in tmp_path.glob("paper.onnx.data"))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 2 * 105_275_921
    assert 4 * n_params * 0.95 < size < 4 * n_params * 1.1  # fp32 weights, all of them
    card = read_onnx_card(path)
    assert card["preset"] == "paper" and card["img_size"] == 224 and card["gflops_per_frame"] > 100
    x = frames_of(1, size=224)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(ort_run(path, x) - expected).max() <= 1e-4
