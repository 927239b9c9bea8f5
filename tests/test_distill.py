"""`pocus-edge distill` on the tiny preset: the student learns the fused teacher's soft masks on
unlabeled target frames (never their masks) plus the source labels, through two loaders; its
card records both teachers; it resumes exactly, exports and streams; bad teachers and sites are
refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pocus_edge.cli import main
from pocus_edge.data.layout import load_site
from pocus_edge.errors import CheckpointError, TrainingError
from pocus_edge.io import sha256_file
from pocus_edge.models.weights import build_segmenter, read_checkpoint
from pocus_edge.train import distill, finetune, pretrain_contrastive, pretrain_mim

FAST = dict(device="cpu", progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def teachers(tiny_sites, tmp_path_factory):
    """Both branches, briefly pretrained on the target and fine-tuned on the source (tiny)."""
    source, target = tiny_sites
    runs = tmp_path_factory.mktemp("teachers")
    mim = pretrain_mim(target, runs / "mim", max_steps=2, preset="tiny", **FAST)
    con = pretrain_contrastive(target, runs / "con", max_steps=2, preset="tiny", **FAST)
    ft_mim = finetune(source, runs / "ft_mim", init=mim.encoder_path, max_steps=20, preset="tiny", **FAST)
    ft_con = finetune(source, runs / "ft_con", init=con.encoder_path, max_steps=20, preset="tiny", **FAST)
    return {"source": source, "target": target, "generative": ft_mim.model_path, "contrastive": ft_con.model_path,
            "mim_encoder": mim.encoder_path}


def _distill(t, out, **kw):
    return distill(t["generative"], t["contrastive"], t["target"], t["source"], out, **{**FAST, **kw})


@pytest.fixture(scope="module")
def distilled(teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    res = _distill(teachers, out, max_steps=40, overrides={"log_every": 2})
    return res


def _train_rows(res):
    return [r for r in res.history if r["phase"] == "train"]


def test_distillation_loss_falls(distilled):
    rows = _train_rows(distilled)
    assert len(rows) == 20
    for key in ("loss", "soft_bce", "source_dicebce"):
        first = np.mean([float(r[key]) for r in rows[:5]])
        last = np.mean([float(r[key]) for r in rows[-5:]])
        assert last < first, (key, first, last)
    # The logged total is the weighted sum of the two logged terms (weights 1 and 1).
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["soft_bce"]) + float(r["source_dicebce"]), rel=1e-5)


def test_card_records_both_teachers_and_the_data(distilled, teachers):
    card = distilled.card
    assert card == read_checkpoint(distilled.model_path)[1]
    assert card["kind"] == "student" and card["stage"] == "distill" and card["student"] == "mobilenetv3"
    assert card["preset"] == "tiny"  # the teachers' preset, not the global default
    for role in ("generative", "contrastive"):
        entry = card["teachers"][role]
        assert entry["sha256"] == sha256_file(teachers[role])
        assert entry["card"] == read_checkpoint(teachers[role])[1]
    assert card["teachers"]["generative"]["card"]["init"]["stage"] == "pretrain-mim"
    assert card["teachers"]["fusion"] == {"method": "entropy", "norm": "image", "formula": "weighted"}
    hp = card["hyperparameters"]
    assert hp["soft_weight"] == 1.0 and hp["source_weight"] == 1.0 and hp["confidence_weighting"] is False
    assert hp["target_frames"] == len(load_site(teachers["target"]).select("train"))
    data = {e["site"]: e for e in card["data"]}
    assert data["target"]["role"] == "ssl-images-only" and data["target"]["splits"] == ["split=train"]
    assert data["source"]["role"] == "supervised" and data["source"]["splits"] == ["split=train", "split=val"]
    # The kept checkpoint is the best source-validation epoch, and it loads as a segmenter.
    assert hp["best_val_dicebce"] == pytest.approx(distilled.best_val)
    net, _ = build_segmenter(distilled.model_path)
    assert type(net).__name__ == "StudentNet"


def test_teacher_targets_are_the_entropy_fusion_of_the_two_branches(teachers):
    """The cached soft masks and confidences equal an independent computation with the fusion
    function, and the uncached path gives the same."""
    from pocus_edge.config import model_preset
    from pocus_edge.data.datasets import UnlabeledImageDataset
    from pocus_edge.models.fusion import confidence, fuse, normalize_confidence
    from pocus_edge.train.distill import TeacherTargets, load_teacher

    site = load_site(teachers["target"])
    images = UnlabeledImageDataset(site, site.select("train")[:40], 64)
    teacher, _ = load_teacher(teachers["generative"], teachers["contrastive"], model_preset("tiny"), "tiny", "cpu")
    cached = TeacherTargets(teacher, images, torch.device("cpu"), cache=True)
    direct = TeacherTargets(teacher, images, torch.device("cpu"), cache=False)
    g, _ = build_segmenter(teachers["generative"])
    c, _ = build_segmenter(teachers["contrastive"])
    index = torch.tensor([3, 17, 39, 0])
    x = torch.stack([images[int(i)] for i in index])
    with torch.no_grad():
        p_g, p_c = g.predict(x), c.predict(x)
    expected = fuse(p_g, p_c, method="entropy", norm="image")
    weight = 0.5 * (normalize_confidence(confidence(p_g), "image") + normalize_confidence(confidence(p_c), "image"))
    # The cache ran the teacher on batches of 40 frames, the reference on 4: the convolutions'
    # float sums differ by ~1e-7, and the per-image min-max normalization of the confidences
    # amplifies that near its extremes (up to ~1e-4 on a few pixels, measured under load).
    for targets in (cached, direct):
        prob, w = targets(x, index)
        torch.testing.assert_close(prob, expected, rtol=0, atol=2e-4)
        torch.testing.assert_close(w, weight, rtol=0, atol=2e-4)
        assert float((prob - expected).abs().mean()) < 1e-6  # a few pixels, not the map
    assert 0.0 < float(expected.std())  # not a constant teacher


def test_target_masks_are_never_read(teachers, tmp_path, monkeypatch):
    """With the target's mask files poisoned (garbage bytes) and every mask access of the target
    spied on, distillation runs and never touches a target mask."""
    import pocus_edge.data.datasets as ds
    import pocus_edge.data.layout as layout

    target = tmp_path / "target"
    shutil.copytree(teachers["target"], target)
    poisoned = list((target / "Masks").iterdir())
    assert poisoned
    for p in poisoned:
        p.write_bytes(b"not a png")
    opened: list[str] = []
    real_read, real_header, real_mask = layout.read_gray_png, layout.image_header, layout.Site.read_mask

    def spy(path):
        opened.append(str(path))
        return real_read(path)

    def read_mask(site, record):
        assert Path(site.root).resolve() != target.resolve(), "distillation read a target mask"
        return real_mask(site, record)

    def header(path):
        assert not str(Path(path).resolve()).startswith(str((target / "Masks").resolve())), "opened a target mask header"
        return real_header(path)

    monkeypatch.setattr(ds, "read_gray_png", spy)
    monkeypatch.setattr(layout, "read_gray_png", spy)
    monkeypatch.setattr(layout, "image_header", header)
    monkeypatch.setattr(layout.Site, "read_mask", read_mask)
    res = distill(teachers["generative"], teachers["contrastive"], target, teachers["source"], tmp_path / "run",
                  max_steps=3, **FAST)
    assert res.model_path is not None
    target_files = [p for p in opened if p.startswith(str(target))]
    assert target_files and not any("/Masks/" in p for p in target_files)
    assert any("/Masks/" in p for p in opened if not p.startswith(str(target)))  # the source's labels are read


@pytest.mark.parametrize("cache", [True, False])
def test_resume_after_a_kill_matches_an_uninterrupted_run(teachers, tmp_path, cache):
    """A kill mid-run and --resume give the same weights, optimizer state and model as one
    uninterrupted run, also across a source-loader epoch (32-frame source batches: 5 per epoch)."""
    from test_train import _run_interrupted, assert_same_training_state

    kw = dict(max_steps=8, batch_size=8, checkpoint_every=3, overrides={"source_batch_size": 32, "teacher_cache": cache})
    whole = _distill(teachers, tmp_path / "whole", **kw)
    resumed = _run_interrupted(lambda **k: _distill(teachers, tmp_path / "killed", **k), 4, **kw)
    assert_same_training_state(tmp_path / "whole", tmp_path / "killed")
    assert whole.last_loss == resumed.last_loss
    wa, wb = load_file(whole.model_path), load_file(resumed.model_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_checkpoint(whole.model_path)[1]["hyperparameters"]["teacher_cache"] is cache


def test_source_batches_come_from_their_own_loader_epoch_by_epoch():
    """The companion loader gives each source frame once per companion epoch, in a fresh order
    each epoch, and a stream restarted at any step continues with the same batches."""
    from torch.utils.data import Dataset

    from pocus_edge.config import TrainConfig
    from pocus_edge.train.distributed import DistContext
    from pocus_edge.train.engine import Companion, _CompanionStream

    class Frames(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, key):
            return torch.tensor(key[0] if isinstance(key, tuple) else key)

    companion = Companion(Frames(), 4)  # 2 full batches per epoch, 2 frames left out each epoch
    stream = _CompanionStream(companion, DistContext(), TrainConfig(seed=3))
    batches = [stream.batch(s).tolist() for s in range(8)]
    epochs = [batches[i] + batches[i + 1] for i in range(0, 8, 2)]
    for e in epochs:
        assert len(set(e)) == 8 and set(e) <= set(range(10))
    assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
    for start in (1, 3, 6):
        fresh = _CompanionStream(companion, DistContext(), TrainConfig(seed=3))
        assert [fresh.batch(s).tolist() for s in range(start, 8)] == batches[start:]


def test_student_exports_to_onnx_and_streams(distilled, teachers, tmp_path, capsys):
    from test_student_export import _recording

    onnx_path = tmp_path / "student.onnx"
    assert main(["export", "--checkpoint", str(distilled.model_path), "--target", "onnx", "--calib",
                 str(teachers["target"]), "--parity-frames", "4", "--out", str(onnx_path)]) == 0
    recording, frames = _recording(teachers["target"], tmp_path / "sweep.tvd.h5", 4)
    capsys.readouterr()
    report_path = tmp_path / "stream.json"
    assert main(["stream", str(recording), "--model", str(onnx_path), "--report", str(report_path), "--no-drop",
                 "--no-progress"]) == 0
    report = json.loads(report_path.read_text())
    assert report["frames_processed"] == len(frames) and report["backend"] == "ort"
    assert report["gflops_per_frame"] == pytest.approx(distilled.card["gflops_per_frame"], rel=1e-3)


def test_wrong_teachers_and_sites_are_refused_in_one_line(teachers, tmp_path, distilled):
    t = teachers
    cases = [
        ((t["mim_encoder"], t["contrastive"]), CheckpointError, "pretrain-mim encoder, not a fine-tuned branch"),
        ((t["contrastive"], t["generative"]), CheckpointError, "swapped"),
        ((distilled.model_path, t["contrastive"]), CheckpointError, "is a student checkpoint"),
        ((t["generative"], t["generative"]), CheckpointError, "both --generative and --contrastive"),
        ((tmp_path / "missing.safetensors", t["contrastive"]), CheckpointError, "no such checkpoint"),
    ]
    for (g, c), error, message in cases:
        with pytest.raises(error, match=message) as info:
            distill(g, c, t["target"], t["source"], tmp_path / "x", **FAST)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="preset 'tiny', this run uses preset 'small'"):
        _distill(t, tmp_path / "small", preset="small")
    with pytest.raises(TrainingError, match="both --target and --source"):
        distill(t["generative"], t["contrastive"], t["source"], t["source"], tmp_path / "y", **FAST)
    # A target site without train frames: nothing to distil on.
    empty = tmp_path / "empty_target"
    shutil.copytree(t["target"], empty)
    manifest = (empty / "manifest.csv").read_text().splitlines()
    header, rows = manifest[0], [r for r in manifest[1:] if ",train," not in r]
    (empty / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(TrainingError, match="split 'train' is empty"):
        distill(t["generative"], t["contrastive"], empty, t["source"], tmp_path / "z", **FAST)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z" / "model.safetensors").exists()


def test_an_unknown_student_is_refused_before_any_teacher_work(tmp_path, monkeypatch):
    """The student name is checked first: no teacher is loaded (nor its frames labelled) for a typo."""
    import importlib

    from pocus_edge.errors import ConfigError

    distill_module = importlib.import_module("pocus_edge.train.distill")  # the module, not the function

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teachers were loaded before the student name was checked")

    monkeypatch.setattr(distill_module, "load_teacher", no_teacher)
    with pytest.raises(ConfigError, match="unknown student 'nosuchnet'; choose one of mobilenetv3"):
        distill(tmp_path / "g.safetensors", tmp_path / "c.safetensors", tmp_path / "target", tmp_path / "source",
                tmp_path / "out", preset="tiny", student="nosuchnet", **FAST)
    assert not (tmp_path / "out").exists()


def test_cli_help_and_a_tiny_run(teachers, tmp_path, capsys):
    assert main(["distill", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--generative", "--contrastive", "--target", "--source", "--student", "--resume", "--set"):
        assert flag in text
    out = tmp_path / "cli"
    code = main(["distill", "--generative", str(teachers["generative"]), "--contrastive", str(teachers["contrastive"]),
                 "--target", str(teachers["target"]), "--source", str(teachers["source"]), "--out", str(out),
                 "--student", "efficientvit", "--max-steps", "3", "--device", "cpu", "--confidence-weighting",
                 "--source-weight", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "distill: 3 steps" in printed and str(out / "model.safetensors") in printed
    card = read_checkpoint(out / "model.safetensors")[1]
    assert card["student"] == "efficientvit" and card["hyperparameters"]["confidence_weighting"] is True
    assert card["hyperparameters"]["source_weight"] == 0.5
    code = main(["distill", "--generative", str(teachers["mim_encoder"]), "--contrastive", str(teachers["contrastive"]),
                 "--target", str(teachers["target"]), "--source", str(teachers["source"]), "--out", str(tmp_path / "bad")])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "not a fine-tuned branch" in err[0]
