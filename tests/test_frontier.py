"""The accuracy/speed frontier figure (`pocus-edge benchmark frontier`) from hand-written
benchmark reports and study results, and students' rows in `pocus-edge benchmark` (random
weights, beside the teacher), `plot` and `compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocus_edge.benchmark.frontier import frontier_data, load_accuracy, pareto_frontier, parse_accuracy, plot_frontier
from pocus_edge.benchmark.schema import validate_report
from pocus_edge.cli import main
from pocus_edge.errors import DataError


def _report(rows: list[tuple[str, str, str, float, str]], device: str = "AMD EPYC (2 cores)") -> dict:
    """A benchmark report by hand: rows of (model, format, precision, batch-1 FPS, status)."""
    from test_benchmark import _hand_report

    report = _hand_report(device, [(fmt, precision, {1: fps}) for _, fmt, precision, fps, _ in rows])
    for row, (model, _, _, _, status) in zip(report["rows"], rows):
        row["model"] = model
        if status != "ok":
            row.update(status=status, reason="planted", latency=[])
    validate_report(report)
    return report


ROWS = [
    ("fused", "eager-2model", "fp32", 2.0, "ok"),
    ("fused", "onnx-int8", "int8", 3.9, "ok"),
    ("mobilenetv3", "torch-fp32", "fp32", 40.0, "ok"),
    ("mobilenetv3", "onnx-int8", "int8", 95.0, "ok"),
    ("fastvit", "onnx-fp32", "fp32", 55.0, "ok"),
    ("fastvit", "openvino-int8", "int8", 70.0, "failed"),
    ("efficientvit", "onnx-fp32", "fp32", 80.0, "ok"),  # no accuracy given: left out
]
ACCURACY = {"models": {"fused": {"dice": 0.82, "ci": [0.80, 0.84]}, "mobilenetv3": 0.81,
                       "fastvit": {"dice": 0.83, "ci": [0.81, 0.85]}}}


def test_pareto_frontier_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = [{"fps": float(rng.integers(1, 6)), "dice": float(rng.integers(1, 6)) / 10} for _ in range(9)]
        got = set(pareto_frontier(pts))
        for i, p in enumerate(pts):
            beaten = any(q["fps"] >= p["fps"] and q["dice"] >= p["dice"] and q != p for q in pts)
            assert (i in got) == (not beaten), (pts, got)
        front = pareto_frontier(pts)
        assert [pts[i]["fps"] for i in front] == sorted(pts[i]["fps"] for i in front)


def test_frontier_places_every_point_and_label_from_its_inputs(tmp_path):
    report = _report(ROWS)
    accuracy = parse_accuracy(ACCURACY)
    out = tmp_path / "frontier.png"
    fig, data = plot_frontier([report], ["cpu"], accuracy, out, fps_goal=60)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = data["series"][0]["points"]
    expected = {("fused", "eager-2model"): (2.0, 0.82), ("fused", "onnx-int8"): (3.9, 0.82),
                ("mobilenetv3", "torch-fp32"): (40.0, 0.81), ("mobilenetv3", "onnx-int8"): (95.0, 0.81),
                ("fastvit", "onnx-fp32"): (55.0, 0.83)}
    assert {(p["model"], p["format"]): (p["fps"], p["dice"]) for p in points} == expected
    # Frontier: fastvit onnx-fp32 (most accurate of the fast ones) and mobilenetv3 onnx-int8 (fastest).
    assert [points[i]["label"] for i in data["series"][0]["frontier"]] == ["fastvit onnx-fp32", "mobilenetv3 onnx-int8"]
    assert dict(data["left_out"]) == {"fastvit openvino-int8": "failed: planted",
                                      "efficientvit onnx-fp32": "no target Dice for model 'efficientvit'"}
    ax = fig.axes[0]
    drawn = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    assert sorted(map(tuple, drawn.tolist())) == sorted(expected.values())
    labels = {t.get_text(): t.xy for t in ax.texts}
    assert labels == {(f if m == "fused" else f"{m} {f}"): xy for (m, f), xy in expected.items()}
    bold = {t.get_text() for t in ax.texts if t.get_fontweight() == "bold"}
    assert bold == {"fastvit onnx-fp32", "mobilenetv3 onnx-int8"}
    # The CI bars: one vertical segment per point with a CI, spanning it.
    segments = {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines if len(line.get_xdata()) == 2}
    assert ((55.0, 55.0), (0.81, 0.85)) in segments and ((2.0, 2.0), (0.80, 0.84)) in segments
    assert ax.get_xscale() == "log" and any(tuple(line.get_xdata()) == (60, 60) for line in ax.lines)


def test_row_dice_is_used_only_for_models_without_study_accuracy():
    report = _report(ROWS)
    for row in report["rows"]:
        row["dice"] = 0.5
    data = frontier_data([report], ["cpu"], parse_accuracy(ACCURACY))
    points = {p["label"]: p for p in data["series"][0]["points"]}
    assert points["efficientvit onnx-fp32"]["dice"] == 0.5 and points["efficientvit onnx-fp32"]["dice_source"] == "benchmark"
    assert points["mobilenetv3 onnx-int8"]["dice"] == 0.81 and points["mobilenetv3 onnx-int8"]["dice_source"] == "study"


@pytest.mark.parametrize("document,expected", [
    ({"models": {"a": 0.7}}, {"a": {"dice": 0.7, "ci": None}}),
    ({"arms": {"student": {"dice": {"mean": 0.8, "ci": [0.7, 0.9]}}}}, {"student": {"dice": 0.8, "ci": (0.7, 0.9)}}),
    ({"arms": [{"arm": "fused", "target_dice": 0.6, "ci_low": 0.5, "ci_high": 0.65}]}, {"fused": {"dice": 0.6, "ci": (0.5, 0.65)}}),
])
def test_accuracy_documents(document, expected):
    assert parse_accuracy(document) == expected


@pytest.mark.parametrize("document,message", [
    ({"models": {"a": 1.7}}, "outside"),
    ({"models": {"a": {"dice": 0.5, "ci": [0.6, 0.7]}}}, "outside its ci"),
    ({"arms": [{"dice": 0.5}]}, "no 'arm'"),
    ({"results": []}, "'models' or 'arms'"),
])
def test_bad_accuracy_documents_are_refused(document, message):
    with pytest.raises(DataError, match=message):
        parse_accuracy(document, "acc.json")


def test_frontier_cli_renames_study_arms(tmp_path, capsys):
    rep = tmp_path / "cpu.json"
    rep.write_text(json.dumps(_report(ROWS)))
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"arms": {"fused": {"dice": 0.82}, "student": {"dice": 0.84, "ci": [0.8, 0.86]}}}))
    assert load_accuracy(study, {"student": "mobilenetv3"})["mobilenetv3"]["dice"] == 0.84
    out = tmp_path / "f.svg"
    assert main(["benchmark", "frontier", str(rep), "--dice", str(study), "--as", "student=mobilenetv3", "--out", str(out),
                 "--fps-goal", "60"]) == 0
    printed = capsys.readouterr().out
    assert "frontier (slow to fast): mobilenetv3 onnx-int8" in printed and out.read_text().lstrip().startswith("<?xml")
    assert main(["benchmark", "frontier", str(rep), "--dice", str(tmp_path / "missing.json"), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.json" in err and len(err.splitlines()) == 1 and not (tmp_path / "g.png").exists()
    assert main(["benchmark", "frontier", str(rep), "--as", "student", "--out", str(tmp_path / "g.png")]) == 2
    assert "ARM=MODEL" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Students in `pocus-edge benchmark`, `plot` and `compare`


def test_benchmark_cli_puts_random_students_beside_the_teacher(tmp_path, capsys):
    from pocus_edge.benchmark import compare_reports, load_report
    from pocus_edge.benchmark.plot import plot_data
    from pocus_edge.models.flops import student_size

    out = tmp_path / "r.json"
    code = main(["benchmark", "--preset", "tiny", "--student", "mobilenetv3,efficientvit", "--formats",
                 "fused-fp32,torch-fp32,onnx-fp32", "--batch", "1", "--runs", "2", "--warmup", "1", "--max-frames", "2",
                 "--threads", "1", "--report", str(out), "--workdir", str(tmp_path / "w")])
    assert code == 0, capsys.readouterr().err
    report = load_report(out)
    got = [(r["model"], r["format"], r["status"]) for r in report["rows"]]
    assert got == [("fused", "fused-fp32", "ok"), ("fused", "onnx-fp32", "ok"),
                   ("mobilenetv3", "torch-fp32", "ok"), ("mobilenetv3", "onnx-fp32", "ok"),
                   ("efficientvit", "torch-fp32", "ok"), ("efficientvit", "onnx-fp32", "ok")], report["rows"]
    students = {s["name"]: s for s in report["students"]}
    for name in ("mobilenetv3", "efficientvit"):
        size = student_size(name, "tiny")
        assert students[name]["gflops_per_frame"] == pytest.approx(size["gflops"], rel=1e-3)
        assert students[name]["params"] == size["params"] and students[name]["img_size"] == 64
        rows = [r for r in report["rows"] if r["model"] == name]
        assert all(r["gflops_per_frame"] == pytest.approx(size["gflops"], rel=1e-3) for r in rows)
        assert rows[1]["agreement_dice"] >= 0.99  # the ONNX against the student's own torch-fp32
    assert sorted(p.name for p in (tmp_path / "w").glob("*.onnx")) == [
        "fused-fp32.onnx", "student-efficientvit-fp32.onnx", "student-mobilenetv3-fp32.onnx"]
    table = capsys.readouterr().out
    assert "mobilenetv3 onnx-fp32" in table and "student efficientvit" in table
    plotted = plot_data([report], ["r"], 1)
    assert plotted["formats"][2:] == ["mobilenetv3 torch-fp32", "mobilenetv3 onnx-fp32",
                                      "efficientvit torch-fp32", "efficientvit onnx-fp32"]
    assert plotted["series"][0]["label"] == "r"  # the report's label, not a row's
    compared = compare_reports([report, report], ["a", "b"])
    assert [r["format"] for r in compared["rows"]].count("onnx-fp32") == 1
    assert "mobilenetv3 onnx-fp32" in [r["format"] for r in compared["rows"]]


@pytest.mark.parametrize("args,message", [
    (["--student", "resnet"], "unknown student(s) resnet"),
    (["--no-teacher"], "--no-teacher leaves nothing"),
    (["--student-checkpoint", "nowhere.safetensors", "--no-teacher"], "nowhere.safetensors: student checkpoint not found"),
    (["--student", "mobilenetv3", "--formats", "onnx-fp99"], "unknown format"),
])
def test_benchmark_student_refusals(tmp_path, capsys, args, message):
    code = main(["benchmark", "--preset", "tiny", "--batch", "1", "--runs", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_student_format_registry_mirrors_the_teachers():
    from pocus_edge.benchmark.formats import BASELINE, FORMATS, STUDENT_FORMATS
    from pocus_edge.export.formats import ARTIFACTS

    exported = {f"{t}-{p}" for t, p in ARTIFACTS}
    assert BASELINE not in STUDENT_FORMATS and "fused-fp32" not in STUDENT_FORMATS
    assert {n for n in FORMATS if n in exported} == {n for n in STUDENT_FORMATS if n in exported}
    assert [n for n in STUDENT_FORMATS if n.startswith("torch-")] == ["torch-fp32", "torch-bf16", "torch-fp16"]
    for name, spec in STUDENT_FORMATS.items():
        assert spec.name == name and spec.precision in ("fp32", "bf16", "fp16", "int8")
