"""The study's ``selected`` view: which seed each arm would ship when the choice is made by
``qualify`` (label-free, on the target's unlabeled frames), by source validation (the best mean
source-validation Dice the study scored), or by the oracle (the best target-test Dice); and over
every model the study trained, the Spearman correlation between ``qualify``'s estimate and the
true target Dice. The true target Dice comes from the study's own evaluation (``eval/``), which
holds target-label results computed by the study: it judges the estimate, it never feeds it.

Gain recovered: per arm, ``(D_qualify - D_random) / (D_oracle - D_random)`` with ``D_random`` the
mean over the arm's seeds (the expected Dice of a random pick); pooled over arms as the ratio of
the summed numerators to the summed denominators. Intervals: percentile bootstrap over models
(Spearman) and over arms (gain recovered).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..io import write_json_atomic, write_text_atomic

SELECTED_SCHEMA = "pocus-edge-selected/1"


def true_scores(study_dir: Path, arm_key: str, seed: int) -> dict[str, float] | None:
    """(target-test Dice: per-patient means, then their mean; source-val Dice: frame mean) from
    the study's evaluation of one arm and seed, or None if it was not scored."""
    path = Path(study_dir) / "eval" / arm_key / f"seed{seed}" / "per_image.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    per_patient: dict[str, list[float]] = {}
    val: list[float] = []
    for r in rows:
        if r["site"] == "target-test":
            per_patient.setdefault(r["patient"], []).append(float(r["dice"]))
        elif r["site"] == "source-val":
            val.append(float(r["dice"]))
    if not per_patient:
        return None
    return {"target_dice": float(np.mean([np.mean(v) for v in per_patient.values()])),
            "source_val_dice": float(np.mean(val)) if val else float("nan")}


def _recovered(arms: list[dict[str, Any]]) -> float:
    num = sum(a["qualify"]["target_dice"] - a["random_dice"] for a in arms)
    den = sum(a["oracle"]["target_dice"] - a["random_dice"] for a in arms)
    return float(num / den) if den > 0 else float("nan")


def _interval(draws: list[float]) -> list[float]:
    d = np.asarray([x for x in draws if math.isfinite(x)])
    return [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))] if d.size >= 10 else [float("nan")] * 2


def selected_view(study_dir: Path, qualify_payload: dict[str, Any], *, draws: int = 2000, seed: int = 0) -> dict[str, Any]:
    from ..qualify.failure import spearman

    models = [m for m in qualify_payload["models"].values() if m.get("arm") is not None]
    rows = []
    for m in models:
        truth = true_scores(study_dir, m["arm"], m["seed"])
        if truth is not None:
            rows.append({"model": m["name"], "arm": m["arm"], "seed": m["seed"], "estimate": m["estimated_dice"], **truth})
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    arms = []
    for arm, rs in by_arm.items():
        if len(rs) < 2:
            continue
        pick = lambda key: max(rs, key=lambda r: (r[key] if math.isfinite(r[key]) else -1.0, -r["seed"]))  # noqa: E731
        arms.append({"arm": arm, "seeds": len(rs), "qualify": pick("estimate"), "source_val": pick("source_val_dice"),
                     "oracle": pick("target_dice"), "random_dice": float(np.mean([r["target_dice"] for r in rs]))})
    rng = np.random.default_rng(seed)
    est = np.array([r["estimate"] for r in rows])
    true = np.array([r["target_dice"] for r in rows])
    rho = spearman(est, true) if len(rows) >= 3 else float("nan")
    rho_draws = []
    if len(rows) >= 3:
        for _ in range(draws):
            idx = rng.integers(0, len(rows), len(rows))
            rho_draws.append(spearman(est[idx], true[idx]))
    rec = _recovered(arms) if arms else float("nan")
    rec_sv = (float(sum(a["source_val"]["target_dice"] - a["random_dice"] for a in arms)
                    / sum(a["oracle"]["target_dice"] - a["random_dice"] for a in arms))
              if arms and sum(a["oracle"]["target_dice"] - a["random_dice"] for a in arms) > 0 else float("nan"))
    rec_draws = [_recovered([arms[i] for i in rng.integers(0, len(arms), len(arms))]) for _ in range(draws)] if arms else []
    return {
        "schema": SELECTED_SCHEMA, "study": str(study_dir), "models": len(rows),
        "spearman": {"rho": rho, "ci95": _interval(rho_draws), "resampled": "models"},
        "gain_recovered": {"qualify": rec, "ci95": _interval(rec_draws), "source_val": rec_sv, "resampled": "arms"},
        "arms": arms, "rows": rows,
        "note": "true target Dice from the study's evaluation (eval/*/per_image.csv); qualify's estimate never reads it",
    }


def render_selected(view: dict[str, Any]) -> str:
    s, g = view["spearman"], view["gain_recovered"]
    f = lambda v: f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else "-"  # noqa: E731
    ci = lambda c: f"[{f(c[0])}, {f(c[1])}]"  # noqa: E731
    lines = [
        f"# Selected view: {view['study']}", "",
        f"Spearman between qualify's label-free estimate and the true target Dice over {view['models']} models: "
        f"**{f(s['rho'])}** {ci(s['ci95'])} (95 % bootstrap over models).", "",
        f"Share of the oracle's gain over a random pick (the mean over seeds) that qualify's pick recovers: "
        f"**{f(g['qualify'])}** {ci(g['ci95'])} (95 % bootstrap over arms); source-validation selection: "
        f"{f(g['source_val'])}.", "",
        "| arm | seeds | qualify pick (Dice) | source-val pick (Dice) | oracle (Dice) | random pick (mean Dice) |",
        "|---|---:|---|---|---|---:|",
    ]
    for a in view["arms"]:
        cell = lambda p: f"seed {p['seed']} ({p['target_dice']:.3f})"  # noqa: E731
        lines.append(f"| {a['arm']} | {a['seeds']} | {cell(a['qualify'])} | {cell(a['source_val'])} | "
                     f"{cell(a['oracle'])} | {a['random_dice']:.3f} |")
    lines += ["", "True target Dice: the study's own evaluation on the target's labeled test frames (per-patient "
              "means); qualify's estimate is computed without them (docs/qualify.md)."]
    return "\n".join(lines) + "\n"


def write_selected(study_dir: Path, qualify_payload: dict[str, Any], out: Path) -> dict[str, Path]:
    view = selected_view(Path(study_dir), qualify_payload)
    return {"json": write_json_atomic(Path(out) / "selected.json", view),
            "md": write_text_atomic(Path(out) / "selected.md", render_selected(view))}
