"""Supervised fine-tuning on ONE labeled site with DiceBCE (docs/method.md, "Fine-tuning"), with a
named recipe (:mod:`.recipes`: ``default`` or the released code's ``paper``).

With ``init`` (a pretraining run's ``encoder.safetensors``): embeddings + encoder come from it,
decoder and head start random, and the stage is "finetune". Without ``init``: the baselines,
"baseline" stage (lower bound on the source site, upper bound on the target's labeled
``ub_split``). Keeps ``RUN/model.safetensors`` = the epoch with the lowest validation DiceBCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..card import build_card, site_entry
from .common import (
    RunOptions,
    check_init_card,
    hyperparameters,
    labeled_datasets,
    open_one_site,
    resolve_configs,
    seeded_model,
    validation_fn,
)
from .distributed import gather_no_grad, gather_with_grad, setup
from .engine import Hooks, OptimSettings, Trainer, TrainResult, write_or_fail
from .recipes import get_recipe, parameter_groups

MODEL_FILE = "model.safetensors"


@dataclass
class FinetuneResult(TrainResult):
    model_path: Path | None = None
    card: dict[str, Any] | None = None


def build_finetune_model(model_cfg, seed: int, init: str | Path | None = None):
    """(TransUNet with a seeded random init, init card or None): embeddings + encoder loaded from
    ``init`` (strict on ``encoder.*``), decoder and head left at their random init."""
    from ..models.transunet import TransUNet
    from ..models.weights import load_encoder

    model = seeded_model(seed, lambda: TransUNet(model_cfg, out_channels=1))
    card = load_encoder(model, init) if init is not None else None
    return model, card


def _init_defaults(recipe_name: str, init_card: dict[str, Any] | None) -> dict[str, Any]:
    """Stage values derived from the init checkpoint: the ``paper`` recipe's weight decay after a
    contrastive encoder (docs/method.md: 0.05 after MIM, 0.1 after contrastive pretraining)."""
    recipe = get_recipe(recipe_name)
    if init_card and init_card.get("stage") == "pretrain-contrastive" and recipe.contrastive_init_weight_decay:
        return {"weight_decay": recipe.contrastive_init_weight_decay}
    return {}


def _finetune_optim(ft_cfg) -> OptimSettings:
    """Optimizer settings with the recipe's parameter groups (encoder lr scale, no decay on
    norms/biases/embeddings, LP-FT hold)."""
    groups = partial(parameter_groups, weight_decay=ft_cfg.weight_decay, encoder_lr_scale=ft_cfg.encoder_lr_scale,
                     decay_all_parameters=ft_cfg.decay_all_parameters, decoder_only_steps=ft_cfg.decoder_only_steps)
    return OptimSettings(ft_cfg.optimizer, ft_cfg.lr, ft_cfg.weight_decay, ft_cfg.batch_size, ft_cfg.epochs,
                         momentum=ft_cfg.momentum, groups=groups)


def _resolve(opts: RunOptions, recipe: str | None, init_card: dict[str, Any] | None, **explicit: Any):
    """The run's configs: the recipe's defaults (with its weight decay after a contrastive
    encoder), then the config file, --set and the explicit options."""
    chosen = resolve_configs("finetune", opts.preset, opts.overrides, config_file=opts.config_file, recipe=recipe)
    return resolve_configs(
        "finetune", opts.preset, opts.overrides, config_file=opts.config_file, recipe=recipe,
        defaults=_init_defaults(chosen.stage_cfg.recipe, init_card), **explicit, **opts.explicit(),
    )


def dice_bce_loss(net, batch):
    """DiceBCE of a batch. Its Dice term is over the whole batch, so it is computed on the GLOBAL
    batch (every rank the same value; distributed.py explains why the gradients come out exact)."""
    from ..losses import dice_bce

    images, masks = batch
    prob = torch.sigmoid(net(images).float())
    return dice_bce(gather_with_grad(prob), gather_no_grad(masks))


def finetune(
    site_dir: Any,
    out_dir: str | Path,
    options: RunOptions | None = None,
    *,
    init: str | Path | None = None,
    recipe: str | None = None,
    split_column: str = "auto",
    weight_decay: float | None = None,
    augment: str | None = None,
    max_val_frames: int | None = None,
    **kwargs: Any,
) -> FinetuneResult:
    """Fine-tune (or train a baseline) on one labeled site with a recipe (``default`` or
    ``paper``, :mod:`.recipes`); returns the run summary and the path of the best-validation
    checkpoint (``out_dir/model.safetensors``). ``max_val_frames`` scores an evenly spaced subset
    of the validation split (cheaper epochs on CPUs). ``options`` / ``kwargs``:
    :class:`RunOptions` fields."""
    from ..models.weights import read_checkpoint, save_checkpoint

    opts = RunOptions.build(options, **kwargs)
    init_card = read_checkpoint(init)[1] if init is not None else None
    resolved = _resolve(opts, recipe, init_card, weight_decay=weight_decay, augment=augment)
    model_cfg, ft_cfg, train_cfg = resolved.model, resolved.stage_cfg, resolved.train
    if init is not None:
        check_init_card(init, init_card, model_cfg, resolved.preset)
    ctx = setup(opts.device)
    site = open_one_site(site_dir, what="finetune", check_images=True)
    column, train_ds, val_ds = labeled_datasets(site, split_column, max_val_frames, model_cfg.img_size, ft_cfg, train_cfg,
                                                opts.preload)
    model, init_card = build_finetune_model(model_cfg, train_cfg.seed, init)
    stage = "finetune" if init is not None else "baseline"
    out_dir, optim, written = Path(out_dir), _finetune_optim(ft_cfg), {}

    def on_best(net, state, val: dict[str, float]) -> None:
        card = build_card(
            preset=resolved.preset, model=model_cfg, out_channels=1, stage=stage, init=init_card,
            hyperparameters=hyperparameters(
                ft_cfg, train_cfg, split_column=column, val_frames=len(val_ds),
                param_groups=[g.describe(ft_cfg.lr) for g in optim.param_groups(net)], best_epoch=state.epoch + 1,
                best_step=state.step, best_val_dicebce=val["val_loss"], best_val_dice=val["val_dice"],
                global_batch=state.global_batch, **state.train_check(),
            ),
            data=[site_entry(site, role="supervised", splits=[f"{column}=train", f"{column}=val"])],
        )
        path = out_dir / MODEL_FILE
        write_or_fail(path, "model", lambda: save_checkpoint(path, net.state_dict(), card))
        written["card"] = card

    trainer = Trainer(
        model=model, loss_fn=dice_bce_loss, train_dataset=train_ds, out_dir=out_dir, optim=optim, train=train_cfg,
        ctx=ctx, options=opts, description=f"{stage} {site.name}", config_record=resolved.record(),
        hooks=Hooks(val_fn=validation_fn(val_ds, ctx, max(1, min(64, ft_cfg.batch_size))), on_best=on_best),
    )
    res = trainer.fit()
    model_path = out_dir / MODEL_FILE
    card = written.get("card") or (read_checkpoint(model_path)[1] if model_path.exists() else None)
    return FinetuneResult(**vars(res), model_path=model_path if model_path.exists() else None, card=card)
