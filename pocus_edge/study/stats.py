"""The statistics of a study (:mod:`pocus_edge.study`), at the level of training seeds.

The unit of replication is the training SEED: every arm of seed s shares its decoder init and
data order (and its pretraining run, seed s mod ``pretrain_seeds``), so the arms are compared on
per-seed paired differences. Test patients and frames are repeated measures inside a seed.

* **Per seed**: an arm's target Dice is the mean over test patients of each patient's mean over
  frames; a comparison's per-seed difference is arm minus comparison arm on that seed.
* **Primary comparison** (``StudyOptions.primary`` against its comparison arm, decided before the
  run): two-sided exact sign-flip test over seeds (:func:`pocus_edge.metrics.sign_flip_p_value`)
  and a 95 % t-interval, at alpha 0.05, outside any multiple-comparison family.
* **Secondary comparisons** (the other arms against theirs, a fusion against the ensemble control,
  a student against its teacher): the same test; Holm's correction over those with at least
  :data:`MIN_SEEDS` seeds, each with the t-interval at its Holm level. One with fewer seeds is
  labelled *underpowered* and kept out of the family: its numbers are descriptive only.
* **Verdict** (:func:`pocus_edge.metrics.seed_verdict`): *helps* if p <= alpha, the interval's
  lower end is > 0 and the gain is >= 0.02 Dice; *hurts* symmetrically; else *inconclusive*.
* **Minimal detectable effect** of every comparison: the true difference its seeds detect with
  80 % power at alpha 0.05, from its own per-seed SD (:func:`pocus_edge.metrics.minimal_detectable_effect`).
* **Within a seed**: a bootstrap over test patients (seeds fixed) describes how much the test set
  alone moves a difference; it is no evidence across training runs.
* **Convergence check**: two source-trained arms whose source-validation Dice differ by more
  than 0.01 are flagged (they did not fit the source equally).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .arms import ARMS, comparisons_of
from .scoring import nanmean

if TYPE_CHECKING:
    from .folder import Study

MIN_EFFECT = 0.02
CONVERGENCE_GAP = 0.01
ALPHA = 0.05
POWER = 0.8
MIN_SEEDS = 10  # fewer seeds: underpowered, outside the Holm family
PLANNING_EFFECTS = (0.03, 0.05)


def matrix(per_seed: dict[int, dict[str, Any]], seeds: list[int], patients: list[str], metric: str) -> np.ndarray:
    """(seeds, patients) per-patient means of ``metric``."""
    return np.array([[per_seed[s]["patients"].get(p, {}).get(metric, np.nan) for p in patients] for s in seeds])


def per_seed_means(m: np.ndarray) -> np.ndarray:
    return np.array([nanmean(row) for row in m])


def patient_interval(m: np.ndarray, n_boot: int, seed: int = 0, alpha: float = ALPHA) -> tuple[float, float]:
    """Percentile interval of the grand mean of ``m`` (seeds x patients) when only the test
    patients are resampled (seeds fixed): how much the test set alone moves the figure."""
    from ..metrics import percentile_interval

    rng = np.random.default_rng(seed)
    cols = rng.integers(0, m.shape[1], size=(n_boot, m.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw of only NaN cells is NaN
        draws = np.nanmean(m[:, cols].transpose(1, 0, 2).reshape(n_boot, -1), axis=1)
    return percentile_interval(draws, alpha)


def seed_summary(values: np.ndarray, alpha: float = ALPHA) -> dict[str, Any]:
    """Mean, SD over seeds, t-interval and the values themselves."""
    from ..metrics import t_interval

    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "sd": float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
            "t_ci95": t_interval(finite, alpha), "per_seed": [float(v) for v in values]}


def analyse(study: "Study", scores: dict[str, Any]) -> dict[str, Any]:
    """Arms, comparisons (primary and secondary, with tests, intervals, MDEs and verdicts) and the
    method's goals, from :func:`.scoring.collect`'s scores."""
    patients = sorted({p for per_seed in scores.values() for s in per_seed.values() for p in s["patients"]})
    arms = {key: entry for key, entry in ((c.key, _arm_entry(study, c, scores, patients)) for c in study.choices)
            if entry is not None}
    comparisons: dict[str, Any] = {}
    primary_key = f"{study.options.primary}@{study.options.recipe}"
    for choice in study.choices:
        for base in comparisons_of(choice.arm, choice.recipe, study.options.recipe):
            base_key = f"{base[0]}@{base[1]}"
            if choice.key not in arms or base_key not in arms:
                continue
            entry = _comparison(study, scores, patients, choice.key, base_key)
            if entry is not None:
                entry["role"] = "primary" if (choice.key == primary_key and base == comparisons_of(
                    choice.arm, choice.recipe, study.options.recipe)[0]) else "secondary"
                comparisons[f"{choice.key} vs {base_key}"] = entry
    _decide(comparisons)
    return {"patients": patients, "arms": arms, "comparisons": comparisons, "primary": primary_key,
            "goals": _goals(study, arms, comparisons)}


def _arm_entry(study: "Study", choice, scores: dict[str, Any], patients: list[str]) -> dict[str, Any] | None:
    per_seed = scores.get(choice.key, {})
    seeds = sorted(per_seed)
    if not seeds:
        return None
    entry: dict[str, Any] = {"arm": choice.arm, "recipe": choice.recipe, "seeds": seeds,
                             "describe": ARMS[choice.arm].describe}
    for metric in ("dice", "iou", "hd95", "asd"):
        m = matrix(per_seed, seeds, patients, metric)
        entry[metric] = seed_summary(per_seed_means(m))
        if metric == "dice":
            entry[metric]["patient_ci95"] = patient_interval(m, study.options.bootstrap, seed=1)
    entry["source_val_dice"] = float(np.mean([per_seed[s]["source_val_dice"] for s in seeds]))
    cells = [v for s in seeds for v in per_seed[s]["patients"].values()]
    entry["frames_scored"] = int(sum(v["frames"] for v in cells))
    entry["empty_predictions"] = int(sum(v.get("empty_prediction", 0) for v in cells))
    fp = sum(v.get("fp_pixels", 0.0) for v in cells)
    entry["fp_static_share"] = float(sum(v.get("fp_static", 0.0) for v in cells) / fp) if fp > 0 else float("nan")
    entry["did_not_train"] = [s for s in seeds if per_seed[s].get("did_not_train")]
    return entry


def _comparison(study: "Study", scores: dict[str, Any], patients: list[str], key: str, base_key: str):
    from ..metrics import minimal_detectable_effect, sign_flip_p_value

    seeds = sorted(set(scores[key]) & set(scores[base_key]))
    if not seeds:
        return None
    entry: dict[str, Any] = {"arm": key, "baseline": base_key, "seeds": seeds}
    for metric in ("dice", "hd95"):
        diff = matrix(scores[key], seeds, patients, metric) - matrix(scores[base_key], seeds, patients, metric)
        entry[metric] = seed_summary(per_seed_means(diff))
        if metric == "dice":
            entry[metric]["patient_ci95"] = patient_interval(diff, study.options.bootstrap, seed=2)
    d = np.asarray(entry["dice"]["per_seed"])
    entry["p_signflip"] = sign_flip_p_value(d)
    entry["mde"] = minimal_detectable_effect(entry["dice"]["sd"], len(seeds), alpha=ALPHA, power=POWER)
    entry["underpowered"] = len(seeds) < MIN_SEEDS
    gap = float(np.mean([scores[key][s]["source_val_dice"] - scores[base_key][s]["source_val_dice"] for s in seeds]))
    entry["source_val_dice_gap"] = gap
    arm, base = key.partition("@")[0], base_key.partition("@")[0]
    entry["convergence_flag"] = bool(ARMS[arm].convergence_check and ARMS[base].convergence_check
                                     and abs(gap) > CONVERGENCE_GAP)
    return entry


def _decide(comparisons: dict[str, Any]) -> None:
    """Verdicts: the primary alone at alpha; Holm over the secondary comparisons with enough
    seeds; the rest underpowered (no verdict)."""
    from ..metrics import holm_adjust, seed_verdict, t_interval

    family = {k: c["p_signflip"] for k, c in comparisons.items() if c["role"] == "secondary" and not c["underpowered"]}
    holm = holm_adjust(family, ALPHA) if family else {}
    for key, c in comparisons.items():
        d = np.asarray(c["dice"]["per_seed"])
        if c["role"] == "primary":
            c["p"], c["level"] = c["p_signflip"], ALPHA
        elif key in holm:
            c["p"], c["level"] = holm[key]["p_holm"], holm[key]["alpha"]
        else:
            c["p"], c["level"] = c["p_signflip"], None
        if c["level"] is None:
            c["dice"]["ci"] = c["dice"]["t_ci95"]
            c["verdict"] = "underpowered"
            continue
        c["dice"]["ci"] = t_interval(d, c["level"])
        c["verdict"] = seed_verdict(c["dice"]["mean"], c["dice"]["ci"], c["p"], alpha=ALPHA, min_effect=MIN_EFFECT)
    for c in comparisons.values():
        c["family_size"] = len(family)


def _goals(study: "Study", arms: dict[str, Any], comparisons: dict[str, Any]) -> dict[str, Any]:
    """The method's claims, each read off the verdict rule: True (met), False (contradicted), or
    a string saying why it is not decided ("inconclusive", "underpowered", "not assessed: fewer
    seeds than planned")."""
    r = study.options.recipe
    planned = {c.key: len(study.seeds_of(c)) for c in study.choices}
    goals: dict[str, Any] = {}

    def complete(c: dict[str, Any]) -> bool:
        return all(len(arms[k]["seeds"]) >= planned.get(k, 0) for k in (c["arm"], c["baseline"]))

    for key, c in comparisons.items():
        arm, _, recipe = c["arm"].partition("@")
        base = c["baseline"].partition("@")[0]
        if recipe != r:
            continue
        claim = ARMS[arm].claim
        if not complete(c):
            value: Any = "not assessed: fewer seeds than planned"
        elif c["verdict"] == "underpowered":
            value = "underpowered"
        else:
            value = None
        if base == "lower" and claim == "fusion":
            name = f"{arm} >= lower + 0.03 (seed-level test, CI excluding 0)"
            decided = c["p"] <= ALPHA and c["dice"]["ci"][0] > 0 and c["dice"]["mean"] >= 0.03
            goals[name] = value or (True if decided else "NO" if c["verdict"] == "hurts" else "inconclusive")
        elif base == "lower" and claim == "branch":
            goals[f"{arm} >= lower"] = value or {"helps": True, "hurts": False}.get(c["verdict"], "inconclusive")
        elif base == "ensemble":
            goals[f"{arm} > ensemble of two lower-bound models"] = value or {"helps": True, "hurts": False}.get(
                c["verdict"], "inconclusive")
        elif ARMS[base].claim == "fusion":  # a student against its teacher: non-inferiority at -0.01
            low, high = c["dice"]["ci"]
            goals[f"{arm} >= {base} - 0.01"] = value or (True if low >= -0.01 else False if high < -0.01
                                                         else "inconclusive")
    upper = arms.get(f"upper@{r}")
    for key, a in arms.items():
        arm, _, recipe = key.partition("@")
        if upper is not None and recipe == r and ARMS[arm].claim == "fusion":
            goals[f"{arm} mean <= upper mean (descriptive)"] = bool(a["dice"]["mean"] <= upper["dice"]["mean"])
    return goals


def sizing(study_json: dict[str, Any], planned_seeds: int) -> list[dict[str, Any]]:
    """Per comparison of an earlier study's (or a pilot's) ``study.json``: the per-seed SD of its
    paired Dice difference, the seeds needed for each of :data:`PLANNING_EFFECTS` at 80 % power,
    and the minimal detectable effect of a run with ``planned_seeds`` seeds. Reads both this
    report's layout and the older one (``dice.per_seed``)."""
    from ..metrics import minimal_detectable_effect, seeds_needed

    rows = []
    for key, c in (study_json.get("comparisons") or {}).items():
        per_seed = np.asarray([v for v in (c.get("dice") or {}).get("per_seed", []) if v is not None], dtype=float)
        per_seed = per_seed[np.isfinite(per_seed)]
        if per_seed.size < 2:
            continue
        sd = float(per_seed.std(ddof=1))
        rows.append({"comparison": key if " vs " in key else f"{key} vs {c.get('baseline')}", "seeds": int(per_seed.size),
                     "sd": sd, "needed": {e: seeds_needed(e, sd, alpha=ALPHA, power=POWER) for e in PLANNING_EFFECTS},
                     "mde_planned": minimal_detectable_effect(sd, planned_seeds, alpha=ALPHA, power=POWER)})
    return rows


__all__ = ["ALPHA", "MIN_EFFECT", "MIN_SEEDS", "analyse", "sizing"]
