"""Distillation: a compact student (:mod:`pocus_edge.models.students`) learns the fused two-branch
teacher on unlabeled TARGET frames and the labels of SOURCE frames.

Per step, on the same engine, options and resume as fine-tuning::

    loss = soft_weight   * soft_bce(student(target frames), teacher(target frames)[, weight])
         + source_weight * DiceBCE(student(source frames), source masks)

* The teacher: the two fine-tuned branches (``--generative`` MIM, ``--contrastive``) and the
  entropy fusion with per-image confidence normalization, in eval mode without gradients. Its
  soft masks of the target frames are computed once before training (the frames are not
  augmented; ``teacher_cache``), or on every batch.
* Target frames: every frame of the target's ``train`` split, read as images only (a target mask
  file is never opened). ``confidence_weighting`` weights each pixel by the teacher's fusion
  confidence (the mean of the two branches' normalized entropy confidences).
* Source frames: the labeled ``split=train`` frames, in a second loader beside the target's
  (:class:`.engine.Companion`): the two sites are never pooled into one dataset. The student sees
  both batches in one forward pass, so its BatchNorm statistics are those of the mix it is
  evaluated with.
* Checkpoint selection on the source validation DiceBCE (as fine-tuning); ``RUN/model.safetensors``
  is a student checkpoint whose card (``stage: distill``) records both teachers' cards, their
  SHA-256, the fusion, the weights and every setting.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..card import file_sha256, is_student_card, site_entry
from ..data.datasets import UnlabeledImageDataset, split_key
from ..errors import CheckpointError, TrainingError
from .common import (
    RunOptions,
    check_image_files,
    check_init_card,
    hyperparameters,
    labeled_datasets,
    open_one_site,
    read_config_file,
    resolve_configs,
    seeded_model,
    validation_fn,
)
from .distributed import gather_no_grad, gather_with_grad, setup
from .engine import Companion, Hooks, OptimSettings, Trainer, TrainResult, batch_plan, write_or_fail
from .finetune import MODEL_FILE
from .mim import pretrain_records
from .recipes import parameter_groups

# The teacher's fusion: the deployed one (a frame's output never depends on its batch mates).
TEACHER_FUSION = {"method": "entropy", "norm": "image", "formula": "weighted"}
_CACHE_CHUNK = 32  # frames per teacher forward when filling the cache (fixed: same bits on resume)


@dataclass
class DistillResult(TrainResult):
    model_path: Path | None = None
    card: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# The teacher


# The pretraining each branch must come from (a swapped pair is refused).
_BRANCH_INIT = {"generative": "pretrain-mim", "contrastive": "pretrain-contrastive"}


def read_teacher_card(path: str | Path, role: str) -> dict[str, Any]:
    """The card of a fine-tuned branch given as ``--{role}``; refuses an encoder, a student, a file
    without a card and a branch fine-tuned from the other pretraining (a swapped pair)."""
    from ..models.weights import read_checkpoint

    _, card = read_checkpoint(path)
    flag = f"--{role}"
    if not card:
        raise CheckpointError(f"{path}: has no model card; {flag} takes a fine-tuned branch (RUN/model.safetensors of `pocus-edge finetune`)")
    if is_student_card(card):
        raise CheckpointError(f"{path}: is a student checkpoint; {flag} takes a fine-tuned TransUNet branch")
    stage = card.get("stage")
    if stage in ("pretrain-mim", "pretrain-contrastive"):
        raise CheckpointError(f"{path}: is a {stage} encoder, not a fine-tuned branch; fine-tune it first "
                              f"(`pocus-edge finetune --init {path}`)")
    if stage not in ("finetune", "baseline") or card.get("out_channels") != 1:
        raise CheckpointError(f"{path}: is not a fine-tuned segmentation branch (stage {stage!r}, "
                              f"{card.get('out_channels')!r} output channels)")
    other = next(r for r in _BRANCH_INIT if r != role)
    init_stage = (card.get("init") or {}).get("stage")
    if init_stage == _BRANCH_INIT[other]:
        raise CheckpointError(f"{path}: was fine-tuned from a {init_stage} encoder, so it is the {other} branch; "
                              f"{flag} takes the {role} one (swapped?)")
    return card


class FusedTeacher(nn.Module):
    """Both branches and the entropy fusion: frames -> (fused probability, fusion confidence),
    each (N, 1, S, S). The confidence is the mean of the two branches' normalized confidences."""

    def __init__(self, generative: nn.Module, contrastive: nn.Module):
        super().__init__()
        from ..models.fusion import FusionHead

        self.generative, self.contrastive = generative, contrastive
        self.fusion = FusionHead(**TEACHER_FUSION)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FusedTeacher":
        return super().train(False)  # the teacher never leaves eval mode

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused, c_g, c_c = self.fusion(self.generative.predict(x).float(), self.contrastive.predict(x).float(),
                                      return_confidence=True)
        return fused, 0.5 * (c_g + c_c)


def load_teacher(generative: str | Path, contrastive: str | Path, model_cfg, preset: str, device) -> tuple[FusedTeacher, dict[str, Any]]:
    """(teacher on ``device``, card record: each branch's path, SHA-256 and card, and the fusion).
    Both branches must be fine-tuned branches of this run's preset and model shape."""
    from ..models.weights import build_segmenter

    paths = {"generative": Path(generative), "contrastive": Path(contrastive)}
    if paths["generative"].resolve() == paths["contrastive"].resolve():
        raise CheckpointError(f"{paths['generative']}: given as both --generative and --contrastive; the teacher fuses two branches")
    record: dict[str, Any] = {}
    nets = {}
    for role, path in paths.items():
        card = read_teacher_card(path, role)
        check_init_card(path, card, model_cfg, preset)
        nets[role], _ = build_segmenter(path, device=device)
        record[role] = {"path": str(path.resolve()), "sha256": file_sha256(path), "card": card}
    record["fusion"] = dict(TEACHER_FUSION)
    return FusedTeacher(nets["generative"], nets["contrastive"]).to(device), record


class IndexedImages(Dataset):
    """Target images with their index (the teacher cache's key); images only, never a mask."""

    def __init__(self, images: UnlabeledImageDataset):
        self.images = images

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, _ = split_key(key, 0)
        return self.images[key], index


class TeacherTargets:
    """The teacher's (probability, confidence) of target frames: looked up in a cache filled once
    (in fixed chunks in frame order, so a resumed run gets the same bits), or computed per batch."""

    def __init__(self, teacher: FusedTeacher, images: UnlabeledImageDataset, device: torch.device, *, cache: bool,
                 say=None):
        self.teacher, self.device = teacher, device
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if cache:
            self.cache = self._fill(images, say)

    def _fill(self, images: UnlabeledImageDataset, say) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        probs, weights = [], []
        for start in range(0, len(images), _CACHE_CHUNK):
            x = torch.stack([images[i] for i in range(start, min(len(images), start + _CACHE_CHUNK))]).to(self.device)
            prob, weight = self.teacher(x)
            probs.append(prob.cpu())
            weights.append(weight.cpu())
        if say is not None:
            say(f"teacher: soft masks of {len(images)} target frames in {time.perf_counter() - t0:.0f} s")
        return torch.cat(probs), torch.cat(weights)

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            return self.teacher(images)
        index = index.cpu()
        return self.cache[0][index].to(self.device), self.cache[1][index].to(self.device)


# ---------------------------------------------------------------------------------------------
# The stage


def _loss(targets: TeacherTargets, dcfg):
    """The per-step objective on ``((target images, indices), (source images, masks))``, on the
    GLOBAL batch (Dice and the confidence-weighted mean are not sums over ranks); logs both terms."""
    from ..losses import dice_bce, distillation_loss, soft_bce

    def loss_fn(net, batch):
        (images, index), source = batch
        teacher_prob, confidence = targets(images, index)
        weight = confidence if dcfg.confidence_weighting else None
        src_images, src_masks = source
        prob = torch.sigmoid(net(torch.cat([images, src_images])).float())
        p_target = gather_with_grad(prob[: len(images)])
        p_source = gather_with_grad(prob[len(images) :])
        teacher_prob, src_masks = gather_no_grad(teacher_prob), gather_no_grad(src_masks)
        weight = gather_no_grad(weight) if weight is not None else None
        loss = distillation_loss(p_target, teacher_prob, p_source, src_masks, teacher_weight=weight,
                                 soft_weight=dcfg.soft_weight, source_weight=dcfg.source_weight)
        with torch.no_grad():
            terms = {"soft_bce": float(soft_bce(p_target, teacher_prob, weight)),
                     "source_dicebce": float(dice_bce(p_source, src_masks))}
        return loss, terms

    return loss_fn


def _optim(dcfg) -> OptimSettings:
    """The default recipe's parameter groups (no decay on norms and biases) at the student's
    encoder learning-rate scale."""
    from functools import partial

    groups = partial(parameter_groups, weight_decay=dcfg.weight_decay, encoder_lr_scale=dcfg.encoder_lr_scale,
                     decay_all_parameters=dcfg.decay_all_parameters, decoder_only_steps=0)
    return OptimSettings(dcfg.optimizer, dcfg.lr, dcfg.weight_decay, dcfg.batch_size, dcfg.epochs,
                         momentum=dcfg.momentum, groups=groups)


def _preset(opts: RunOptions, generative: str | Path) -> str:
    """The run's preset: the option, else the config file's, else the teachers' (a student is
    trained at its teacher's input size)."""
    if opts.preset:
        return opts.preset
    in_file = read_config_file(opts.config_file, "distill").get("preset") if opts.config_file is not None else None
    if in_file:
        return in_file
    from ..models.weights import read_checkpoint

    card = read_checkpoint(generative)[1]
    return card.get("preset") or (card.get("model") or {}).get("name") or "small"


@dataclass
class _Data:
    """The two sites and their datasets: target images (unlabeled, images only) and the source's
    labeled train / validation frames."""

    target_site: Any
    source_site: Any
    target_images: UnlabeledImageDataset
    column: str
    source_train: Dataset
    source_val: Dataset

    def card_entries(self) -> list[dict[str, Any]]:
        return [site_entry(self.target_site, role="ssl-images-only", splits=["split=train"]),
                site_entry(self.source_site, role="supervised", splits=[f"{self.column}=train", f"{self.column}=val"])]


def _data(target: Any, source: Any, img_size: int, dcfg, train_cfg, opts: RunOptions, max_val_frames) -> _Data:
    """Open one site each (never the same one) and build the datasets."""
    target_site = open_one_site(target, what="distill --target")
    source_site = open_one_site(source, what="distill --source", check_images=True)
    if target_site.root.resolve() == source_site.root.resolve():
        raise TrainingError(f"{target_site.root}: given as both --target and --source; distillation reads two sites")
    records = pretrain_records(target_site, "train")
    check_image_files(target_site, records)
    images = UnlabeledImageDataset(target_site, records, img_size, seed=train_cfg.seed, preload=opts.preload,
                                   preload_threads=max(1, train_cfg.num_workers or 4))
    column, source_train, source_val = labeled_datasets(source_site, "split", max_val_frames, img_size, dcfg, train_cfg,
                                                        opts.preload)
    return _Data(target_site, source_site, images, column, source_train, source_val)


def _saver(out_dir: Path, data: _Data, dcfg, train_cfg, optim: OptimSettings, teachers: dict[str, Any],
           source_batch: int, written: dict[str, Any]):
    """``on_best``: write the student checkpoint with its card (teachers, sites, settings)."""
    from ..models.weights import read_checkpoint, save_student

    def on_best(net, state, val: dict[str, float]) -> None:
        facts = hyperparameters(
            dcfg, train_cfg, teacher_fusion=dict(TEACHER_FUSION), val_frames=len(data.source_val),
            param_groups=[g.describe(dcfg.lr) for g in optim.param_groups(net)], best_epoch=state.epoch + 1,
            best_step=state.step, best_val_dicebce=val["val_loss"], best_val_dice=val["val_dice"],
            global_batch=state.global_batch, source_global_batch=source_batch, target_frames=len(data.target_images),
            **state.train_check(),
        )
        path = out_dir / MODEL_FILE
        write_or_fail(path, "model", lambda: save_student(path, net, stage="distill", hyperparameters=facts,
                                                           data=data.card_entries(), teachers=teachers))
        written["card"] = read_checkpoint(path)[1]

    return on_best


def distill(
    generative: str | Path,
    contrastive: str | Path,
    target: Any,
    source: Any,
    out: str | Path,
    options: RunOptions | None = None,
    *,
    student: str | None = None,
    soft_weight: float | None = None,
    source_weight: float | None = None,
    confidence_weighting: bool | None = None,
    max_val_frames: int | None = None,
    **kwargs: Any,
) -> DistillResult:
    """Distil a compact ``student`` (default ``mobilenetv3``) from the fused ``generative`` +
    ``contrastive`` fine-tuned branches on ``target``'s unlabeled train frames, with DiceBCE on
    ``source``'s labeled train frames (see the module docstring). Returns the run summary and
    ``out/model.safetensors`` (best source-validation DiceBCE). ``options`` / ``kwargs``:
    :class:`RunOptions` fields; None options take the config's (per-preset) defaults."""
    from ..models.students import build_student, student_config
    from ..models.weights import read_checkpoint

    opts = RunOptions.build(options, **kwargs)
    resolved = resolve_configs("distill", _preset(opts, generative), opts.overrides, config_file=opts.config_file,
                               student=student, soft_weight=soft_weight, source_weight=source_weight,
                               confidence_weighting=confidence_weighting, **opts.explicit())
    model_cfg, dcfg, train_cfg = resolved.model, resolved.stage_cfg, resolved.train
    student_config(dcfg.student, resolved.preset)  # an unknown student is refused here, before any teacher work
    ctx = setup(opts.device)
    teacher, teachers = load_teacher(generative, contrastive, model_cfg, resolved.preset, ctx.device)
    data = _data(target, source, model_cfg.img_size, dcfg, train_cfg, opts, max_val_frames)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if opts.progress and ctx.is_main else None
    targets = TeacherTargets(teacher, data.target_images, ctx.device, cache=dcfg.teacher_cache, say=say)
    model = seeded_model(train_cfg.seed, lambda: build_student(dcfg.student, resolved.preset))
    out_dir, optim, written = Path(out), _optim(dcfg), {}
    companion = Companion(data.source_train, dcfg.source_batch_size or dcfg.batch_size)
    source_batch = batch_plan(len(data.source_train), companion.batch_size, ctx.world_size)[0]
    on_best = _saver(out_dir, data, dcfg, train_cfg, optim, teachers, source_batch, written)
    trainer = Trainer(
        model=model, loss_fn=_loss(targets, dcfg), train_dataset=IndexedImages(data.target_images), out_dir=out_dir,
        optim=optim, train=train_cfg, ctx=ctx, options=opts, companion=companion,
        description=f"distill {dcfg.student} {data.target_site.name}", config_record=resolved.record(),
        hooks=Hooks(val_fn=validation_fn(data.source_val, ctx, max(1, min(64, dcfg.batch_size))), on_best=on_best),
    )
    res = trainer.fit()
    model_path = out_dir / MODEL_FILE
    card = written.get("card") or (read_checkpoint(model_path)[1] if model_path.exists() else None)
    return DistillResult(**vars(res), model_path=model_path if model_path.exists() else None, card=card)


__all__ = ["DistillResult", "FusedTeacher", "TEACHER_FUSION", "distill", "load_teacher", "read_teacher_card"]
