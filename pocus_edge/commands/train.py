"""`pretrain mim`, `pretrain contrastive`, `finetune`, `distill`, `evaluate`.

Every training command runs on one process (CPU or one GPU) or under torchrun for several GPUs:
``torchrun --nproc_per_node 8 -m pocus_edge pretrain contrastive --data T --out RUN --preset paper``
(``--batch-size`` is always the GLOBAL batch, split over the processes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from .options import (
    DEVICE_HELP,
    Augment,
    FusionFormula,
    FusionMethodChoice,
    FusionNorm,
    Preset,
    Recipe,
    SplitColumn,
    Student,
    complete_device,
)

PRESET_HELP = (
    "Model preset: paper (TransUNet R50-ViT-B/16 @224, the published network), small (CPU-trainable @128, the "
    "default), tiny (tests @64)."
)
CONFIG_HELP = (
    "YAML run config (sections model, train and the stage's; RUN/config.yaml of an earlier run works). "
    "Command-line options and --set win over it; the resolved config is written to OUT/config.yaml."
)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _one_site(data: List[Path], command: str) -> Path:
    from ..errors import TrainingError

    if len(data) != 1:
        raise TrainingError(
            f"{command} reads exactly one site, got {len(data)} (--data {' --data '.join(map(str, data))}): sites are never pooled"
        )
    return data[0]


def _run_folder(out: Optional[Path]) -> None:
    """Refuse, before any work, an --out that is a file, lies under a file or cannot be written."""
    from ..io import check_output_dir

    if out is not None:
        check_output_dir(out, what="--out (a run folder)")


def _overrides(items: Optional[List[str]]) -> dict:
    from ..config import parse_set_options

    return parse_set_options(items)


def _echo_run(kind: str, res, extra: str = "") -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # launched by torchrun: leave the group cleanly
        dist.destroy_process_group()
    if not _main_process():
        return
    typer.echo(
        f"{kind}: {res.global_step} steps ({res.epochs_done} epochs, global batch {res.batch_size}), "
        f"last loss {res.last_loss:.4f}{extra}"
    )


# Options shared by the training commands (typer needs them spelled out per command).
def _opt_data():
    return typer.Option(..., "--data", "-d", metavar="SITE", help="ONE site folder (e.g. OUT/target). Given twice, the command refuses: sites are never pooled.")


def _opt_device():
    return typer.Option("auto", "--device", help=DEVICE_HELP + " Training: bf16 autocast on CUDA (--set amp=false to disable).",
                        autocompletion=complete_device)


def _opt_progress():
    return typer.Option(True, "--progress/--no-progress", help="A progress bar on a terminal (else a log line every few steps).")


def register(app: typer.Typer) -> None:
    pretrain_app = typer.Typer(
        help="Self-supervised pretraining on ONE unlabeled target site (reads its 'train' split, images only; never opens a mask).",
        no_args_is_help=True,
    )

    @pretrain_app.command("mim")
    def mim(
        data: List[Path] = _opt_data(),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder: encoder.safetensors, checkpoint.safetensors, log.csv, tensorboard/."),
        preset: Optional[Preset] = typer.Option(None, "--preset", help=PRESET_HELP),
        config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
        epochs: Optional[int] = typer.Option(None, help="Epochs (default: paper 1200, small 10, tiny 2)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="GLOBAL batch over all processes (default: paper 128, small 32, tiny 8)."),
        lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default: 5e-4); weight decay 0.05 (--set weight_decay=...)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (the LR schedule spans them)."),
        device: str = _opt_device(),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped (a folder without a checkpoint: a fresh run)."),
        seed: Optional[int] = typer.Option(None, help="Random seed (default: 0): same seed, same weights."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="DataLoader worker processes (default: 0)."),
        preload: bool = typer.Option(False, "--preload/--no-preload", help="Decode and resize every frame into memory first (fast GPUs)."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also checkpoint every N steps (0 = at each epoch end)."),
        progress: bool = _opt_progress(),
        set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=(
            "Override any setting: key=value (mask_ratio, grad_clip, schedule, warmup_epochs, grad_checkpointing, "
            "model.dropout, ...)."
        )),
    ) -> None:
        """Masked image modeling (SimMIM-style): a 7x7 grid of cells (32 px at 224), ratio 0.6, 20%
        speckle; masked L1. Defaults follow the paper (docs/method.md) for --preset paper (sized
        for 4-8 GPUs); small/tiny use CPU-sized batches and a handful of epochs (see each
        option)."""
        from ..train import pretrain_mim

        _run_folder(out)
        res = pretrain_mim(
            _one_site(data, "pretrain mim"), out, preset=preset, epochs=epochs, batch_size=batch_size, lr=lr,
            max_steps=max_steps, device=device, resume=resume, seed=seed, num_workers=num_workers, preload=preload,
            checkpoint_every=checkpoint_every, overrides=_overrides(set_), config_file=config, progress=progress,
        )
        _echo_run("pretrain mim", res, f"; encoder -> {res.encoder_path}")


    @pretrain_app.command("contrastive")
    def contrastive(
        data: List[Path] = _opt_data(),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder: encoder.safetensors, checkpoint.safetensors, log.csv, tensorboard/."),
        preset: Optional[Preset] = typer.Option(None, "--preset", help=PRESET_HELP),
        config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
        min_frame_gap: Optional[int] = typer.Option(None, "--min-frame-gap", help="delta_t: same-video frames closer than this are not negatives (default: 15); 0 = plain NT-Xent (SimCLR)."),
        temperature: Optional[float] = typer.Option(None, help="Softmax temperature tau (default: 0.5)."),
        frames_per_video: Optional[int] = typer.Option(None, "--frames-per-video", min=0, help=(
            "Video-clustered batches: k frames of each of batch/k sampled videos, so the temporal mask has "
            "neighbours to remove (default 0: uniform batches, the released code's). The log reports the share of "
            "negatives masked."
        )),
        epochs: Optional[int] = typer.Option(None, help="Epochs (default: paper 400, small 10, tiny 2)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="GLOBAL pairs per batch over all processes (default: paper 512, small 32, tiny 8); the loss always sees all of them."),
        lr: Optional[float] = typer.Option(None, help="Adam learning rate (default: paper 1e-5; small/tiny 1e-4); weight decay 0.05."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (the LR schedule spans them)."),
        device: str = _opt_device(),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped (a folder without a checkpoint: a fresh run)."),
        seed: Optional[int] = typer.Option(None, help="Random seed (default: 0)."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="DataLoader worker processes (default: 0) (augmentations run there)."),
        preload: bool = typer.Option(False, "--preload/--no-preload", help="Decode and resize every frame into memory first."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also checkpoint every N steps (0 = at each epoch end)."),
        progress: bool = _opt_progress(),
        set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=(
            "Override any setting: key=value (crop_scale, jitter, flip_p, grad_clip (default: none for this stage), "
            "schedule (default: constant after a 5% warm-up), model.dropout, ...)."
        )),
    ) -> None:
        """Contrastive pretraining with MT-NXent (two augmented views per frame; temporal
        neighbours masked). No gradient clipping and a constant lr after a short warm-up, so the
        loss leaves its plateau at chance. Defaults follow the paper (docs/method.md) for
        --preset paper (sized for 4-8 GPUs); small/tiny use CPU-sized batches and a handful of
        epochs (see each option)."""
        from ..train import pretrain_contrastive

        _run_folder(out)
        res = pretrain_contrastive(
            _one_site(data, "pretrain contrastive"), out, preset=preset, min_frame_gap=min_frame_gap,
            temperature=temperature, frames_per_video=frames_per_video, epochs=epochs, batch_size=batch_size, lr=lr,
            max_steps=max_steps, device=device, resume=resume, seed=seed, num_workers=num_workers, preload=preload,
            checkpoint_every=checkpoint_every, overrides=_overrides(set_), config_file=config, progress=progress,
        )
        _echo_run("pretrain contrastive", res, f"; encoder -> {res.encoder_path}")

    app.add_typer(pretrain_app, name="pretrain")

    @app.command("finetune")
    def finetune(
        data: List[Path] = _opt_data(),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder: model.safetensors (lowest validation DiceBCE), checkpoint, log.csv."),
        init: Optional[Path] = typer.Option(None, "--init", help=(
            "Pretrained RUN/encoder.safetensors (same preset). Without it: a baseline from random init (lower bound "
            "on the source, upper bound on the target's labeled ub_split)."
        )),
        preset: Optional[Preset] = typer.Option(None, "--preset", help=PRESET_HELP),
        config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
        recipe: Optional[Recipe] = typer.Option(None, "--recipe", help=(
            "default: AdamW, decoupled decay off norms/biases/embeddings, encoder lr 0.1x, 5% warm-up + cosine, no "
            "clipping (the same for every arm); paper: the released code's SGD (momentum 0.99, wd 0.05/0.1 on all "
            "parameters, clip 1.0), which at short budgets decays the encoder instead of fine-tuning it. See "
            "docs/method.md."
        )),
        augment: Optional[Augment] = typer.Option(None, "--augment", help="none (default) | intensity: probe-agnostic gain, gamma, blur, noise and black-level augmentation of the labeled frames."),
        split_column: SplitColumn = typer.Option("auto", "--split-column", help=(
            "auto | split | ub_split: which manifest column gives train/val (auto: split if it has labeled "
            "train+val, else ub_split)."
        )),
        epochs: Optional[int] = typer.Option(None, help="Epochs (default: paper 200, small 5, tiny 2)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="GLOBAL batch over all processes (default: paper 512, small 16, tiny 8)."),
        lr: Optional[float] = typer.Option(None, help="Decoder/head learning rate (default recipe: paper preset 1e-4, small/tiny 1e-3, encoder 0.1x; paper recipe: 2e-4, small/tiny 2e-3)."),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay (default: 0.05; paper recipe: 0.1 when --init is a contrastive encoder)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (the LR schedule spans them)."),
        device: str = _opt_device(),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped (a folder without a checkpoint: a fresh run)."),
        seed: Optional[int] = typer.Option(None, help="Random seed (default: 0) (also fixes the decoder's random init)."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="DataLoader worker processes (default: 0)."),
        preload: bool = typer.Option(False, "--preload/--no-preload", help="Decode and resize every frame and mask into memory first."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also checkpoint every N steps (0 = at each epoch end)."),
        progress: bool = _opt_progress(),
        set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=(
            "Override any setting: key=value (encoder_lr_scale, decoder_only_steps (LP-FT), momentum, optimizer, "
            "schedule, grad_clip, model.dropout, ...)."
        )),
    ) -> None:
        """Supervised fine-tuning on ONE labeled site with DiceBCE and a named recipe; keeps the
        best validation checkpoint. Defaults follow the paper (docs/method.md) for --preset
        paper (sized for 4-8 GPUs); small/tiny use CPU-sized batches and a handful of epochs
        (see each option)."""
        from ..train import finetune as run_finetune

        _run_folder(out)
        res = run_finetune(
            _one_site(data, "finetune"), out, init=init, recipe=recipe, augment=augment, preset=preset,
            split_column=split_column, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            max_steps=max_steps, device=device, resume=resume, seed=seed, num_workers=num_workers, preload=preload,
            checkpoint_every=checkpoint_every, overrides=_overrides(set_), config_file=config, progress=progress,
        )
        best = f"; best val DiceBCE {res.best_val:.4f} (epoch {res.best_epoch}) -> {res.model_path}" if res.best_val is not None else ""
        _echo_run("finetune" if init else "baseline", res, best)


    @app.command("distill")
    def distill(
        generative: Path = typer.Option(..., "--generative", "-g", metavar="MODEL", help="The fine-tuned generative (MIM) branch: RUN/model.safetensors of `pocus-edge finetune --init MIM_ENCODER`."),
        contrastive: Path = typer.Option(..., "--contrastive", "-c", metavar="MODEL", help="The fine-tuned contrastive branch (same preset)."),
        target: Path = typer.Option(..., "--target", metavar="SITE", help="ONE target site: the teacher labels its 'train' frames; images only, its masks are never opened."),
        source: Path = typer.Option(..., "--source", metavar="SITE", help="ONE labeled source site: DiceBCE on its train frames, checkpoint selection on its val frames."),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder: model.safetensors (a student checkpoint, lowest source-validation DiceBCE), checkpoint, log.csv."),
        student: Optional[Student] = typer.Option(None, "--student", "-s", help="Student network (default: mobilenetv3); `pocus-edge flops` lists their sizes."),
        soft_weight: Optional[float] = typer.Option(None, "--soft-weight", help="Weight of the soft-label BCE against the teacher on target frames (default: 1)."),
        source_weight: Optional[float] = typer.Option(None, "--source-weight", help="Weight of DiceBCE on labeled source frames (default: 1; 0 = the teacher only)."),
        confidence_weighting: Optional[bool] = typer.Option(None, "--confidence-weighting/--no-confidence-weighting", help=(
            "Weight each target pixel by the teacher's fusion confidence (default: off)."
        )),
        max_val_frames: Optional[int] = typer.Option(None, "--max-val-frames", min=1, help="Score an evenly spaced subset of the source validation frames each epoch (default: all)."),
        preset: Optional[Preset] = typer.Option(None, "--preset", help=PRESET_HELP + " Default here: the teachers' preset."),
        config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
        epochs: Optional[int] = typer.Option(None, help="Passes over the target frames (default: paper 200, small 5, tiny 2)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help=(
            "GLOBAL target frames per step (default: paper 512, small 16, tiny 8); the source batch is the same "
            "(--set source_batch_size=N)."
        )),
        lr: Optional[float] = typer.Option(None, help="AdamW learning rate, encoder and decoder alike (default: 1e-3); 5% warm-up, then cosine."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (the LR schedule spans them)."),
        device: str = _opt_device(),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped (a folder without a checkpoint: a fresh run)."),
        seed: Optional[int] = typer.Option(None, help="Random seed (default: 0) (also fixes the student's random init)."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="DataLoader worker processes per loader (default: 0)."),
        preload: bool = typer.Option(False, "--preload/--no-preload", help="Decode and resize every frame and mask into memory first."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also checkpoint every N steps (0 = at each epoch end)."),
        progress: bool = _opt_progress(),
        set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=(
            "Override any setting: key=value (source_batch_size, teacher_cache, augment, weight_decay, "
            "encoder_lr_scale, schedule, grad_clip, ...)."
        )),
    ) -> None:
        """Distil a compact student from the fused teacher: soft-label BCE against the two
        fine-tuned branches' entropy fusion on unlabeled TARGET frames, plus DiceBCE on labeled
        SOURCE frames (two loaders, never pooled). The student card records both teachers' cards
        and SHA-256. Export and stream it like any checkpoint (docs/students.md)."""
        from ..train import distill as run_distill

        _run_folder(out)
        res = run_distill(
            generative, contrastive, target, source, out, student=student, soft_weight=soft_weight,
            source_weight=source_weight, confidence_weighting=confidence_weighting, max_val_frames=max_val_frames,
            preset=preset, epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps, device=device,
            resume=resume, seed=seed, num_workers=num_workers, preload=preload, checkpoint_every=checkpoint_every,
            overrides=_overrides(set_), config_file=config, progress=progress,
        )
        best = f"; best source val DiceBCE {res.best_val:.4f} (epoch {res.best_epoch}) -> {res.model_path}" if res.best_val is not None else ""
        _echo_run("distill", res, best)

    @app.command("evaluate")
    def evaluate(
        data: List[Path] = _opt_data(),
        generative: Optional[Path] = typer.Option(None, "--generative", "-g", metavar="MODEL", help="The fine-tuned generative (MIM) branch; with --contrastive, the pair --fusion fuses."),
        contrastive: Optional[Path] = typer.Option(None, "--contrastive", "-c", metavar="MODEL", help="The fine-tuned contrastive branch."),
        model: Optional[List[Path]] = typer.Option(None, "--model", "-m", metavar="MODEL", help=(
            "Any other model.safetensors to score (a baseline, a student); repeatable. All models are compared "
            "pairwise (Wilcoxon)."
        )),
        split: str = typer.Option("test", "--split", help="Manifest split whose labeled frames are scored."),
        fusion: Optional[List[FusionMethodChoice]] = typer.Option(None, "--fusion", metavar="METHOD", help="Fuse the pair -g/-c with this confidence: entropy | margin | average; repeatable."),
        fusion_norm: FusionNorm = typer.Option("image", "--fusion-norm", help="Confidence min-max normalization: image (per frame, deployment) | batch (released code)."),
        fusion_formula: FusionFormula = typer.Option("weighted", "--fusion-formula", help="weighted (released code) | paper (1/2 of the weighted sum)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder: per_image.csv, summary.json, summary.md, overlays/."),
        batch: int = typer.Option(32, "--batch", "-b", min=1, help="Frames per forward pass."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP, autocompletion=complete_device),
        overlays: int = typer.Option(3, "--overlays", help="Overlay PNGs of the N worst and N best frames per model (0 = none)."),
    ) -> None:
        """Per-image Dice/IoU, mean table, Wilcoxon p-values and overlays on ONE site's labeled split.

        The p-values compare models over the frames of one training run each: frames of a few
        patients are not independent, and one run says nothing about another training seed.
        Whether a method helps is `pocus-edge study`'s question (docs/study.md)."""
        from ..errors import TrainingError

        pair = [p for p in (generative, contrastive) if p is not None]
        if fusion and (len(pair) != 2 or model):
            raise TrainingError("--fusion fuses the branch pair: give exactly -g GEN -c CON (score other models with --model in another run)")
        models = [*pair, *(model or [])]
        if not models:
            raise TrainingError("evaluate needs a model: -g GEN -c CON (the branch pair) and/or --model MODEL")
        from ..train import evaluate as run_evaluate

        _run_folder(out)
        res = run_evaluate(
            _one_site(data, "evaluate"), models, out, split=split, fusion=[f.value for f in fusion or ()],
            fusion_norm=fusion_norm, fusion_formula=fusion_formula, batch_size=batch, device=device, overlays=overlays,
        )
        typer.echo(res.table(), nl=False)
        if out is not None:
            typer.echo(f"reports -> {out}")
