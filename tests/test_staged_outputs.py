"""Multi-file outputs (a simulated site pair, a masks folder, an export with its intermediates
and reports) are built in a staging folder and renamed into place only when complete: a full
disk at any point leaves nothing under the final names, not even an empty folder, and the
error is one line naming the output the user asked for (never a temporary name).

A full disk is a small tmpfs (root and ``mount`` needed; skipped with the reason otherwise).
Each case first measures how much space the finished output takes on a tmpfs, then runs it
again on tmpfs disks of several fractions of that: each run must fail, and leave nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _fs import small_tmpfs
from _models import mean_onnx

from pocus_edge.cli import main

FRACTIONS = (0.1, 0.4, 0.7, 0.95)


def _space_taken(tmp_path: Path, write) -> int:
    """Bytes the finished output of ``write(folder)`` occupies on a tmpfs (pages included)."""
    import shutil

    with small_tmpfs(tmp_path, "256m") as disk:
        before = shutil.disk_usage(disk).used
        write(disk)
        taken = shutil.disk_usage(disk).used - before
    (tmp_path / "tmpfs_256m").rmdir()
    return taken


def _tmpfs_size(nbytes: int) -> str:
    return f"{max(16, nbytes // 1024)}k"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_simulate_on_a_full_disk_leaves_nothing(tmp_path, capsys):
    need = _space_taken(tmp_path, lambda disk: main(["simulate", str(disk / "sim"), "--data-preset", "tiny", "--no-progress"]))
    for fraction in FRACTIONS:
        with small_tmpfs(tmp_path, _tmpfs_size(int(need * fraction))) as disk:
            capsys.readouterr()
            assert main(["simulate", str(disk / "sim"), "--data-preset", "tiny", "--no-progress"]) == 2, fraction
            line = _one_line(capsys)
            assert "disk full" in line and "nothing was written" in line, line
            assert str(disk / "sim") in line and ".tmp" not in line, line
            assert list(disk.iterdir()) == [], fraction  # no site, no staging folder, no empty "sim"
        (tmp_path / f"tmpfs_{_tmpfs_size(int(need * fraction))}").rmdir()


def test_a_masks_folder_on_a_full_disk_leaves_nothing_and_the_report_still_counts(tmp_path, capsys):
    import cv2

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        cv2.imwrite(str(frames / f"f{i:02d}.png"), rng.integers(0, 256, (64, 80), dtype=np.uint8))
    model = mean_onnx(tmp_path / "mean.onnx")
    args = ["stream", str(frames), "--model", str(model), "--threads", "1", "--no-progress"]
    assert main([*args, "--masks", str(tmp_path / "whole")]) == 0
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == [f"{i:07d}.png" for i in range(30)]
    need = _space_taken(tmp_path, lambda disk: main([*args, "--masks", str(disk / "masks")]))
    for fraction in FRACTIONS[:3]:
        size = _tmpfs_size(int(need * fraction))
        with small_tmpfs(tmp_path, size) as disk:
            capsys.readouterr()
            report = tmp_path / f"report_{size}.json"
            assert main([*args, "--masks", str(disk / "masks"), "--report", str(report)]) == 2
            line = _one_line(capsys)
            assert f"{disk / 'masks'}: cannot write (disk full)" in line, line
            assert list(disk.iterdir()) == []
            counts = json.loads(report.read_text())
            assert counts["frames_in"] == (counts["frames_processed"] + counts["frames_dropped"] + counts["frames_invalid"]
                                           + counts["frames_interrupted"])
        (tmp_path / f"tmpfs_{size}").rmdir()


def test_a_masks_folder_replaces_an_earlier_one_and_refuses_a_foreign_folder(tmp_path, capsys):
    import cv2

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"f{i}.png"), np.full((20, 20), 40 * i, np.uint8))
    model = mean_onnx(tmp_path / "mean.onnx")
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "0000099.png").write_bytes(b"an earlier run's mask")
    assert main(["stream", str(frames), "--model", str(model), "--no-progress", "--masks", str(masks)]) == 0
    assert sorted(p.name for p in masks.iterdir()) == ["0000000.png", "0000001.png", "0000002.png"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    capsys.readouterr()
    assert main(["stream", str(frames), "--model", str(model), "--no-progress", "--masks", str(notes)]) == 2
    assert "holds other files than masks" in _one_line(capsys)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def test_an_empty_recording_is_refused_like_an_empty_folder(tmp_path, capsys):
    import h5py

    model = mean_onnx(tmp_path / "mean.onnx")
    recording = tmp_path / "empty.tvd.h5"
    with h5py.File(recording, "w") as h5:
        h5.create_dataset("frames/gray", shape=(0, 48, 64), dtype=np.uint8)
        h5.create_dataset("timing/time_ms", shape=(0,), dtype=np.float64)
        h5.attrs["n_frames"] = 0
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    for source in (recording, empty_folder):
        capsys.readouterr()
        assert main(["stream", str(source), "--model", str(model), "--no-progress", "--report", str(tmp_path / "r.json"),
                     "--masks", str(tmp_path / "m.npz")]) == 2
        assert str(source) in _one_line(capsys)
        assert not (tmp_path / "r.json").exists() and not (tmp_path / "m.npz").exists()


def test_an_empty_stream_is_refused_and_leaves_no_output(tmp_path):
    import os

    from pocus_edge.errors import DataError
    from pocus_edge.inference import open_backend
    from pocus_edge.runtime.pipeline import MaskFileSink, run_stream
    from pocus_edge.runtime.sources import RawStreamSource

    model = mean_onnx(tmp_path / "mean.onnx")
    read_end, write_end = os.pipe()
    os.close(write_end)  # a sender that connects and closes without a frame
    source = RawStreamSource(read_end, name="empty sender")
    try:
        with pytest.raises(DataError, match="empty sender: the source ended before its first frame"):
            run_stream(source, open_backend(model), sinks=[MaskFileSink(tmp_path / "m.npz"), MaskFileSink(tmp_path / "m")],
                       report_path=tmp_path / "r.json")
    finally:
        os.close(read_end)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.onnx"]


@pytest.mark.parametrize("target, suffix", [("onnx", ".onnx"), ("openvino", ".xml")])
def test_an_export_on_a_full_disk_leaves_nothing(tmp_path, capsys, target, suffix):
    pytest.importorskip("torch")
    if target == "openvino":
        pytest.importorskip("openvino")
    g, c = _tiny_checkpoints(tmp_path)
    extra = ["--precision", "fp16"] if target == "onnx" else []
    args = ["export", "-g", str(g), "-c", str(c), "--target", target, *extra, "--parity-frames", "2"]
    need = _space_taken(tmp_path, lambda disk: main([*args, "--out", str(disk / "out" / f"model{suffix}")]))
    for fraction in FRACTIONS:
        size = _tmpfs_size(int(need * fraction))
        with small_tmpfs(tmp_path, size) as disk:
            capsys.readouterr()
            assert main([*args, "--out", str(disk / "out" / f"model{suffix}")]) == 2, fraction
            line = _one_line(capsys)
            assert f"{disk / 'out' / ('model' + suffix)}: cannot write (disk full)" in line, line
            assert list(disk.iterdir()) == [], fraction
        (tmp_path / f"tmpfs_{size}").rmdir()


def test_export_of_a_folder_says_is_a_directory_like_every_command(tmp_path, capsys):
    """export names a folder given as a checkpoint as the checkpoint reader (every other command) does."""
    pytest.importorskip("torch")
    from pocus_edge.errors import CheckpointError
    from pocus_edge.models.weights import read_checkpoint

    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(CheckpointError) as shared:
        read_checkpoint(folder)
    assert str(shared.value) == f"{folder}: is a directory, expected a .safetensors file"
    for flag in ("-g", "-c"):
        g, c = _tiny_checkpoints(tmp_path)
        args = {"-g": (folder, c), "-c": (g, folder)}[flag]
        capsys.readouterr()
        assert main(["export", "-g", str(args[0]), "-c", str(args[1]), "--out", str(tmp_path / "m.onnx")]) == 2
        assert _one_line(capsys) == f"error: {shared.value}"
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------------------------




def _tiny_checkpoints(folder: Path) -> tuple[Path, Path]:
    import torch

    from pocus_edge.config import model_preset, to_dict
    from pocus_edge.models.transunet import TransUNet
    from pocus_edge.models.weights import save_checkpoint

    cfg = model_preset("tiny")
    paths = []
    for seed, name in enumerate(("generative", "contrastive")):
        torch.manual_seed(seed)
        card = {"format": "pocus-edge/1", "preset": cfg.name, "model": to_dict(cfg), "out_channels": 1,
                "stage": "finetune", "hyperparameters": {}, "data": [], "init": None}
        paths.append(save_checkpoint(folder / f"{name}.safetensors", TransUNet(cfg), card))
    return paths[0], paths[1]
