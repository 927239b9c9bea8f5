"""The risk output in a stream: masks.npz and the report hold the graph's own per-frame risk,
the drift alarm fires at the closed-form frame and the report's intervals are a DriftMonitor's
over the same risks, with batches, dropping and interrupts; bad qualify files are one line,
exit 2. The stand-in graph's risk is the frame's mean gray level / 255, so each test sets the
risk of every frame through its pixels."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import cv2
import numpy as np
import pytest
from _models import ListSource, mean_onnx, ort_passes_risk_through, risk_onnx

from pocus_edge.inference import open_backend
from pocus_edge.runtime.drift import DriftBand, DriftMonitor
from pocus_edge.runtime.pipeline import CallbackSink, StreamOptions, run_stream
from pocus_edge.runtime.risk import NO_BAND_NOTE, RiskSetup, level_of

SIZE = 32
FORMULA = "branch-soft-dice-disagreement-v1"


@pytest.fixture(autouse=True)
def _risk_backends(monkeypatch):
    ort_passes_risk_through(monkeypatch)


def _card(threshold=0.5, drift=None, risk_threshold=None):
    return {"img_size": SIZE, "threshold": threshold, "precision": "fp32",
            "risk": {"formula": FORMULA, "threshold": risk_threshold, "drift": drift}}


def _flat(level: int) -> np.ndarray:
    return np.full((SIZE, SIZE), level, np.uint8)


def _write_folder(folder, levels):
    folder.mkdir()
    for i, v in enumerate(levels):
        cv2.imwrite(str(folder / f"f{i:04d}.png"), _flat(v))
    return folder




def _graph_risk(model_path, frames) -> np.ndarray:
    """The graph's own risk output, frame by frame, straight from onnxruntime."""
    import onnxruntime as ort

    from pocus_edge.data.transforms import preprocess_frame

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.array([sess.run(["risk"], {"frames": preprocess_frame(f, SIZE)[None]})[0][0, 0] for f in frames], np.float32)


@pytest.mark.parametrize("batch", [1, 3])
def test_masks_npz_and_report_hold_the_graphs_risk(tmp_path, batch):
    from pocus_edge.runtime.pipeline import stream

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(11)]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"f{i:03d}.png"), f)
    model = risk_onnx(tmp_path / "m.onnx", _card(risk_threshold=0.5))
    report = stream(folder, model, batch_size=batch, threads=1, masks=tmp_path / "m.npz", report=tmp_path / "r.json",
                    progress=False)
    expected = _graph_risk(model, frames)
    with np.load(tmp_path / "m.npz") as z:
        np.testing.assert_array_equal(z["risk_frames"], np.arange(11))
        np.testing.assert_allclose(z["risk"], expected, rtol=0, atol=1e-7)
        assert sorted(n for n in z.files if n.startswith("frame_")) == [f"frame_{i:07d}" for i in range(11)]
        assert "drift_alarm" not in z.files  # no band: no alarm column
    risk = json.loads((tmp_path / "r.json").read_text())["risk"]
    assert risk == report["risk"]
    assert risk["frames"] == 11 and risk["formula"] == FORMULA and risk["threshold"] == 0.5
    assert risk["median"] == pytest.approx(float(np.median(expected)), rel=1e-5)
    assert risk["p95"] == pytest.approx(float(np.percentile(expected, 95)), rel=1e-5)
    assert risk["frames_over_threshold"] == int((expected > 0.5).sum())
    assert risk["drift"] is None and risk["note"] == NO_BAND_NOTE


def test_a_model_without_risk_output_changes_nothing(tmp_path):
    from pocus_edge.runtime.pipeline import stream

    folder = _write_folder(tmp_path / "imgs", [10, 200, 30])
    report = stream(folder, mean_onnx(tmp_path / "m.onnx"), threads=1, masks=tmp_path / "m.npz", progress=False)
    assert "risk" not in report
    with np.load(tmp_path / "m.npz") as z:
        assert sorted(z.files) == [f"frame_{i:07d}" for i in range(3)]


def _step_levels(base: int, step: int, before: int, after: int) -> list[int]:
    return [base] * before + [step] * after


def test_alarm_fires_at_the_closed_form_frame_and_report_equals_a_monitor(tmp_path):
    from pocus_edge.runtime.pipeline import stream

    base, step, before, after = 51, 102, 40, 60  # risk 0.2 -> 0.4
    lam, half = 0.1, 0.05
    model = risk_onnx(tmp_path / "probe.onnx")
    r_base, r_step = _graph_risk(model, [_flat(base), _flat(step)])
    band = DriftBand(center=float(r_base), half_width=half, lam=lam, hysteresis=0.5)
    model = risk_onnx(tmp_path / "m.onnx", _card(drift=band.to_dict(), risk_threshold=0.3))
    folder = _write_folder(tmp_path / "imgs", _step_levels(base, step, before, after))
    report = stream(folder, model, threads=1, batch_size=4, masks=tmp_path / "m.npz", progress=False)
    d = float(r_step) - float(r_base)
    # z - center = d (1 - (1 - lam)^t) after t frames of the step: the first t where it exceeds half.
    t = math.ceil(math.log(1 - half / d) / math.log(1 - lam))
    drift = report["risk"]["drift"]
    assert drift["alarm_intervals"] == [[before + t - 1, before + after - 1]]
    assert drift["alarms"] == 1 and drift["alarm_now"] is True
    assert report["risk"]["frames_over_threshold"] == after
    assert report["risk"]["level_now"] == "alarm" and report["risk"]["from"] == "model card"
    with np.load(tmp_path / "m.npz") as z:
        mon = DriftMonitor(band)
        alarms = [mon.update(r, i) for i, r in zip(z["risk_frames"], z["risk"])]
        assert mon.report()["alarm_intervals"] == drift["alarm_intervals"]
        np.testing.assert_array_equal(z["drift_alarm"], np.array(alarms, np.uint8))


def test_qualify_file_overrides_the_card(tmp_path):
    from pocus_edge.runtime.pipeline import stream

    model = risk_onnx(tmp_path / "m.onnx", _card(drift=DriftBand(center=0.9, half_width=0.01).to_dict()))
    band = DriftBand(center=0.2, half_width=0.05, lam=0.2)
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"schema": "pocus-edge-qualify/1", "models": [
        {"name": "a", "risk": {"formula": FORMULA, "threshold": 0.3, "drift": band.to_dict()}},
        {"name": "b", "risk": {"formula": FORMULA, "threshold": 0.1, "drift": None}}]}))
    folder = _write_folder(tmp_path / "imgs", [51] * 30)
    report = stream(folder, model, threads=1, qualify=q, qualify_model="a", progress=False)
    risk = report["risk"]
    assert risk["drift"]["band"]["center"] == 0.2 and risk["drift"]["alarms"] == 0
    assert risk["threshold"] == 0.3 and risk["from"].startswith("qualify file")
    # The card's band (center 0.9) would have been in alarm from the first frame.
    assert stream(folder, model, threads=1, progress=False)["risk"]["drift"]["alarm_intervals"][0][0] == 0


class RiskBackend:
    """A numpy backend whose risk is the frame's mean; ``delay_s`` per batch to force drops."""

    name, precision, device, img_size, threshold, has_risk = "risk", "fp32", "cpu", 8, 0.5, True

    def __init__(self, delay_s=0.0, band=None):
        self.delay_s, self.card = delay_s, {"risk": {"formula": "f", "threshold": 0.5, "drift": band}}

    def prepare(self, frame):
        from pocus_edge.data.transforms import preprocess_frame

        return preprocess_frame(frame, self.img_size)

    def run(self, batch):
        time.sleep(self.delay_s)
        return {"prob": batch[:, :1].astype(np.float32), "risk": batch[:, :1].mean(axis=(2, 3)).astype(np.float32)}

    def describe(self):
        return {"backend": self.name, "precision": "fp32", "device": "cpu", "gflops_per_frame": None,
                "risk": self.card["risk"]}


def test_dropping_realtime_stream_alarms_over_the_processed_frames():
    levels = [40] * 30 + [200] * 50
    band = DriftBand(center=40 / 255, half_width=0.05, lam=0.3)
    seen = []
    report = run_stream(ListSource([_flat(v) for v in levels], period_ms=5.0), RiskBackend(0.02, band.to_dict()),
                        sinks=[CallbackSink(lambda r: seen.append((r.index, r.risk, r.alarm, r.risk_level)))],
                        options=StreamOptions(realtime=True, queue_size=2, batch_size=2, progress=False))
    assert report["frames_dropped"] > 0
    assert report["risk"]["frames"] == report["frames_processed"] == len(seen)
    mon = DriftMonitor(band)
    for index, risk, alarm, level in seen:
        assert mon.update(risk, index) == alarm
        assert level == level_of(risk, 0.5, alarm)
    assert report["risk"]["drift"]["alarm_intervals"] == mon.report()["alarm_intervals"]
    assert report["risk"]["drift"]["alarms"] == 1


def test_interrupted_stream_reports_the_risk_of_every_processed_frame(tmp_path):
    band = DriftBand(center=40 / 255, half_width=0.05, lam=0.5)
    seen = []

    def sink(r):
        seen.append((r.index, r.risk))
        if r.index == 25:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stream(ListSource([_flat(40)] * 20 + [_flat(220)] * 80), RiskBackend(0.0, band.to_dict()),
                       sinks=[CallbackSink(sink)], report_path=tmp_path / "r.json",
                       options=StreamOptions(batch_size=3, progress=False))
    finally:
        signal.signal(signal.SIGINT, previous)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted_by"] == "SIGINT"
    assert report["risk"]["frames"] == report["frames_processed"] == len(seen) < 100
    mon = DriftMonitor(band)
    for index, risk in seen:
        mon.update(risk, index)
    assert report["risk"]["drift"]["alarm_intervals"] == mon.report()["alarm_intervals"] != []


def test_run_stream_takes_an_explicit_setup_and_defaults_to_the_card():
    band = DriftBand(center=0.5, half_width=0.01, lam=1.0)
    frames = [_flat(40)] * 5
    report = run_stream(ListSource(frames), RiskBackend(0.0, band.to_dict()), options=StreamOptions(progress=False))
    assert report["risk"]["drift"]["alarm_intervals"] == [[0, 4]]
    report = run_stream(ListSource(frames), RiskBackend(0.0, band.to_dict()), options=StreamOptions(progress=False),
                        risk=RiskSetup(threshold=0.1))
    assert report["risk"]["drift"] is None and report["risk"]["frames_over_threshold"] == 5


def _cli(args):
    from pocus_edge.cli import main

    return main(args)


def _qualify(tmp_path, risk, name="q.json", schema="pocus-edge-qualify/1"):
    path = tmp_path / name
    # json.dumps writes float("nan") as NaN, which Python's reader accepts: a band of NaN parses.
    path.write_text(json.dumps({"schema": schema, "models": [{"name": "m", "risk": risk}]}))
    return path


@pytest.mark.parametrize("risk, message", [
    ({"formula": FORMULA, "threshold": 0.3}, "has no 'drift' field"),
    ({"formula": FORMULA, "threshold": 0.3, "drift": {"center": 0.2}}, "half_width"),
    ({"formula": FORMULA, "threshold": 0.3, "drift": {"center": float("nan"), "half_width": 0.1}}, "center is not a finite number"),
    ({"formula": FORMULA, "threshold": float("nan"), "drift": None}, "not a finite number"),
    ({"formula": "another-formula-v9", "threshold": 0.3, "drift": None}, "another-formula-v9"),
])
def test_bad_qualify_files_are_one_line_exit_2(tmp_path, capsys, risk, message):
    model = risk_onnx(tmp_path / "m.onnx", _card())
    folder = _write_folder(tmp_path / "imgs", [10, 20])
    q = _qualify(tmp_path, risk)
    rc = _cli(["stream", str(folder), "--model", str(model), "--qualify", str(q), "--threads", "1", "--no-progress",
               "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_qualify_problems_of_the_file_and_model_are_one_line(tmp_path, capsys):
    folder = _write_folder(tmp_path / "imgs", [10, 20])
    model = risk_onnx(tmp_path / "m.onnx", _card())
    band = DriftBand(center=0.2, half_width=0.05).to_dict()
    good = {"formula": FORMULA, "threshold": 0.3, "drift": band}
    cases = [
        (tmp_path / "absent.json", model, "qualify file not found"),
        (_qualify(tmp_path, good, "v9.json", schema=9), model, "schema 9"),
        (_qualify(tmp_path, good), mean_onnx(tmp_path / "plain.onnx"), "has no risk output"),
    ]
    for q, m, message in cases:
        rc = _cli(["stream", str(folder), "--model", str(m), "--qualify", str(q), "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (q, err)
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"schema": "pocus-edge-qualify/1", "models": {"a": {"risk": good}, "b": {"risk": good}}}))
    assert _cli(["stream", str(folder), "--model", str(model), "--qualify", str(two), "--no-progress"]) == 2
    assert "--qualify-model" in capsys.readouterr().err
    # The object form `pocus-edge qualify` writes, one model named: streams.
    assert _cli(["stream", str(folder), "--model", str(model), "--qualify", str(two), "--qualify-model", "b",
                 "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["risk"]["alarms"] == 0


def test_a_card_band_of_nan_is_refused_in_one_line(tmp_path, capsys):
    bad = {"center": float("nan"), "half_width": 0.1, "lam": 0.1, "hysteresis": 0.5, "k": 5.0}
    model = risk_onnx(tmp_path / "m.onnx", _card(drift=bad))
    folder = _write_folder(tmp_path / "imgs", [10])
    rc = _cli(["stream", str(folder), "--model", str(model), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model card" in err and "not a finite number" in err and len(err.splitlines()) == 1


def test_backend_reports_the_risk_output(tmp_path):
    be = open_backend(risk_onnx(tmp_path / "m.onnx", _card()), "ort", threads=1)
    out = be.run(be.prepare(_flat(51))[None].repeat(2, axis=0))
    assert out["risk"].shape == (2, 1) and out["risk"][0, 0] == pytest.approx(0.2, abs=1e-6)
