"""Supervised fine-tuning on ONE labeled site with DiceBCE (METHOD.md, "Fine-tuning").

With ``init`` (a pretraining run's ``encoder.safetensors``): embeddings + encoder come from it,
decoder and head start random, and the stage is "finetune". Without ``init``: the baselines,
"baseline" stage (lower bound on the source site, upper bound on the target's labeled
``ub_split``). Keeps ``RUN/model.safetensors`` = the epoch with the lowest validation DiceBCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..card import build_card, site_entry
from ..data.datasets import SegmentationDataset
from ..errors import TrainingError
from .common import check_init_card, hyperparameters, open_one_site, resolve_configs, seeded_model
from .distributed import gather_no_grad, gather_with_grad, setup
from .engine import OptimSettings, Trainer, TrainResult

MODEL_FILE = "model.safetensors"
SPLIT_COLUMNS = ("auto", "split", "ub_split")


@dataclass
class FinetuneResult(TrainResult):
    model_path: Path | None = None
    card: dict[str, Any] | None = None


def select_labeled_splits(site, split_column: str = "auto"):
    """(column, train records, val records) of labeled frames, refusing unlabeled sites and empty
    splits. ``auto``: the ``split`` column when it has labeled train and val frames (a source
    site), else ``ub_split`` (the target's upper-bound split)."""
    if split_column not in SPLIT_COLUMNS:
        raise TrainingError(f"split column must be one of {', '.join(SPLIT_COLUMNS)}, got {split_column!r}")
    if not site.select(labeled=True):
        raise TrainingError(
            f"{site.root}: no labeled frames (no masks); fine-tuning needs a labeled site (pretrain on unlabeled ones)"
        )

    def pick(column: str, name: str):
        if column == "split":
            return site.select(name, labeled=True)
        return site.select(labeled=True, ub_split=name)

    if split_column == "auto":
        if pick("split", "train") and pick("split", "val"):
            split_column = "split"
        elif pick("ub_split", "train") or pick("ub_split", "val"):
            split_column = "ub_split"
        else:
            split_column = "split"
    train, val = pick(split_column, "train"), pick(split_column, "val")
    for name, recs in (("train", train), ("val", val)):
        if not recs:
            raise TrainingError(
                f"{site.manifest_path}: {split_column} '{name}' has no labeled frames (empty split; run `pocus-edge split`?)"
            )
    return split_column, train, val


def per_image_dice_bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DiceBCE of each image separately (N,), so validation does not depend on batch grouping."""
    from ..losses import dice_bce

    return torch.stack([dice_bce(prob[i : i + 1], target[i : i + 1]) for i in range(prob.shape[0])])


def build_finetune_model(model_cfg, seed: int, init: str | Path | None = None):
    """(TransUNet with a seeded random init, init card or None): embeddings + encoder loaded from
    ``init`` (strict on ``encoder.*``), decoder and head left at their random init."""
    from ..models.transunet import TransUNet
    from ..models.weights import load_encoder

    model = seeded_model(seed, lambda: TransUNet(model_cfg, out_channels=1))
    card = load_encoder(model, init) if init is not None else None
    return model, card


def finetune(
    site_dir: Any,
    out_dir: str | Path,
    *,
    init: str | Path | None = None,
    preset: str = "small",
    split_column: str = "auto",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    num_workers: int | None = None,
    preload: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
    checkpoint_every: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    time_limit_s: float | None = None,
    max_val_frames: int | None = None,
) -> FinetuneResult:
    """Fine-tune (or train a baseline) on one labeled site; returns the run summary and the path
    of the best-validation checkpoint (``out_dir/model.safetensors``). ``max_val_frames`` scores an
    evenly spaced subset of the validation split (cheaper epochs on CPUs)."""
    from ..models.weights import read_checkpoint

    overrides = dict(overrides or {})
    init_card = None
    if init is not None:
        _, init_card = read_checkpoint(init)
        # METHOD.md: weight decay 0.05 after MIM pretraining, 0.1 after contrastive pretraining.
        if weight_decay is None and not any(k.split(".")[-1] == "weight_decay" for k in overrides):
            if init_card.get("stage") == "pretrain-contrastive":
                weight_decay = 0.1
    model_cfg, ft_cfg, train_cfg = resolve_configs(
        "finetune", preset, overrides, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        max_steps=max_steps, seed=seed, num_workers=num_workers,
    )
    if init is not None:
        check_init_card(init, init_card, model_cfg, preset)
    ctx = setup(device)
    site = open_one_site(site_dir, what="finetune", check_images=True)
    column, train_recs, val_recs = select_labeled_splits(site, split_column)
    if max_val_frames is not None and len(val_recs) > max_val_frames > 0:
        # Evenly spaced, deterministic subset: validation cost matters on short CPU budgets.
        stride = -(-len(val_recs) // max_val_frames)
        val_recs = val_recs[::stride]

    model, loaded_card = build_finetune_model(model_cfg, train_cfg.seed, init)
    init_card = loaded_card if init is not None else None
    size = model_cfg.img_size
    threads = max(1, train_cfg.num_workers or 4)
    train_ds = SegmentationDataset(site, train_recs, size, seed=train_cfg.seed, preload=preload, preload_threads=threads)
    val_ds = SegmentationDataset(site, val_recs, size, seed=train_cfg.seed, preload=preload, preload_threads=threads)
    stage = "finetune" if init is not None else "baseline"
    out_dir = Path(out_dir)
    from ..losses import dice_bce

    def loss_fn(net, batch):
        images, masks = batch
        prob = torch.sigmoid(net(images).float())
        # DiceBCE's Dice term is over the whole batch: compute it on the GLOBAL batch (every rank
        # the same value; see distributed.py for why the gradients then come out exact).
        return dice_bce(gather_with_grad(prob), gather_no_grad(masks))

    val_batch = max(1, min(64, ft_cfg.batch_size))

    def val_fn(net) -> dict[str, float]:
        # Each rank scores every world_size-th image; sums are all-reduced.
        idx = list(range(ctx.rank, len(val_ds), ctx.world_size))
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        dice_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        from ..metrics import dice_iou_per_image

        for start in range(0, len(idx), val_batch):
            items = [val_ds[i] for i in idx[start : start + val_batch]]
            images = torch.stack([a for a, _ in items]).to(ctx.device)
            masks = torch.stack([b for _, b in items]).to(ctx.device)
            prob = torch.sigmoid(net(images).float())
            loss_sum += per_image_dice_bce(prob, masks).double().sum()
            dice_sum += float(dice_iou_per_image(prob, masks)[0].sum())
        if ctx.distributed:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
            dist.all_reduce(dice_sum)
        n = len(val_ds)
        return {"val_loss": float(loss_sum / n), "val_dice": float(dice_sum / n)}

    result_holder: dict[str, Any] = {}

    def card_for(extra: dict[str, Any]) -> dict[str, Any]:
        return build_card(
            preset=preset,
            model=model_cfg,
            out_channels=1,
            stage=stage,
            hyperparameters=hyperparameters(ft_cfg, train_cfg, split_column=column, val_frames=len(val_recs), **extra),
            data=[site_entry(site, role="supervised", splits=[f"{column}=train", f"{column}=val"])],
            init=init_card,
        )

    def on_best(net, epoch: int, val: dict[str, float]) -> None:
        from ..models.weights import save_checkpoint

        card = card_for({"best_epoch": epoch, "best_val_dicebce": val["val_loss"], "best_val_dice": val["val_dice"],
                         "global_batch": result_holder.get("batch")})
        save_checkpoint(out_dir / MODEL_FILE, net.state_dict(), card)
        result_holder["card"] = card

    trainer = Trainer(
        model=model,
        loss_fn=loss_fn,
        train_dataset=train_ds,
        out_dir=out_dir,
        optim=OptimSettings(ft_cfg.optimizer, ft_cfg.lr, ft_cfg.weight_decay, ft_cfg.batch_size, ft_cfg.epochs,
                            momentum=ft_cfg.momentum),
        train=train_cfg,
        ctx=ctx,
        val_fn=val_fn,
        on_best=on_best,
        resume=resume,
        checkpoint_every=checkpoint_every,
        progress=progress,
        tensorboard=tensorboard,
        description=f"{stage} {site.name}",
        on_step=on_step,
        time_limit_s=time_limit_s,
    )
    result_holder["batch"] = trainer._local_batch()[0]
    res = trainer.fit()
    model_path = out_dir / MODEL_FILE
    card = result_holder.get("card")
    if card is None and model_path.exists():
        card = read_checkpoint(model_path)[1]
    return FinetuneResult(**vars(res), model_path=model_path if model_path.exists() else None, card=card)
