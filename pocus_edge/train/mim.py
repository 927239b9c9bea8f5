"""Masked image modeling pretraining (SimMIM-style, METHOD.md generative branch) on ONE site.

Reads only the images of the site's pretraining split (never a mask file). Each sample's mask
grid, speckle cells and speckle noise are drawn from a generator seeded by (seed, epoch, index),
so single-process, DDP and resumed runs see identical inputs. The whole TransUNet (3 output
channels) reconstructs the image; loss = mean absolute error over masked pixels. Writes
``RUN/encoder.safetensors`` (``encoder.*`` tensors + model card) at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..card import build_card, site_entry
from ..data.datasets import UnlabeledImageDataset, sample_generator, split_key
from ..errors import TrainingError
from .common import check_image_files, hyperparameters, open_one_site, resolve_configs, seeded_model
from .distributed import setup
from .engine import OptimSettings, Trainer, TrainResult

ENCODER_FILE = "encoder.safetensors"


@dataclass
class PretrainResult(TrainResult):
    encoder_path: Path | None = None
    card: dict[str, Any] | None = None


def pretrain_records(site, split: str = "train"):
    """Frames a pretraining stage may read: every frame of ``split`` (labeled or not; read as images)."""
    records = site.select(split)
    if not records:
        raise TrainingError(f"{site.manifest_path}: split {split!r} is empty, nothing to pretrain on (run `pocus-edge split`?)")
    return records


def save_encoder(path: Path, net: nn.Module, card: dict[str, Any]) -> None:
    from ..models.heads import encoder_state
    from ..models.weights import save_checkpoint

    save_checkpoint(path, encoder_state(net), card)


class MaskedImages(Dataset):
    """Unlabeled images -> (image, mask, speckle, noise), the masks drawn per sample and epoch."""

    def __init__(self, images: UnlabeledImageDataset, mask_generator, seed: int):
        self.images = images
        self.mask_generator = mask_generator
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.images.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, epoch = split_key(key, self.epoch)
        image = self.images[index]
        g = sample_generator(self.seed, epoch, index, "mim")
        mask, speckle = self.mask_generator(1, generator=g)
        noise = torch.randn((1, *image.shape[1:]), generator=g)  # shared by the 3 gray channels
        return image, mask[0], speckle[0], noise


class MIMObjective(nn.Module):
    """One forward for DDP: mask the input, reconstruct with the whole TransUNet, masked L1."""

    def __init__(self, mim_model: nn.Module):
        super().__init__()
        self.mim = mim_model

    def forward(self, image, mask, speckle, noise):
        from ..losses import masked_l1
        from ..models.heads import apply_mim_mask

        reconstruction = self.mim.net(apply_mim_mask(image, mask, speckle, noise=noise))
        return masked_l1(reconstruction.float(), image, mask)


def pretrain_mim(
    site_dir: Any,
    out_dir: str | Path,
    *,
    preset: str = "small",
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
    """Pretrain a MIM-TransUNet on the images of ``split`` of ONE site; returns the run summary and
    ``out_dir/encoder.safetensors``."""
    from ..models.heads import MaskGenerator, MIMModel

    model_cfg, mim_cfg, train_cfg = resolve_configs(
        "mim", preset, overrides, epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps, seed=seed,
        num_workers=num_workers,
    )
    ctx = setup(device)
    site = open_one_site(site_dir, what="pretrain mim")
    records = pretrain_records(site, split)
    check_image_files(site, records)
    images = UnlabeledImageDataset(site, records, model_cfg.img_size, seed=train_cfg.seed, preload=preload,
                                   preload_threads=max(1, train_cfg.num_workers or 4))
    dataset = MaskedImages(images, MaskGenerator(model_cfg.img_size, mim_cfg), train_cfg.seed)
    model = seeded_model(train_cfg.seed, lambda: MIMObjective(MIMModel(model_cfg, mim_cfg)))
    out_dir = Path(out_dir)
    holder: dict[str, Any] = {}

    def loss_fn(net, batch):
        # Every image has the same number of masked pixels, so the mean of the per-process losses
        # equals the global-batch loss (see distributed.py).
        return net(*batch)

    def on_end(net) -> None:
        card = build_card(
            preset=preset,
            model=model_cfg,
            out_channels=0,  # encoder only
            stage="pretrain-mim",
            hyperparameters=hyperparameters(mim_cfg, train_cfg, global_batch=holder["batch"],
                                            steps=holder["trainer"].global_step),
            data=[site_entry(site, role="ssl-images-only", splits=[f"split={split}"])],
        )
        holder["card"] = card
        save_encoder(out_dir / ENCODER_FILE, net.mim, card)

    trainer = Trainer(
        model=model, loss_fn=loss_fn, train_dataset=dataset, out_dir=out_dir,
        optim=OptimSettings(mim_cfg.optimizer, mim_cfg.lr, mim_cfg.weight_decay, mim_cfg.batch_size, mim_cfg.epochs),
        train=train_cfg, ctx=ctx, on_end=on_end, resume=resume, checkpoint_every=checkpoint_every,
        progress=progress, tensorboard=tensorboard, description=f"pretrain mim {site.name}", on_step=on_step,
        time_limit_s=time_limit_s,
    )
    holder["batch"] = trainer._local_batch()[0]
    holder["trainer"] = trainer
    res = trainer.fit()
    path = out_dir / ENCODER_FILE
    return PretrainResult(**vars(res), encoder_path=path if path.exists() else None, card=holder.get("card"))
