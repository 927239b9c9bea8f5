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
