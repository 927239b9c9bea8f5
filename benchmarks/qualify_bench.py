"""Measure `qualify` on a finished study folder:

(a) model selection: Spearman between qualify's estimate and the true target Dice over every model
    the study trained, and the share of the oracle's gain over a random pick that qualify's pick
    recovers (pocus_edge.study.selected), each with a bootstrap CI;
(b) frame-level failure detection on the target TEST frames (failure = frame Dice < 0.5, computed
    with the target test labels: allowed here, in the benchmark, never in qualify): AURC and AUROC
    of the risk score (the exported graph's), of qualify's combined per-frame score (1 - estimated
    frame Dice) and of the baselines "mean max-probability" and "mean entropy" of the fused output,
    pooled over models, with 95 % bootstrap CIs over target patients, and the paired AURC
    difference (combined minus entropy baseline) with its CI.

    python benchmarks/qualify_bench.py STUDY --out OUT [--frames 240] [--test-frames 0] [--draws 1000]

Writes OUT/qualify_bench.json and OUT/qualify_bench.md (and qualify's own outputs under OUT/qualify/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def failure_scores(study: Path, result, frames: int, seed: int):
    """Per (model, test frame): the scores and the true Dice on the target's labeled test frames."""
    from pocus_edge.data.transforms import preprocess_mask
    from pocus_edge.metrics import dice_iou_per_image
    from pocus_edge.qualify.api import score_model
    from pocus_edge.qualify.estimate import estimate_frames, feature_matrix, fit_calibration
    from pocus_edge.qualify.frames import load_frames, open_site
    from pocus_edge.qualify.models import NetworkCache, model_outputs, read_study

    options = read_study(study)
    site = open_site(options["target"], "benchmark target")
    records = site.select("test", labeled=True)
    if frames and len(records) > frames:
        records = records[:: -(-len(records) // frames)]
    cache = NetworkCache("cpu")
    size = next(iter(result.scores.values()))
    size = cache.network(size.spec.paths[0]).img_size
    test = load_frames(site, records, size)
    masks = np.stack([preprocess_mask(site.read_mask(r), size)[0] > 0.5 for r in records])
    cal_info = result.payload["calibration"]
    rows = {k: [] for k in ("risk", "combined", "maxprob_baseline", "entropy_baseline", "fail", "patient")}
    for name, s in result.scores.items():
        scores = score_model(s.spec, cache, test, "test")
        fused, _ = model_outputs(s.spec, cache, "test", test.gray)
        dice = dice_iou_per_image(fused, masks)[0]
        # The same calibration qualify fitted (refitted here from its stored source rows).
        members = [m for m in result.scores.values() if m.family == s.family]
        truth_empty = np.full(len(s.source_dice), cal_info[s.family]["source_empty_rate"] > 0.5)
        cal = fit_calibration(s.family, np.concatenate([feature_matrix(m.source, m.family) for m in members]),
                              np.concatenate([m.source_dice for m in members]), truth_empty,
                              np.concatenate([m.source["empty"] for m in members]))
        cal.empty_rate = cal_info[s.family]["source_empty_rate"]
        est = estimate_frames(cal, feature_matrix(scores, s.family), scores["empty"])
        rows["risk"].append(scores["risk"])
        rows["combined"].append(1.0 - est)
        rows["maxprob_baseline"].append(1.0 - scores["maxprob"])  # low confidence = risky
        rows["entropy_baseline"].append(scores["entropy"])
        rows["fail"].append(dice < 0.5)
        rows["patient"].append(np.array([r.patient for r in records]))
    return {k: np.concatenate(v) for k, v in rows.items()}


def detection(rows, draws: int, seed: int):
    from pocus_edge.qualify.failure import aurc, auroc

    patients = np.unique(rows["patient"])
    members = {p: np.flatnonzero(rows["patient"] == p) for p in patients}
    rng = np.random.default_rng(seed)
    boots = [np.concatenate([members[p] for p in rng.choice(patients, len(patients))]) for _ in range(draws)]
    fail = rows["fail"].astype(float)
    out = {}
    for key in ("risk", "combined", "maxprob_baseline", "entropy_baseline"):
        a = [aurc(rows[key][i], fail[i]) for i in boots]
        r = [auroc(rows[key][i], fail[i]) for i in boots]
        out[key] = {"aurc": aurc(rows[key], fail), "aurc_ci95": np.nanpercentile(a, [2.5, 97.5]).tolist(),
                    "auroc": auroc(rows[key], fail), "auroc_ci95": np.nanpercentile(r, [2.5, 97.5]).tolist()}
    diff = [aurc(rows["combined"][i], fail[i]) - aurc(rows["entropy_baseline"][i], fail[i]) for i in boots]
    out["combined_minus_entropy_aurc"] = {"value": out["combined"]["aurc"] - out["entropy_baseline"]["aurc"],
                                          "ci95": np.nanpercentile(diff, [2.5, 97.5]).tolist()}
    out["frames"] = int(len(fail))
    out["failure_rate"] = float(fail.mean())
    out["patients"] = int(len(patients))
    return out


def render(res) -> str:
    sel, det = res["selected"], res["detection"]
    f = lambda v: f"{v:.3f}"  # noqa: E731
    ci = lambda c: f"[{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
    lines = [f"# qualify benchmark: {res['study']}", "",
             f"Models: {sel['models']}. Spearman(estimate, true target Dice) = {f(sel['spearman']['rho'])} "
             f"{ci(sel['spearman']['ci95'])}; gain recovered {f(sel['gain_recovered']['qualify'])} "
             f"{ci(sel['gain_recovered']['ci95'])} (source-val selection {f(sel['gain_recovered']['source_val'])}).", "",
             f"Frame failure (Dice < 0.5) on {det['frames']} model-frames of {det['patients']} target test patients "
             f"(failure rate {det['failure_rate']:.3f}); CIs: bootstrap over patients.", "",
             "| score | AURC (lower better) | 95 % CI | AUROC | 95 % CI |", "|---|---:|---|---:|---|"]
    for key in ("risk", "combined", "maxprob_baseline", "entropy_baseline"):
        d = det[key]
        lines.append(f"| {key} | {f(d['aurc'])} | {ci(d['aurc_ci95'])} | {f(d['auroc'])} | {ci(d['auroc_ci95'])} |")
    c = det["combined_minus_entropy_aurc"]
    lines += ["", f"Paired AURC difference combined - entropy baseline: {c['value']:+.4f} {ci(c['ci95'])}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from pocus_edge.io import write_json_atomic, write_text_atomic
    from pocus_edge.qualify import QualifyOptions, qualify, study_models
    from pocus_edge.qualify.report import write_outputs
    from pocus_edge.study.selected import selected_view

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=240, help="unlabeled target frames per model (qualify)")
    ap.add_argument("--test-frames", type=int, default=0, help="target test frames for failure detection (0 = all)")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    specs, options = study_models(args.study)
    result = qualify(specs, options["target"], options["source"],
                     QualifyOptions(frames=args.frames, seed=args.seed, progress=not args.no_progress), say=print)
    write_outputs(args.out / "qualify", result.payload, result.frames)
    rows = failure_scores(args.study, result, args.test_frames, args.seed)
    res = {"study": str(args.study), "selected": selected_view(args.study, result.payload, draws=args.draws, seed=args.seed),
           "detection": detection(rows, args.draws, args.seed)}
    write_json_atomic(args.out / "qualify_bench.json", json.loads(json.dumps(res, default=float)))
    md = write_text_atomic(args.out / "qualify_bench.md", render(res))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
