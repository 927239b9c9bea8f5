"""Contrastive pretraining with MT-NXent on ONE unlabeled site (docs/method.md, contrastive branch).

Batches are drawn at random from the whole training split (the released code) or, with
``frames_per_video`` k > 0, as k frames of each of batch/k videos (:mod:`.sampler`), so that the
temporal mask removes real negatives; each sample carries its video id and frame index, and the
log records the share of negatives masked and the loss at chance. Under DDP the loss sees the GLOBAL batch: embeddings (with gradients), video ids and
frame indices are all-gathered, so W processes x B/W pairs have exactly the negatives (and the
temporal masking across processes) of one process with B pairs. Writes ``RUN/encoder.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..card import build_card, site_entry
from ..data.datasets import ContrastivePairDataset
from .common import RunOptions, check_image_files, hyperparameters, open_one_site, resolve_configs, seeded_model
from .distributed import gather_no_grad, gather_with_grad, setup
from .engine import Hooks, OptimSettings, Trainer, batch_plan
from .mim import ENCODER_FILE, PretrainResult, encoder_if_written, pretrain_records, save_encoder
from .sampler import video_clustered_factory


def contrastive_loss(net, batch, *, min_frame_gap: int, temperature: float):
    """MT-NXent of one (local) batch of pairs, computed on the global batch; with the share of
    negatives the temporal mask removed, the loss at chance for this batch's mask and the share
    of views whose nearest unmasked candidate is their positive (``retrieval``)."""
    from ..losses import mt_nxent, mt_nxent_mask, mt_nxent_mask_stats, positive_retrieval

    view1, view2, video_ids, frame_ids = batch
    z = net(torch.cat([view1, view2], dim=0)).float()
    z1, z2 = z.chunk(2, dim=0)
    videos, frames = gather_no_grad(video_ids), gather_no_grad(frame_ids)
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    loss = mt_nxent(g1, g2, videos, frames, min_frame_gap=min_frame_gap, temperature=temperature)
    with torch.no_grad():
        mask = mt_nxent_mask(videos, frames, min_frame_gap=min_frame_gap, device=videos.device)
        stats = {**mt_nxent_mask_stats(mask), "retrieval": positive_retrieval(g1.detach(), g2.detach(), mask)}
    return loss, stats


def pretrain_contrastive(
    site_dir: Any,
    out_dir: str | Path,
    options: RunOptions | None = None,
    *,
    min_frame_gap: int | None = None,
    temperature: float | None = None,
    frames_per_video: int | None = None,
    split: str = "train",
    **kwargs: Any,
) -> PretrainResult:
    """Pretrain a Contrastive-TransUNet encoder on the images of ``split`` of ONE site.
    ``options`` / ``kwargs``: :class:`RunOptions` fields."""
    from ..models.heads import ContrastiveModel

    opts = RunOptions.build(options, **kwargs)
    resolved = resolve_configs(
        "contrastive", opts.preset, opts.overrides, config_file=opts.config_file, min_frame_gap=min_frame_gap,
        temperature=temperature, frames_per_video=frames_per_video, **opts.explicit(),
    )
    model_cfg, c_cfg, train_cfg = resolved.model, resolved.stage_cfg, resolved.train
    ctx = setup(opts.device)
    site = open_one_site(site_dir, what="pretrain contrastive")
    records = pretrain_records(site, split)
    check_image_files(site, records)
    dataset = ContrastivePairDataset(site, records, model_cfg.img_size, c_cfg, seed=train_cfg.seed, preload=opts.preload,
                                     preload_threads=max(1, train_cfg.num_workers or 4))
    model = seeded_model(train_cfg.seed, lambda: ContrastiveModel(model_cfg, projection_bn=c_cfg.projection_bn))
    out_dir = Path(out_dir)
    global_batch = batch_plan(len(dataset), c_cfg.batch_size, ctx.world_size)[0]
    sampler = (video_clustered_factory(dataset.video_ids, c_cfg.frames_per_video, global_batch)
               if c_cfg.frames_per_video > 0 else None)
    written: dict[str, Any] = {}

    def loss_fn(net, batch):
        return contrastive_loss(net, batch, min_frame_gap=c_cfg.min_frame_gap, temperature=c_cfg.temperature)

    def on_end(net, state) -> None:
        card = build_card(
            preset=resolved.preset,
            model=model_cfg,
            out_channels=0,  # encoder only: no segmentation head
            stage="pretrain-contrastive",
            hyperparameters=hyperparameters(c_cfg, train_cfg, global_batch=state.global_batch, steps=state.step,
                                            **{f"mean_{k}": round(v / max(1, state.extras_n), 6)
                                               for k, v in state.extras_sum.items()}),
            data=[site_entry(site, role="ssl-images-only", splits=[f"split={split}"])],
        )
        save_encoder(out_dir / ENCODER_FILE, net, card)
        written["card"] = card

    trainer = Trainer(
        model=model, loss_fn=loss_fn, train_dataset=dataset, out_dir=out_dir,
        optim=OptimSettings(c_cfg.optimizer, c_cfg.lr, c_cfg.weight_decay, c_cfg.batch_size, c_cfg.epochs,
                            decay_all_parameters=c_cfg.decay_all_parameters),
        train=train_cfg, ctx=ctx, options=opts, hooks=Hooks(on_end=on_end), sampler=sampler,
        description=f"pretrain contrastive {site.name}", config_record=resolved.record(),
    )
    return PretrainResult(**vars(trainer.fit()), encoder_path=encoder_if_written(out_dir), card=written.get("card"))
