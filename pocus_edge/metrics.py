"""Segmentation metrics as the method reports them (docs/method.md, "Metrics").

Per-image Dice and IoU with smoothing 1 on the thresholded prediction, averaged over images;
significance between two models by the Wilcoxon signed-rank test on paired per-image Dice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

THRESHOLD = 0.5
# The one mask rule of the project (docs/method.md: threshold 0.5): bone where the probability is
# strictly greater than the threshold. Scoring, export parity, the runtime, the golden vectors
# and the Android port all use it, so a pixel at exactly 0.5 is background everywhere.
MASK_RULE = "prob > threshold"


def binarize(prob, threshold: float = THRESHOLD):
    """Bone mask of a probability map (numpy or torch) under MASK_RULE."""
    return prob > threshold


def _as_binary_batch(x: np.ndarray, threshold: float | None) -> np.ndarray:
    """(N,1,H,W) | (N,H,W) | (H,W) -> bool (N, H*W). ``threshold`` None means x already binary."""
    arr = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)  # torch or numpy
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {arr.shape}")
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"expected (N,1,H,W), (N,H,W) or (H,W), got shape {arr.shape}")
    binary = binarize(arr, threshold) if threshold is not None else arr.astype(bool)
    return binary.reshape(binary.shape[0], -1)


def dice_iou_per_image(
    prediction, target, *, threshold: float | None = THRESHOLD, smooth: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU, each a float64 array of length N.

    ``prediction``: probabilities (thresholded at ``threshold``, strictly greater) or a binary mask
    when ``threshold`` is None; ``target``: binary mask (values >= 0.5 are foreground).
    Dice = (2|P∩Y| + s) / (|P| + |Y| + s), IoU = (|P∩Y| + s) / (|P∪Y| + s), s = ``smooth``:
    an empty prediction of an empty mask scores 1.
    """
    pred = _as_binary_batch(prediction, threshold)
    true = _as_binary_batch(target, 0.5)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and target {true.shape} differ in shape")
    inter = np.logical_and(pred, true).sum(axis=1).astype(np.float64)
    p_sum = pred.sum(axis=1).astype(np.float64)
    t_sum = true.sum(axis=1).astype(np.float64)
    dice = (2.0 * inter + smooth) / (p_sum + t_sum + smooth)
    iou = (inter + smooth) / (p_sum + t_sum - inter + smooth)
    return dice, iou


def wilcoxon_p(a, b) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples ``a`` vs ``b`` (scipy.stats).

    Identical samples (every difference zero) have no evidence of a difference: p = 1.
    """
    from scipy.stats import wilcoxon

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be 1-D of equal length, got {a.shape} and {b.shape}")
    if a.size == 0 or np.all(a == b):
        return 1.0
    return float(wilcoxon(a, b).pvalue)


@dataclass
class Summary:
    """Mean and standard deviation of per-image scores of one model."""

    n: int
    dice_mean: float
    dice_std: float
    iou_mean: float
    iou_std: float


def summarize(dice: np.ndarray, iou: np.ndarray) -> Summary:
    dice = np.asarray(dice, dtype=np.float64)
    iou = np.asarray(iou, dtype=np.float64)
    return Summary(
        n=int(dice.size),
        dice_mean=float(dice.mean()) if dice.size else float("nan"),
        dice_std=float(dice.std()) if dice.size else float("nan"),
        iou_mean=float(iou.mean()) if iou.size else float("nan"),
        iou_std=float(iou.std()) if iou.size else float("nan"),
    )


# ---------------------------------------------------------------------------------------------
# Boundary quality: where the predicted cortex line lies, not only how much it overlaps


def surface_distances_per_image(prediction, target, *, threshold: float | None = THRESHOLD,
                                percentile: float = 95.0, empty: str = "nan") -> tuple[np.ndarray, np.ndarray]:
    """Per-image HD95 and average (symmetric) surface distance in pixels, by MONAI's metrics.

    Boundaries are the mask pixels with a background 4-neighbour (MONAI's edges by binary
    erosion); HD95 = max of the two directed 95th-percentile distances between the boundaries,
    ASD = mean of both directions' distances pooled. An image where the prediction or the truth is
    empty has no boundary to measure: ``empty="nan"`` gives NaN (report how many);
    ``empty="diagonal"`` gives the image diagonal (the worst distance the frame allows) when
    exactly one of the two is empty and 0 when both are, so a model that misses the bone is
    penalized instead of silently left out of the mean.
    """
    if empty not in ("nan", "diagonal"):
        raise ValueError(f"empty must be 'nan' or 'diagonal', got {empty!r}")
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    pred = _as_binary_batch(prediction, threshold)
    true = _as_binary_batch(target, 0.5)
    side = _side(prediction)
    pred_t = torch.from_numpy(pred.reshape(-1, 1, *side).astype(np.float32))
    true_t = torch.from_numpy(true.reshape(-1, 1, *side).astype(np.float32))
    hd = np.full(pred.shape[0], np.nan)
    asd = np.full(pred.shape[0], np.nan)
    both = pred.any(axis=1) & true.any(axis=1)
    if both.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on empty masks; they are excluded above
            hd[both] = compute_hausdorff_distance(pred_t[both], true_t[both], include_background=True,
                                                  percentile=percentile).numpy()[:, 0]
            asd[both] = compute_average_surface_distance(pred_t[both], true_t[both], include_background=True,
                                                         symmetric=True).numpy()[:, 0]
    if empty == "diagonal":
        one_empty = pred.any(axis=1) != true.any(axis=1)
        none = ~pred.any(axis=1) & ~true.any(axis=1)
        diagonal = float(np.hypot(*side))
        hd[one_empty] = asd[one_empty] = diagonal
        hd[none] = asd[none] = 0.0
    return hd, asd


def _side(x) -> tuple[int, int]:
    shape = tuple(x.shape)
    return shape[-2], shape[-1]


# ---------------------------------------------------------------------------------------------
# Uncertainty over seeds and patients


def hierarchical_bootstrap(values: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of the grand mean of ``values`` (seeds x patients): each draw
    resamples the seeds with replacement, then the patients with replacement (one patient draw
    shared by the seeds: a patient is the same person in every run), and averages the grid.
    NaN cells (a patient without a finite score in a run) are left out of that draw's mean."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a (seeds, patients) array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    n_seeds, n_patients = values.shape
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    patients = rng.integers(0, n_patients, size=(n_boot, n_patients))
    grid = values[seeds[:, :, None], patients[:, None, :]]  # (n_boot, seeds, patients)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw of only NaN cells is NaN
        return np.nanmean(grid.reshape(n_boot, -1), axis=1)


def bootstrap_p_value(draws: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the mean is 0": twice the smaller tail share of draws at
    or beyond 0 (with the +1 correction, so it is never 0)."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return 1.0
    below = (np.sum(draws <= 0) + 1) / (draws.size + 1)
    above = (np.sum(draws >= 0) + 1) / (draws.size + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def holm_adjust(p_values: dict[str, float], alpha: float = 0.05) -> dict[str, dict[str, float]]:
    """Holm's step-down correction. For each name: ``p_holm`` (adjusted p-value, monotone in the
    order) and ``alpha`` (the level its test meets in the step-down: alpha / (m - rank), rank
    0-based in ascending p), whose 1 - alpha interval is the matching Holm-level interval."""
    order = sorted(p_values, key=lambda k: (p_values[k], k))
    m = len(order)
    out: dict[str, dict[str, float]] = {}
    running = 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[name]))
        out[name] = {"p_holm": running, "alpha": alpha / (m - rank)}
    return out


def percentile_interval(draws: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Inference over training seeds (the unit of replication)


def sign_flip_p_value(differences, *, max_exact: int = 20, draws: int = 200_000, seed: int = 0) -> float:
    """Two-sided exact sign-flip (paired permutation) test of "the mean paired difference is 0"
    over per-seed differences: under the null each seed's difference is as likely negative as
    positive, so the observed |mean| is compared with the |mean| of every one of the 2^n sign
    patterns (Monte Carlo with ``draws`` patterns beyond ``max_exact`` seeds). The smallest
    p-value n seeds can give is 2 / 2^n (0.25 at 3 seeds, 0.0625 at 5): with fewer than 6 seeds
    no result reaches 0.05, whatever the effect."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = d.size
    if n == 0:
        return 1.0
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= max_exact:
        signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1)
        means = np.abs(signs @ d) / n
        return float(np.mean(means >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(draws, n))
    means = np.abs(signs @ d) / n
    return float((np.sum(means >= observed - tol) + 1) / (draws + 1))


def t_interval(differences, alpha: float = 0.05) -> tuple[float, float]:
    """The 1 - alpha Student-t interval of the mean of per-seed differences (scipy.stats.t);
    NaN with fewer than 2 seeds."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return float("nan"), float("nan")
    half = float(stats.t.ppf(1 - alpha / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return float(d.mean() - half), float(d.mean() + half)


def minimal_detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean paired difference a two-sided test at ``alpha`` over ``n`` seeds
    detects with probability ``power``, for a per-seed SD of the paired difference ``sd``:
    (t_{1-alpha/2, n-1} + t_{power, n-1}) x sd / sqrt(n) (the paired t-test's normal-shift
    approximation). Infinite where the exact sign-flip test cannot reach ``alpha`` at all
    (2 / 2^n > alpha: fewer than 6 seeds at 0.05) or with fewer than 2 seeds."""
    from scipy import stats

    if n < 2 or 2.0 ** (1 - n) > alpha or not np.isfinite(sd):
        return float("inf")
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / np.sqrt(n))


def seeds_needed(effect: float, sd: float, *, alpha: float = 0.05, power: float = 0.8, limit: int = 100_000) -> int | None:
    """The fewest seeds whose :func:`minimal_detectable_effect` is <= ``effect`` (None beyond ``limit``)."""
    if effect <= 0 or not np.isfinite(sd):
        return None
    floor = next(n for n in range(2, 64) if 2.0 / 2**n <= alpha)  # the exact test's own minimum
    if sd == 0:
        return floor

    def detects(n: int) -> bool:
        return minimal_detectable_effect(sd, n, alpha=alpha, power=power) <= effect

    high = floor
    while not detects(high):  # MDE falls with n: double, then bisect
        if high > limit:
            return None
        high *= 2
    low = max(floor, high // 2)
    if detects(low):
        return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if detects(mid) else (mid, high)
    return high


def seed_verdict(mean_difference: float, interval: tuple[float, float], p_value: float, *, alpha: float = 0.05,
                 min_effect: float = 0.02) -> str:
    """The seed-level verdict: ``helps`` only if the test's p <= alpha, the t-interval's lower end
    is > 0 and the gain is >= ``min_effect``; ``hurts`` symmetrically; else ``inconclusive``."""
    low, high = interval
    if p_value <= alpha and np.isfinite(low) and low > 0 and mean_difference >= min_effect:
        return "helps"
    if p_value <= alpha and np.isfinite(high) and high < 0 and mean_difference <= -min_effect:
        return "hurts"
    return "inconclusive"


def verdict(mean_difference: float, interval: tuple[float, float], p_holm: float, *, alpha: float = 0.05,
            min_effect: float = 0.02) -> str:
    """``helps`` only if the Holm-level interval's lower end is > 0, the Holm-adjusted p <= alpha
    and the gain is >= ``min_effect``; ``hurts`` symmetrically; else ``inconclusive``."""
    low, high = interval
    if p_holm <= alpha and low > 0 and mean_difference >= min_effect:
        return "helps"
    if p_holm <= alpha and high < 0 and mean_difference <= -min_effect:
        return "hurts"
    return "inconclusive"
