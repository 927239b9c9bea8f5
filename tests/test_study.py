"""`pocus-edge study` on the tiny preset: the simulator's test-patient knob, the arm registry,
paired seeds, resumability, AdaBN, and a report whose statistics match an independent
recomputation from the per-image scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pocus_edge.errors import ConfigError
from pocus_edge.study import ARMS, BUDGETS, ArmKind, Study, StudyOptions, parse_arms, run_study
from pocus_edge.study.arms import _segmenter_predictor
from pocus_edge.study.budgets import check_protocol
from pocus_edge.study.markers import read_done, read_failed


@pytest.fixture(scope="module")
def study_sites(tmp_path_factory):
    """Tiny sites with 2 target test patients, every frame of them labeled."""
    from pocus_edge.data.phantom import simulate

    root = tmp_path_factory.mktemp("study_sites")
    source, target = simulate(root, preset="tiny", seed=0, progress=False, target_test_patients=2,
                              label_all_target_test=True)
    return source.root, target.root


def test_simulator_knob_labels_every_frame_of_the_chosen_test_patients(study_sites):
    from pocus_edge.data.layout import load_site
    from pocus_edge.data.phantom import get_preset, planned_records, with_target_test

    _, target = study_sites
    site = load_site(target)
    test_patients = {r.patient for r in site.records if r.split == "test"}
    assert len(test_patients) == 2
    of_test = [r for r in site.records if r.patient in test_patients]
    assert all(r.labeled and r.split == "test" for r in of_test)
    assert all((site.root / "Masks" / r.filename).is_file() for r in of_test)
    others = [r for r in site.records if r.patient not in test_patients]
    assert 0 < sum(r.labeled for r in others) < len(others) / 4  # everyone else stays sparse (12.5 %)
    # The knob only adds labels: the same frames, videos and (sparse) labels elsewhere.
    sparse = planned_records("target", get_preset("tiny"), 0)
    full = planned_records("target", with_target_test("tiny", 2, True), 0)
    assert [r.filename for r in sparse] == [r.filename for r in full]
    assert all(b.labeled or not a.labeled for a, b in zip(sparse, full))
    with pytest.raises(ConfigError, match="target test patients must be in 1..5"):
        with_target_test("tiny", 6, True)


def test_parse_arms_adds_what_arms_need_and_are_compared_with():
    # A fusion brings its control: the ensemble of two lower-bound models (lower and lower_b).
    keys = [c.key for c in parse_arms(["fused", "mim@paper:1"], "default", 3)]
    assert keys == ["lower@default", "mim@default", "contrastive@default", "lower_b@default", "ensemble@default",
                    "fused@default", "lower@paper", "mim@paper"]
    seeds = {c.key: c.seeds for c in parse_arms(["fused", "mim@paper:1"], "default", 3)}
    assert seeds["lower@paper"] == 1 and seeds["lower@default"] == 3
    with pytest.raises(ConfigError, match="unknown arm"):
        parse_arms(["teacher"], "default", 3)
    keys = [c.key for c in parse_arms(["student_uniform"], "default", 2)]
    assert keys == ["lower@default", "mim@default", "contrastive_uniform@default", "lower_b@default",
                    "ensemble@default", "fused_uniform@default", "student_uniform@default"]
    with pytest.raises(ConfigError, match="unknown recipe"):
        parse_arms(["mim@fast"], "default", 3)
    with pytest.raises(ConfigError, match="seeds after ':' must be 1..3"):
        parse_arms(["mim:4"], "default", 3)


def _options(sites, out, **kw):
    source, target = sites
    base = dict(source=source, target=target, out=out, budget="smoke", preset="tiny", device="cpu", seeds=2,
                progress=False, bootstrap=2000, arms=("lower", "mim", "contrastive", "fused", "adabn", "mim@paper:1"),
                primary="fused")
    return StudyOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def smoke_study(study_sites, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    messages: list[str] = []
    result = run_study(_options(study_sites, out), say=messages.append)
    return out, result, messages


def _per_image(out: Path, key: str, seed: int) -> list[dict[str, str]]:
    with open(out / "eval" / key / f"seed{seed}" / "per_image.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_study_prints_an_estimate_first_and_reports_every_arm(smoke_study):
    out, result, messages = smoke_study
    estimate = next(i for i, m in enumerate(messages) if "estimate: ~" in m)
    first_unit = next(i for i, m in enumerate(messages) if m.startswith("[1/"))
    assert first_unit > estimate
    report = json.loads((out / "study.json").read_text())
    assert set(report["arms"]) == {"lower@default", "mim@default", "contrastive@default", "fused@default",
                                   "adabn@default", "lower@paper", "mim@paper", "lower_b@default", "ensemble@default"}
    comps = report["comparisons"]
    assert set(comps) == {"mim@default vs lower@default", "contrastive@default vs lower@default",
                          "fused@default vs lower@default", "fused@default vs ensemble@default",
                          "adabn@default vs lower@default", "ensemble@default vs lower@default",
                          "mim@paper vs lower@paper", "lower@paper vs lower@default"}
    assert report["arms"]["mim@paper"]["seeds"] == [0] and report["arms"]["mim@default"]["seeds"] == [0, 1]
    assert (out / "study.png").stat().st_size > 0 and "## Paired differences" in (out / "study.md").read_text()
    # Two pretraining runs per method; seed s fine-tunes from run s mod 2.
    assert report["pretraining"]["contrastive seed 0"]["extras"]["masked_negatives"] > 0  # video-clustered
    assert {"mim seed 0", "mim seed 1"} <= set(report["pretraining"])
    for seed in (0, 1):
        card = json.loads((out / "runs" / "mim@default" / f"seed{seed}" / "done.json").read_text())
        assert card["seed"] == seed
    # The primary comparison alone carries a verdict at 2 seeds (inconclusive: 2 seeds give p >= 0.5);
    # every secondary comparison has fewer than 10 seeds and is labelled underpowered.
    assert comps["fused@default vs lower@default"]["role"] == "primary"
    assert comps["fused@default vs lower@default"]["verdict"] == "inconclusive"
    assert comps["fused@default vs lower@default"]["p"] >= 0.5
    assert {c["verdict"] for k, c in comps.items() if c["role"] == "secondary"} == {"underpowered"}
    assert comps["fused@default vs lower@default"]["mde"] == float("inf")
    assert "**Primary: fused - lower" in (out / "study.md").read_text()


def test_report_statistics_match_the_per_image_scores(smoke_study):
    out, _, _ = smoke_study
    report = json.loads((out / "study.json").read_text())
    patients = report["patients"]
    assert len(patients) == 2

    def matrix(key, seeds):
        rows = {s: [r for r in _per_image(out, key, s) if r["site"] == "target-test"] for s in seeds}
        return np.array([[np.mean([float(r["dice"]) for r in rows[s] if r["patient"] == p]) for p in patients]
                         for s in seeds])

    from scipy import stats

    for key, arm in report["arms"].items():
        per_seed = matrix(key, arm["seeds"]).mean(axis=1)
        assert arm["dice"]["mean"] == pytest.approx(per_seed.mean(), abs=1e-9)
        if len(per_seed) > 1:  # the t-interval over seeds, by scipy
            low, high = stats.t.interval(0.95, len(per_seed) - 1, loc=per_seed.mean(), scale=stats.sem(per_seed))
            assert arm["dice"]["t_ci95"] == pytest.approx([low, high], abs=1e-9)
    mim = report["comparisons"]["mim@default vs lower@default"]
    diff = matrix("mim@default", [0, 1]) - matrix("lower@default", [0, 1])
    assert mim["dice"]["mean"] == pytest.approx(diff.mean(axis=1).mean(), abs=1e-9)
    assert mim["dice"]["per_seed"] == pytest.approx(diff.mean(axis=1).tolist(), abs=1e-9)
    # Two seeds: the exact sign-flip p is 1.0 when they share a sign, else |mean| decides.
    d = diff.mean(axis=1)
    assert mim["p_signflip"] == pytest.approx(np.mean([abs(a * d[0] + b * d[1]) >= abs(d.sum()) - 1e-12
                                                       for a in (-1, 1) for b in (-1, 1)]))
    # The source-validation gap is paired too: `lower@paper` has seed 0 only, `lower` seeds 0 and 1.
    paper = report["comparisons"]["lower@paper vs lower@default"]
    assert paper["seeds"] == [0]
    sv = {k: np.mean([float(r["dice"]) for r in _per_image(out, k, 0) if r["site"] == "source-val"])
          for k in ("lower@paper", "lower@default")}
    assert paper["source_val_dice_gap"] == pytest.approx(sv["lower@paper"] - sv["lower@default"], abs=1e-9)


def test_fused_and_adabn_arms_are_what_they_say(smoke_study, study_sites):
    from pocus_edge.data.layout import load_site
    from pocus_edge.data.transforms import preprocess_frame, preprocess_mask
    from pocus_edge.metrics import dice_iou_per_image
    from pocus_edge.models.fusion import fuse
    from pocus_edge.models.weights import build_segmenter, read_checkpoint

    out, _, _ = smoke_study
    _, target = study_sites
    site = load_site(target)
    recs = site.select("test", labeled=True)
    x = torch.from_numpy(np.stack([preprocess_frame(site.read_image(r), 64) for r in recs]))
    y = np.stack([preprocess_mask(site.read_mask(r), 64) for r in recs])
    models = {k: build_segmenter(out / "runs" / k / "seed1" / "train" / "model.safetensors")[0]
              for k in ("mim@default", "contrastive@default")}
    with torch.no_grad():
        fused = fuse(models["mim@default"].predict(x), models["contrastive@default"].predict(x), method="entropy",
                     norm="image")
    scored = [r for r in _per_image(out, "fused@default", 1) if r["site"] == "target-test"]
    assert [r["filename"] for r in scored] == [r.filename for r in recs]
    np.testing.assert_allclose([float(r["dice"]) for r in scored], dice_iou_per_image(fused, y)[0], atol=1e-6)
    # AdaBN: the lower bound's weights, other BatchNorm statistics, the target images in its card.
    lower, _ = read_checkpoint(out / "runs" / "lower@default" / "seed1" / "train" / "model.safetensors")
    adapted, card = read_checkpoint(out / "runs" / "adabn@default" / "seed1" / "model.safetensors")
    for k, v in lower.items():
        if "running_" in k or "num_batches_tracked" in k:
            continue
        assert torch.equal(v, adapted[k]), k
    assert any(not torch.equal(v, adapted[k]) for k, v in lower.items() if "running_mean" in k)
    assert card["data"][-1]["role"] == "ssl-images-only" and card["adabn"]["frames"] > 0


def test_rerun_skips_finished_units_and_refuses_changed_settings(smoke_study, study_sites, monkeypatch):
    out, first, _ = smoke_study
    assert first.units_run == first.units_total > 0
    import sys

    ft = sys.modules["pocus_edge.train.finetune"]  # the package re-exports the function under this name
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: pytest.fail("a finished arm was trained again"))
    again = run_study(_options(study_sites, out), say=lambda m: None)
    assert again.units_run == 0
    with pytest.raises(ConfigError, match="run with other settings.*budget"):
        run_study(_options(study_sites, out, steps={"finetune": 7}), say=lambda m: None)


def test_a_registered_arm_plugs_in_without_touching_the_loop(smoke_study, study_sites, monkeypatch):
    """A new arm joins through the registry: here one that
    predicts exactly what the lower bound predicts, so its paired difference must be 0."""
    out, _, _ = smoke_study
    monkeypatch.setitem(ARMS, "echo", ArmKind(
        "echo", "the lower bound's predictions", lambda study, run: _segmenter_predictor(
            study, study.arm_run("lower", run.recipe, run.seed)), needs=("lower",), convergence_check=False))
    res = run_study(_options(study_sites, out, arms=("lower", "mim", "contrastive", "fused", "adabn", "mim@paper:1",
                                                    "echo")), say=lambda m: None)
    assert res.units_run == 2  # two evaluations, nothing trained
    echo = res.summary["comparisons"]["echo@default vs lower@default"]
    assert echo["dice"]["mean"] == 0.0 and echo["verdict"] == "underpowered" and echo["p_signflip"] == 1.0


def test_adabn_statistics_are_the_average_of_the_batch_statistics():
    from pocus_edge.config import model_preset
    from pocus_edge.models.transunet import TransUNet
    from pocus_edge.train.adabn import adapt_batchnorm, batchnorm_layers

    torch.manual_seed(0)
    net = TransUNet(model_preset("tiny")).eval()
    images = torch.rand(10, 3, 64, 64)
    first_bn = batchnorm_layers(net)[0]
    seen = []
    hook = first_bn.register_forward_hook(lambda m, inp, outp: seen.append(inp[0].detach()))
    with torch.no_grad():
        net(images[:4]), net(images[4:8]), net(images[8:])
    hook.remove()
    adapted = adapt_batchnorm(net, images, batch_size=4)
    bn = batchnorm_layers(adapted)[0]
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-4, atol=1e-5)
    assert not bn.training and torch.equal(bn.weight, first_bn.weight)
    assert not torch.equal(first_bn.running_mean, bn.running_mean)  # the original is untouched


def test_cli_study_estimate_and_bad_input(study_sites, tmp_path, capsys):
    from pocus_edge.cli import main

    source, target = study_sites
    code = main(["study", "--source", str(source), "--target", str(target), "--out", str(tmp_path / "e"),
                 "--preset", "tiny", "--budget", "smoke", "--device", "cpu", "--arms", "lower,mim", "--estimate"])
    out = capsys.readouterr().out
    assert code == 0 and "estimate: ~" in out and not (tmp_path / "e" / "runs").exists()
    assert main(["study", "--source", str(source), "--out", str(tmp_path / "x")]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["study", "--source", str(source), "--target", str(source), "--out", str(tmp_path / "y"),
                 "--preset", "tiny"]) == 2
    assert "same site" in capsys.readouterr().err
    assert main(["study", "--source", str(source), "--target", str(target), "--out", str(tmp_path / "z"),
                 "--steps", "mim=lots"]) == 2
    assert "KIND=N" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The student arm: distilled from the same seed's fused teacher, compared with that teacher


@pytest.fixture(scope="module")
def student_study(study_sites, tmp_path_factory):
    out = tmp_path_factory.mktemp("student_study") / "s"
    arms = ("lower", "mim", "contrastive_uniform", "fused_uniform", "student_uniform")
    return out, run_study(_options(study_sites, out, arms=arms), say=lambda m: None)


def _patient_matrix(out: Path, key: str, seeds, patients) -> np.ndarray:
    rows = {s: [r for r in _per_image(out, key, s) if r["site"] == "target-test"] for s in seeds}
    return np.array([[np.mean([float(r["dice"]) for r in rows[s] if r["patient"] == p]) for p in patients]
                     for s in seeds])


def test_student_arm_is_paired_with_its_own_seeds_teacher(student_study):
    from pocus_edge.io import sha256_file
    from pocus_edge.models.weights import read_checkpoint

    out, result = student_study
    report = json.loads((out / "study.json").read_text())
    assert set(report["arms"]) == {f"{a}@default" for a in ("lower", "mim", "contrastive_uniform", "fused_uniform",
                                                             "student_uniform", "lower_b", "ensemble")}
    student = report["comparisons"]["student_uniform@default vs fused_uniform@default"]
    assert student["baseline"] == "fused_uniform@default" and student["seeds"] == [0, 1]
    assert report["comparisons"]["fused_uniform@default vs lower@default"]["baseline"] == "lower@default"
    # The paired difference IS student - teacher, seed by seed and patient by patient.
    diff = (_patient_matrix(out, "student_uniform@default", [0, 1], report["patients"])
            - _patient_matrix(out, "fused_uniform@default", [0, 1], report["patients"]))
    assert student["dice"]["mean"] == pytest.approx(diff.mean(), abs=1e-9)
    assert student["dice"]["per_seed"] == pytest.approx(diff.mean(axis=1).tolist(), abs=1e-9)
    # Two seeds: secondary and underpowered, outside the Holm family (which is empty here).
    assert student["role"] == "secondary" and student["underpowered"] and student["family_size"] == 0
    assert not student["convergence_flag"]
    assert report["goals"]["student_uniform >= fused_uniform - 0.01"] == "underpowered"
    assert "| student_uniform | fused_uniform | secondary (underpowered) | 2 |" in (out / "study.md").read_text()
    # Each seed's student was distilled from THAT seed's two branches, for the budget's steps.
    for seed in (0, 1):
        card = read_checkpoint(out / "runs" / "student_uniform@default" / f"seed{seed}" / "train" / "model.safetensors")[1]
        assert card["kind"] == "student" and card["stage"] == "distill" and card["student"] == "mobilenetv3"
        for role, arm in (("generative", "mim"), ("contrastive", "contrastive_uniform")):
            teacher = out / "runs" / f"{arm}@default" / f"seed{seed}" / "train" / "model.safetensors"
            assert card["teachers"][role]["sha256"] == sha256_file(teacher)
        assert card["hyperparameters"]["train.seed"] == seed
        assert card["hyperparameters"]["train.max_steps"] == BUDGETS["smoke"].distill[0]


def test_a_study_recorded_before_distillation_budgets_still_resumes(smoke_study, study_sites, tmp_path):
    """A study folder whose recorded budget predates the ``distill`` entry is not refused (its
    units cannot depend on it); any other change still is."""
    import yaml

    out, _, _ = smoke_study
    copy = tmp_path / "old"
    copy.mkdir()
    record = yaml.safe_load((out / "study_config.yaml").read_text())
    del record["protocol"]["budget"]["distill"]
    (copy / "study_config.yaml").write_text(yaml.safe_dump(record))
    study = Study(_options(study_sites, copy))
    check_protocol(study)
    assert "distill" in yaml.safe_load((copy / "study_config.yaml").read_text())["protocol"]["budget"]
    record["protocol"]["budget"]["finetune"] = [7, 8]
    (copy / "study_config.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(ConfigError, match="other settings.*budget"):
        check_protocol(study)


def test_a_run_that_diverges_is_scored_on_the_checkpoint_selected_before_it(study_sites, tmp_path, monkeypatch):
    """A fine-tuning whose loss turns NaN after its first validation stops there; the study keeps
    the model the selection rule had kept, records the step in the unit's facts and lists the run
    in the report. Without any validation before the NaN, the run is recorded as failed."""
    import pocus_edge.losses as losses
    from pocus_edge.models.weights import read_checkpoint

    out = tmp_path / "s"
    model = out / "runs" / "lower@default" / "seed0" / "train" / "model.safetensors"
    real = losses.dice_bce

    def poisoned(prob, target, smooth=1.0):
        value = real(prob, target, smooth)
        return value * float("nan") if model.is_file() and torch.is_grad_enabled() else value

    monkeypatch.setattr(losses, "dice_bce", poisoned)
    res = run_study(_options(study_sites, out, arms=("lower",), seeds=1, steps={"finetune": 40}), say=lambda m: None)
    info = read_done(out / "runs" / "lower@default" / "seed0")
    kept = read_checkpoint(model)[1]["hyperparameters"]
    assert info["diverged_at_step"] == kept["best_step"] + 1 < 40 and info["best_step"] == kept["best_step"]
    text = res.report_md.read_text()
    assert "## Runs that diverged" in text and f"| lower | 0 | {info['diverged_at_step']} | {kept['best_step']} |" in text
    assert res.summary["arms"]["lower@default"]  # the seed is scored, not dropped

    # A NaN before any validation: nothing to keep. The run is recorded as failed (and its
    # evaluation with it), the next seed still runs, the report lists the failure, and a rerun
    # does not try it again.
    calls = {"poisoned": 0}

    def nan_once(prob, target, smooth=1.0):
        value = real(prob, target, smooth)
        if torch.is_grad_enabled() and calls["poisoned"] == 0:
            calls["poisoned"] += 1
            return value * float("nan")
        return value

    monkeypatch.setattr(losses, "dice_bce", nan_once)
    out2, said = tmp_path / "t", []
    res2 = run_study(_options(study_sites, out2, arms=("lower",), seeds=2), say=said.append)
    failed = read_failed(out2 / "runs" / "lower@default" / "seed0")
    assert failed["diverged_at_step"] == 1 and "before its first validation" in failed["reason"]
    assert "\n" not in failed["reason"]
    assert read_done(out2 / "runs" / "lower@default" / "seed0") is None
    evaluation = read_failed(out2 / "eval" / "lower@default" / "seed0")
    assert evaluation["inputs_failed"] == [str(out2 / "runs" / "lower@default" / "seed0")]
    assert res2.summary["arms"]["lower@default"]["seeds"] == [1]  # seed 1 trained and was scored
    text = res2.report_md.read_text()
    assert "## Runs that failed" in text and "| lower | 0 | train | 1 |" in text
    assert any("FAILED" in m for m in said)
    rerun = run_study(_options(study_sites, out2, arms=("lower",), seeds=2), say=lambda m: None)
    assert rerun.units_run == 0 and calls["poisoned"] == 1


def test_goals_are_read_off_the_verdict_rule():
    """A claim is met only where the verdict rule says so; a comparison with an arm short of its
    planned seeds reads "not assessed", one with too few seeds "underpowered"."""
    from types import SimpleNamespace

    from pocus_edge.metrics import t_interval
    from pocus_edge.study.report import _goal_text
    from pocus_edge.study.stats import _decide, _goals

    study = SimpleNamespace(options=SimpleNamespace(recipe="default"), choices=parse_arms(
        ["lower", "mim", "contrastive_uniform", "fused_uniform", "student_uniform", "upper:3"], "default", 12))
    study.seeds_of = lambda choice: list(range(choice.seeds))
    n = {"lower": 12, "mim": 5, "contrastive_uniform": 12, "fused_uniform": 12, "student_uniform": 12,
         "ensemble": 12, "lower_b": 12, "upper": 3}
    arms = {f"{a}@default": {"seeds": list(range(k)), "dice": {"mean": 0.7}} for a, k in n.items()}
    rng = np.random.default_rng(0)

    def comparison(arm, base, effect, role="secondary"):
        seeds = min(n[arm], n[base])
        d = effect + rng.normal(0, 0.01, seeds)
        return {"arm": f"{arm}@default", "baseline": f"{base}@default", "role": role, "underpowered": seeds < 10,
                "p_signflip": __import__("pocus_edge.metrics", fromlist=["x"]).sign_flip_p_value(d),
                "dice": {"mean": float(d.mean()), "per_seed": d.tolist(), "t_ci95": t_interval(d)}}

    comps = {"f": comparison("fused_uniform", "lower", 0.05, "primary"), "m": comparison("mim", "lower", 0.05),
             "c": comparison("contrastive_uniform", "lower", -0.05), "e": comparison("fused_uniform", "ensemble", 0.0),
             "s": comparison("student_uniform", "fused_uniform", 0.0)}
    _decide(comps)
    goals = _goals(study, arms, comps)
    assert goals["fused_uniform >= lower + 0.03 (seed-level test, CI excluding 0)"] is True
    assert goals["mim >= lower"] == "not assessed: fewer seeds than planned"
    assert goals["contrastive_uniform >= lower"] is False
    assert goals["fused_uniform > ensemble of two lower-bound models"] == "inconclusive"
    assert goals["student_uniform >= fused_uniform - 0.01"] is True  # interval well within -0.01
    assert _goal_text(True) == "met" and _goal_text(False) == "NOT met" and _goal_text("inconclusive") == "inconclusive"
    # The family: Holm over the three secondary comparisons with >= 10 seeds (not mim's 5).
    assert comps["c"]["family_size"] == 3 and comps["m"]["verdict"] == "underpowered"


def test_sizing_reads_an_earlier_study_and_prints_the_seeds_needed(tmp_path):
    from pocus_edge.metrics import minimal_detectable_effect, seeds_needed
    from pocus_edge.study.run import format_sizing
    from pocus_edge.study.stats import sizing

    earlier = {"comparisons": {"fused@default": {"baseline": "lower@default",
                                                 "dice": {"per_seed": [0.2, -0.1, 0.05, 0.3, 0.0]}}}}
    rows = sizing(earlier, planned_seeds=10)
    sd = float(np.std([0.2, -0.1, 0.05, 0.3, 0.0], ddof=1))
    assert rows[0]["sd"] == pytest.approx(sd) and rows[0]["comparison"] == "fused@default vs lower@default"
    assert rows[0]["needed"] == {0.03: seeds_needed(0.03, sd), 0.05: seeds_needed(0.05, sd)}
    assert rows[0]["mde_planned"] == pytest.approx(minimal_detectable_effect(sd, 10))
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    text = format_sizing(path, 10)
    assert f"SD {sd:.3f} over 5 seeds" in text and f"0.05: {seeds_needed(0.05, sd)} seeds" in text
    with pytest.raises(ConfigError, match="no comparison"):
        bad = tmp_path / "none.json"
        bad.write_text("{}")
        format_sizing(bad, 10)
