"""Losses against brute-force references, a second library (lightly) and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pocus_edge.losses import dice_bce, masked_l1, mt_nxent, mt_nxent_mask


def brute_force_mt_nxent(z1, z2, video_ids, frame_ids, min_frame_gap, temperature):
    """docs/method.md written out with Python loops over every (k, l) pair."""
    batch = len(video_ids)
    rows = [F.normalize(v, dim=0) for v in list(z1) + list(z2)]
    videos = list(video_ids) * 2
    frames = list(frame_ids) * 2
    total = 0.0
    for k in range(2 * batch):
        positive = (k + batch) % (2 * batch)
        terms = []
        for l in range(2 * batch):
            if l == k:
                continue
            if l != positive and videos[k] == videos[l] and abs(frames[k] - frames[l]) < min_frame_gap:
                continue
            terms.append(float(rows[k] @ rows[l]) / temperature)
        s_pos = float(rows[k] @ rows[positive]) / temperature
        peak = max(terms)
        log_denominator = peak + math.log(sum(math.exp(t - peak) for t in terms))
        total += log_denominator - s_pos
    return total / (2 * batch)


def random_batch(batch, dim, videos, frames, seed):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    z2 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    video_ids = torch.randint(0, videos, (batch,), generator=g)
    frame_ids = torch.randint(0, frames, (batch,), generator=g)
    return z1, z2, video_ids, frame_ids


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("gap", [0, 1, 15, 40])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_mt_nxent_matches_brute_force(batch, gap, temperature):
    z1, z2, video_ids, frame_ids = random_batch(batch, 8, videos=3, frames=50, seed=batch * 100 + gap)
    expected = brute_force_mt_nxent(z1, z2, video_ids.tolist(), frame_ids.tolist(), gap, temperature)
    got = mt_nxent(z1, z2, video_ids, frame_ids, min_frame_gap=gap, temperature=temperature)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_temporal_masking_changes_the_loss_only_when_neighbours_exist():
    z1, z2, _, _ = random_batch(6, 8, videos=1, frames=1, seed=3)
    video_ids = torch.tensor([0, 0, 0, 1, 1, 2])
    frame_ids = torch.tensor([0, 5, 100, 0, 200, 0])
    plain = mt_nxent(z1, z2, video_ids, frame_ids, min_frame_gap=0)
    far_apart_only = mt_nxent(z1, z2, video_ids, frame_ids, min_frame_gap=5)  # |0-5| = 5 is not < 5
    with_neighbours = mt_nxent(z1, z2, video_ids, frame_ids, min_frame_gap=6)
    assert far_apart_only.item() == pytest.approx(plain.item(), rel=1e-12)
    assert with_neighbours.item() != pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("batch", [3, 8])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_gap_zero_equals_lightly_ntxent(batch, temperature):
    from lightly.loss import NTXentLoss

    z1, z2, video_ids, frame_ids = random_batch(batch, 16, videos=1, frames=3, seed=batch)
    z1, z2 = z1.float(), z2.float()
    ours = mt_nxent(z1, z2, video_ids, frame_ids, min_frame_gap=0, temperature=temperature)
    theirs = NTXentLoss(temperature=temperature)(z1, z2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_mask_never_masks_positives_even_for_identical_frames():
    video_ids = torch.tensor([7, 7, 7, 8])
    frame_ids = torch.tensor([10, 10, 12, 10])  # two identical frames in one batch
    mask = mt_nxent_mask(video_ids, frame_ids, min_frame_gap=15)
    batch = 4
    rows = torch.arange(2 * batch)
    assert not mask[rows, (rows + batch) % (2 * batch)].any()
    assert mask.diagonal().all()
    # Brute-force definition of every entry.
    v = video_ids.tolist() * 2
    f = frame_ids.tolist() * 2
    for k in range(2 * batch):
        for l in range(2 * batch):
            expected = k == l or (v[k] == v[l] and abs(f[k] - f[l]) < 15 and l != (k + batch) % (2 * batch))
            assert bool(mask[k, l]) == expected, (k, l)


def test_mt_nxent_gradients_finite_and_low_precision_stays_finite():
    z1, z2, _, _ = random_batch(8, 16, videos=1, frames=1, seed=11)
    z1 = z1.float().requires_grad_()
    z2 = z2.float().requires_grad_()
    video_ids = torch.zeros(8, dtype=torch.long)  # one video: nearly everything masked
    frame_ids = torch.arange(8)
    loss = mt_nxent(z1, z2, video_ids, frame_ids, min_frame_gap=15, temperature=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    # Only positives and self remain: every row's softmax is over its positive alone -> loss 0.
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        low = mt_nxent(z1.detach().to(dtype), z2.detach().to(dtype), video_ids, frame_ids, min_frame_gap=3)
        assert torch.isfinite(low), dtype


def test_dice_bce_matches_hand_computation():
    prob = torch.tensor([[[[0.9, 0.2], [0.6, 0.1]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    p, y = prob.flatten().tolist(), target.flatten().tolist()
    intersection = sum(a * b for a, b in zip(p, y))
    dice = 1 - (2 * intersection + 1) / (sum(p) + sum(y) + 1)
    bce = -sum(b * math.log(a) + (1 - b) * math.log(1 - a) for a, b in zip(p, y)) / len(p)
    assert dice_bce(prob, target).item() == pytest.approx(dice + bce, rel=1e-6)
    # Same as PyTorch's own BCE outside autocast, and p in {0, 1} stays finite (log clamped at -100).
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    dice_term = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    reference = dice_term + F.binary_cross_entropy(prob, target)
    assert dice_bce(prob, target).item() == pytest.approx(reference.item(), rel=1e-6)
    extreme = dice_bce(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(extreme)
    assert extreme.item() == pytest.approx((1 - 1 / 3) + 100.0, rel=1e-6)


def test_dice_bce_gradient_is_the_formula_and_stays_finite_where_a_sigmoid_saturates():
    """d BCE / d p = (p - y) / (p (1 - p)) / N away from 0 and 1; at p exactly 0 or 1 (a saturated
    fp32 sigmoid, which ended fine-tunings with a NaN) the gradient must stay finite, for the
    hard-label loss and for the distillation's soft-label one, with and without autocast."""
    from pocus_edge.losses import soft_bce

    p = torch.tensor([0.3, 0.8, 0.55, 0.1])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    leaf = p.clone().requires_grad_(True)
    (dice_bce(leaf, y) - dice_bce(leaf.detach(), y)).backward()  # the BCE term's gradient plus Dice's
    s = p.sum() + y.sum() + 1
    dice_grad = -(2 * y * s - (2 * (p * y).sum() + 1)) / s**2
    bce_grad = (p - y) / (p * (1 - p)) / p.numel()
    assert torch.allclose(leaf.grad, dice_grad + bce_grad, rtol=1e-5, atol=1e-7)

    logits = torch.tensor([-120.0, -3.0, 0.5, 40.0, 120.0])  # sigmoid is exactly 0 or 1 at both ends
    assert torch.sigmoid(logits)[0] == 0.0 and torch.sigmoid(logits)[-1] == 1.0
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    for loss_fn in (lambda q: dice_bce(q, labels), lambda q: soft_bce(q, torch.full_like(q, 0.3))):
        for autocast in (False, True):
            z = logits.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(torch.sigmoid(z))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), (autocast, z.grad)


def test_masked_l1_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    original = torch.rand(2, 3, 4, 4, generator=g)
    reconstruction = torch.rand(2, 3, 4, 4, generator=g)
    mask = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    total, count = 0.0, 0
    for n in range(2):
        for i in range(4):
            for j in range(4):
                if mask[n, 0, i, j] == 1:
                    for c in range(3):
                        total += abs(float(original[n, c, i, j]) - float(reconstruction[n, c, i, j]))
                    count += 1
    assert masked_l1(reconstruction, original, mask).item() == pytest.approx(total / count / 3, rel=1e-6)
    # Unmasked pixels do not matter at all.
    changed = reconstruction + (1 - mask) * 10.0
    assert masked_l1(changed, original, mask).item() == pytest.approx(total / count / 3, rel=1e-6)


@pytest.mark.parametrize("gap", [0, 3, 15])
def test_mask_stats_chance_is_the_loss_of_an_encoder_that_cannot_tell_frames_apart(gap):
    """``chance`` must equal MT-NXent of identical embeddings (every logit equal), and
    ``masked_negatives`` the share counted pair by pair."""
    from pocus_edge.losses import mt_nxent_mask_stats

    video_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    frame_ids = torch.tensor([0, 2, 20, 4, 6, 0, 30, 31])
    batch = len(video_ids)
    mask = mt_nxent_mask(video_ids, frame_ids, min_frame_gap=gap)
    stats = mt_nxent_mask_stats(mask)
    same = torch.ones(batch, 4, dtype=torch.float64)
    assert stats["chance"] == pytest.approx(float(mt_nxent(same, same, video_ids, frame_ids, min_frame_gap=gap)), rel=1e-9)
    videos, frames = video_ids.tolist() * 2, frame_ids.tolist() * 2
    masked = sum(1 for k in range(2 * batch) for l in range(2 * batch)
                 if l != k and l != (k + batch) % (2 * batch) and videos[k] == videos[l] and abs(frames[k] - frames[l]) < gap)
    assert stats["masked_negatives"] == pytest.approx(masked / (2 * batch * (2 * batch - 2)))
    if gap == 0:
        assert stats["masked_negatives"] == 0 and stats["chance"] == pytest.approx(math.log(2 * batch - 1))


def test_positive_retrieval_counts_rows_whose_nearest_candidate_is_the_positive():
    from pocus_edge.losses import mt_nxent_mask, positive_retrieval

    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    videos, frames = [0, 0, 0, 1, 1, 2], [0, 3, 40, 5, 6, 0]
    mask = mt_nxent_mask(videos, frames, min_frame_gap=15)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    hits = 0
    for k in range(12):  # brute force: the best unmasked candidate of each row
        candidates = [(float(z[k] @ z[j]), j) for j in range(12) if not mask[k, j]]
        hits += max(candidates)[1] == (k + 6) % 12
    assert positive_retrieval(z1, z2, mask) == pytest.approx(hits / 12)
    assert positive_retrieval(z1, z1 + 1e-4, mask) == 1.0  # identical views always find each other
