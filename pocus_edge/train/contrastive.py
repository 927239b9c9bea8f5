"""Contrastive pretraining with MT-NXent on ONE unlabeled site (METHOD.md, contrastive branch).

Batches are drawn at random from the whole training split; each sample carries its video id and
frame index. Under DDP the loss sees the GLOBAL batch: embeddings (with gradients), video ids and
frame indices are all-gathered, so W processes x B/W pairs have exactly the negatives (and the
temporal masking across processes) of one process with B pairs. Writes ``RUN/encoder.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..card import build_card, site_entry
from ..data.datasets import ContrastivePairDataset
from .common import check_image_files, hyperparameters, open_one_site, resolve_configs, seeded_model
from .distributed import gather_no_grad, gather_with_grad, setup
from .engine import OptimSettings, Trainer
from .mim import ENCODER_FILE, PretrainResult, pretrain_records, save_encoder


def contrastive_loss(net, batch, *, min_frame_gap: int, temperature: float) -> torch.Tensor:
    """MT-NXent of one (local) batch of pairs, computed on the global batch."""
    from ..losses import mt_nxent

    view1, view2, video_ids, frame_ids = batch
    z = net(torch.cat([view1, view2], dim=0)).float()
    z1, z2 = z.chunk(2, dim=0)
    return mt_nxent(
        gather_with_grad(z1),
        gather_with_grad(z2),
        gather_no_grad(video_ids),
        gather_no_grad(frame_ids),
        min_frame_gap=min_frame_gap,
        temperature=temperature,
    )


def pretrain_contrastive(
    site_dir: Any,
    out_dir: str | Path,
    *,
    preset: str = "small",
    min_frame_gap: int | None = None,
    temperature: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    num_workers: int | None = None,
    preload: bool = False,
    split: str = "train",
    progress: bool = True,
    tensorboard: bool = True,
    checkpoint_every: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    time_limit_s: float | None = None,
) -> PretrainResult:
    """Pretrain a Contrastive-TransUNet encoder on the images of ``split`` of ONE site."""
    from ..models.heads import ContrastiveModel

    model_cfg, c_cfg, train_cfg = resolve_configs(
        "contrastive", preset, overrides, min_frame_gap=min_frame_gap, temperature=temperature, epochs=epochs,
        batch_size=batch_size, lr=lr, max_steps=max_steps, seed=seed, num_workers=num_workers,
    )
    ctx = setup(device)
    site = open_one_site(site_dir, what="pretrain contrastive")
    records = pretrain_records(site, split)
    check_image_files(site, records)
    dataset = ContrastivePairDataset(site, records, model_cfg.img_size, c_cfg, seed=train_cfg.seed, preload=preload,
                                     preload_threads=max(1, train_cfg.num_workers or 4))
    model = seeded_model(train_cfg.seed, lambda: ContrastiveModel(model_cfg))
    out_dir = Path(out_dir)

    def loss_fn(net, batch):
        return contrastive_loss(net, batch, min_frame_gap=c_cfg.min_frame_gap, temperature=c_cfg.temperature)

    holder: dict[str, Any] = {}

    def on_end(net) -> None:
        card = build_card(
            preset=preset,
            model=model_cfg,
            out_channels=0,  # encoder only: no segmentation head
            stage="pretrain-contrastive",
            hyperparameters=hyperparameters(c_cfg, train_cfg, global_batch=holder["batch"], steps=holder["trainer"].global_step),
            data=[site_entry(site, role="ssl-images-only", splits=[f"split={split}"])],
        )
        holder["card"] = card
        save_encoder(out_dir / ENCODER_FILE, net, card)

    trainer = Trainer(
        model=model, loss_fn=loss_fn, train_dataset=dataset, out_dir=out_dir,
        optim=OptimSettings(c_cfg.optimizer, c_cfg.lr, c_cfg.weight_decay, c_cfg.batch_size, c_cfg.epochs),
        train=train_cfg, ctx=ctx, on_end=on_end, resume=resume, checkpoint_every=checkpoint_every,
        progress=progress, tensorboard=tensorboard, description=f"pretrain contrastive {site.name}", on_step=on_step,
        time_limit_s=time_limit_s,
    )
    holder["batch"] = trainer._local_batch()[0]
    holder["trainer"] = trainer
    res = trainer.fit()
    path = out_dir / ENCODER_FILE
    return PretrainResult(**vars(res), encoder_path=path if path.exists() else None, card=holder.get("card"))
