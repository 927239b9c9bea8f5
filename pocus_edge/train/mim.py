"""Masked image modeling pretraining (SimMIM-style, docs/method.md generative branch) on ONE site.

Reads only the images of the site's pretraining split (never a mask file). The mask grid is the
paper's 7x7 of 32-px cells at 224 px; at other sizes cells stay whole multiples of the 16-px
token (16 px at 128 and 64). Each sample's mask
grid, speckle cells and speckle noise are drawn from a generator seeded by (seed, epoch, index),
so single-process, DDP and resumed runs see identical inputs. The whole TransUNet (3 output
channels) reconstructs the image; loss = mean absolute error over masked pixels. Writes
``RUN/encoder.safetensors`` (``encoder.*`` tensors + model card) at the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..card import build_card, site_entry
from ..data.datasets import UnlabeledImageDataset, sample_generator, split_key
from ..errors import TrainingError
from .common import RunOptions, check_image_files, hyperparameters, open_one_site, resolve_configs, seeded_model
from .distributed import setup
from .engine import Hooks, OptimSettings, Trainer, TrainResult, write_or_fail

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

    write_or_fail(path, "encoder", lambda: save_checkpoint(path, encoder_state(net), card))


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
    """One forward for DDP: mask the input, reconstruct with the whole TransUNet, masked L1.

    Images may have different numbers of masked pixels (a partial last grid cell), so under
    several processes each returns world x (its error sum / the GLOBAL masked-pixel count): the
    objectives sum to world x the global-batch loss (see distributed.py)."""

    def __init__(self, mim_model: nn.Module):
        super().__init__()
        self.mim = mim_model

    def forward(self, image, mask, speckle, noise):
        from ..losses import masked_l1
        from ..models.heads import apply_mim_mask, inpainting_baseline
        from .distributed import all_reduce_sum, world_size

        reconstruction = self.mim.reconstruct(apply_mim_mask(image, mask, speckle, noise=noise)).float()
        with torch.no_grad():  # the trivial inpainting's loss on the same masks, logged beside the loss
            baseline = {"inpaint_baseline_l1": float(masked_l1(inpainting_baseline(image, mask), image, mask))}
        world = world_size()
        if world == 1:
            return masked_l1(reconstruction, image, mask), baseline
        weights = mask.to(reconstruction.dtype).expand_as(reconstruction)
        count = all_reduce_sum(weights.sum().detach()).clamp_min(1.0)
        return world * ((reconstruction - image).abs() * weights).sum() / count, baseline


def resolve_mask_cell(img_size: int, mim_cfg) -> Any:
    """The MIM config with its mask cell in pixels filled in (recorded in the card):
    ``mask_cell`` when set, else ceil(img_size / mask_grid)."""
    return dataclasses.replace(mim_cfg, mask_cell=mim_cfg.cell_pixels(img_size))


def pretrain_mim(
    site_dir: Any,
    out_dir: str | Path,
    options: RunOptions | None = None,
    *,
    split: str = "train",
    **kwargs: Any,
) -> PretrainResult:
    """Pretrain a MIM-TransUNet on the images of ``split`` of ONE site; returns the run summary and
    ``out_dir/encoder.safetensors``. ``options`` / ``kwargs``: :class:`RunOptions` fields."""
    from ..models.heads import MaskGenerator, MIMModel

    opts = RunOptions.build(options, **kwargs)
    resolved = resolve_configs("mim", opts.preset, opts.overrides, config_file=opts.config_file, **opts.explicit())
    resolved.stage_cfg = resolve_mask_cell(resolved.model.img_size, resolved.stage_cfg)
    model_cfg, mim_cfg, train_cfg = resolved.model, resolved.stage_cfg, resolved.train
    ctx = setup(opts.device)
    site = open_one_site(site_dir, what="pretrain mim")
    records = pretrain_records(site, split)
    check_image_files(site, records)
    images = UnlabeledImageDataset(site, records, model_cfg.img_size, seed=train_cfg.seed, preload=opts.preload,
                                   preload_threads=max(1, train_cfg.num_workers or 4))
    dataset = MaskedImages(images, MaskGenerator(model_cfg.img_size, mim_cfg), train_cfg.seed)
    model = seeded_model(train_cfg.seed, lambda: MIMObjective(MIMModel(model_cfg, mim_cfg)))
    out_dir = Path(out_dir)
    written: dict[str, Any] = {}

    def loss_fn(net, batch):
        return net(*batch)

    def on_end(net, state) -> None:
        card = build_card(
            preset=resolved.preset,
            model=model_cfg,
            out_channels=0,  # encoder only
            stage="pretrain-mim",
            hyperparameters=hyperparameters(mim_cfg, train_cfg, global_batch=state.global_batch, steps=state.step,
                                            **{f"mean_{k}": round(v / max(1, state.extras_n), 6)
                                               for k, v in state.extras_sum.items()}),
            data=[site_entry(site, role="ssl-images-only", splits=[f"split={split}"])],
        )
        save_encoder(out_dir / ENCODER_FILE, net.mim, card)
        written["card"] = card

    trainer = Trainer(
        model=model, loss_fn=loss_fn, train_dataset=dataset, out_dir=out_dir,
        optim=OptimSettings(mim_cfg.optimizer, mim_cfg.lr, mim_cfg.weight_decay, mim_cfg.batch_size, mim_cfg.epochs,
                            decay_all_parameters=mim_cfg.decay_all_parameters),
        train=train_cfg, ctx=ctx, options=opts, hooks=Hooks(on_end=on_end),
        description=f"pretrain mim {site.name}", config_record=resolved.record(),
    )
    return PretrainResult(**vars(trainer.fit()), encoder_path=encoder_if_written(out_dir), card=written.get("card"))


def encoder_if_written(out_dir: Path) -> Path | None:
    path = Path(out_dir) / ENCODER_FILE
    return path if path.exists() else None
