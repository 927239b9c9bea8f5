"""Per-frame risk: one number per frame, from the model's own outputs, that rises when its mask
should not be trusted. Target labels are never needed, so it can run inside the exported graph
and next to the probe.

* Two branches (the fused model): ``risk = 1 - softDice(p_generative, p_contrastive)``. The two
  networks were pretrained independently (MIM and contrastive) and fine-tuned on the same source
  frames; where the target probe breaks one of them, they stop agreeing.
* One network (a student, a single TransUNet): ``risk = 1 - softDice(p, [p > threshold])``: how
  far the soft map is from its own mask, i.e. how much of the predicted bone is undecided.

``softDice(a, b) = (2 sum(a b) + eps) / (sum a + sum b + eps)`` over the frame's pixels with
``eps = 1`` pixel, so two empty maps agree (risk 0) instead of 0/0. Both are elementwise products
and per-frame sums: batch independent, and exportable to every format the fusion exports to.
The sums run in float32 whatever the graph's precision (a 224 x 224 sum exceeds fp16's range).

The numpy twins (:func:`branch_disagreement_np`, :func:`self_disagreement_np`) are what the
offline scorer (``pocus-edge qualify``) and the tests use; a test holds the two implementations
to each other.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "RISK_FORMULA_TWO_BRANCH", "RISK_FORMULA_SINGLE", "RISK_EPS",
    "branch_disagreement", "self_disagreement", "branch_disagreement_np", "self_disagreement_np",
]

# Names stored in model cards and qualify reports: a change of formula gets a new name.
RISK_FORMULA_TWO_BRANCH = "branch-soft-dice-disagreement-v1"
RISK_FORMULA_SINGLE = "self-soft-dice-disagreement-v1"
RISK_EPS = 1.0


def branch_disagreement(p_a: torch.Tensor, p_b: torch.Tensor, eps: float = RISK_EPS) -> torch.Tensor:
    """``(N, 1, H, W)`` x 2 -> ``(N, 1)``: 1 - soft Dice between two probability maps."""
    a, b = p_a.float(), p_b.float()
    inter = (a * b).sum(dim=(2, 3))
    total = a.sum(dim=(2, 3)) + b.sum(dim=(2, 3))
    return 1.0 - (2.0 * inter + eps) / (total + eps)


def self_disagreement(p: torch.Tensor, threshold: float = 0.5, eps: float = RISK_EPS) -> torch.Tensor:
    """``(N, 1, H, W)`` -> ``(N, 1)``: 1 - soft Dice between a probability map and its mask."""
    hard = (p > threshold).to(torch.float32)
    return branch_disagreement(p, hard, eps)


def branch_disagreement_np(p_a: np.ndarray, p_b: np.ndarray, eps: float = RISK_EPS) -> np.ndarray:
    """numpy twin of :func:`branch_disagreement` for ``(..., H, W)`` maps -> ``(...)``."""
    a, b = np.asarray(p_a, np.float64), np.asarray(p_b, np.float64)
    inter = (a * b).sum(axis=(-2, -1))
    total = a.sum(axis=(-2, -1)) + b.sum(axis=(-2, -1))
    return 1.0 - (2.0 * inter + eps) / (total + eps)


def self_disagreement_np(p: np.ndarray, threshold: float = 0.5, eps: float = RISK_EPS) -> np.ndarray:
    """numpy twin of :func:`self_disagreement`."""
    p = np.asarray(p, np.float64)
    return branch_disagreement_np(p, (p > threshold).astype(np.float64), eps)
