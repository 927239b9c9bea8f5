"""Training stages on the tiny preset and the tiny simulator sites: losses decrease, exact resume,
encoder-only init, site isolation, NaN and full-disk safety, provenance cards, evaluation."""

from __future__ import annotations

import csv
import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pocus_edge.card import build_card, code_version, site_entry, sites_seen
from pocus_edge.config import model_preset
from pocus_edge.data.layout import FrameRecord, SiteWriter, load_site, read_manifest, write_manifest
from pocus_edge.errors import CheckpointError, TrainingError
from pocus_edge.train import engine, evaluate, finetune, pretrain_contrastive, pretrain_mim

FAST = dict(preset="tiny", device="cpu", progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def sites(tiny_sites):
    """(source_dir, target_dir) of the shared tiny simulator sites (read-only)."""
    return tiny_sites


@pytest.fixture(scope="module")
def encoders(sites, tmp_path_factory):
    """One short MIM and one short contrastive pretraining run on the target site."""
    _, target = sites
    runs = tmp_path_factory.mktemp("pretrain")
    mim = pretrain_mim(target, runs / "mim", max_steps=2, **{**FAST, "tensorboard": True})
    con = pretrain_contrastive(target, runs / "con", max_steps=2, **FAST)
    return mim, con


def _fixed_batch_losses(model, loss_fn, batch, steps=8, lr=2e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_each_stage_loss_decreases_on_a_fixed_batch(sites):
    """The stages' own loss functions and models learn: a fixed batch's loss drops."""
    from pocus_edge.config import ContrastiveConfig, MIMConfig
    from pocus_edge.data.datasets import ContrastivePairDataset, SegmentationDataset, UnlabeledImageDataset
    from pocus_edge.models.heads import ContrastiveModel, MaskGenerator, MIMModel
    from pocus_edge.models.transunet import TransUNet
    from pocus_edge.train.contrastive import contrastive_loss
    from pocus_edge.train.mim import MaskedImages, MIMObjective

    source, target = sites
    cfg = model_preset("tiny", dropout=0.0)
    tsite, ssite = load_site(target), load_site(source)
    train = tsite.select("train")[::17][:8]  # frames of different videos: real negatives
    torch.manual_seed(0)

    mim_ds = MaskedImages(UnlabeledImageDataset(tsite, train, cfg.img_size), MaskGenerator(cfg.img_size, MIMConfig()), 0)
    mim_batch = [torch.stack(t) for t in zip(*[mim_ds[i] for i in range(8)])]
    losses = _fixed_batch_losses(MIMObjective(MIMModel(cfg)), lambda m, b: m(*b), mim_batch)
    assert losses[-1] < 0.8 * losses[0], losses

    con_ds = ContrastivePairDataset(tsite, train, cfg.img_size, ContrastiveConfig())
    items = [con_ds[i] for i in range(8)]
    con_batch = [torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
                 torch.tensor([it[2] for it in items]), torch.tensor([it[3] for it in items])]
    losses = _fixed_batch_losses(ContrastiveModel(cfg),
                                 lambda m, b: contrastive_loss(m, b, min_frame_gap=15, temperature=0.5)[0], con_batch)
    assert losses[-1] < losses[0] - 0.1, losses

    from pocus_edge.losses import dice_bce

    seg_ds = SegmentationDataset(ssite, ssite.select("train", labeled=True)[:8], cfg.img_size)
    seg_batch = [torch.stack(t) for t in zip(*[seg_ds[i] for i in range(8)])]
    losses = _fixed_batch_losses(TransUNet(cfg), lambda m, b: dice_bce(torch.sigmoid(m(b[0])), b[1]), seg_batch)
    assert losses[-1] < 0.9 * losses[0], losses


def test_pretraining_writes_encoder_and_card(sites, encoders):
    _, target = sites
    mim, con = encoders
    for res, stage in ((mim, "pretrain-mim"), (con, "pretrain-contrastive")):
        tensors = load_file(res.encoder_path)
        assert tensors and all(k.startswith("encoder.") for k in tensors)
        card = res.card
        assert card["stage"] == stage and card["preset"] == "tiny" and card["format"] == "pocus-edge/1"
        [entry] = card["data"]
        assert entry["role"] == "ssl-images-only" and entry["splits"] == ["split=train"]
        assert entry["manifest_sha256"] == load_site(target).manifest_sha256()
        assert card["code_version"].startswith("0.")
        rows = list(csv.DictReader(open(res.out_dir / engine.LOG_CSV)))
        assert rows and rows[-1]["step"] == "2"
    assert con.card["hyperparameters"]["min_frame_gap"] == 15
    assert any((mim.out_dir / engine.TB_DIR).iterdir())  # TensorBoard scalars were written


def test_pretraining_never_opens_a_mask(sites, tmp_path, monkeypatch):
    import pocus_edge.data.datasets as ds
    import pocus_edge.data.layout as layout

    _, target = sites
    opened = []
    real = layout.read_gray_png

    def spy(path):
        opened.append(str(path))
        return real(path)

    monkeypatch.setattr(ds, "read_gray_png", spy)
    monkeypatch.setattr(layout, "read_gray_png", spy)
    monkeypatch.setattr(layout.Site, "read_mask", lambda *a, **k: pytest.fail("pretraining read a mask"))
    real_header = layout.image_header
    monkeypatch.setattr(layout, "image_header", lambda p: pytest.fail("pretraining opened a mask header") if "/Masks/" in str(p) else real_header(p))
    pretrain_mim(target, tmp_path / "mim", max_steps=1, **FAST)
    pretrain_contrastive(target, tmp_path / "con", max_steps=1, **FAST)
    assert opened and not any("/Masks/" in p for p in opened)


def test_finetune_loads_encoder_and_leaves_decoder_random(encoders):
    from pocus_edge.models.transunet import TransUNet
    from pocus_edge.train.finetune import build_finetune_model

    mim, _ = encoders
    cfg = model_preset("tiny")
    model, card = build_finetune_model(cfg, seed=5, init=mim.encoder_path)
    assert card["stage"] == "pretrain-mim"
    pretrained = load_file(mim.encoder_path)
    state = model.state_dict()
    for k, v in pretrained.items():
        assert torch.equal(state[k], v), k
    torch.manual_seed(5)
    fresh = TransUNet(cfg).state_dict()
    decoder_keys = [k for k in state if k.startswith("decoder.")]
    assert decoder_keys
    for k in decoder_keys:
        assert torch.equal(state[k], fresh[k]), k
    # ... and the encoder really changed from a random init.
    assert not torch.equal(state["encoder.pos_embed"], fresh["encoder.pos_embed"])


def test_finetune_end_to_end_and_recipes_in_the_card(sites, encoders, tmp_path):
    source, _ = sites
    mim, con = encoders
    a = finetune(source, tmp_path / "mim_ft", init=mim.encoder_path, max_steps=3, **FAST)
    b = finetune(source, tmp_path / "con_ft", init=con.encoder_path, max_steps=3, **FAST)
    assert a.model_path.exists() and a.best_val is not None
    assert a.card["stage"] == "finetune" and a.card["init"]["stage"] == "pretrain-mim"
    # default recipe: the same optimizer and decay after either encoder (no per-branch confound).
    for res in (a, b):
        hp = res.card["hyperparameters"]
        assert (hp["recipe"], hp["optimizer"], hp["weight_decay"], hp["encoder_lr_scale"]) == ("default", "adamw", 0.05, 0.1)
        assert hp["train.grad_clip"] is None and hp["train.warmup_fraction"] == 0.05
        groups = {g["group"]: g for g in hp["param_groups"]}
        assert groups["encoder"]["lr"] == pytest.approx(0.1 * groups["decoder"]["lr"])
        assert groups["encoder-no-decay"]["weight_decay"] == 0.0 and groups["decoder"]["weight_decay"] == 0.05
    # paper recipe: the released code's SGD, 0.05 after MIM and 0.1 after a contrastive encoder.
    c = finetune(source, tmp_path / "mim_paper", init=mim.encoder_path, recipe="paper", max_steps=2, **FAST)
    d = finetune(source, tmp_path / "con_paper", init=con.encoder_path, recipe="paper", max_steps=2, **FAST)
    assert c.card["hyperparameters"]["weight_decay"] == 0.05 and d.card["hyperparameters"]["weight_decay"] == 0.1
    assert c.card["hyperparameters"]["momentum"] == 0.99 and c.card["hyperparameters"]["optimizer"] == "sgd"
    # Decay on every parameter at one learning rate: the encoder and decoder groups differ in name only.
    paper_groups = c.card["hyperparameters"]["param_groups"]
    assert [g["group"] for g in paper_groups] == ["encoder", "decoder"]
    assert {(g["lr"], g["weight_decay"]) for g in paper_groups} == {(paper_groups[0]["lr"], 0.05)}
    assert c.card["hyperparameters"]["train.grad_clip"] == 1.0
    seen = sites_seen(a.card)
    assert [e["role"] for e in seen] == ["ssl-images-only", "supervised"]
    assert seen[0]["site"] != seen[1]["site"]
    assert seen[1]["splits"] == ["split=train", "split=val"]


def _run_interrupted(fn, kill_at, **kw):
    class Killed(Exception):
        pass

    def boom(step, loss):
        if step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        fn(on_step=boom, **kw)
    return fn(resume=True, **kw)


def assert_same_training_state(run_a: Path, run_b: Path) -> None:
    """Two runs' resumable checkpoints hold the same weights and optimizer state (RNG aside)."""
    a, b = load_file(Path(run_a) / engine.CHECKPOINT), load_file(Path(run_b) / engine.CHECKPOINT)
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stage", ["finetune", "mim"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(sites, tmp_path, stage):
    source, target = sites
    if stage == "finetune":
        fn = lambda **kw: finetune(source, **kw)  # noqa: E731
    else:
        fn = lambda **kw: pretrain_mim(target, **kw)  # noqa: E731
    # 8 frames per batch: several steps per epoch, a mid-epoch checkpoint at step 2, a kill at 3.
    kw = dict(max_steps=5, batch_size=8, checkpoint_every=2, **FAST)
    whole = fn(out_dir=tmp_path / "whole", **kw)
    resumed = _run_interrupted(fn, 3, out_dir=tmp_path / "killed", **kw)
    assert_same_training_state(tmp_path / "whole", tmp_path / "killed")
    assert whole.last_loss == resumed.last_loss
    artifact = "model.safetensors" if stage == "finetune" else "encoder.safetensors"
    wa, wb = load_file(tmp_path / "whole" / artifact), load_file(tmp_path / "killed" / artifact)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(sites, tmp_path, monkeypatch):
    import pocus_edge.losses as losses

    source, _ = sites
    real = losses.dice_bce
    calls = {"n": 0}

    def poisoned(prob, target, smooth=1.0):
        calls["n"] += 1
        out = real(prob, target, smooth)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(losses, "dice_bce", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"loss became nan at step 4.*last good checkpoint kept"):
        finetune(source, run, max_steps=6, batch_size=8, checkpoint_every=2, **FAST)
    meta = json.loads(__import__("safetensors").safe_open(str(run / engine.CHECKPOINT), "pt").metadata()["pocus_edge_trainer"])
    assert meta["global_step"] == 2
    weights = load_file(run / engine.CHECKPOINT)
    assert all(torch.isfinite(v).all() for k, v in weights.items() if v.is_floating_point())


def test_full_disk_keeps_previous_checkpoint(sites, tmp_path, monkeypatch):
    source, _ = sites
    run = tmp_path / "disk"
    real = engine._write_safetensors
    saved = {"n": 0}

    def flaky(tensors, path, metadata):
        saved["n"] += 1
        if saved["n"] == 2:
            Path(path).write_bytes(b"partial")  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata)

    monkeypatch.setattr(engine, "_write_safetensors", flaky)
    with pytest.raises(TrainingError, match="No space left on device.*previous checkpoint is intact"):
        finetune(source, run, max_steps=6, batch_size=8, checkpoint_every=1, **FAST)
    meta = json.loads(__import__("safetensors").safe_open(str(run / engine.CHECKPOINT), "pt").metadata()["pocus_edge_trainer"])
    assert meta["global_step"] == 1
    assert not [p for p in run.iterdir() if ".tmp" in p.name]  # no half-written leftovers


def test_isolation_and_bad_input_refusals(sites, encoders, tmp_path):
    source, target = sites
    mim, _ = encoders
    with pytest.raises(TrainingError, match="exactly one site"):
        finetune([source, target], tmp_path / "two", **FAST)
    with pytest.raises(TrainingError, match="exactly one site"):
        pretrain_mim([target, source], tmp_path / "two_mim", **FAST)
    with pytest.raises(TrainingError, match="holds 2 sites"):
        finetune(Path(source).parent, tmp_path / "parent", **FAST)
    # The target's main split has labeled train frames but no val: refused as an empty split.
    with pytest.raises(TrainingError, match="split 'val' has no labeled frames"):
        finetune(target, tmp_path / "ub", split_column="split", **FAST)
    with pytest.raises(CheckpointError, match="preset 'tiny'.*preset 'small'"):
        finetune(source, tmp_path / "small", init=mim.encoder_path, **{**FAST, "preset": "small"})
    # An unlabeled site cannot be fine-tuned on; a site without a train split cannot be pretrained on.
    writer = SiteWriter(tmp_path / "unlabeled")
    for i in range(4):
        writer.add(FrameRecord(f"f{i}.png", "v0", i, patient="p0", split="test"), np.full((20, 20), 9, np.uint8))
    writer.close()
    with pytest.raises(TrainingError, match="no labeled frames"):
        finetune(tmp_path / "unlabeled", tmp_path / "x", **FAST)
    with pytest.raises(TrainingError, match="split 'train' is empty"):
        pretrain_contrastive(tmp_path / "unlabeled", tmp_path / "y", **FAST)
    # An existing run is never overwritten silently.
    run = tmp_path / "once"
    finetune(source, run, max_steps=1, **FAST)
    with pytest.raises(TrainingError, match="pass --resume"):
        finetune(source, run, max_steps=1, **FAST)


def test_cli_refuses_two_sites(sites, tmp_path, capsys):
    from pocus_edge.cli import main

    source, target = sites
    code = main(["finetune", "--data", str(source), "--data", str(target), "--out", str(tmp_path / "r"), "--preset", "tiny"])
    assert code == 2
    assert "exactly one site" in capsys.readouterr().err


def test_card_hash_follows_the_manifest(sites, tmp_path):
    source, _ = sites
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    site = load_site(copy, check_images=False)
    before = build_card(preset="tiny", model=model_preset("tiny"), out_channels=1, stage="baseline",
                        hyperparameters={}, data=[site_entry(site, role="supervised", splits=["split=train"])])
    records = read_manifest(copy / "manifest.csv")
    records[0].view = records[0].view + "-relabelled"  # any edit of the manifest
    write_manifest(copy / "manifest.csv", records)
    after_entry = site_entry(load_site(copy, check_images=False), role="supervised", splits=["split=train"])
    assert before["data"][0]["manifest_sha256"] != after_entry["manifest_sha256"]
    assert before["data"][0]["manifest_sha256"] == load_site(source).manifest_sha256()
    assert before["code_version"] == code_version() and before["created"].endswith("+00:00")


def test_contrastive_stage_does_not_clip_gradients_and_the_others_do(sites, tmp_path, monkeypatch):
    """docs/method.md gives the contrastive stage no clipping, and clipping at 1.0 keeps MT-NXent at
    chance for hundreds of steps (benchmarks/notes/contrastive_plateau.md): the engine must not clip there, must
    clip the other stages at 1.0, and an explicit --set train.grad_clip must still win."""
    source, target = sites
    calls: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        calls.append(float(max_norm))
        return original(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    con = pretrain_contrastive(target, tmp_path / "con", max_steps=2, **FAST)
    assert calls == [] and con.card["hyperparameters"]["train.grad_clip"] is None
    pretrain_contrastive(target, tmp_path / "con_clip", max_steps=2, overrides={"train.grad_clip": 0.5}, **FAST)
    assert calls == [0.5, 0.5]
    calls.clear()
    mim = pretrain_mim(target, tmp_path / "mim", max_steps=2, **FAST)
    assert calls == [1.0, 1.0] and mim.card["hyperparameters"]["train.grad_clip"] == 1.0


def test_lr_schedule_formula():
    f = engine.LRFactor("cosine", total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert engine.LRFactor("constant", 10, 0)(7) == 1.0
    # LP-FT: held at 0, then its own warm-up, then the run's cosine.
    held = engine.LRFactor("cosine", total_steps=10, warmup_steps=2, hold_steps=3)
    assert [held(s) for s in range(5)] == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert held(6) == pytest.approx(f(6))


def test_evaluate_reports_match_independent_computation(sites, encoders, tmp_path):
    from pocus_edge.data.transforms import preprocess_frame, preprocess_mask
    from pocus_edge.metrics import dice_iou_per_image, wilcoxon_p
    from pocus_edge.models.fusion import fuse
    from pocus_edge.models.weights import build_segmenter

    source, target = sites
    mim, con = encoders
    a = finetune(source, tmp_path / "g", init=mim.encoder_path, max_steps=2, **FAST)
    b = finetune(source, tmp_path / "c", init=con.encoder_path, max_steps=2, seed=1, **FAST)
    res = evaluate(target, [a.model_path, b.model_path], tmp_path / "ev", fusion=["entropy", "average"], device="cpu",
                   overlays=1, batch_size=3)
    site = load_site(target)
    recs = site.select("test", labeled=True)
    assert [r.filename for r in res.records] == [r.filename for r in recs]
    x = torch.from_numpy(np.stack([preprocess_frame(site.read_image(r), 64) for r in recs]))
    y = np.stack([preprocess_mask(site.read_mask(r), 64) for r in recs])
    with torch.no_grad():
        pg = build_segmenter(a.model_path)[0].predict(x)
        pc = build_segmenter(b.model_path)[0].predict(x)
    np.testing.assert_allclose(res.dice["g"], dice_iou_per_image(pg, y)[0])
    np.testing.assert_allclose(res.dice["fused-entropy"], dice_iou_per_image(fuse(pg, pc, method="entropy"), y)[0])
    np.testing.assert_allclose(res.iou["c"], dice_iou_per_image(pc, y)[1])
    assert res.wilcoxon["g vs c"] == pytest.approx(wilcoxon_p(res.dice["g"], res.dice["c"]))
    rows = list(csv.DictReader(open(tmp_path / "ev" / "per_image.csv")))
    assert len(rows) == 4 * len(recs)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["models"]["g"]["dice_mean"] == pytest.approx(float(res.dice["g"].mean()))
    assert summary["manifest_sha256"] == site.manifest_sha256()
    assert len(list((tmp_path / "ev" / "overlays").glob("*.png"))) == 2 * 4
    # A checkpoint whose card flags "did not train" is marked in the table and the summary.
    from pocus_edge.models.weights import read_checkpoint, save_checkpoint

    state, card = read_checkpoint(b.model_path)
    card["hyperparameters"]["did_not_train"] = True
    save_checkpoint(tmp_path / "flat" / "model.safetensors", state, card)
    flagged = evaluate(target, [a.model_path, tmp_path / "flat" / "model.safetensors"], tmp_path / "ev2",
                       device="cpu", overlays=0)
    assert flagged.did_not_train == {"g": a.did_not_train, "flat": True}
    assert "flat **(did not train)**" in flagged.table()
    assert ("g **(did not train)**" in flagged.table()) is bool(a.did_not_train)  # two steps: its own flag
    assert json.loads((tmp_path / "ev2" / "summary.json").read_text())["models"]["flat"]["did_not_train"] is True
    with pytest.raises(TrainingError, match="exactly two models"):
        evaluate(target, [a.model_path], fusion=["entropy"], device="cpu")


def test_persistent_workers_see_each_epoch(sites, tmp_path):
    """Augmentations are seeded by (seed, epoch, index): DataLoader workers that persist across
    epochs must give the same run as the main process (3 epochs of 2 steps)."""
    _, target = sites
    kw = dict(epochs=3, max_steps=5, batch_size=64, **FAST)
    inline = pretrain_contrastive(target, tmp_path / "w0", num_workers=0, **kw)
    workers = pretrain_contrastive(target, tmp_path / "w2", num_workers=2, **kw)
    assert inline.epochs_done == 3
    a, b = load_file(inline.encoder_path), load_file(workers.encoder_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and the epochs really differ (the views are re-drawn each epoch).
    from pocus_edge.config import ContrastiveConfig
    from pocus_edge.data.datasets import ContrastivePairDataset

    data = ContrastivePairDataset(load_site(target), load_site(target).select("train"), 64, ContrastiveConfig())
    assert not torch.equal(data[(0, 0)][0], data[(0, 1)][0])


def test_time_budgeted_schedule_fits_the_measured_pace():
    # 30 steps in 10 s of a 60 s budget: 50 s left at 3 steps/s, 5% margin -> 30 + 142 steps.
    assert engine._fit_steps(30, 0, 10.0, 60.0) == 30 + int(50 * 0.95 * 3)
    assert engine._fit_steps(40, 10, 70.0, 60.0) == 40  # over time: no more steps


# ---------------------------------------------------------------------------------------------
# Recipes: the default trains the encoder, the paper recipe's decay erases it


def _vit_weights(state) -> torch.Tensor:
    """The transformer blocks' weight matrices, in a fixed key order."""
    return torch.cat([state[k].flatten().double() for k in sorted(state)
                      if k.startswith("encoder.blocks.") and state[k].ndim >= 2])


def _encoder_after(source, out, recipe, steps, lr):
    from pocus_edge.models.transunet import TransUNet

    res = finetune(source, out, recipe=recipe, max_steps=steps, epochs=1000, batch_size=8, lr=lr,
                   overrides={"dropout": 0.0}, **FAST)
    torch.manual_seed(0)
    init = _vit_weights(TransUNet(model_preset("tiny", dropout=0.0)).state_dict())
    final = load_file(res.out_dir / engine.CHECKPOINT)
    after = _vit_weights({k[len("model."):]: v for k, v in final.items() if k.startswith("model.")})
    cosine = float(after @ init / (after.norm() * init.norm()))
    return cosine, float(after.norm() / init.norm())


def test_default_recipe_moves_the_encoder_and_paper_recipe_shrinks_it(sites, tmp_path):
    """Would fail if the default recipe froze the encoder (cosine to init stays ~1) or erased it,
    or if the paper recipe's decay stopped dominating its encoder. Both runs give the encoder the
    same lr (1e-3: the default's decoder lr 1e-2 x 0.1), so the difference is the optimizer and
    the decay: with momentum 0.99 the paper recipe's per-step shrink is lr x wd / 0.01."""
    source, _ = sites
    cos_default, norm_default = _encoder_after(source, tmp_path / "default", "default", 120, lr=1e-2)
    assert cos_default < 0.999, cos_default
    assert 0.5 < norm_default < 2.0, norm_default
    cos_paper, norm_paper = _encoder_after(source, tmp_path / "paper", "paper", 120, lr=1e-3)
    assert norm_paper < 0.95 and norm_paper < norm_default - 0.05, (norm_paper, norm_default)
    # ... while keeping its direction: it decays, it does not learn.
    assert 1 - cos_paper < 0.01 * (1 - cos_default), (cos_paper, cos_default)


def test_parameter_groups_follow_the_recipe():
    from pocus_edge.models.transunet import TransUNet
    from pocus_edge.train.recipes import is_no_decay, parameter_groups

    model = TransUNet(model_preset("tiny"))
    groups = parameter_groups(model, weight_decay=0.05, encoder_lr_scale=0.1, decay_all_parameters=False,
                             decoder_only_steps=7)
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    seen = set()
    for g in groups:
        names = [by_id[id(p)] for p in g.params]
        seen.update(names)
        assert all(n.startswith("encoder.") == g.name.startswith("encoder") for n in names), g.name
        assert all(is_no_decay(n, named[n]) == g.name.endswith("no-decay") for n in names), g.name
        assert g.weight_decay == (0.0 if g.name.endswith("no-decay") else 0.05)
        assert g.lr_scale == (0.1 if g.name.startswith("encoder") else 1.0)
        assert g.hold_steps == (7 if g.name.startswith("encoder") else 0)
    assert seen == set(named)  # every parameter in exactly one group
    assert "encoder.pos_embed" in {by_id[id(p)] for g in groups if g.name == "encoder-no-decay" for p in g.params}
    paper = parameter_groups(model, weight_decay=0.05, encoder_lr_scale=1.0, decay_all_parameters=True,
                            decoder_only_steps=0)
    assert sum(len(g.params) for g in paper) == len(named)
    assert all(g.weight_decay == 0.05 and g.lr_scale == 1.0 and g.hold_steps == 0 for g in paper)


def test_decoder_only_steps_hold_the_encoder_then_release_it(sites, tmp_path):
    source, _ = sites
    from pocus_edge.models.transunet import TransUNet

    def encoder_state(run):
        weights = load_file(run / engine.CHECKPOINT)
        return {k: v for k, v in weights.items() if k.startswith("model.encoder.")}

    torch.manual_seed(0)
    init = {f"model.{k}": v for k, v in TransUNet(model_preset("tiny")).state_dict().items() if k.startswith("encoder.")}
    finetune(source, tmp_path / "held", max_steps=3, batch_size=8, overrides={"decoder_only_steps": 3}, **FAST)
    held = encoder_state(tmp_path / "held")
    assert all(torch.equal(held[k], init[k]) for k in init)  # lr 0 and decoupled decay lr*wd = 0
    finetune(source, tmp_path / "released", max_steps=5, batch_size=8, overrides={"decoder_only_steps": 3}, **FAST)
    assert not all(torch.equal(v, init[k]) for k, v in encoder_state(tmp_path / "released").items())


# ---------------------------------------------------------------------------------------------
# Resume, failed writes, config files


def test_resume_without_a_checkpoint_is_exactly_a_fresh_run(sites, tmp_path):
    source, _ = sites
    kw = dict(max_steps=3, batch_size=8, **FAST)
    fresh = finetune(source, tmp_path / "fresh", **kw)
    resumed = finetune(source, tmp_path / "resumed", resume=True, **kw)
    a, b = load_file(fresh.model_path), load_file(resumed.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.last_loss == resumed.last_loss


@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_failed_checkpoint_or_model_write_is_one_line_and_leaves_nothing(sites, tmp_path, monkeypatch, error):
    from safetensors import SafetensorError

    import pocus_edge.models.weights as weights

    source, _ = sites
    exc = SafetensorError("I/O error: No space left on device (os error 28)") if error == "safetensors" \
        else OSError(errno.EROFS, "Read-only file system")

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(engine, "_write_safetensors", fail)
    with pytest.raises(TrainingError, match=r"checkpoint\.safetensors: could not write the checkpoint \(.*\); no checkpoint was written"):
        finetune(source, tmp_path / "ckpt", max_steps=2, batch_size=8, **FAST)
    monkeypatch.undo()
    monkeypatch.setattr(weights, "write_bytes_atomic", fail)
    with pytest.raises(TrainingError, match=r"model\.safetensors: could not write the model"):
        finetune(source, tmp_path / "model", max_steps=2, batch_size=8, **FAST)
    for run in (tmp_path / "ckpt", tmp_path / "model"):
        assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_cli_errors_for_unwritable_outputs(sites, tmp_path, capsys):
    from pocus_edge.cli import main

    source, _ = sites
    afile = tmp_path / "a_file"
    afile.write_text("x")
    code = main(["finetune", "--data", str(source), "--out", str(afile), "--preset", "tiny", "--max-steps", "1",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "is a file" in err and "Traceback" not in err


def test_config_file_round_trip_and_precedence(sites, tmp_path):
    import yaml

    from pocus_edge.errors import ConfigError
    from pocus_edge.train.common import resolve_configs

    source, _ = sites
    first = finetune(source, tmp_path / "a", max_steps=2, batch_size=8, overrides={"lr": "3e-4", "train.seed": "4"},
                     **FAST)
    written = yaml.safe_load((first.out_dir / engine.CONFIG_FILE).read_text())
    assert written["stage"] == "finetune" and written["finetune"]["lr"] == 3e-4 and written["train"]["seed"] == 4
    # The written file reproduces the run.
    again = finetune(source, tmp_path / "b", config_file=first.out_dir / engine.CONFIG_FILE, **{**FAST, "preset": None})
    assert yaml.safe_load((again.out_dir / engine.CONFIG_FILE).read_text()) == written
    wa, wb = load_file(first.model_path), load_file(again.model_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # --set beats the file; explicit options beat --set.
    r = resolve_configs("finetune", None, {"lr": "5e-4"}, config_file=first.out_dir / engine.CONFIG_FILE, seed=9)
    assert (r.stage_cfg.lr, r.train.seed, r.preset) == (5e-4, 9, "tiny")
    with pytest.raises(ConfigError, match="written for stage 'finetune'"):
        resolve_configs("mim", None, config_file=first.out_dir / engine.CONFIG_FILE)
    with pytest.raises(ConfigError, match="written for recipe 'default'"):
        resolve_configs("finetune", None, config_file=first.out_dir / engine.CONFIG_FILE, recipe="paper")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"lr: cannot read 'fast' as float.*bad\.yaml"):
        resolve_configs("finetune", "tiny", config_file=bad)


def test_config_coercion_reads_types_without_evaluating_text():
    import inspect

    import pocus_edge.config as config
    from pocus_edge.config import TrainConfig, apply_overrides
    from pocus_edge.data.phantom_profiles import ProbePSF  # string annotations (postponed evaluation)

    assert "eval(" not in inspect.getsource(config)
    t = apply_overrides(TrainConfig(), {"grad_clip": "none", "max_steps": "12", "amp": "off", "warmup_fraction": "0.1"})
    assert (t.grad_clip, t.max_steps, t.amp, t.warmup_fraction) == (None, 12, False, 0.1)
    assert apply_overrides(ProbePSF(), {"center_mhz": "9"}).center_mhz == 9.0
    from pocus_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot read 2.5 as int"):
        apply_overrides(TrainConfig(), {"max_steps": 2.5})


def test_mim_mask_cells_are_whole_tokens_at_every_size():
    from pocus_edge.config import MIMConfig
    from pocus_edge.errors import ConfigError
    from pocus_edge.models.heads import MaskGenerator
    from pocus_edge.train.mim import resolve_mask_cell

    # The paper's 7x7 grid of 32-px cells at 224; elsewhere ceil(size / 7) rounded to whole 16-px
    # tokens (19 -> 16 at 128, 10 -> 16 at 64), so no cell straddles a token.
    for size, cell, side in ((224, 32, 7), (128, 16, 8), (64, 16, 4)):
        cfg = resolve_mask_cell(size, MIMConfig())
        gen = MaskGenerator(size, cfg)
        assert (cfg.mask_cell, gen.cells_per_side) == (cell, side)
        assert gen.num_masked == math.ceil(side * side * 0.6 - 1e-9)
        mask, _ = gen(2, generator=torch.Generator().manual_seed(0))
        tokens = mask[:, 0].unfold(1, 16, 16).unfold(2, 16, 16)  # (N, g, g, 16, 16)
        assert torch.all(tokens.amin(dim=(-1, -2)) == tokens.amax(dim=(-1, -2)))  # every token all-or-nothing
        assert abs(float(mask.mean()) - gen.num_masked / gen.num_cells) < 1e-6
    with pytest.raises(ConfigError, match="multiple of the 16-px token"):
        resolve_mask_cell(128, MIMConfig(mask_cell=19))
    assert resolve_mask_cell(128, MIMConfig(mask_cell=32)).mask_cell == 32


def test_did_not_train_flag_rests_on_the_first_validation_and_survives_resume(sites, tmp_path):
    from pocus_edge.models.weights import read_checkpoint

    source, _ = sites
    res = finetune(source, tmp_path / "run", max_steps=4, batch_size=8, epochs=2, **FAST)
    rows = [r for r in csv.DictReader(open(res.out_dir / engine.LOG_CSV)) if r["phase"] == "val"]
    first = float(rows[0]["val_dice"])
    assert res.first_val_dice == pytest.approx(first)
    assert res.did_not_train == (first < engine.DID_NOT_TRAIN_DICE)
    card = read_checkpoint(res.model_path)[1]["hyperparameters"]
    assert card["first_val_dice"] == pytest.approx(first) and card["did_not_train"] == res.did_not_train

    # The rule itself, on a stage whose validation reports a chosen Dice: a later, better
    # validation does not clear the flag, and a resumed run keeps the first figure.
    for dice, flagged in ((0.05, True), (0.5, False)):
        state = engine.RunState(8, 8, 1, 1, 1)
        state.first_val_dice = dice
        assert state.did_not_train is flagged and state.train_check() == {"first_val_dice": dice,
                                                                          "did_not_train": flagged}
    assert engine.RunState(8, 8, 1, 1, 1).did_not_train is None
    more = finetune(source, tmp_path / "run", max_steps=8, batch_size=8, epochs=4, resume=True, **FAST)
    assert more.first_val_dice == pytest.approx(first)
