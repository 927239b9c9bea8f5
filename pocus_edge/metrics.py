"""Segmentation metrics as the method reports them (METHOD.md, "Metrics").

Per-image Dice and IoU with smoothing 1 on the thresholded prediction, averaged over images;
significance between two models by the Wilcoxon signed-rank test on paired per-image Dice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THRESHOLD = 0.5
# The one mask rule of the project (METHOD.md: threshold 0.5): bone where the probability is
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
