"""Confidence-aware fusion of the generative (MIM) and contrastive branches ("infusion head").

Per pixel, each branch's probability ``p`` gets a confidence ``c``:

* ``entropy``: ``c = 1 - H(p) / ln 2`` with ``H(p) = -(p ln p + (1 - p) ln(1 - p))``;
* ``margin``:  ``c = |2p - 1|``;
* ``average``: ``c = 1``.

Each branch's ``c`` is min-max normalized to [0, 1], either per frame (``norm="image"``: a frame's
output never depends on its batch mates, the streaming/deployment default) or over the whole batch
tensor (``norm="batch"``: the released code, for paper parity). A constant confidence map
(max == min, always the case for ``average``) normalizes to 1 instead of 0/0.

Fused probability: ``formula="weighted"`` ``(p_g c_g + p_c c_c) / (c_g + c_c + 1e-6)`` (released
code) or ``formula="paper"`` ``(p_g c_g + p_c c_c) / 2`` (as the paper writes it).

All of it is elementwise tensor math without data-dependent Python branches, so a
:class:`FusionHead` exports inside the same ONNX / Core ML graph as the two branches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["METHODS", "NORMS", "FORMULAS", "confidence", "normalize_confidence", "fuse", "FusionHead"]

METHODS = ("entropy", "margin", "average")
NORMS = ("image", "batch")
FORMULAS = ("weighted", "paper")

_WEIGHT_EPS = 1e-6  # the released code's denominator guard


def _check(method: str, norm: str, formula: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    if norm not in NORMS:
        raise ConfigError(f"unknown fusion norm {norm!r}; choose one of {', '.join(NORMS)}")
    if formula not in FORMULAS:
        raise ConfigError(f"unknown fusion formula {formula!r}; choose one of {', '.join(FORMULAS)}")


def _x_log_x(v: torch.Tensor) -> torch.Tensor:
    """v ln v with 0 ln 0 = 0, exactly and without an epsilon: an epsilon such as 1e-6 becomes a
    subnormal (or 0 with flush-to-zero) once the graph runs in fp16 (TensorRT, Core ML), and then
    0 * log(0) = NaN; log(1) = 0 at v = 0 keeps every branch of the graph finite."""
    return v * torch.log(torch.where(v > 0, v, torch.ones_like(v)))


def confidence(p: torch.Tensor, method: str = "entropy") -> torch.Tensor:
    """Per-pixel confidence of probability map ``p`` (any shape), before normalization."""
    if method == "entropy":
        q = p.clamp(0.0, 1.0)
        r = 1.0 - q
        entropy = -(_x_log_x(q) + _x_log_x(r))
        return 1.0 - entropy / math.log(2.0)
    if method == "margin":
        return (2.0 * p - 1.0).abs()
    if method == "average":
        return torch.ones_like(p)
    raise ConfigError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")


def normalize_confidence(c: torch.Tensor, norm: str = "image") -> torch.Tensor:
    """Min-max normalize ``c`` to [0, 1] per frame (dim 0 = frames) or over the whole batch.

    Where max == min the result is 1 (every pixel equally confident), never NaN.
    """
    if norm == "image":
        dims = tuple(range(1, c.dim()))
        low = c.amin(dim=dims, keepdim=True)
        high = c.amax(dim=dims, keepdim=True)
    elif norm == "batch":
        low = c.amin()
        high = c.amax()
    else:
        raise ConfigError(f"unknown fusion norm {norm!r}; choose one of {', '.join(NORMS)}")
    spread = high - low
    has_spread = spread > 0
    safe_spread = torch.where(has_spread, spread, torch.ones_like(spread))
    return torch.where(has_spread, (c - low) / safe_spread, torch.ones_like(c))


def _fuse_with_confidence(
    p_g: torch.Tensor, p_c: torch.Tensor, method: str, norm: str, formula: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(method, norm, formula)
    c_g = normalize_confidence(confidence(p_g, method), norm)
    c_c = normalize_confidence(confidence(p_c, method), norm)
    weighted_sum = p_g * c_g + p_c * c_c
    if formula == "weighted":
        # (p_g c_g + p_c c_c) / (c_g + c_c + 1e-6) as released; where both confidences are 0 the
        # numerator is 0 too and the result is 0, without relying on 1e-6 surviving fp16.
        total = c_g + c_c
        fused = weighted_sum / torch.where(total > 0, total + _WEIGHT_EPS, torch.ones_like(total))
    else:
        fused = 0.5 * weighted_sum
    return fused, c_g, c_c


def fuse(
    p_g: torch.Tensor,
    p_c: torch.Tensor,
    *,
    method: str = "entropy",
    norm: str = "image",
    formula: str = "weighted",
) -> torch.Tensor:
    """Fuse the generative (``p_g``) and contrastive (``p_c``) probability maps, shape (N, 1, H, W)."""
    return _fuse_with_confidence(p_g, p_c, method, norm, formula)[0]


class FusionHead(nn.Module):
    """:func:`fuse` as a module, so the fusion exports inside one graph with both branches."""

    def __init__(self, method: str = "entropy", norm: str = "image", formula: str = "weighted"):
        super().__init__()
        _check(method, norm, formula)
        self.method = method
        self.norm = norm
        self.formula = formula

    def forward(self, p_g: torch.Tensor, p_c: torch.Tensor, return_confidence: bool = False):
        fused, c_g, c_c = _fuse_with_confidence(p_g, p_c, self.method, self.norm, self.formula)
        if return_confidence:
            return fused, c_g, c_c
        return fused

    def extra_repr(self) -> str:
        return f"method={self.method!r}, norm={self.norm!r}, formula={self.formula!r}"
