"""Training losses (docs/method.md): MT-NXent (contrastive), DiceBCE (fine-tuning), masked L1 (MIM)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["mt_nxent", "mt_nxent_mask", "mt_nxent_mask_stats", "positive_retrieval", "dice_bce", "bce_per_pixel", "masked_l1"]

# The released code's fill value for masked similarities: exp(-9e15 - max) is exactly 0.
_MASKED_LOGIT = -9e15


def _as_index_tensor(values: torch.Tensor | Sequence[int], device: torch.device, name: str) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(list(values))
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.long)


def mt_nxent_mask(
    video_ids: torch.Tensor | Sequence[int],
    frame_ids: torch.Tensor | Sequence[int],
    *,
    min_frame_gap: int = 15,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean (2B, 2B) mask M of MT-NXent: True on the diagonal and on pairs from the same video
    whose frame indices differ by less than ``min_frame_gap``, except each row's positive pair."""
    device = torch.device(device)
    videos = _as_index_tensor(video_ids, device, "video_ids")
    frames = _as_index_tensor(frame_ids, device, "frame_ids")
    batch = videos.numel()
    if frames.numel() != batch:
        raise ValueError(f"video_ids ({batch}) and frame_ids ({frames.numel()}) differ in length")
    videos = torch.cat([videos, videos])
    frames = torch.cat([frames, frames])
    same_video = videos[:, None] == videos[None, :]
    too_close = (frames[:, None] - frames[None, :]).abs() < min_frame_gap
    mask = (same_video & too_close) | torch.eye(2 * batch, dtype=torch.bool, device=device)
    rows = torch.arange(2 * batch, device=device)
    mask[rows, (rows + batch) % (2 * batch)] = False  # positives are never masked
    return mask


def mt_nxent_mask_stats(mask: torch.Tensor) -> dict[str, float]:
    """What a (2B, 2B) MT-NXent mask does to a batch: ``masked_negatives``, the share of the
    2B(2B - 2) negatives it removes, and ``chance``, the loss of an encoder that cannot tell
    frames apart (uniform softmax over each row's unmasked candidates, positive included):
    the mean over rows of ln(#unmasked). Without temporal masking chance = ln(2B - 1)."""
    n = mask.shape[0]
    masked_per_row = mask.sum(dim=1).double() - 1.0  # the diagonal is not a negative
    negatives = n * max(1, n - 2)
    candidates = (n - 1 - masked_per_row).clamp_min(1.0)
    return {"masked_negatives": float(masked_per_row.sum() / negatives), "chance": float(candidates.log().mean())}


def mt_nxent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    video_ids: torch.Tensor | Sequence[int],
    frame_ids: torch.Tensor | Sequence[int],
    *,
    min_frame_gap: int = 15,
    temperature: float = 0.5,
) -> torch.Tensor:
    """Multi-temporal NT-Xent: NT-Xent whose negatives exclude temporally adjacent frames.

    ``z1``/``z2`` (B, D) are the projections of two views of the same B frames (normalized here
    again, which is a no-op for L2-normalized inputs); row k's positive is k + B (mod 2B). Pairs
    from the same video closer than ``min_frame_gap`` frames, and self-similarities, are masked
    out of the softmax. ``min_frame_gap=0`` is plain NT-Xent (SimCLR). Returns the mean
    cross-entropy over the 2B rows (0-d tensor).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (B, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.T / temperature
    mask = mt_nxent_mask(video_ids, frame_ids, min_frame_gap=min_frame_gap, device=z.device)
    # -9e15 as in the released code, but never beyond what the dtype can hold (fp16 -> -32752),
    # so low-precision logits stay finite.
    fill = max(_MASKED_LOGIT, torch.finfo(logits.dtype).min / 2)
    logits = logits.masked_fill(mask, fill)
    rows = torch.arange(2 * batch, device=z.device)
    return F.cross_entropy(logits, (rows + batch) % (2 * batch))


@torch.no_grad()
def positive_retrieval(z1: torch.Tensor, z2: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the 2B rows whose most similar unmasked candidate (``mask`` from
    :func:`mt_nxent_mask`) is their positive (the other view of the same frame): 1/(2B - 1) for an
    encoder that cannot tell frames apart, 1 for one that always finds the pair. Logged next to
    the MT-NXent loss, it says in plain terms how far the contrastive task is solved."""
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)
    similarity = (z @ z.T).masked_fill(mask.to(z.device), float("-inf"))
    rows = torch.arange(2 * batch, device=z.device)
    return float((similarity.argmax(dim=1) == (rows + batch) % (2 * batch)).float().mean())


def dice_bce(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """DiceBCE on probabilities: ``1 - (2 sum(p y) + s) / (sum p + sum y + s) + BCE(p, y)``.

    Dice over all pixels of the batch, BCE averaged over pixels (the released code's DiceBCELoss).
    Computed in float32; the BCE is :func:`bce_per_pixel`'s, so a saturated probability (exactly
    0 or 1) keeps a finite gradient.
    """
    p = prob.float().reshape(-1)
    y = target.float().reshape(-1)
    intersection = (p * y).sum()
    dice = 1.0 - (2.0 * intersection + smooth) / (p.sum() + y.sum() + smooth)
    return dice + bce_per_pixel(p, y).mean()


def bce_per_pixel(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy of probabilities against (soft) targets, in float32, with
    PyTorch's kernel: log terms clamped at -100 in the value, and a gradient that stays finite
    where a probability is exactly 0 or 1 (its backward divides by ``max(p (1 - p), 1e-12)``).

    A hand-written ``log(p).clamp_min(-100)`` has the same value but multiplies the clamp's zero
    gradient by ``1/p = inf`` there: NaN, which ends a fine-tuning as soon as a sigmoid saturates.
    Autocast is off around the call, because ``F.binary_cross_entropy`` refuses to run under it.
    """
    with torch.autocast(device_type=prob.device.type, enabled=False):
        return F.binary_cross_entropy(prob.float(), target.float(), reduction="none")


def masked_l1(reconstruction: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over masked pixels: sum |x - x_hat| over mask / masked pixels / channels.

    ``mask`` (N, 1, H, W) or (N, C, H, W) of {0, 1} broadcasts over the channels.
    """
    mask = mask.to(reconstruction.dtype).expand_as(reconstruction)
    error = (reconstruction - original).abs() * mask
    return error.sum() / mask.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Distillation: a compact student learns the fused teacher's per-pixel probabilities on unlabeled
# target frames, and the labels on source frames.


def soft_bce(prob: torch.Tensor, teacher_prob: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of probabilities against soft targets (the teacher's probabilities):
    ``sum_i w_i * -(t_i log p_i + (1 - t_i) log(1 - p_i)) / sum_i w_i`` (plain mean without ``weight``).

    Minimal, with zero gradient, exactly where ``p = t`` (its value there is the teacher's mean
    binary entropy, not 0); with respect to the student's logit the gradient is ``w (p - t) / sum w``.
    ``weight`` (non-negative, broadcastable to ``prob``), e.g. the teacher's per-pixel fusion
    confidence, lets confident teacher pixels count more. Teacher and weight get no gradient.
    Computed in float32 (safe under autocast); hard 0/1 targets give exactly ``dice_bce``'s BCE term.
    """
    if prob.shape != teacher_prob.shape:
        raise ValueError(f"student {tuple(prob.shape)} and teacher {tuple(teacher_prob.shape)} probabilities differ in shape")
    per_pixel = bce_per_pixel(prob, teacher_prob.detach())
    if weight is None:
        return per_pixel.mean()
    try:
        w = weight.detach().float().expand_as(per_pixel)
    except RuntimeError:
        raise ValueError(f"weight {tuple(weight.shape)} does not broadcast to {tuple(prob.shape)}") from None
    # All-zero weights (a fully unsure teacher) give 0, not 0/0.
    return (w * per_pixel).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


def distillation_loss(
    target_prob: torch.Tensor,
    teacher_prob: torch.Tensor,
    source_prob: torch.Tensor | None = None,
    source_mask: torch.Tensor | None = None,
    *,
    teacher_weight: torch.Tensor | None = None,
    soft_weight: float = 1.0,
    source_weight: float = 1.0,
) -> torch.Tensor:
    """``soft_weight * soft_bce(target_prob, teacher_prob, teacher_weight) + source_weight * dice_bce(source_prob, source_mask)``.

    ``target_prob``: the student on unlabeled target frames; ``teacher_prob``: the fused teacher
    on the same frames (never labels). ``source_prob`` / ``source_mask``: the student on labeled
    source frames and their masks (both or neither; without them only the soft term).
    """
    if (source_prob is None) != (source_mask is None):
        raise ValueError("source_prob and source_mask go together: pass both or neither")
    if soft_weight < 0 or source_weight < 0:
        raise ValueError(f"soft_weight and source_weight must be >= 0, got {soft_weight} and {source_weight}")
    loss = soft_weight * soft_bce(target_prob, teacher_prob, teacher_weight)
    if source_prob is not None:
        loss = loss + source_weight * dice_bce(source_prob, source_mask)
    return loss


__all__ += ["soft_bce", "distillation_loss"]
