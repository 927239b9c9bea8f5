"""Metrics against hand computations and a brute-force Wilcoxon reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pocus_edge.metrics import dice_iou_per_image, summarize, wilcoxon_p


def test_dice_iou_hand_computed():
    # image 0: |P|=1, |Y|=2, |P∩Y|=1 -> Dice (2+1)/(1+2+1) = 0.75, IoU (1+1)/(2+1) = 2/3
    # image 1: empty prediction of an empty mask -> 1, 1 (smoothing 1)
    # image 2: |P|=4, |Y|=0 -> Dice 1/5, IoU 1/5
    pred = np.array(
        [[[0.9, 0.1], [0.2, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.7, 0.6]]], dtype=np.float32
    )[:, None]
    true = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=np.float32)[:, None]
    dice, iou = dice_iou_per_image(pred, true)
    np.testing.assert_allclose(dice, [0.75, 1.0, 0.2])
    np.testing.assert_allclose(iou, [2 / 3, 1.0, 0.2])


def test_threshold_is_strict_and_torch_input_accepted():
    pred = torch.full((1, 1, 2, 2), 0.5)  # exactly 0.5 is background
    true = torch.ones((1, 1, 2, 2))
    dice, iou = dice_iou_per_image(pred, true)
    assert dice[0] == pytest.approx(1 / 5) and iou[0] == pytest.approx(1 / 5)
    dice_b, _ = dice_iou_per_image(pred + 1e-3, true)
    assert dice_b[0] == pytest.approx(1.0)


def test_dice_matches_set_definition_on_random_masks():
    rng = np.random.default_rng(0)
    p = rng.random((5, 1, 7, 9))
    y = (rng.random((5, 1, 7, 9)) > 0.6).astype(np.float32)
    dice, iou = dice_iou_per_image(p, y)
    for i in range(5):
        P = {tuple(ix) for ix in np.argwhere(p[i, 0] > 0.5)}
        Y = {tuple(ix) for ix in np.argwhere(y[i, 0] > 0.5)}
        assert dice[i] == pytest.approx((2 * len(P & Y) + 1) / (len(P) + len(Y) + 1))
        assert iou[i] == pytest.approx((len(P & Y) + 1) / (len(P | Y) + 1))


def _exact_wilcoxon_two_sided(a, b):
    """Enumerate all 2^n sign patterns of the ranked |differences| (no ties, no zeros)."""
    d = np.asarray(a) - np.asarray(b)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_plus = ranks[d > 0].sum()
    total = ranks.sum()
    stats = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    stats = np.array(stats)
    t = min(w_plus, total - w_plus)
    return min(1.0, 2 * np.mean(stats <= t))


def test_wilcoxon_matches_brute_force():
    a = np.array([0.81, 0.72, 0.93, 0.65, 0.88, 0.79, 0.70, 0.91, 0.60])
    b = np.array([0.78, 0.75, 0.85, 0.61, 0.80, 0.82, 0.64, 0.84, 0.59]) - 0.0001 * np.arange(9)
    assert wilcoxon_p(a, b) == pytest.approx(_exact_wilcoxon_two_sided(a, b), rel=1e-9)


def test_wilcoxon_identical_samples_and_bad_shapes():
    x = np.linspace(0, 1, 10)
    assert wilcoxon_p(x, x) == 1.0
    with pytest.raises(ValueError):
        wilcoxon_p(x, x[:5])


def test_summarize():
    s = summarize(np.array([0.5, 1.0]), np.array([0.25, 0.75]))
    assert (s.n, s.dice_mean, s.iou_mean) == (2, 0.75, 0.5)
    assert s.dice_std == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# Boundary distances (MONAI) against a brute-force reference


def _brute_force_surface(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Boundary = mask pixels with a background 4-neighbour (outside the image is background);
    every pairwise Euclidean distance between the two boundaries, no library."""
    def boundary(m):
        pts = []
        h, w = m.shape
        for y, x in zip(*np.nonzero(m)):
            nbrs = [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
            if any(not (0 <= a < h and 0 <= b < w) or not m[a, b] for a, b in nbrs):
                pts.append((y, x))
        return np.array(pts, dtype=np.float64)

    bp, bt = boundary(pred), boundary(true)
    d = np.sqrt(((bp[:, None, :] - bt[None, :, :]) ** 2).sum(-1))
    pred_to_true, true_to_pred = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(pred_to_true, 95), np.percentile(true_to_pred, 95))
    asd = np.concatenate([pred_to_true, true_to_pred]).mean()
    return float(hd95), float(asd)


def test_hd95_and_asd_match_brute_force_on_random_shapes():
    from pocus_edge.metrics import surface_distances_per_image

    rng = np.random.default_rng(3)
    preds, trues = [], []
    for _ in range(6):
        yy, xx = np.mgrid[:40, :48]
        def blob():
            cy, cx, ry, rx = rng.uniform(10, 30), rng.uniform(10, 38), rng.uniform(3, 9), rng.uniform(3, 12)
            return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        preds.append(blob() | (rng.random((40, 48)) > 0.995))  # a few stray pixels: long tails
        trues.append(blob())
    pred = np.stack(preds).astype(np.float32)[:, None]
    true = np.stack(trues).astype(np.float32)[:, None]
    hd, asd = surface_distances_per_image(pred, true)
    for i in range(6):
        ref_hd, ref_asd = _brute_force_surface(preds[i], trues[i])
        assert hd[i] == pytest.approx(ref_hd, rel=1e-5), i
        assert asd[i] == pytest.approx(ref_asd, rel=1e-5), i


def test_surface_distances_are_nan_without_a_boundary():
    from pocus_edge.metrics import surface_distances_per_image

    pred = np.zeros((2, 1, 8, 8), np.float32)
    true = np.zeros((2, 1, 8, 8), np.float32)
    true[0, 0, 2:5, 2:5] = 1  # prediction empty, truth not
    hd, asd = surface_distances_per_image(pred, true)
    assert np.isnan(hd).all() and np.isnan(asd).all()


# ---------------------------------------------------------------------------------------------
# Hierarchical bootstrap, Holm, verdicts


def test_hierarchical_bootstrap_matches_exact_enumeration():
    """2 seeds x 3 patients: all 2^2 x 3^3 resamples are equally likely; the bootstrap's mean and
    variance must match that exact distribution."""
    from pocus_edge.metrics import hierarchical_bootstrap

    values = np.array([[0.1, 0.5, 0.3], [0.4, 0.2, 0.9]])
    exact = [values[np.ix_(s, p)].mean() for s in itertools.product(range(2), repeat=2)
             for p in itertools.product(range(3), repeat=3)]
    draws = hierarchical_bootstrap(values, n_boot=200_000, seed=0)
    assert draws.mean() == pytest.approx(np.mean(exact), abs=2e-3)
    assert draws.var() == pytest.approx(np.var(exact), rel=0.03)
    assert np.all(hierarchical_bootstrap(np.full((3, 4), 0.7), 50) == pytest.approx(0.7))


def test_holm_and_bootstrap_p_values_by_hand():
    from pocus_edge.metrics import bootstrap_p_value, holm_adjust

    adjusted = holm_adjust({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert {k: round(v["p_holm"], 10) for k, v in adjusted.items()} == {"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06}
    assert {k: v["alpha"] for k, v in adjusted.items()} == {"d": 0.0125, "a": 0.05 / 3, "c": 0.025, "b": 0.05}
    assert bootstrap_p_value(np.full(999, 0.1)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(np.linspace(-1, 1, 1001)) == 1.0


def test_verdict_rule():
    from pocus_edge.metrics import verdict

    assert verdict(0.03, (0.01, 0.05), 0.01) == "helps"
    assert verdict(0.015, (0.005, 0.03), 0.01) == "inconclusive"  # significant but below 0.02
    assert verdict(0.03, (-0.01, 0.07), 0.2) == "inconclusive"
    assert verdict(-0.04, (-0.06, -0.02), 0.001) == "hurts"
    assert verdict(0.03, (0.01, 0.05), 0.08) == "inconclusive"  # not significant after Holm


# -- seed-level inference ---------------------------------------------------------------------


def test_sign_flip_p_value_matches_a_brute_force_enumeration():
    import itertools

    from pocus_edge.metrics import sign_flip_p_value

    d = np.array([0.12, -0.03, 0.08, 0.2, 0.05, -0.01, 0.07])
    count = 0
    for signs in itertools.product([-1, 1], repeat=d.size):
        count += abs(np.mean(np.array(signs) * d)) >= abs(d.mean()) - 1e-12
    assert sign_flip_p_value(d) == pytest.approx(count / 2**d.size)
    # Above the exact limit: a Monte Carlo estimate close to the exact value.
    assert sign_flip_p_value(d, max_exact=3, draws=100_000) == pytest.approx(count / 2**d.size, abs=0.01)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_few_all_positive_seeds_cannot_reach_significance(n):
    from pocus_edge.metrics import minimal_detectable_effect, sign_flip_p_value

    # However large and consistent the gain, n seeds give at best p = 2 / 2^n: 3 seeds never go
    # below 0.125 (one-sided) or 0.25 (two-sided), the degenerate bootstrap's 2/10001 is gone.
    p = sign_flip_p_value(np.full(n, 0.5) + np.arange(n) * 0.01)
    assert p == pytest.approx(2 / 2**n if n else 1.0)
    assert p >= 0.0625 and (n != 3 or p >= 0.125)
    assert minimal_detectable_effect(0.1, n) == float("inf")


def test_t_interval_and_mde_follow_their_formulas():
    from scipy import stats

    from pocus_edge.metrics import minimal_detectable_effect, seeds_needed, t_interval

    d = np.array([0.1, 0.3, -0.05, 0.2, 0.15, 0.0, 0.12, 0.08])
    half = stats.t.ppf(0.975, 7) * d.std(ddof=1) / np.sqrt(8)
    assert t_interval(d) == pytest.approx((d.mean() - half, d.mean() + half))
    mde = minimal_detectable_effect(0.15, 10)
    assert mde == pytest.approx((stats.t.ppf(0.975, 9) + stats.t.ppf(0.8, 9)) * 0.15 / np.sqrt(10))
    # Simulated power at that effect is ~80 % for the t-test it approximates.
    rng = np.random.default_rng(0)
    samples = rng.normal(mde, 0.15, size=(20_000, 10))
    t = samples.mean(1) / (samples.std(1, ddof=1) / np.sqrt(10))
    assert np.mean(np.abs(t) > stats.t.ppf(0.975, 9)) == pytest.approx(0.8, abs=0.03)
    n = seeds_needed(0.05, 0.15)
    assert minimal_detectable_effect(0.15, n) <= 0.05 < minimal_detectable_effect(0.15, n - 1)
    assert seeds_needed(0.03, 0.15) > n


def test_empty_prediction_gets_the_image_diagonal():
    from pocus_edge.metrics import surface_distances_per_image

    truth = np.zeros((3, 16, 20), bool)
    truth[0, 4:8, 4:10] = truth[1, 4:8, 4:10] = True
    pred = np.zeros_like(truth)
    pred[1, 4:8, 4:10] = True  # image 0: missed bone; image 1: perfect; image 2: both empty
    hd_nan, _ = surface_distances_per_image(pred, truth, threshold=None)
    assert np.isnan(hd_nan[0]) and hd_nan[1] == 0 and np.isnan(hd_nan[2])
    hd, asd = surface_distances_per_image(pred, truth, threshold=None, empty="diagonal")
    assert hd[0] == pytest.approx(np.hypot(16, 20)) == asd[0]
    assert hd[1] == 0 and hd[2] == 0 and asd[2] == 0


def test_seeds_needed_for_a_large_spread_is_large_not_an_error():
    from pocus_edge.metrics import minimal_detectable_effect, seeds_needed

    n = seeds_needed(0.03, 0.32)  # the withdrawn CPU study's SD of fused - lower
    assert n > 500 and minimal_detectable_effect(0.32, n) <= 0.03 < minimal_detectable_effect(0.32, n - 1)
    assert minimal_detectable_effect(0.32, 5000) > 0
