"""`pocus-edge qualify` and the study's selected view: every score depends on its input as its
closed form says, AURC / AUROC / Spearman match brute force and scipy, the target's labels are
never opened, bad input ends in one line with exit 2, outputs are atomic and ranked."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pocus_edge.cli import main
from pocus_edge.io import sha256_file
from pocus_edge.models.risk import branch_disagreement_np
from pocus_edge.qualify.estimate import estimate_frames, fit_calibration
from pocus_edge.qualify.failure import aurc, auroc, spearman
from pocus_edge.qualify.scores import PERTURBATIONS, frame_scores, mask_shape, perturb

FAST = dict(device="cpu", progress=False, tensorboard=False)
QUICK = ["--frames", "40", "--calib-frames", "16", "--bootstrap", "20", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_models(tiny_sites, tmp_path_factory):
    """Two briefly fine-tuned tiny networks (seeds 0 and 1)."""
    from pocus_edge.train import finetune

    source, target = tiny_sites
    runs = tmp_path_factory.mktemp("qualify_models")
    a = finetune(source, runs / "a", max_steps=4, preset="tiny", seed=0, **FAST).model_path
    b = finetune(source, runs / "b", max_steps=4, preset="tiny", seed=1, **FAST).model_path
    return {"source": source, "target": target, "a": a, "b": b}


def _onnx(path: Path, outputs: list[str], size: int = 32) -> Path:
    """A graph of the given outputs, each a different function of the mean gray level."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", 3, size, size])
    nodes = [helper.make_node("ReduceMean", ["frames"], ["m"], axes=[1], keepdims=1)]
    outs = []
    for k, name in enumerate(outputs):
        nodes.append(helper.make_node("Pow", ["m", f"e{k}"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1, size, size]))
    inits = [helper.make_tensor(f"e{k}", TensorProto.FLOAT, [], [0.5 + k]) for k in range(len(outputs))]
    model = helper.make_model(helper.make_graph(nodes, "g", [inp], outs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Scores


def test_branch_agreement_follows_its_closed_form():
    rng = np.random.default_rng(0)
    p = rng.random((3, 16, 16))
    same = frame_scores(p, (p, p), {})
    assert np.allclose(same["risk"], 1.0 - (2 * (p * p).sum((1, 2)) + 1) / (2 * p.sum((1, 2)) + 1))
    q = p.copy()
    q[1] = 0.0  # one branch sees nothing on frame 1
    other = frame_scores(p, (p, q), {})
    expected = 1.0 - (2 * (p * q).sum((1, 2)) + 1) / (p.sum((1, 2)) + q.sum((1, 2)) + 1)
    assert np.allclose(other["risk"], expected)
    assert np.allclose(other["risk"], branch_disagreement_np(p, q))
    assert other["risk"][1] > same["risk"][1] and np.allclose(other["risk"][[0, 2]], same["risk"][[0, 2]])
    hard = (p > 0.5).astype(float)
    assert np.allclose(frame_scores(hard, (hard, hard), {})["risk"], 0.0)  # identical binary branches: risk 0
    # Without branches the risk is the map's disagreement with its own mask.
    assert np.allclose(frame_scores(p, None, {})["risk"], same["self_risk"])


def test_consistency_compares_with_the_unflipped_mask():
    p = np.zeros((1, 8, 8))
    p[0, 2:4, 0:3] = 0.9  # bone on the left
    flipped_right = p[:, :, ::-1]
    assert frame_scores(p, None, {"hflip": flipped_right})["consistency"][0] == pytest.approx(1.0)
    assert frame_scores(p, None, {"hflip": p})["consistency"][0] < 0.2  # not moved back: disagrees
    assert frame_scores(p, None, {"gain": p, "blur": np.zeros_like(p)})["consistency"][0] == pytest.approx((1 + 1 / 7) / 2)  # Dice(6 px, empty) = 1 / 7


def test_confidence_baselines_and_mask_shape():
    p = np.full((2, 4, 4), 0.5)
    p[1] = 1.0
    s = frame_scores(p, None, {})
    assert s["maxprob"] == pytest.approx([0.5, 1.0]) and s["entropy"] == pytest.approx([1.0, 0.0])
    m = np.zeros((2, 20, 20), bool)
    m[0, 5:7, 2:18] = True  # a 2-px thick line
    m[1, 2:5, 2:5] = m[1, 10:14, 10:14] = True
    area, comps, thick = mask_shape(m)
    assert comps.tolist() == [1, 2] and area[0] == pytest.approx(32 / 400)
    assert 1.5 < thick[0] < 2.5 and thick[1] > thick[0]


def test_perturbations_change_the_frame_and_are_deterministic():
    x = np.random.default_rng(1).random((2, 16, 16)).astype(np.float32) * 0.8
    for name in PERTURBATIONS:
        y = perturb(x, name)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not np.allclose(x, y)
        assert np.array_equal(y, perturb(x, name))
    assert np.array_equal(perturb(x, "hflip")[:, :, ::-1], x)


# ---------------------------------------------------------------------------------------------
# Estimate


def test_calibration_recovers_a_linear_map_and_empty_masks_get_the_source_empty_rate():
    rng = np.random.default_rng(2)
    x = rng.random((300, 3))
    dice = 0.2 + 0.5 * x[:, 0] + 0.1 * x[:, 2]
    truth_empty = np.r_[np.ones(30, bool), np.zeros(270, bool)]
    cal = fit_calibration("single", x, dice, truth_empty, np.zeros(300, bool), ridge=1e-6)
    assert np.allclose(cal.predict(x), dice, atol=1e-4) and cal.empty_rate == pytest.approx(0.1)
    assert cal.to_dict()["coefficients"]["self_agreement"] == pytest.approx(0.5, abs=1e-4)
    # A model that leaves every frame empty is estimated at q, however confident it looks.
    assert np.allclose(estimate_frames(cal, x[:10], np.ones(10, bool)), 0.1)
    half = np.r_[np.ones(5, bool), np.zeros(5, bool)]  # empty on 50 % of frames: min(1, 0.1 / 0.5)
    assert np.allclose(estimate_frames(cal, x[:10], half)[:5], 0.2)
    assert np.allclose(estimate_frames(cal, x[:10], half)[5:], np.clip(dice[5:10], 0, 1), atol=1e-4)


def _brute_aurc(score, loss):
    # Every random order within ties, averaged: the tie-robust definition, by brute force.
    rng = np.random.default_rng(0)
    vals = []
    for _ in range(400):
        order = np.lexsort((rng.random(len(score)), score))
        sel = np.cumsum(loss[order]) / np.arange(1, len(score) + 1)
        vals.append(sel.mean())
    return np.mean(vals)


def test_aurc_matches_brute_force_and_auroc_and_spearman_match_references():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    score = rng.integers(0, 6, 40).astype(float)  # many ties
    fail = (rng.random(40) < 0.4).astype(float)
    # Ties averaged by brute force over orders vs the group formula (exact in expectation).
    assert aurc(score, fail) == pytest.approx(_brute_aurc(score, fail), abs=0.01)
    distinct = rng.random(40)
    sel = np.cumsum(fail[np.argsort(distinct)]) / np.arange(1, 41)
    assert aurc(distinct, fail) == pytest.approx(sel.mean())
    assert aurc(fail, fail) < aurc(-fail, fail)  # a perfect score beats the reverse
    pairs = [(a > b) + 0.5 * (a == b) for a in score[fail == 1] for b in score[fail == 0]]
    assert auroc(score, fail) == pytest.approx(np.mean(pairs))
    a, b = rng.random(30), rng.integers(0, 5, 30)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)


# ---------------------------------------------------------------------------------------------
# The command


def _poisoned_target(target: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "target"
    shutil.copytree(target, copy)
    for p in (copy / "Masks").iterdir():
        p.write_bytes(b"not a png")
    return copy


def test_qualify_ranks_models_without_opening_a_target_label(tiny_models, tmp_path, monkeypatch, capsys):
    import pocus_edge.data.layout as layout
    import pocus_edge.qualify.frames as frames_mod

    target = _poisoned_target(tiny_models["target"], tmp_path)
    opened: list[str] = []
    real_read, real_mask, real_header = frames_mod.read_gray_png, layout.Site.read_mask, layout.image_header

    def spy(path):
        opened.append(str(path))
        return real_read(path)

    def read_mask(site, record):
        assert Path(site.root).resolve() != target.resolve(), "qualify read a target mask"
        return real_mask(site, record)

    def header(path):
        assert "Masks" not in Path(path).parts or not str(path).startswith(str(target)), "opened a target mask header"
        return real_header(path)

    monkeypatch.setattr(frames_mod, "read_gray_png", spy)
    monkeypatch.setattr(layout, "read_gray_png", spy)
    monkeypatch.setattr(layout, "image_header", header)
    monkeypatch.setattr(layout.Site, "read_mask", read_mask)
    models = [tiny_models["a"], tiny_models["b"]]
    before = [sha256_file(p) for p in models]
    out = tmp_path / "q"
    code = main(["qualify", str(models[0]), str(models[1]), "-g", str(models[0]), "-c", str(models[1]),
                 "--target", str(target), "--source", str(tiny_models["source"]), "--out", str(out), *QUICK])
    assert code == 0, capsys.readouterr().err
    assert [sha256_file(p) for p in models] == before  # the models are never touched
    target_files = [p for p in opened if p.startswith(str(target))]
    assert target_files and not any("/Masks/" in p for p in target_files)
    report = json.loads((out / "qualify.json").read_text())
    assert report["schema"] == "pocus-edge-qualify/1" and len(report["models"]) == 3
    ests = [report["models"][m]["estimated_dice"] for m in report["ranking"]]
    assert ests == sorted(ests, reverse=True)
    assert [report["models"][m]["rank"] for m in report["ranking"]] == [1, 2, 3]
    with open(out / "ranking.csv") as fh:
        assert [r["model"] for r in csv.DictReader(fh)] == report["ranking"]
    fused = next(m for m in report["models"].values() if m["kind"] == "pair")
    assert fused["risk"]["formula"] == "branch-soft-dice-disagreement-v1"
    single = next(m for m in report["models"].values() if m["kind"] == "single")
    assert single["risk"]["formula"] == "self-soft-dice-disagreement-v1"
    for m in report["models"].values():
        lo, hi = m["interval95"]
        assert 0 <= lo <= hi <= 1 and np.isfinite(m["risk"]["threshold"])
        assert m["risk"]["drift"] is None or m["risk"]["drift"]["half_width"] > 0
    with open(out / "frames.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * report["frames"]["target"]
    assert (out / "qualify.png").read_bytes()[:4] == b"\x89PNG"
    # What qualify writes is what export --qualify and stream --qualify read (one reader for both).
    from pocus_edge.export.risk import risk_entry
    from pocus_edge.qualify_file import read_qualify_risk

    name = next(n for n, m in report["models"].items() if m["kind"] == "pair")
    assert read_qualify_risk(out / "qualify.json", name) == (name, report["models"][name]["risk"])
    entry = risk_entry("branch-soft-dice-disagreement-v1", out / "qualify.json", name)
    assert entry["threshold"] == report["models"][name]["risk"]["threshold"] and entry["qualify"]["model"] == name


def test_fused_onnx_risk_is_the_branch_disagreement_of_its_outputs(tmp_path):
    from pocus_edge.qualify.api import score_model
    from pocus_edge.qualify.frames import FrameSet
    from pocus_edge.qualify.models import NetworkCache, check_models, resolve_models

    path = _onnx(tmp_path / "f.onnx", ["fused", "p_generative", "p_contrastive"])
    specs, _ = resolve_models([path])
    cache = NetworkCache()
    assert check_models(specs, cache) == 32 and specs[0].two_branch
    gray = np.random.default_rng(4).random((3, 32, 32)).astype(np.float32)
    s = score_model(specs[0], cache, FrameSet(None, [], gray), "t")
    assert np.allclose(s["risk"], branch_disagreement_np(gray**1.5, gray**2.5), atol=1e-5)


def _fail(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_exit_2(tiny_models, tmp_path, capsys):
    src, tgt, a = str(tiny_models["source"]), str(tiny_models["target"]), str(tiny_models["a"])
    common = ["--source", src, "--out", str(tmp_path / "o"), *QUICK]
    # An ONNX export without the branch outputs the agreement needs.
    err = _fail(["qualify", str(_onnx(tmp_path / "nb.onnx", ["fused"])), "--target", tgt, *common], capsys)
    assert "nb.onnx" in err and "p_generative" in err
    # Models made at other input sizes (64 px tiny checkpoint, 32 px graph).
    err = _fail(["qualify", a, str(_onnx(tmp_path / "p.onnx", ["prob"])), "--target", tgt, *common], capsys)
    assert "p.onnx" in err and "32 px" in err and "64 px" in err
    # A target without unlabeled frames.
    labeled = tmp_path / "labeled"
    shutil.copytree(tgt, labeled)
    with open(labeled / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(labeled / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([r for r in rows if r["labeled"] == "1"])
    err = _fail(["qualify", a, "--target", str(labeled), *common], capsys)
    assert "manifest.csv" in err and "unlabeled" in err
    # A study folder with no finished run.
    study = tmp_path / "study"
    study.mkdir()
    (study / "study_config.yaml").write_text(f"options:\n  source: {src}\n  target: {tgt}\n  out: {study}\n"
                                             "  arms: [lower]\n  seeds: 2\n")
    err = _fail(["qualify", "--study", str(study), "--out", str(tmp_path / "o2"), *QUICK], capsys)
    assert str(study) in err and "no finished runs" in err


def test_outputs_are_atomic(tiny_models, tmp_path, monkeypatch):
    import pocus_edge.qualify.report as report

    def boom(rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "frames_csv", boom)
    out = tmp_path / "q"
    code = main(["qualify", str(tiny_models["a"]), "--target", str(tiny_models["target"]), "--source",
                 str(tiny_models["source"]), "--out", str(out), *QUICK])
    assert code == 130
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert "frames.csv" not in left and "qualify.png" not in left
    assert all(name in ("qualify.json", "ranking.csv") for name in left)  # complete files or nothing
    if "qualify.json" in left:
        json.loads((out / "qualify.json").read_text())


# ---------------------------------------------------------------------------------------------
# Selected view


def test_selected_view_picks_and_gain_recovered(tmp_path):
    from pocus_edge.study.selected import selected_view

    truth = {("a@d", 0): (0.5, 0.9), ("a@d", 1): (0.8, 0.95), ("a@d", 2): (0.6, 0.7),
             ("b@d", 0): (0.3, 0.9), ("b@d", 1): (0.7, 0.8)}
    estimate = {("a@d", 0): 0.4, ("a@d", 1): 0.6, ("a@d", 2): 0.7, ("b@d", 0): 0.2, ("b@d", 1): 0.5}
    for (arm, seed), (dice, val) in truth.items():
        folder = tmp_path / "eval" / arm / f"seed{seed}"
        folder.mkdir(parents=True)
        lines = ["site,patient,dice", f"target-test,P1,{dice - 0.1}", f"target-test,P1,{dice + 0.1}",
                 f"target-test,P2,{dice}", f"source-val,S1,{val}"]
        (folder / "per_image.csv").write_text("\n".join(lines) + "\n")
    payload = {"models": {f"{a}/{s}": {"name": f"{a}/{s}", "arm": a, "seed": s, "estimated_dice": e}
                          for (a, s), e in estimate.items()}}
    view = selected_view(tmp_path, payload, draws=200)
    arms = {a["arm"]: a for a in view["arms"]}
    assert arms["a@d"]["qualify"]["seed"] == 2 and arms["a@d"]["oracle"]["seed"] == 1
    assert arms["a@d"]["source_val"]["seed"] == 1 and arms["b@d"]["source_val"]["seed"] == 0
    assert arms["a@d"]["random_dice"] == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    num = (0.6 - 1.9 / 3) + (0.7 - 0.5)
    den = (0.8 - 1.9 / 3) + (0.7 - 0.5)
    assert view["gain_recovered"]["qualify"] == pytest.approx(num / den)
    keys = list(estimate)
    assert view["spearman"]["rho"] == pytest.approx(spearman([estimate[k] for k in keys], [truth[k][0] for k in keys]))
