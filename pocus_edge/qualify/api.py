"""``qualify``: score models on the target's unlabeled frames, estimate their target Dice, rank
them, and set each one's per-frame risk threshold and drift band (docs/qualify.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..models.risk import RISK_FORMULA_SINGLE, RISK_FORMULA_TWO_BRANCH
from ..qualify_file import SCHEMA
from .estimate import (
    FEATURES,
    bootstrap_estimates,
    drift_band,
    estimate_frames,
    feature_matrix,
    fit_calibration,
    risk_threshold,
)
from .frames import (
    DEFAULT_CALIB_FRAMES,
    DEFAULT_FRAMES,
    FrameSet,
    load_frames,
    open_site,
    source_records,
    target_records,
)
from .models import ModelSpec, NetworkCache, check_models, model_outputs
from .scores import PERTURBATIONS, frame_scores, perturb


@dataclass
class QualifyOptions:
    frames: int = DEFAULT_FRAMES
    calib_frames: int = DEFAULT_CALIB_FRAMES
    flag_rate: float = 0.05
    bootstrap: int = 500
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass
class ModelScores:
    spec: ModelSpec
    family: str
    target: dict[str, np.ndarray]
    source: dict[str, np.ndarray]
    source_dice: np.ndarray


@dataclass
class QualifyResult:
    payload: dict[str, Any]
    frames: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, ModelScores] = field(default_factory=dict)
    target: FrameSet | None = None


def score_model(spec: ModelSpec, cache: NetworkCache, frames: FrameSet, key: str) -> dict[str, np.ndarray]:
    """Every label-free per-frame score of ``spec`` on ``frames`` (:func:`.scores.frame_scores`)."""
    fused, branches = model_outputs(spec, cache, key, frames.gray)
    perturbed = {name: model_outputs(spec, cache, f"{key}:{name}", perturb(frames.gray, name))[0]
                 for name in PERTURBATIONS}
    return frame_scores(fused, branches, perturbed)


def _progress(enabled: bool, total: int, description: str):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar.start()
    bar.add_task(description, total=total)
    return bar


def score_models(specs: Sequence[ModelSpec], target: FrameSet, source: FrameSet, cache: NetworkCache,
                 progress: bool = False) -> dict[str, ModelScores]:
    """Scores of every model on the target frames and on the source calibration frames."""
    from ..metrics import dice_iou_per_image

    bar = _progress(progress, len(specs), "qualify")
    out: dict[str, ModelScores] = {}
    try:
        for spec in specs:
            family = "two-branch" if spec.two_branch else "single"
            tgt = score_model(spec, cache, target, "target")
            src = score_model(spec, cache, source, "source")
            fused_src, _ = model_outputs(spec, cache, "source", source.gray)
            dice = dice_iou_per_image(fused_src, source.masks)[0]
            out[spec.name] = ModelScores(spec, family, tgt, src, dice)
            if bar is not None:
                bar.advance(0)
    finally:
        if bar is not None:
            bar.stop()
    return out


def _calibrations(scores: dict[str, ModelScores], truth_empty: np.ndarray):
    cals = {}
    for family in FEATURES:
        members = [s for s in scores.values() if s.family == family]
        if members:
            cals[family] = fit_calibration(
                family, np.concatenate([feature_matrix(s.source, family) for s in members]),
                np.concatenate([s.source_dice for s in members]), truth_empty,
                np.concatenate([s.source["empty"] for s in members]))
            # q is a property of the source labels, one per frame: not repeated per model.
            cals[family].empty_rate = float(np.mean(truth_empty))
    return cals


def qualify(specs: Sequence[ModelSpec], target_dir: Path, source_dir: Path, options: QualifyOptions | None = None,
            say: Callable[[str], None] | None = None) -> QualifyResult:
    """Score ``specs`` on the target's unlabeled frames; see the module docstring. Writes nothing
    (:func:`pocus_edge.qualify.report.write_outputs` does)."""
    options = options or QualifyOptions()
    say = say or (lambda text: None)
    target_site = open_site(target_dir, "qualify --target")
    source_site = open_site(source_dir, "qualify --source")
    t_records = target_records(target_site, options.frames, options.seed)
    s_records = source_records(source_site, options.calib_frames)
    cache = NetworkCache(options.device)
    size = check_models(specs, cache)
    target = load_frames(target_site, t_records, size)
    source = load_frames(source_site, s_records, size, masks=True)
    say(f"qualify: {len(specs)} model(s), {len(t_records)} unlabeled target frames of "
        f"{len({r.videoname for r in t_records})} recordings, {len(s_records)} source validation frames, "
        f"{len(PERTURBATIONS)} perturbations each")
    scores = score_models(specs, target, source, cache, options.progress)
    return summarize(scores, target, source, options)


def summarize(scores: dict[str, ModelScores], target: FrameSet, source: FrameSet, options: QualifyOptions
              ) -> QualifyResult:
    truth_empty = ~source.masks.reshape(len(source.records), -1).any(1)
    cals = _calibrations(scores, truth_empty)
    t_groups = target.groups("videoname")
    draws = bootstrap_estimates(
        {m: s.family for m, s in scores.items()},
        {m: {"x": feature_matrix(s.source, s.family), "dice": s.source_dice, "empty": s.source["empty"]}
         for m, s in scores.items()},
        {m: {"x": feature_matrix(s.target, s.family), "empty": s.target["empty"]} for m, s in scores.items()},
        source.groups("patient"), truth_empty, t_groups, options.bootstrap, options.seed) if options.bootstrap else {}
    models: dict[str, dict[str, Any]] = {}
    frame_rows: list[dict[str, Any]] = []
    for name, s in scores.items():
        cal = cals[s.family]
        est_frames = estimate_frames(cal, feature_matrix(s.target, s.family), s.target["empty"])
        threshold = risk_threshold(s.source["risk"], options.flag_rate)
        sequences = [s.target["risk"][t_groups == v] for v in dict.fromkeys(t_groups)]
        band, note = drift_band(sequences)
        d = draws.get(name)
        interval = [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))] if d is not None else [np.nan, np.nan]
        models[name] = {
            "name": name, "kind": s.spec.kind, "family": s.family, "paths": [str(p) for p in s.spec.paths],
            "arm": s.spec.arm, "seed": s.spec.seed,
            "estimated_dice": float(est_frames.mean()), "interval95": interval,
            "scores": {
                "agreement": float(1.0 - s.target["risk"].mean()),
                "mean_risk": float(s.target["risk"].mean()),
                "mean_maxprob": float(s.target["maxprob"].mean()),
                "mean_entropy": float(s.target["entropy"].mean()),
                "consistency": float(np.nanmean(s.target["consistency"])),
                "empty_rate": float(s.target["empty"].mean()),
                "area_fraction": float(s.target["area"].mean()),
                "components": float(s.target["components"].mean()),
                "thickness_px": float(s.target["thickness"].mean()),
                "source_val_dice": float(s.source_dice.mean()),
            },
            "risk": {"formula": RISK_FORMULA_TWO_BRANCH if s.family == "two-branch" else RISK_FORMULA_SINGLE,
                     "threshold": threshold, "flag_rate": options.flag_rate,
                     "flagged_target_share": float(np.mean(s.target["risk"] > threshold)),
                     "drift": band, **({"drift_note": note} if note else {})},
        }
        for i, r in enumerate(target.records):
            frame_rows.append({"model": name, "patient": r.patient, "videoname": r.videoname, "framenum": r.framenum,
                               "filename": r.filename, **{k: float(v[i]) for k, v in s.target.items()},
                               "estimated_dice": float(est_frames[i]), "flagged": int(s.target["risk"][i] > threshold)})
    ranked = sorted(models, key=lambda m: (-models[m]["estimated_dice"], m))
    for rank, name in enumerate(ranked, 1):
        models[name]["rank"] = rank
    payload = {
        "schema": SCHEMA,
        "target": str(target.site.root), "source": str(source.site.root),
        "frames": {"target": len(target.records), "target_recordings": len(set(t_groups.tolist())),
                   "source_calibration": len(source.records), "perturbations": list(PERTURBATIONS),
                   "seed": options.seed},
        "bootstrap": options.bootstrap,
        "calibration": {f: c.to_dict() for f, c in cals.items()},
        "ranking": ranked,
        "models": {m: models[m] for m in ranked},
    }
    return QualifyResult(payload, frame_rows, scores, target)
