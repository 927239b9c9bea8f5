"""Fusion head against a per-pixel brute-force reference (docs/method.md formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from pocus_edge.errors import ConfigError
from pocus_edge.models.fusion import FORMULAS, METHODS, NORMS, FusionHead, confidence, fuse


def pixel_confidence(p: float, method: str) -> float:
    if method == "entropy":
        h = -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)
        return 1 - h / math.log(2)
    if method == "margin":
        return abs(2 * p - 1)
    return 1.0


def brute_force_fuse(p_g: torch.Tensor, p_c: torch.Tensor, method: str, norm: str, formula: str) -> torch.Tensor:
    """Loop over every pixel; min-max per frame or over the batch; constant maps normalize to 1."""
    n, _, h, w = p_g.shape
    conf = {}
    for name, p in (("g", p_g), ("c", p_c)):
        raw = [[[pixel_confidence(float(p[i, 0, y, x]), method) for x in range(w)] for y in range(h)] for i in range(n)]
        if norm == "batch":
            flat = [v for frame in raw for row in frame for v in row]
            lows, highs = [min(flat)] * n, [max(flat)] * n
        else:
            lows = [min(v for row in frame for v in row) for frame in raw]
            highs = [max(v for row in frame for v in row) for frame in raw]
        conf[name] = [
            [[(v - lows[i]) / (highs[i] - lows[i]) if highs[i] > lows[i] else 1.0 for v in row] for row in raw[i]]
            for i in range(n)
        ]
    out = torch.empty(n, 1, h, w, dtype=torch.float64)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                pg, pc = float(p_g[i, 0, y, x]), float(p_c[i, 0, y, x])
                cg, cc = conf["g"][i][y][x], conf["c"][i][y][x]
                if formula == "weighted":
                    out[i, 0, y, x] = (pg * cg + pc * cc) / (cg + cc + 1e-6)
                else:
                    out[i, 0, y, x] = 0.5 * (pg * cg + pc * cc)
    return out


def probability_maps(n=3, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Frames of different sharpness so per-frame and per-batch normalization really differ.
    logits_g = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64) * torch.tensor([0.5, 3.0, 8.0][:n]).view(n, 1, 1, 1)
    logits_c = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64) * 2.0
    return torch.sigmoid(logits_g), torch.sigmoid(logits_c)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("formula", FORMULAS)
def test_fuse_matches_brute_force(method, norm, formula):
    p_g, p_c = probability_maps()
    expected = brute_force_fuse(p_g, p_c, method, norm, formula)
    got = fuse(p_g, p_c, method=method, norm=norm, formula=formula)
    assert got.shape == p_g.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    head = FusionHead(method, norm, formula)
    fused, c_g, c_c = head(p_g, p_c, return_confidence=True)
    torch.testing.assert_close(fused, got)
    for c in (c_g, c_c):
        assert c.min() >= 0 and c.max() <= 1


def test_normalizations_really_differ():
    p_g, p_c = probability_maps()
    image = fuse(p_g, p_c, norm="image")
    batch = fuse(p_g, p_c, norm="batch")
    assert (image - batch).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("formula", FORMULAS)
def test_image_norm_output_is_independent_of_batch_mates(method, formula):
    p_g, p_c = probability_maps(n=3, seed=5)
    in_batch = fuse(p_g, p_c, method=method, norm="image", formula=formula)
    for i in range(3):
        alone = fuse(p_g[i : i + 1], p_c[i : i + 1], method=method, norm="image", formula=formula)
        assert torch.equal(alone[0], in_batch[i])
    if method != "average":
        # The released code's batch normalization does depend on the batch mates.
        alone = fuse(p_g[:1], p_c[:1], method=method, norm="batch", formula=formula)
        batched = fuse(p_g, p_c, method=method, norm="batch", formula=formula)
        assert not torch.allclose(alone[0], batched[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", NORMS)
def test_constant_confidence_gives_no_nan(method, norm):
    constant = torch.full((2, 1, 4, 4), 0.3)
    certain = torch.ones(2, 1, 4, 4)
    for p_g, p_c in ((constant, constant), (certain, constant), (torch.zeros(2, 1, 4, 4), certain)):
        fused, c_g, c_c = FusionHead(method, norm)(p_g, p_c, return_confidence=True)
        assert torch.isfinite(fused).all() and torch.isfinite(c_g).all() and torch.isfinite(c_c).all()
        # Constant maps are "equally confident everywhere": normalized confidence 1.
        assert torch.equal(c_g, torch.ones_like(c_g))
    fused = fuse(constant, certain, method=method, norm=norm, formula="weighted")
    torch.testing.assert_close(fused, torch.full_like(fused, 1.3 / (2 + 1e-6)))


def test_confidence_formulas_at_known_points():
    p = torch.tensor([0.0, 0.5, 1.0, 0.25])
    torch.testing.assert_close(confidence(p, "margin"), torch.tensor([1.0, 0.0, 1.0, 0.5]))
    entropy = confidence(p, "entropy")
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy, torch.tensor([1.0, 0.0, 1.0, 1 - h / math.log(2)]))
    assert torch.equal(confidence(p, "average"), torch.ones(4))


def test_unknown_options_are_refused():
    with pytest.raises(ConfigError, match="method"):
        FusionHead(method="max")
    with pytest.raises(ConfigError, match="norm"):
        fuse(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), norm="global")
    with pytest.raises(ConfigError, match="formula"):
        FusionHead(formula="mean")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("formula", FORMULAS)
def test_half_precision_with_saturated_probabilities_stays_finite(method, norm, formula):
    """Exported graphs run in fp16 (TensorRT, Core ML), where sigmoid outputs saturate to exactly
    0 and 1 and an epsilon like 1e-6 does not survive: the head must still give no NaN/inf."""
    p_g, p_c = probability_maps(n=2, seed=9)
    p_g[0, 0, :2] = 1.0
    p_g[1, 0, :2] = 0.0
    p_c[:, 0, 2:4] = 1.0
    p_c[0, 0, 0, :] = 0.5  # where a branch is least confident
    p_g[0, 0, 0, :] = 0.5
    reference = fuse(p_g, p_c, method=method, norm=norm, formula=formula)
    half = fuse(p_g.half(), p_c.half(), method=method, norm=norm, formula=formula)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.double(), reference, rtol=0, atol=2e-2)
