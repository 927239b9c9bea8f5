"""Label-free per-frame scores of one model's outputs (numpy only).

Every score is a function of the model's own probability maps on a frame, never of a label:

* ``risk``: :func:`pocus_edge.models.risk.branch_disagreement_np` between the two branches (a
  fused model) or :func:`~pocus_edge.models.risk.self_disagreement_np` of the one network: the
  same formula the exported graph and the stream alarm compute.
* ``self_risk``: self-disagreement of the (fused) output, for every model.
* ``maxprob`` / ``entropy``: the mean over the frame's pixels of ``max(p, 1 - p)`` and of the
  binary entropy ``H(p) / ln 2`` of the (fused) output: the two classic baselines.
* ``consistency``: the mean Dice (smoothing 1) between the frame's mask and the mask of each
  probe-nuisance perturbation of the frame (:data:`PERTURBATIONS`; a flipped frame's mask is
  flipped back first).
* ``area``, ``components``, ``thickness``: the mask's area fraction, number of 8-connected
  components, and mean thickness in pixels (2 area / perimeter: about the width of a thin curve).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..models.risk import branch_disagreement_np, self_disagreement_np

__all__ = ["PERTURBATIONS", "perturb", "unperturb_mask", "frame_scores", "consistency", "mask_shape",
           "mean_maxprob", "mean_entropy", "SCORE_COLUMNS"]

# Fixed, deterministic probe nuisances at the middle of the ranges the contrastive pretraining's
# ProbeNuisance draws from (pocus_edge.data.datasets.ProbeNuisance): the same frame always gets
# the same perturbation, so scores are reproducible and comparable between models.
PERTURBATIONS = ("gain", "gamma", "blur", "speckle", "hflip")
GAIN = float(np.exp(0.2))
GAMMA = float(np.exp(0.3))
BLUR_SIGMA = 1.0
SPECKLE_SD = 0.15
SPECKLE_SEED = 20240

SCORE_COLUMNS = ("risk", "self_risk", "maxprob", "entropy", "consistency", "area", "components", "thickness",
                 "empty")


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    radius = max(1, int(3.0 * sigma + 0.5))
    return np.stack([cv2.GaussianBlur(f, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT)
                     for f in x.astype(np.float32)])


def perturb(gray: np.ndarray, name: str) -> np.ndarray:
    """``gray`` float32 (N, S, S) in [0, 1] -> the perturbed frames, clipped to [0, 1]."""
    x = np.asarray(gray, np.float32)
    if name == "gain":
        out = x * GAIN
    elif name == "gamma":
        out = np.clip(x, 0.0, 1.0) ** GAMMA
    elif name == "blur":
        out = _blur(x, BLUR_SIGMA)
    elif name == "speckle":
        field = np.random.default_rng(SPECKLE_SEED).standard_normal(x.shape[1:]).astype(np.float32)
        out = x * (1.0 + SPECKLE_SD * field)
    elif name == "hflip":
        out = x[:, :, ::-1]
    else:
        raise ValueError(f"unknown perturbation {name!r}; known: {', '.join(PERTURBATIONS)}")
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def unperturb_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """A mask predicted on a perturbed frame, moved back onto the original frame's pixels."""
    return mask[..., ::-1] if name == "hflip" else mask


def _dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    inter = np.logical_and(a, b).sum(1).astype(np.float64)
    return (2.0 * inter + 1.0) / (a.sum(1) + b.sum(1) + 1.0)


def consistency(mask: np.ndarray, perturbed_masks: dict[str, np.ndarray]) -> np.ndarray:
    """Mean Dice between ``mask`` (N, S, S) bool and each perturbation's mask, moved back."""
    if not perturbed_masks:
        return np.full(mask.shape[0], np.nan)
    return np.mean([_dice(mask, unperturb_mask(m, name)) for name, m in perturbed_masks.items()], axis=0)


def mean_maxprob(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.maximum(p, 1.0 - p).mean(axis=(-2, -1))


def mean_entropy(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
              + np.where(q < 1, (1 - q) * np.log(np.where(q < 1, 1 - q, 1.0)), 0.0))
    return (h / np.log(2.0)).mean(axis=(-2, -1))


def mask_shape(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame of ``mask`` (N, S, S) bool: area fraction, 8-connected components, mean
    thickness in pixels (2 area / perimeter; 0 for an empty mask)."""
    import cv2

    n = mask.shape[0]
    area = mask.reshape(n, -1).mean(1).astype(np.float64)
    components = np.zeros(n)
    thickness = np.zeros(n)
    for i, m in enumerate(mask.astype(np.uint8)):
        if not m.any():
            continue
        components[i] = cv2.connectedComponents(m, connectivity=8)[0] - 1
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        perimeter = sum(cv2.arcLength(c, True) for c in contours)
        thickness[i] = 2.0 * float(m.sum()) / max(perimeter, 1.0)
    return area, components, thickness


def frame_scores(fused: np.ndarray, branches: tuple[np.ndarray, np.ndarray] | None,
                 perturbed_fused: dict[str, np.ndarray], threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Every per-frame score of one model from its (fused) probability ``fused`` (N, S, S), its two
    branches' probabilities (None: one network) and its (fused) probabilities on each perturbed
    frame ({name: (N, S, S)}, in the perturbed frame's geometry)."""
    mask = fused > threshold
    self_risk = self_disagreement_np(fused, threshold)
    risk = branch_disagreement_np(*branches) if branches is not None else self_risk
    area, components, thickness = mask_shape(mask)
    return {
        "risk": np.asarray(risk, np.float64),
        "self_risk": np.asarray(self_risk, np.float64),
        "maxprob": mean_maxprob(fused),
        "entropy": mean_entropy(fused),
        "consistency": consistency(mask, {k: v > threshold for k, v in perturbed_fused.items()}),
        "area": area,
        "components": components,
        "thickness": thickness,
        "empty": (~mask.reshape(mask.shape[0], -1).any(1)).astype(np.float64),
    }


Scorer = Callable[[np.ndarray], dict[str, np.ndarray]]
