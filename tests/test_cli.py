"""The command line: every command listed, user mistakes -> exit 2 with one line and no traceback,
and the data commands end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pocus_edge.cli import main
from pocus_edge.data.layout import FrameRecord, SiteWriter, load_site

COMMANDS = ["simulate", "import", "split", "pretrain", "finetune", "distill", "evaluate", "export", "stream", "benchmark", "flops", "demo"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "pocus_edge", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    listed = set()
    for line in result.stdout.splitlines():
        words = line.strip("│| ").split()
        if words:
            listed.add(words[0])
    missing = [c for c in COMMANDS if c not in listed]
    assert not missing, f"missing from --help: {missing}\n{result.stdout}"


@pytest.mark.parametrize(
    "args",
    [
        ("split", "{missing}", "--domain", "source"),
        ("import", "{missing}", "{tmp}/out"),
    ],
)
def test_missing_folder_exits_2_with_one_line(tmp_path, args):
    missing = tmp_path / "no_such_folder"
    result = run_cli(*(a.format(missing=missing, tmp=tmp_path) for a in args))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0] and "not found" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (("export", "--no-such-option"), "No such option: --no-such-option"),
        (("no-such-command",), "No such command 'no-such-command'"),
        (("benchmark", "--batch", "1", "--runs", "0"), "--runs"),
    ],
)
def test_usage_errors_exit_2_without_traceback(args, expected):
    # typer >= 0.22 raises its vendored click's exceptions, which are not click.ClickException:
    # main() must still turn them into click's short usage message.
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def _small_site(root, n_patients=8):
    writer = SiteWriter(root)
    img = np.zeros((6, 8), np.uint8)
    for p in range(n_patients):
        for f in range(3):
            writer.add(FrameRecord(f"P{p}_{f}.png", f"P{p}_v", f, patient=f"P{p}"), img, img if f != 1 else None)
    return writer.close()


def test_split_command(tmp_path, capsys):
    _small_site(tmp_path / "site")
    assert main(["split", str(tmp_path / "site"), "--domain", "source", "--seed", "4"]) == 0
    site = load_site(tmp_path / "site")
    patients = {s: {r.patient for r in site.records if r.split == s} for s in ("train", "val", "test")}
    assert [len(patients[s]) for s in ("train", "val", "test")] == [6, 1, 1]
    out = capsys.readouterr().out
    for name in ("train", "val", "test"):
        assert name in out
    # Target split on the same site: a labeled test patient, SSL train for the rest, ub_split set.
    assert main(["split", str(tmp_path / "site"), "--domain", "target"]) == 0
    site = load_site(tmp_path / "site")
    assert {r.split for r in site.records} == {"train", "test", ""}
    assert {r.ub_split for r in site.records if r.split == "train" and r.labeled} == {"train", "val"}


def test_split_command_refusals(tmp_path, capsys):
    _small_site(tmp_path / "site", n_patients=2)
    assert main(["split", str(tmp_path / "site"), "--domain", "source"]) == 2
    assert "only 2 patient(s)" in capsys.readouterr().err
    assert main(["split", str(tmp_path / "site"), "--domain", "sideways"]) == 2
    assert main(["split", str(tmp_path / "site"), "--domain", "source", "--source-fractions", "0.5,0.5"]) == 2
    assert load_site(tmp_path / "site").select(split="train") == [], "a refused split leaves the manifest alone"


def test_import_command(tmp_path, capsys):
    import cv2

    videos = tmp_path / "videos"
    videos.mkdir()
    writer = cv2.VideoWriter(str(videos / "P7_dorsal.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (16, 12), isColor=False)
    if not writer.isOpened():
        pytest.skip("OpenCV here cannot write MJPG video")
    for i in range(4):
        writer.write(np.full((12, 16), 40 * i, np.uint8))
    writer.release()
    assert main(["import", str(videos), str(tmp_path / "site"), "--patient-from", r"^(P\d+)_"]) == 0
    assert "4 frames" in capsys.readouterr().out
    site = load_site(tmp_path / "site")
    assert [r.patient for r in site.records] == ["P7"] * 4
    assert main(["import", str(videos), str(tmp_path / "other"), "--patient-from", "(unclosed"]) == 2
    assert "bad regular expression" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
