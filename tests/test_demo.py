"""The one-command demo, end to end on the tiny simulator and the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from pocus_edge.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    messages = []
    result = run_demo(out, data_preset="tiny", preset="tiny", quick=True, max_steps=3, progress=False,
                      threads=1, device="cpu", say=messages.append)
    return out, result, messages


def test_demo_writes_a_consistent_report(demo_run):
    import cv2

    out, result, messages = demo_run
    assert result.report_md == out / "report.md"
    text = result.report_md.read_text()
    # Every stage announced itself, in order.
    assert [m.split("]")[0] for m in messages if m.startswith("[")] == [f"[{k}/11" for k in range(1, 12)]
    # The report's accuracy figures are the evaluator's own (summary.json), not recomputed differently.
    branches = json.loads((out / "eval" / "branches" / "summary.json").read_text())
    baseline = json.loads((out / "eval" / "baseline" / "summary.json").read_text())
    student = json.loads((out / "eval" / "student" / "summary.json").read_text())
    evaluated = {**branches["models"], **baseline["models"], **student["models"]}
    assert set(evaluated) == {"generative_mim", "contrastive_mtnxent", "fused-entropy", "lower_bound",
                              "student_mobilenetv3"}
    from pocus_edge.demo import DISPLAY_NAMES

    for name, summary in evaluated.items():
        shown = result.accuracy[DISPLAY_NAMES[name]]
        assert shown["dice"] == pytest.approx(summary["dice_mean"], abs=1e-9)
        flag = " **(did not train)**" if summary.get("did_not_train") else ""  # the model card's flag
        assert f"| {DISPLAY_NAMES[name]}{flag} | {summary['n']} | {summary['dice_mean']:.4f}" in text
    flagged = [n for n, summary in evaluated.items() if summary.get("did_not_train")]
    assert ("**Did not train:**" in text) is bool(flagged)
    # Every picture the report links exists and is a readable PNG.
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) >= 6
    for link in links:
        img = cv2.imread(str(out / link))
        assert img is not None and img.size > 0, link


def test_demo_streams_the_target_test_sweep_honestly(demo_run):
    from pocus_edge.data.layout import load_site
    from pocus_edge.runtime.sources import TvdH5Source

    out, result, _ = demo_run
    r = result.stream_report
    assert r == json.loads((out / "stream" / "stream_report.json").read_text())
    assert r["frames_in"] == r["frames_processed"] + r["frames_dropped"] + r["frames_invalid"]
    assert r["frames_dropped"] == 0 and r["frames_invalid"] == 0  # offline run of a clean recording
    assert r["backend"] == "ort" and r["gflops_per_frame"] > 0
    # The recording's ROI crop gives back the target test video's frames exactly.
    site = load_site(out / "data" / "target")
    with TvdH5Source(out / "stream" / "target_test_sweep.tvd.h5") as src:
        frames = list(src)
    assert len(frames) == r["frames_processed"]
    test_videos = {rec.videoname for rec in site.records if rec.split == "test"}
    candidates = [rec for rec in site.records if rec.videoname in test_videos]
    first = frames[0][0]
    assert any(np.array_equal(site.read_image(rec), first) for rec in candidates)
    masks = np.load(out / "stream" / "masks.npz")
    assert len(masks.files) == r["frames_processed"]
    assert masks[masks.files[0]].shape == first.shape
    assert (out / "stream" / "overlay.mp4").stat().st_size > 0


def test_torch_backend_on_the_demo_checkpoints_matches_the_exported_graph(demo_run):
    from pocus_edge.data.transforms import preprocess_frame
    from pocus_edge.inference import open_backend

    out, result, _ = demo_run
    ckpts = f"{out / 'runs' / 'finetune_mim' / 'model.safetensors'},{out / 'runs' / 'finetune_contrastive' / 'model.safetensors'}"
    torch_be = open_backend(ckpts, "torch")
    ort_be = open_backend(out / "export" / "fused.onnx", "ort", threads=1)
    assert torch_be.img_size == ort_be.img_size and torch_be.has_weight_map and ort_be.has_weight_map
    rng = np.random.default_rng(0)
    x = np.stack([preprocess_frame(rng.integers(0, 256, (50, 70), dtype=np.uint8), torch_be.img_size) for _ in range(3)])
    a, b = torch_be.run(x), ort_be.run(x)
    np.testing.assert_allclose(a["prob"], b["prob"], atol=1e-4)
    # The fusion weight c_g / (c_g + c_c) is ill-conditioned where both branches sit near 0.5 (a few steps of
    # training): float rounding may move a stray pixel past 1e-3 there. A wrong graph moves most of them.
    gap = np.abs(a["weight"] - b["weight"])
    assert gap.max() < 1e-2 and np.mean(gap > 1e-3) < 1e-3, (gap.max(), np.mean(gap > 1e-3))
    # GFLOPs: counted by torch's flop counter vs the exporter's card.
    assert torch_be.gflops_per_frame == pytest.approx(ort_be.gflops_per_frame, rel=0.02)


def test_demo_report_shows_each_branch_against_the_lower_bound_with_its_uncertainty(demo_run):
    """The differences are per-patient paired means of the evaluator's own per-image Dice, every
    model is fine-tuned with the default recipe, and the report says what the demo cannot show."""
    import csv

    from pocus_edge.models.weights import read_checkpoint

    out, result, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    rows = {}
    for folder in ("branches", "baseline"):
        with open(out / "eval" / folder / "per_image.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                rows.setdefault(r["model"], {})[r["filename"]] = (r["videoname"], float(r["dice"]))
    from pocus_edge.data.layout import load_site

    patient_of = {r.filename: r.patient for r in load_site(out / "data" / "target").records}
    from pocus_edge.demo import DISPLAY_NAMES

    for name in ("generative_mim", "contrastive_mtnxent", "fused-entropy"):
        per_patient = {}
        for filename, (_, d) in rows[name].items():
            per_patient.setdefault(patient_of[filename], []).append(d - rows["lower_bound"][filename][1])
        expected = np.mean([np.mean(v) for v in per_patient.values()])
        shown = report["differences_to_lower_bound"][DISPLAY_NAMES[name]]
        assert shown["mean"] == pytest.approx(expected, abs=1e-9)
        assert shown["ci95"][0] <= shown["mean"] <= shown["ci95"][1]
    text = result.report_md.read_text()
    assert "What it cannot show" in text and "pocus-edge study" in text and "chance level" in text
    for run in ("finetune_mim", "finetune_contrastive", "baseline_lower"):
        card = read_checkpoint(out / "runs" / run / "model.safetensors")[1]
        assert card["hyperparameters"]["recipe"] == "default"


def test_demo_distils_a_student_and_reports_it_next_to_the_fused_model(demo_run):
    """The student is distilled from the demo's own two branches, scored on the same target test
    frames, exported and streamed over the same sweep; its row (Dice, FPS) and its paired
    difference to the fused teacher are the evaluator's and the stream's own figures."""
    import csv

    from pocus_edge.data.layout import load_site
    from pocus_edge.export.onnx import read_onnx_card
    from pocus_edge.io import sha256_file
    from pocus_edge.models.weights import read_checkpoint

    out, result, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    row = report["student"]
    summary = json.loads((out / "eval" / "student" / "summary.json").read_text())["models"]["student_mobilenetv3"]
    stream = json.loads((out / "stream_student" / "stream_report.json").read_text())
    assert row["dice"] == pytest.approx(summary["dice_mean"], abs=1e-9) and row["stream"] == stream
    assert result.student_stream_report == stream and row["fps"] == pytest.approx(stream["fps"])
    assert stream["frames_processed"] == result.stream_report["frames_processed"] and stream["frames_dropped"] == 0
    assert 0 < stream["gflops_per_frame"] < result.stream_report["gflops_per_frame"]
    card = read_checkpoint(out / "runs" / "distill_student" / "model.safetensors")[1]
    assert card["kind"] == "student" and card["stage"] == "distill" and card["student"] == "mobilenetv3"
    for role, run in (("generative", "finetune_mim"), ("contrastive", "finetune_contrastive")):
        assert card["teachers"][role]["sha256"] == sha256_file(out / "runs" / run / "model.safetensors")
    onnx_card = read_onnx_card(out / "export" / "student.onnx")
    assert onnx_card["kind"] == "student" and onnx_card["branches"]["student"] == card
    # Paired difference to the fused teacher, recomputed from the per-image scores per patient.
    dice = {}
    for folder in ("branches", "student"):
        with open(out / "eval" / folder / "per_image.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                dice.setdefault(r["model"], {})[r["filename"]] = float(r["dice"])
    patient_of = {r.filename: r.patient for r in load_site(out / "data" / "target").records}
    per_patient = {}
    for filename, d in dice["student_mobilenetv3"].items():
        per_patient.setdefault(patient_of[filename], []).append(d - dice["fused-entropy"][filename])
    expected = np.mean([np.mean(v) for v in per_patient.values()])
    assert row["difference_to_teacher"]["mean"] == pytest.approx(expected, abs=2e-6)  # the CSV keeps 6 decimals
    text = result.report_md.read_text()
    assert "## Phone-size student" in text
    assert f"| student (mobilenetv3, distilled) | {row['dice']:.4f} | {row['fps']:.1f} |" in text
    assert f"| fused (entropy) teacher | {row['teacher_dice']:.4f} | {row['teacher_fps']:.1f} |" in text


def test_the_streamed_recording_loops_the_sweep_to_hundreds_of_frames(tmp_path):
    """Quick: the recording plays the longest test sweep back to back, frames and ROI crop intact,
    timestamps strictly increasing across passes, until it holds STREAM_MIN_FRAMES frames."""
    from pocus_edge.data.layout import FrameRecord, SiteWriter, load_site
    from pocus_edge.demo import STREAM_MIN_FRAMES, _write_sweep_recording
    from pocus_edge.runtime.sources import TvdH5Source

    writer = SiteWriter(tmp_path / "site")
    rng = np.random.default_rng(0)
    for video, n in (("P1_a", 7), ("P1_b", 4)):  # the 7-frame video is the longest test sweep
        for f in range(n):
            writer.add(FrameRecord(f"{video}_{f}.png", video, 2 * f, patient="P1", split="test"),
                       rng.integers(0, 256, (12, 16), dtype=np.uint8), None)
    site = writer.close()
    site = load_site(site.root)
    info = _write_sweep_recording(site, tmp_path / "sweep.tvd.h5")
    assert STREAM_MIN_FRAMES >= 300
    assert info == {"sweep_frames": 7, "passes": -(-STREAM_MIN_FRAMES // 7), "frames": 7 * -(-STREAM_MIN_FRAMES // 7)}
    sweep = [site.read_image(r) for r in sorted((r for r in site.records if r.videoname == "P1_a"),
                                                key=lambda r: r.framenum)]
    with TvdH5Source(tmp_path / "sweep.tvd.h5") as src:
        frames = list(src)
    assert len(frames) == info["frames"] >= STREAM_MIN_FRAMES
    for i, item in enumerate(frames):
        assert np.array_equal(item[0], sweep[i % 7]), i
    stamps = [item[1] for item in frames]
    assert all(b > a for a, b in zip(stamps, stamps[1:])), "time runs on across passes"


def test_a_reused_stage_keeps_the_time_it_took_when_it_ran(tmp_path):
    """Quick: a stage whose every part an earlier run did keeps that run's times and is marked
    reused; a stage with any new work is timed anew."""
    from pocus_edge.demo import _Stages

    record = tmp_path / "stage_times.json"
    first = _Stages(3, lambda m: None, record=record)
    first.run("train", lambda: first.part(reused=False))
    first.run("export", lambda: None)
    first.seconds["train"] = 123.0  # as if training had taken two minutes
    first._save()
    second = _Stages(3, lambda m: None, record=record)
    second.run("train", lambda: (second.part(reused=True), second.part(reused=True)))
    second.run("export", lambda: None)
    assert second.reused == ["train"] and second.seconds["train"] == 123.0
    third = _Stages(3, lambda m: None, record=record)
    third.run("train", lambda: (third.part(reused=True), third.part(reused=False)))  # one run continued
    assert third.reused == [] and third.seconds["train"] < 123.0
    assert json.loads(record.read_text())["export"]["wall_s"] == second.seconds["export"]


# Keep these last: they rerun the demo in the shared folder.


def test_a_rerun_reuses_every_finished_stage_and_gives_the_same_report(demo_run):
    from pocus_edge.demo import run_demo

    out, first, _ = demo_run
    runs = ["pretrain_mim", "pretrain_contrastive", "finetune_mim", "finetune_contrastive", "baseline_lower",
            "distill_student"]
    before = {name: (out / "runs" / name / "checkpoint.safetensors").read_bytes() for name in runs}
    models = {name: (out / "runs" / name / "model.safetensors").read_bytes() for name in runs[2:]}
    messages = []
    second = run_demo(out, data_preset="tiny", preset="tiny", quick=True, max_steps=3, progress=False,
                      threads=1, device="cpu", say=messages.append)
    reused = [m.split("reusing ")[1] for m in messages if "reusing" in m]
    assert reused == [str(out / "data")] + [str(out / "runs" / name) for name in runs]
    # Nothing was trained again: checkpoints and models are byte for byte the first run's.
    for name in runs:
        assert (out / "runs" / name / "checkpoint.safetensors").read_bytes() == before[name], name
    for name in runs[2:]:
        assert (out / "runs" / name / "model.safetensors").read_bytes() == models[name], name
    assert second.accuracy == first.accuracy
    text = second.report_md.read_text()
    assert "| nan |" not in text and " nan " not in text  # a reused run still reports its last loss
    # The stage table keeps the first run's times of the reused stages, and says they were reused.
    report = json.loads((out / "report.json").read_text())
    assert len(report["stages_reused"]) == 6  # simulate, two pretrainings, fine-tuning, lower bound, distillation
    for name in report["stages_reused"]:
        assert second.stage_seconds[name] == first.stage_seconds[name], name
        assert f"| {name} (reused) |" in text


def test_other_settings_are_refused_with_an_option_the_demo_has(demo_run, tmp_path):
    import os
    import re
    import subprocess
    import sys

    from pocus_edge.demo import SETTINGS_FILE, _prepare_folder, run_demo
    from pocus_edge.errors import ConfigError

    out, _, _ = demo_run
    with pytest.raises(ConfigError, match=r"other settings \(seed 1 \(folder: 0\)\); pass --fresh") as info:
        run_demo(out, data_preset="tiny", preset="tiny", quick=True, max_steps=3, seed=1, progress=False,
                 device="cpu", say=lambda m: None)
    # Every option the message suggests is one `pocus-edge demo` has.
    hinted = set(re.findall(r"--[a-z-]+", str(info.value)))
    help_text = subprocess.run([sys.executable, "-m", "pocus_edge", "demo", "--help"], capture_output=True,
                               text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120).stdout
    assert hinted == {"--fresh", "--out"} and all(option in help_text for option in hinted), help_text
    # A demo folder whose settings were not recorded is refused too; --fresh deletes only what
    # the demo writes, so a user's own file in the folder stays.
    folder = tmp_path / "mine"
    (folder / "runs" / "x").mkdir(parents=True)
    (folder / "runs" / "x" / "checkpoint.safetensors").write_bytes(b"old")
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="settings were not recorded; pass --fresh"):
        _prepare_folder(folder, {"seed": 0}, fresh=False, say=lambda m: None)
    _prepare_folder(folder, {"seed": 0}, fresh=True, say=lambda m: None)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["notes.txt", SETTINGS_FILE])
