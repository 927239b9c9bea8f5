"""Golden vectors for the Android demo: what `pocus-edge golden` writes must be exactly what the
Python pipeline computes, and the committed set under android_demo/ must still match the
current pipeline (otherwise the Kotlin tests would be checking a stale reference)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pocus_edge.cli import main
from pocus_edge.data import transforms
from pocus_edge.errors import DataError
from pocus_edge.export import golden
from pocus_edge.models.risk import (
    RISK_FORMULA_SINGLE,
    RISK_FORMULA_TWO_BRANCH,
    branch_disagreement_np,
    self_disagreement_np,
)
from pocus_edge.runtime.drift import DriftBand, DriftMonitor
from pocus_edge.runtime.risk import level_of

HAVE_FUSED = importlib.util.find_spec("pocus_edge.models.fused") is not None
REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "android_demo" / "core" / "src" / "test" / "resources" / "golden"


def _check_golden_folder(folder: Path) -> dict:
    """Every array in a golden folder against an independent recomputation by the pipeline."""
    index = golden.read_golden(folder)
    assert index["interpolation"] == transforms.INTERPOLATION
    assert index["mask_rule"] == "prob > threshold"
    threshold = np.float32(index["threshold"])
    for case in index["cases"]:
        frame = np.load(folder / case["frame"])
        assert frame.dtype == np.uint8 and frame.shape == (case["height"], case["width"])
        assert frame.shape[0] != frame.shape[1], "golden frames must be non-square so the padding is exercised"
        for entry in case["sizes"]:
            size = entry["size"]
            gray = np.load(folder / entry["gray"])
            np.testing.assert_array_equal(gray, transforms.preprocess_gray(frame, size))
            if "input" in entry:
                x = np.load(folder / entry["input"])
                assert x.dtype == np.float32 and x.shape == (3, size, size)
                np.testing.assert_array_equal(x, transforms.preprocess_frame(frame, size))
            if "cv2" in entry:
                padded = transforms.pad_to_square(frame)
                ref = cv2.resize(padded, (size, size), interpolation=cv2.INTER_LINEAR)
                np.testing.assert_array_equal(np.load(folder / entry["cv2"]), ref)
        if case.get("prob"):
            prob = np.load(folder / case["prob"])
            mask = np.load(folder / case["mask"])
            assert prob.dtype == np.float32 and prob.shape == (case["prob_size"],) * 2
            np.testing.assert_array_equal(mask, (prob > threshold).astype(np.uint8))
            assert 0.05 < mask.mean() < 0.95, "a mask that is (nearly) all one class tests no thresholding"
            frame_mask = np.load(folder / case["frame_mask"])
            assert frame_mask.shape == frame.shape
            if index.get("risk_formula") == RISK_FORMULA_SINGLE:
                assert case["risk"] == pytest.approx(float(self_disagreement_np(prob, float(threshold))), abs=1e-9)
    probe_p = np.load(folder / index["threshold_probe"]["prob"])
    probe_m = np.load(folder / index["threshold_probe"]["mask"])
    assert np.any(probe_p == threshold), "the probe must hold the threshold itself"
    np.testing.assert_array_equal(probe_m, (probe_p > threshold).astype(np.uint8))
    lat = index["latency_probe"]
    for q, value in lat["percentiles"].items():
        assert value == pytest.approx(np.percentile(lat["samples_ms"], float(q)), abs=1e-12)
    return index


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden")
    golden.write_golden(out, n=3, seed=5)
    return out


def test_written_golden_equals_the_python_pipeline(written):
    index = _check_golden_folder(written)
    assert len(index["cases"]) == 3
    assert index["input_size"] == 64 and 224 in index["sizes"]
    if HAVE_FUSED:
        assert "random-weight tiny" in index["probabilities"]["kind"]
        assert all("prob" in case for case in index["cases"])
    else:  # preprocessing goldens only without the model code
        assert index["probabilities"] is None
        assert not any("prob" in case for case in index["cases"])


def test_frame_resolution_mask_matches_the_runtime(tmp_path):
    """golden.probability_at_frame restates runtime.overlay.to_frame_resolution (the export layer
    may not import the runtime); this keeps the two identical."""
    from pocus_edge.runtime.overlay import to_frame_resolution

    model = tmp_path / "fused.onnx"
    _mean_channel_onnx(model, 40, 0.3)
    out = tmp_path / "g"
    index = golden.write_golden(out, model=model, n=3)
    for case in index["cases"]:
        frame = np.load(out / case["frame"])
        prob = np.load(out / case["prob"])
        runtime = to_frame_resolution(prob, frame.shape)
        np.testing.assert_array_equal(golden.probability_at_frame(prob, frame.shape), runtime)
        frame_mask = np.load(out / case["frame_mask"])
        np.testing.assert_array_equal(frame_mask, (runtime >= np.float32(0.3)).astype(np.uint8))
        assert 0 < frame_mask.sum() < frame_mask.size


def test_committed_golden_set_is_current_and_small(tmp_path):
    """If this fails after a change of the preprocessing, the mask rule or the students, regenerate:
    pocus-edge golden --student mobilenetv3 --out android_demo/core/src/test/resources/golden"""
    if not COMMITTED.is_dir():
        pytest.skip("android_demo golden set not present in this checkout")
    index = _check_golden_folder(COMMITTED)
    total = sum(p.stat().st_size for p in COMMITTED.iterdir())
    assert total < 1_000_000, f"committed golden set is {total} bytes; keep it under 1 MB"
    # The app ships a student: the committed probabilities are the default student's, and the
    # current student code still computes them.
    described = index["probabilities"]
    assert described["student"]["name"] == "mobilenetv3" and described["student"]["preset"] == "tiny"
    fresh = golden.write_golden(tmp_path / "fresh", n=len(index["cases"]), seed=described["seed"], student="mobilenetv3")
    assert fresh["probabilities"] == described
    for case in index["cases"]:
        committed = np.load(COMMITTED / case["prob"])
        np.testing.assert_allclose(np.load(tmp_path / "fresh" / case["prob"]), committed, atol=1e-4)


def test_student_golden_holds_the_students_probabilities(tmp_path):
    """`golden --student NAME`: the probabilities are the seeded random-weight tiny student's, in
    its inference form, recomputed here independently of the golden writer."""
    import torch

    from pocus_edge.export.parity import spread_head_logits
    from pocus_edge.models.students import build_student

    out = tmp_path / "g"
    index = golden.write_golden(out, n=3, seed=4, student="fastvit")
    _check_golden_folder(out)
    assert "student fastvit" in index["probabilities"]["kind"] and index["input_size"] == 64
    frames = [np.load(out / case["frame"]) for case in index["cases"]]
    torch.manual_seed(4)
    network = build_student("fastvit", "tiny").eval().reparameterize()
    x = np.stack([transforms.preprocess_frame(f, 64) for f in frames])
    spread_head_logits(network, x, std=3.0)
    with torch.no_grad():
        expected = torch.sigmoid(network(torch.from_numpy(x))).numpy()
    for i, case in enumerate(index["cases"]):
        np.testing.assert_allclose(np.load(out / case["prob"]), expected[i, 0], atol=1e-5)
    assert main(["golden", "--out", str(tmp_path / "h"), "--student", "resnet"]) == 2
    assert main(["golden", "--out", str(tmp_path / "h"), "--student", "fastvit", "--model", str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "h").exists()


def _mean_channel_onnx(path: Path, size: int, threshold: float) -> None:
    """A stand-in 'fused model': probability = mean over the 3 input channels (= gray / 255),
    with a model card whose threshold is not 0.5."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [1 / 3] * 3)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["frames", "w"], ["fused"])],
        "mean_channels",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("fused", TensorProto.FLOAT, [1, 1, size, size])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = {"img_size": size, "threshold": threshold}
    model.metadata_props.append(onnx.StringStringEntryProto(key="pocus_edge_card", value=json.dumps(card)))
    onnx.save(model, str(path))


def test_onnx_model_gives_probabilities_size_and_threshold(tmp_path):
    model = tmp_path / "fused.onnx"
    _mean_channel_onnx(model, 48, 0.4)
    out = tmp_path / "g"
    index = golden.write_golden(out, model=model, n=2)
    assert index["input_size"] == 48 and index["threshold"] == pytest.approx(0.4)
    assert index["probabilities"]["kind"] == "onnxruntime"
    for case in index["cases"]:
        frame = np.load(out / case["frame"])
        expected = transforms.preprocess_gray(frame, 48).astype(np.float32) / 255.0
        prob = np.load(out / case["prob"])
        np.testing.assert_allclose(prob, expected, atol=1e-6)
        np.testing.assert_array_equal(np.load(out / case["mask"]), (prob >= np.float32(0.4)).astype(np.uint8))


def test_site_frames_are_taken_from_the_site_and_made_non_square(tmp_path):
    from pocus_edge.data.layout import FrameRecord, SiteWriter

    writer = SiteWriter(tmp_path / "target")
    rng = np.random.default_rng(0)
    for k in range(5):
        img = rng.integers(0, 256, (50, 50), dtype=np.uint8)
        writer.add(FrameRecord(f"v0_{k:03d}.png", "v0", k, patient="p0"), img)
    writer.close()
    frames = golden.site_frames(tmp_path / "target", 2)
    assert len(frames) == 2
    for img, note in frames:
        assert img.shape == (40, 50) and "target" in note
    first = cv2.imread(str(tmp_path / "target" / "Images" / "v0_000.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(frames[0][0], first[:40])


def test_cli_writes_a_golden_folder_and_reports_bad_input(tmp_path, capsys):
    model = tmp_path / "fused.onnx"
    _mean_channel_onnx(model, 32, 0.5)
    assert main(["golden", "--out", str(tmp_path / "g"), "--model", str(model), "--frames", "1"]) == 0
    assert "wrote 1 frames" in capsys.readouterr().out
    assert (tmp_path / "g" / "index.json").is_file()
    assert main(["golden", "--out", str(tmp_path / "h"), "--data", str(tmp_path / "no_site")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no_site" in err and "\n" not in err
    with pytest.raises(DataError):
        golden.read_golden(tmp_path / "no_site")


def _replay_drift_probe(probe: dict) -> dict:
    """The runtime's own monitor and level rule over the probe's risks (None = non-finite)."""
    entry = probe["card"]["risk"]
    monitor = DriftMonitor(DriftBand.from_dict(entry["drift"]))
    ewma, alarm, levels = [], [], []
    for i, r in enumerate(probe["risks"]):
        r = float("nan") if r is None else r
        on = monitor.update(r, i)
        ewma.append(monitor.z)
        alarm.append(int(on))
        levels.append(level_of(r, entry["threshold"], on) if np.isfinite(r) else ("alarm" if on else "ok"))
    return {"ewma": ewma, "alarm": alarm, "levels": levels, "alarm_intervals": monitor.report()["alarm_intervals"],
            "nonfinite": monitor.nonfinite}


@pytest.mark.parametrize("where", ["written", "committed"])
def test_drift_probe_is_what_the_runtime_alarm_computes(where, written):
    """The golden drift probe (written by the export layer from the alarm's definition) equals
    the runtime's DriftMonitor frame by frame: EWMA bit for bit, alarm, level, intervals; and it
    exercises what the app must get right (both directions, the threshold, a non-finite risk)."""
    folder = written if where == "written" else COMMITTED
    if not folder.is_dir():
        pytest.skip("android_demo golden set not present in this checkout")
    probe = golden.read_golden(folder)["drift_probe"]
    replay = _replay_drift_probe(probe)
    assert replay["ewma"] == probe["ewma"]  # same float64 operations in the same order
    for key in ("alarm", "levels", "alarm_intervals", "nonfinite"):
        assert replay[key] == probe[key], key
    assert len(probe["alarm_intervals"]) == 2 and "high" in probe["levels"] and probe["nonfinite"] == 1
    band = probe["card"]["risk"]["drift"]
    up = probe["alarm_intervals"][0][0]
    z_up = np.array(probe["ewma"])[up]
    assert z_up > band["upper"] and all(z <= band["upper"] for z in probe["ewma"][:up])
    assert min(probe["ewma"]) < band["lower"]  # the second excursion leaves the band below


def test_golden_risk_is_the_models_own(tmp_path):
    """The fused pair's per-frame risk is its branches' disagreement (recomputed here); an
    exported graph's is its own risk output."""
    import torch

    index = golden.write_golden(tmp_path / "fused", n=2, seed=3)
    if not HAVE_FUSED:
        pytest.skip("no model code")
    assert index["risk_formula"] == RISK_FORMULA_TWO_BRANCH
    risks = [case["risk"] for case in index["cases"]]
    assert all(0.0 <= r <= 1.0 for r in risks) and len(set(risks)) == 2
    prob_model = golden._RandomProbabilities(3)
    prob_model.calibrate([np.load(tmp_path / "fused" / c["frame"]) for c in index["cases"]])
    for case in index["cases"]:
        x = torch.from_numpy(transforms.preprocess_frame(np.load(tmp_path / "fused" / case["frame"]), 64)[None])
        with torch.no_grad():
            _, p_g, p_c = prob_model.model.branch_outputs(x)[:3]
        assert case["risk"] == pytest.approx(float(branch_disagreement_np(p_g.numpy()[0, 0], p_c.numpy()[0, 0])), abs=1e-6)


def test_golden_risk_of_an_exported_graph_is_its_risk_output(tmp_path, monkeypatch):
    from _models import ort_passes_risk_through, risk_onnx

    ort_passes_risk_through(monkeypatch)
    card = {"img_size": 32, "threshold": 0.5, "risk": {"formula": "stand-in", "threshold": None, "drift": None}}
    index = golden.write_golden(tmp_path / "g", model=risk_onnx(tmp_path / "m.onnx", card), n=2)
    assert index["risk_formula"] == "stand-in"
    for case in index["cases"]:
        prob = np.load(tmp_path / "g" / case["prob"])
        assert case["risk"] == pytest.approx(float(prob.mean()), abs=1e-6)  # the stand-in's risk: mean of its map
