"""From label-free scores to an estimated Dice, its interval, a risk threshold and a drift band.

Calibration (the only place labels are read: the SOURCE validation frames). For each family of
models (``two-branch``: fused pairs and fused exports; ``single``: one network), a ridge
regression pooled over the family's models maps a frame's label-free features
(:data:`FEATURES`) to its Dice on the source validation frames whose mask is not empty. On the
target, a frame with a non-empty mask gets the regression's estimate (clipped to [0, 1]); a frame
with an empty mask gets ``min(1, q / e)``, where ``q`` is the share of source validation frames
without bone and ``e`` the share of target frames the model leaves empty: of the frames it leaves
empty at most ``q`` of all frames can truly be empty (an empty mask scores 1 on them and about 0
on the others), so a model that returns nothing everywhere is estimated at ``q``, not at the
perfect agreement and stability its empty masks show. A model's estimate is the mean over its
target frames; its interval a percentile bootstrap that resamples the source validation patients
(refitting the regression) and the target recordings together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["FEATURES", "Calibration", "fit_calibration", "estimate_frames", "risk_threshold", "drift_band",
           "bootstrap_estimates"]

FEATURES = {
    "two-branch": ("agreement", "self_agreement", "consistency", "maxprob", "entropy", "log_components", "thickness"),
    "single": ("self_agreement", "consistency", "maxprob", "entropy", "log_components", "thickness"),
}
RIDGE = 1.0


def feature_matrix(scores: dict[str, np.ndarray], family: str) -> np.ndarray:
    derived = {
        "agreement": 1.0 - scores["risk"],
        "self_agreement": 1.0 - scores["self_risk"],
        "consistency": scores["consistency"],
        "maxprob": scores["maxprob"],
        "entropy": scores["entropy"],
        "log_components": np.log1p(scores["components"]),
        "thickness": scores["thickness"],
    }
    return np.stack([np.asarray(derived[f], np.float64) for f in FEATURES[family]], axis=1)


@dataclass
class Calibration:
    """A fitted map from features to Dice for one family (standardized ridge regression)."""

    family: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    empty_rate: float  # q: share of source validation masks without bone
    frames: int
    r2: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.clip(((x - self.mean) / self.scale) @ self.coef + self.intercept, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "features": list(FEATURES[self.family]),
                "coefficients": dict(zip(FEATURES[self.family], (self.coef / self.scale).round(6).tolist())),
                "intercept": float(self.intercept - (self.mean / self.scale) @ self.coef),
                "source_empty_rate": self.empty_rate, "frames": self.frames, "r2_source": self.r2, "ridge": RIDGE}


def fit_calibration(family: str, x: np.ndarray, dice: np.ndarray, truth_empty: np.ndarray, pred_empty: np.ndarray,
                    ridge: float = RIDGE) -> Calibration:
    """Fit on source validation rows (one per model and frame): ``x`` features, ``dice`` the frame's
    Dice, ``truth_empty`` whether its label mask is empty, ``pred_empty`` whether the model's is."""
    keep = ~pred_empty.astype(bool) & np.all(np.isfinite(x), axis=1)
    q = float(np.mean(truth_empty)) if truth_empty.size else 0.0
    xs, ys = x[keep], dice[keep]
    if xs.shape[0] < 2:
        # Nothing to regress on: every frame's mask was empty. Constant map at the observed mean.
        mean_dice = float(dice.mean()) if dice.size else 0.0
        k = x.shape[1]
        return Calibration(family, np.zeros(k), np.ones(k), np.zeros(k), mean_dice, q, int(xs.shape[0]), float("nan"))
    mean, scale = xs.mean(0), xs.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = (xs - mean) / scale
    intercept = float(ys.mean())
    coef = np.linalg.solve(z.T @ z + ridge * np.eye(z.shape[1]), z.T @ (ys - intercept))
    resid = ys - (z @ coef + intercept)
    total = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else float("nan")
    return Calibration(family, mean, scale, coef, intercept, q, int(xs.shape[0]), r2)


def estimate_frames(cal: Calibration, x: np.ndarray, pred_empty: np.ndarray, empty_rate: float | None = None
                    ) -> np.ndarray:
    """Estimated Dice of each target frame of one model (see the module docstring)."""
    pred_empty = pred_empty.astype(bool)
    e = float(pred_empty.mean()) if empty_rate is None else empty_rate
    est = cal.predict(np.nan_to_num(x))
    if pred_empty.any():
        est = np.where(pred_empty, min(1.0, cal.empty_rate / e) if e > 0 else 1.0, est)
    return est


def risk_threshold(source_risk: np.ndarray, flag_rate: float) -> float:
    """The risk above which a frame is flagged: the (1 - flag_rate) quantile of the model's risk on
    the SOURCE validation frames (images only), so an in-distribution frame is flagged with about
    that probability. Label-free: a conformal-style bound on false flags, not a Dice cut."""
    r = np.asarray(source_risk, np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan")
    return float(np.quantile(r, 1.0 - flag_rate, method="higher"))


def drift_band(sequences: Sequence[np.ndarray]) -> tuple[dict[str, Any] | None, str | None]:
    """``DriftBand.calibrate`` over the target's per-recording risk sequences (frame order)."""
    from ..errors import ConfigError
    from ..runtime.drift import DriftBand

    try:
        return DriftBand.calibrate(sequences).to_dict(), None
    except ConfigError as exc:
        return None, str(exc)


def cluster_resample(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one cluster bootstrap draw (clusters drawn with replacement)."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(uniq))]
    picked = rng.integers(0, len(uniq), len(uniq))
    return np.concatenate([members[k] for k in picked])


def bootstrap_estimates(families: dict[str, str], source: dict[str, dict[str, np.ndarray]],
                        target: dict[str, dict[str, np.ndarray]], source_groups: np.ndarray, truth_empty: np.ndarray,
                        target_groups: np.ndarray, draws: int, seed: int) -> dict[str, np.ndarray]:
    """Per model, ``draws`` bootstrap estimates of its mean target Dice. ``source[m]`` holds the
    model's source features ``x``, ``dice`` and ``empty``; ``target[m]`` its target ``x`` and
    ``empty``; groups: the source patients and the target recordings of the rows."""
    rng = np.random.default_rng(seed)
    out = {m: np.empty(draws) for m in families}
    for b in range(draws):
        s_idx = cluster_resample(source_groups, rng)
        t_idx = cluster_resample(target_groups, rng)
        for family in set(families.values()):
            members = [m for m, f in families.items() if f == family]
            cal = fit_calibration(
                family, np.concatenate([source[m]["x"][s_idx] for m in members]),
                np.concatenate([source[m]["dice"][s_idx] for m in members]), truth_empty[s_idx],
                np.concatenate([source[m]["empty"][s_idx] for m in members]))
            for m in members:
                out[m][b] = estimate_frames(cal, target[m]["x"][t_idx], target[m]["empty"][t_idx]).mean()
    return out
