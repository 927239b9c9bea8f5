"""The per-frame risk output of an exported graph (``--risk``): what it computes (the branch
disagreement of the pair, a single network's self disagreement), that it is batch independent,
that a graph without it is unchanged, its card entry from a ``qualify.json``, its parity in every
format that runs here, and how the backends return it. Tiny preset, random weights with a
rescaled head (see test_export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pocus_edge.card import RISK_OUTPUT_NAME
from pocus_edge.errors import ExportError
from pocus_edge.export import parity as parity_mod
from pocus_edge.export.api import ExportOptions, export_model
from pocus_edge.export.onnx import export_onnx, read_onnx_card
from pocus_edge.export.parity import spread_head_logits
from pocus_edge.models.fused import FusedSegmenter, SingleSegmenter
from pocus_edge.models.risk import (
    RISK_FORMULA_SINGLE,
    RISK_FORMULA_TWO_BRANCH,
    branch_disagreement,
    branch_disagreement_np,
    self_disagreement,
    self_disagreement_np,
)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def frames_of(n: int, seed: int = 3, uint8: bool = False) -> np.ndarray:
    return parity_mod.parity_frames(None, 64, n=n, seed=seed, uint8_input=uint8)[0]


def ort_outputs(path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))


@pytest.fixture(scope="module")
def branches():
    from test_export import make_branches

    return make_branches()


@pytest.fixture(scope="module")
def student():
    from pocus_edge.models.students import build_student

    torch.manual_seed(0)
    network = build_student("mobilenetv3", "tiny").eval().reparameterize()
    spread_head_logits(network, frames_of(4, seed=1), std=3.0)
    return network


@pytest.fixture(scope="module")
def branched_risk_onnx(branches, tmp_path_factory) -> Path:
    """Dynamic-batch fp32 graph with the branch outputs AND the risk output (one export)."""
    model = FusedSegmenter(*branches, return_branches=True, risk=True).eval()
    return export_onnx(model, tmp_path_factory.mktemp("risk") / "fused-risk.onnx", batch=None, max_batch=4)


# --------------------------------------------------------------------------------------------
# What the graph computes


def test_fused_risk_is_the_branch_disagreement_of_its_own_branch_outputs(branches):
    x = torch.from_numpy(frames_of(3))
    with torch.no_grad():
        fused, p_g, p_c, c_g, c_c, risk = FusedSegmenter(*branches, return_branches=True, risk=True).eval()(x)
        plain_fused, plain_risk = FusedSegmenter(*branches, risk=True).eval()(x)
        off = FusedSegmenter(*branches).eval()(x)
    assert risk.shape == (3, 1) and risk.dtype == torch.float32
    torch.testing.assert_close(risk, branch_disagreement(p_g, p_c), rtol=0, atol=0)
    torch.testing.assert_close(plain_risk, risk, rtol=0, atol=1e-7)
    assert torch.equal(plain_fused, off) and torch.equal(fused, off)  # the other outputs are untouched
    # It reads its input: a branch paired with itself disagrees only by its own softness, less
    # than with an independently initialized partner, on every frame.
    with torch.no_grad():
        same = FusedSegmenter(branches[0], branches[0], risk=True).eval()(x)[1]
    np.testing.assert_allclose(same.numpy()[:, 0], branch_disagreement_np(p_g.numpy(), p_g.numpy())[:, 0], atol=1e-6)
    assert bool((same < risk - 0.05).all())


def test_onnx_risk_matches_pytorch_and_the_numpy_twin_of_its_branch_outputs(branches, branched_risk_onnx):
    model = FusedSegmenter(*branches, return_branches=True, risk=True).eval()
    assert model.output_names() == ["fused", "p_generative", "p_contrastive", "c_generative", "c_contrastive", RISK_OUTPUT_NAME]
    x = frames_of(3, seed=7)
    got = ort_outputs(branched_risk_onnx, x)
    assert list(got) == model.output_names()  # risk last, after the existing outputs
    assert got["risk"].shape == (3, 1) and got["risk"].dtype == np.float32
    with torch.no_grad():
        expected = model(torch.from_numpy(x))[-1].numpy()
    np.testing.assert_allclose(got["risk"], expected, rtol=0, atol=1e-5)
    twin = branch_disagreement_np(got["p_generative"][:, 0], got["p_contrastive"][:, 0])[:, None]
    np.testing.assert_allclose(got["risk"], twin, rtol=0, atol=1e-5)


def test_risk_of_a_frame_is_independent_of_its_batch_mates(branched_risk_onnx):
    x = frames_of(3, seed=13)
    mates = np.concatenate([np.zeros_like(x[:1]), x[1:2], np.ones_like(x[:1])])
    batch = ort_outputs(branched_risk_onnx, x)["risk"]
    for k in range(3):
        alone = ort_outputs(branched_risk_onnx, x[k : k + 1])["risk"]
        np.testing.assert_allclose(alone, batch[k : k + 1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ort_outputs(branched_risk_onnx, mates)["risk"][1], batch[1], rtol=0, atol=1e-6)


def test_student_risk_is_its_self_disagreement(student, tmp_path):
    model = SingleSegmenter(student, name="student", risk=True).eval()
    assert model.output_names() == ["prob", RISK_OUTPUT_NAME] and model.risk_formula == RISK_FORMULA_SINGLE
    x = frames_of(3, seed=5)
    with torch.no_grad():
        prob, risk = model(torch.from_numpy(x))
    torch.testing.assert_close(risk, self_disagreement(prob, 0.5), rtol=0, atol=0)
    assert 0 < float(risk.min()) and float(risk.max()) < 1
    path = export_onnx(model, tmp_path / "student-risk.onnx", batch=None, max_batch=4)
    got = ort_outputs(path, x)
    np.testing.assert_allclose(got["risk"], risk.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["risk"], self_disagreement_np(got["prob"][:, 0])[:, None], rtol=0, atol=1e-5)
    alone = ort_outputs(path, x[2:3])["risk"]
    np.testing.assert_allclose(alone, got["risk"][2:3], rtol=0, atol=1e-6)
    assert read_onnx_card(path)["risk"] == {"formula": RISK_FORMULA_SINGLE, "threshold": None, "drift": None}


def test_without_risk_the_graph_and_card_are_what_they_were(branches, tmp_path):
    model = FusedSegmenter(*branches).eval()
    assert not model.risk and model.output_names() == ["fused"]
    off = onnx.load(str(export_onnx(model, tmp_path / "off.onnx", batch=1)))
    on = onnx.load(str(export_onnx(FusedSegmenter(*branches, risk=True).eval(), tmp_path / "on.onnx", batch=1)))
    assert [o.name for o in off.graph.output] == ["fused"]
    assert [o.name for o in on.graph.output] == ["fused", RISK_OUTPUT_NAME]
    card = read_onnx_card(tmp_path / "off.onnx")
    assert "risk" not in card and card["outputs"] == ["fused"]
    # The risk adds nodes after the branch sigmoids only; every node of the plain graph is still there.
    count = lambda proto: {t: sum(n.op_type == t for n in proto.graph.node) for t in {n.op_type for n in proto.graph.node}}
    plain, risky = count(off), count(on)
    assert all(risky.get(t, 0) >= c for t, c in plain.items()) and risky.get("ReduceSum", 0) > plain.get("ReduceSum", 0)
    weights = lambda proto: sum(int(np.prod(t.dims)) for t in proto.graph.initializer if np.prod(t.dims) > 16)
    assert weights(off) == weights(on)  # no new weights


# --------------------------------------------------------------------------------------------
# The card entry from qualify.json


def qualify_file(path: Path, *models: tuple[str, str]) -> Path:
    drift = {"center": 0.2, "half_width": 0.05, "lam": 0.1, "hysteresis": 0.5, "k": 5.0, "calibration_frames": 400,
             "lower": 0.15, "upper": 0.25}
    body = {"schema": "pocus-edge-qualify/1", "models": [{"name": name, "risk": {"formula": formula, "threshold": 0.3 + i / 10, "drift": drift}}
                                    for i, (name, formula) in enumerate(models)]}
    path.write_text(json.dumps(body))
    return path


def test_risk_entry_reads_threshold_and_drift_and_refuses_mistakes(tmp_path):
    from pocus_edge.export.risk import risk_entry
    from pocus_edge.io import sha256_file

    assert risk_entry(RISK_FORMULA_TWO_BRANCH) == {"formula": RISK_FORMULA_TWO_BRANCH, "threshold": None, "drift": None}
    one = qualify_file(tmp_path / "one.json", ("seed0", RISK_FORMULA_TWO_BRANCH))
    entry = risk_entry(RISK_FORMULA_TWO_BRANCH, one)
    assert entry["threshold"] == pytest.approx(0.3) and entry["drift"]["center"] == 0.2 and entry["drift"]["half_width"] == 0.05
    assert entry["qualify"] == {"file": "one.json", "sha256": sha256_file(one), "model": "seed0"}
    two = qualify_file(tmp_path / "two.json", ("seed0", RISK_FORMULA_TWO_BRANCH), ("seed1", RISK_FORMULA_TWO_BRANCH))
    assert risk_entry(RISK_FORMULA_TWO_BRANCH, two, "seed1")["threshold"] == pytest.approx(0.4)
    refusals = [
        ((RISK_FORMULA_TWO_BRANCH, two), "holds 2 models .*--qualify-model"),
        ((RISK_FORMULA_TWO_BRANCH, two, "seed7"), "no model named 'seed7'"),
        ((RISK_FORMULA_SINGLE, one), "qualified with risk formula .*branch-soft-dice.* this graph computes .*self-soft-dice"),
        ((RISK_FORMULA_TWO_BRANCH, tmp_path / "missing.json"), "not found"),
        ((RISK_FORMULA_TWO_BRANCH, None, "seed0"), "--qualify"),
    ]
    for args, message in refusals:
        with pytest.raises(ExportError, match=message) as info:
            risk_entry(*args)
        assert "\n" not in str(info.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ExportError, match="bad.json: not a readable qualify file"):
        risk_entry(RISK_FORMULA_TWO_BRANCH, tmp_path / "bad.json")
    (tmp_path / "v2.json").write_text(json.dumps({"schema": 2, "models": []}))
    with pytest.raises(ExportError, match="schema 2"):
        risk_entry(RISK_FORMULA_TWO_BRANCH, tmp_path / "v2.json")


@pytest.mark.parametrize("change", [{"half_width": 0.0}, {"lam": 0.0}, {"lam": 1.5}, {"hysteresis": 2.0},
                                    {"center": float("nan")}, {"center": "x"}, None])
def test_a_drift_band_export_accepts_is_one_the_runtime_accepts(tmp_path, change):
    """export checks the band without importing the runtime; the two checks agree."""
    from pocus_edge.errors import ConfigError
    from pocus_edge.export.risk import risk_entry
    from pocus_edge.runtime.drift import DriftBand

    path = qualify_file(tmp_path / "q.json", ("m", RISK_FORMULA_TWO_BRANCH))
    body = json.loads(path.read_text())
    drift = body["models"][0]["risk"]["drift"]
    if change is not None:
        drift.update(change)
    path.write_text(json.dumps(body))  # json writes NaN, which json reads back
    runtime_ok = True
    try:
        DriftBand.from_dict(drift)
    except ConfigError:
        runtime_ok = False
    try:
        risk_entry(RISK_FORMULA_TWO_BRANCH, path)
        export_ok = True
    except ExportError as exc:
        export_ok = False
        assert "drift band" in str(exc)
    assert export_ok == runtime_ok == (change is None)


def test_export_card_carries_the_qualified_risk_and_the_cli_refuses_a_formula_mismatch(branches, tmp_path, capsys):
    from pocus_edge.cli import main
    from pocus_edge.config import to_dict
    from pocus_edge.models.weights import save_checkpoint

    cfg = branches[0].cfg
    ckpts = []
    for name, branch in zip(("generative", "contrastive"), branches):
        card = {"format": "pocus-edge/1", "preset": cfg.name, "model": to_dict(cfg), "out_channels": 1,
                "stage": "finetune", "hyperparameters": {}, "data": [], "init": None}
        ckpts.append(str(save_checkpoint(tmp_path / f"{name}.safetensors", branch, card)))
    qualify = qualify_file(tmp_path / "qualify.json", ("pair", RISK_FORMULA_TWO_BRANCH), ("student", RISK_FORMULA_SINGLE))
    out = tmp_path / "fused.onnx"
    base = ["export", "-g", ckpts[0], "-c", ckpts[1], "--out", str(out), "--parity-frames", "3"]
    # A formula that is not the graph's: one line, exit 2, nothing written.
    assert main([*base, "--risk", "--qualify", str(qualify), "--qualify-model", "student"]) == 2
    err = capsys.readouterr().err
    assert "qualify.json" in err and "formula" in err and "Traceback" not in err and not out.exists()
    assert main([*base, "--qualify", str(qualify), "--qualify-model", "pair"]) == 2  # --qualify without --risk
    assert "--risk" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--risk", "--qualify", str(qualify)]) == 2  # two models, none named
    assert "--qualify-model" in capsys.readouterr().err
    assert main([*base, "--risk", "--qualify", str(qualify), "--qualify-model", "pair"]) == 0
    printed = capsys.readouterr().out
    assert "risk max |diff|" in printed
    card = read_onnx_card(out)
    assert card["outputs"] == ["fused", RISK_OUTPUT_NAME]
    risk = card["risk"]
    assert risk["formula"] == RISK_FORMULA_TWO_BRANCH and risk["threshold"] == pytest.approx(0.3)
    assert risk["drift"]["center"] == 0.2 and risk["qualify"]["model"] == "pair"
    report = json.loads(Path(str(out) + ".parity.json").read_text())
    assert report["risk_passed"] and report["risk_max_abs_diff"] <= 1e-4 and report["risk_bar"]["max"] == 1e-4
    # The runtime reads it through the backend.
    from pocus_edge.inference import open_backend

    backend = open_backend(out)
    assert backend.has_risk and backend.risk_card["threshold"] == pytest.approx(0.3)
    assert backend.describe()["risk"] == backend.risk_card and backend.risk_card["drift"]["half_width"] == 0.05


# --------------------------------------------------------------------------------------------
# Parity in every format


def test_parity_catches_a_wrong_or_missing_risk_output(branches):
    model = FusedSegmenter(*branches, risk=True).eval()
    frames = frames_of(3, seed=9)
    reference, _, reference_risk = parity_mod.torch_reference_outputs(model, frames)

    def runner(shift):
        return lambda _frames: {"prob": reference, "risk": reference_risk + shift}

    good = parity_mod.parity_report("x.onnx", model, frames, precision="fp32", source="test", runner=runner(0.0))
    assert good["passed"] and good["risk_max_abs_diff"] == 0
    bad = parity_mod.parity_report("x.onnx", model, frames, precision="fp32", source="test", runner=runner(1e-3))
    assert not bad["passed"] and not bad["risk_passed"] and bad["mask_dice_mean"] == 1.0
    with pytest.raises(ExportError, match="risk_max_abs_diff"):
        parity_mod.enforce(bad)
    assert "risk" in parity_mod.parity_markdown(bad)
    nan = parity_mod.parity_report("x.onnx", model, frames, precision="fp16", source="test", runner=runner(np.nan))
    assert not nan["passed"] and nan["risk_nonfinite_outputs"] == 3
    with pytest.raises(ExportError, match="no 'risk' output"):
        parity_mod.parity_report("x.onnx", model, frames, precision="fp32", source="test",
                                 runner=lambda _frames: {"prob": reference})


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_graphs_keep_the_risk_within_its_bar(branches, tmp_path, precision):
    model = FusedSegmenter(*branches, risk=True).eval()
    options = ExportOptions(precision=precision, batch=None, max_batch=4, parity_frames=8,
                            calibration_frames=frames_of(8, seed=21) if precision == "int8" else None)
    result = export_model(model, tmp_path / f"f-{precision}.onnx", options)
    report = result.parity
    assert report["passed"] and report["risk_passed"], report
    assert report["risk_bar"]["max"] == parity_mod.ParityBars().risk_max_abs(precision)
    assert 0 < report["risk_max_abs_diff"] <= report["risk_bar"]["max"]  # a different precision, within its bar
    proto = onnx.load(str(result.onnx_path))
    risk_output = next(o for o in proto.graph.output if o.name == RISK_OUTPUT_NAME)
    assert risk_output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_onnx_card(result.onnx_path)["risk"]["formula"] == RISK_FORMULA_TWO_BRANCH


def test_ort_format_carries_the_risk_output(student, tmp_path):
    from pocus_edge.inference import open_backend

    model = SingleSegmenter(student, uint8_input=True, name="student", risk=True).eval()
    out = tmp_path / "student.ort"
    result = export_model(model, out, ExportOptions(target="ort", precision="fp32", batch=1, parity_frames=4))
    assert result.parity["passed"] and result.parity["risk_passed"]
    backend = open_backend(out)
    x = frames_of(2, seed=4, uint8=True)
    got = backend.run(x[:1])
    assert set(got) == {"prob", "risk"} and got["risk"].shape == (1, 1)
    np.testing.assert_allclose(got["risk"], self_disagreement_np(got["prob"][:, 0])[:, None], atol=1e-5)
    assert backend.risk_card == {"formula": RISK_FORMULA_SINGLE, "threshold": None, "drift": None}


def test_openvino_runs_the_risk_output(branches, tmp_path):
    pytest.importorskip("openvino")
    from pocus_edge.inference import open_backend

    model = FusedSegmenter(*branches, risk=True).eval()
    out = tmp_path / "fused.xml"
    result = export_model(model, out, ExportOptions(target="openvino", precision="fp32", batch=1, parity_frames=4))
    assert result.parity["passed"] and result.parity["risk_passed"] and result.parity["backend"] == "openvino"
    backend = open_backend(out)
    assert backend.has_risk and backend.risk_card["formula"] == RISK_FORMULA_TWO_BRANCH
    x = frames_of(1, seed=6)
    with torch.no_grad():
        expected = model(torch.from_numpy(x))[1].numpy()
    np.testing.assert_allclose(backend.infer_outputs(x)["risk"], expected, atol=1e-4)


def test_tensorrt_accepts_the_risk_graph_up_to_the_engine(branched_risk_onnx, tmp_path):
    """The op check runs everywhere; the engine needs TensorRT and a GPU (skipped otherwise)."""
    from pocus_edge.card import EXPORT_INPUT_NAME
    from pocus_edge.export.tensorrt import build_engine, check_tensorrt_ops, tensorrt_available

    ops = check_tensorrt_ops(branched_risk_onnx)
    assert ops["compatible"], ops["issues"]
    assert ops["op_counts"].get("ReduceSum", 0) > 0
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT engine with the risk output not testable here: {why}")
    from pocus_edge.inference import open_backend

    engine = build_engine(branched_risk_onnx, tmp_path / "r.engine", input_name=EXPORT_INPUT_NAME, input_shape=(1, 3, 64, 64),
                          batch=None, max_batch=4, timing_cache=tmp_path / "t.cache")
    backend = open_backend(engine, "tensorrt")
    x = frames_of(3)
    np.testing.assert_allclose(backend.infer_outputs(x)["risk"], ort_outputs(branched_risk_onnx, x)["risk"], atol=1e-4)


def test_coreml_package_has_the_risk_output(student, tmp_path):
    """Conversion and the package's spec run on any OS; Core ML prediction needs macOS (off
    macOS the parity runs the same in-graph preprocessing in PyTorch, as for every package)."""
    from pocus_edge.export.coreml import coremltools_status, inspect_mlpackage

    importable, can_predict, message = coremltools_status()
    if not importable:
        pytest.skip(message)
    model = SingleSegmenter(student, name="student", risk=True).eval()
    out = tmp_path / "student.mlpackage"
    result = export_model(model, out, target="coreml", precision="fp16", frame_shape=(48, 64), parity_frames=3)
    spec = inspect_mlpackage(out)
    assert [o["name"] for o in spec["outputs"]] == ["prob", RISK_OUTPUT_NAME]
    assert spec["card"]["risk"]["formula"] == RISK_FORMULA_SINGLE and spec["card"]["coreml"]["outputs"] == ["prob", "risk"]
    assert result.parity["passed"] and result.parity["risk_passed"]
    if not can_predict:
        assert "ProbeFrameModel" in result.parity["backend"]


# --------------------------------------------------------------------------------------------
# Backends


def test_torch_backend_returns_the_risk_the_export_computes(branches, branched_risk_onnx, tmp_path):
    from pocus_edge.config import to_dict
    from pocus_edge.inference import open_backend
    from pocus_edge.models.weights import save_checkpoint

    cfg = branches[0].cfg
    paths = []
    for name, branch in zip(("g", "c"), branches):
        card = {"format": "pocus-edge/1", "preset": cfg.name, "model": to_dict(cfg), "out_channels": 1, "stage": "finetune"}
        paths.append(save_checkpoint(tmp_path / f"{name}.safetensors", branch, card))
    torch_backend = open_backend(tuple(paths), "torch")
    onnx_backend = open_backend(branched_risk_onnx)
    x = frames_of(2, seed=17)
    reference, exported = torch_backend.run(x), onnx_backend.run(x)
    assert set(reference) == set(exported) == {"prob", "weight", "risk"}
    np.testing.assert_allclose(exported["risk"], reference["risk"], atol=1e-5)
    assert torch_backend.risk_card == {"formula": RISK_FORMULA_TWO_BRANCH, "threshold": None, "drift": None}
    plain = open_backend(export_onnx(FusedSegmenter(*branches).eval(), tmp_path / "plain.onnx", batch=1))
    assert not plain.has_risk and plain.risk_card is None and "risk" not in plain.run(x[:1])
    assert plain.describe()["risk"] is None


def test_a_risk_output_of_the_wrong_shape_is_refused():
    from pocus_edge.inference import check_segmenter_io

    inputs = [{"name": "frames", "dtype": "float32", "shape": ["batch", 3, 64, 64]}]
    prob = {"name": "fused", "dtype": "float32", "shape": ["batch", 1, 64, 64]}
    assert check_segmenter_io("m.onnx", inputs, [prob, {"name": "risk", "dtype": "float32", "shape": ["batch", 1]}], None) == 64
    with pytest.raises(ExportError, match="m.onnx: output 'risk' has shape"):
        check_segmenter_io("m.onnx", inputs, [prob, {"name": "risk", "dtype": "float32", "shape": ["batch", 1, 64, 64]}], None)
