"""AdaBN: a source-trained segmenter whose BatchNorm statistics are re-estimated on unlabeled
target frames, with no training (Li et al., "Revisiting Batch Normalization For Practical Domain
Adaptation"). The reference a reviewer asks for next to target-only SSL: it uses the same
unlabeled target frames, but only their first and second moments.

In the TransUNet only the decoder has BatchNorm (the encoder uses GroupNorm and LayerNorm), so
AdaBN adapts the decoder's normalization to the target's feature statistics.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data.datasets import gray_to_tensor
from ..data.layout import FrameRecord, Site, read_gray_png
from ..data.transforms import preprocess_gray
from ..errors import TrainingError


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: Sequence[torch.Tensor] | torch.Tensor, *, batch_size: int = 64,
                    device: str | torch.device = "cpu") -> nn.Module:
    """A copy of ``model`` whose BatchNorm running mean and variance are the average of the
    per-batch statistics of ``images`` ((N, 3, S, S) in [0, 1]); weights are untouched, dropout
    stays off. The batches are consecutive slices, so the result does not depend on any RNG."""
    adapted = copy.deepcopy(model).to(device)
    layers = batchnorm_layers(adapted)
    if not layers:
        raise TrainingError("AdaBN: the model has no BatchNorm layer to adapt")
    adapted.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    n = len(images)
    if n == 0:
        raise TrainingError("AdaBN: no target frames to estimate the statistics from")
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        batch = chunk if torch.is_tensor(chunk) else torch.stack(list(chunk))
        adapted(batch.to(device))
    for bn in layers:
        bn.momentum = 0.1
    return adapted.eval()


def target_images(site: Site, records: Sequence[FrameRecord], size: int, max_frames: int | None = None) -> torch.Tensor:
    """(N, 3, S, S) preprocessed images of ``records`` (images only, never a mask), an evenly
    spaced subset of at most ``max_frames``."""
    records = list(records)
    if max_frames is not None and len(records) > max_frames > 0:
        records = [records[int(i)] for i in np.linspace(0, len(records) - 1, max_frames).round().astype(int)]
    return torch.stack([gray_to_tensor(preprocess_gray(read_gray_png(site.image_path(r)), size)) for r in records])


def adabn_checkpoint(model_path: str | Path, target_site: Site, out_path: str | Path, *, split: str = "train",
                     max_frames: int | None = 1024, device: str = "cpu") -> dict[str, Any]:
    """Adapt the segmenter in ``model_path`` to ``target_site``'s ``split`` images and save it
    to ``out_path`` with a card that records the adaptation; returns the card."""
    from ..card import site_entry
    from ..models.weights import build_segmenter, save_checkpoint

    net, card = build_segmenter(model_path, device=device)
    records = target_site.select(split)
    if not records:
        raise TrainingError(f"{target_site.manifest_path}: split {split!r} is empty, no frames for AdaBN")
    images = target_images(target_site, records, net.cfg.img_size, max_frames)
    adapted = adapt_batchnorm(net, images, device=device)
    new_card = dict(card)
    # The target images it saw go into the card's data list, as every other stage's do.
    new_card["data"] = list(card.get("data", [])) + [site_entry(target_site, role="ssl-images-only",
                                                                splits=[f"split={split}"])]
    new_card["adabn"] = {"frames": int(len(images)), "batchnorm_layers": len(batchnorm_layers(adapted))}
    save_checkpoint(out_path, adapted.state_dict(), new_card)
    return new_card


__all__ = ["adabn_checkpoint", "adapt_batchnorm", "batchnorm_layers", "target_images"]
