"""The one training engine behind every stage (MIM and contrastive pretraining, fine-tuning,
baselines).

What it does for every stage: seeded determinism, DistributedSampler batches (also in a single
process, so one process with global batch B draws exactly the samples that W processes with B/W
each draw), AdamW/Adam/SGD, cosine or constant LR per step with optional warm-up, gradient
clipping, bf16 autocast on CUDA only, optional gradient checkpointing, DDP (torchrun; gloo on
CPU, NCCL on CUDA), a rich progress bar, TensorBoard scalars and a CSV log, and atomic resumable
checkpoints (``RUN/checkpoint.safetensors``: weights, optimizer and scheduler state, RNG state,
position in the epoch) so ``resume=True`` continues bit for bit where a killed run stopped.

A non-finite loss stops the run with :class:`TrainingError` before the optimizer touches the
weights, so the last checkpoint on disk stays the last good one. A failed checkpoint write (full
disk) raises TrainingError and leaves the previous checkpoint intact.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..config import TrainConfig
from ..errors import ConfigError, TrainingError
from ..io import atomic_path, write_text_atomic
from .distributed import (
    DistContext,
    all_ranks_true,
    all_reduce_mean,
    barrier,
    convert_batchnorm,
)

CHECKPOINT = "checkpoint.safetensors"
LOG_CSV = "log.csv"
TB_DIR = "tensorboard"
_TRAINER_KEY = "pocus_edge_trainer"
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class OptimSettings:
    """Stage hyperparameters the engine needs. ``batch_size`` is the GLOBAL batch (all processes)."""

    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")


@dataclass
class TrainResult:
    out_dir: Path
    global_step: int
    epochs_done: int
    last_loss: float
    best_val: float | None
    best_epoch: int | None
    batch_size: int
    steps_per_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False  # the time limit ended the run before its planned steps


def build_optimizer(params, s: OptimSettings) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        # Adam with L2 weight decay, as the released contrastive code.
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


class LRFactor:
    """Multiplier of the base LR at a step: linear warm-up, then cosine to 0 or constant."""

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int):
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.schedule, self.total, self.warmup = schedule, max(1, total_steps), max(0, warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _EpochSampler(Sampler):
    """Yields ``(index, epoch)`` keys of a DistributedSampler's epoch, minus the first ``skip``
    (resuming in the middle of an epoch). Carrying the epoch in the key lets persistent
    DataLoader workers, which hold their own dataset copy, seed each sample by epoch."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def start(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in list(self.sampler)[self.skip :]])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Turn on gradient checkpointing wherever a submodule supports it; returns how many did."""
    count = 0
    for m in model.modules():
        fn = getattr(m, "set_grad_checkpointing", None)
        if callable(fn):
            try:
                fn(True)
                count += 1
            except (TypeError, NotImplementedError):
                pass
    return count


# ---------------------------------------------------------------------------------------------
# Resumable training checkpoint (one safetensors file, written atomically)


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Separate function so tests can simulate a full disk mid-write."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def save_training_state(path: Path, model: nn.Module, optimizer, scheduler, trainer: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in _unwrap(model).state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous().clone()
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                opt_scalars.setdefault(str(pid), {})[k] = v
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        **trainer,
        "optimizer_param_groups": opt["param_groups"],
        "optimizer_scalars": opt_scalars,
        "optimizer_state_ids": [str(pid) for pid in opt["state"]],
        "scheduler": scheduler.state_dict(),
    }
    try:
        with atomic_path(path) as tmp:
            _write_safetensors(tensors, tmp, {_TRAINER_KEY: json.dumps(meta, default=str)})
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
        raise TrainingError(f"{path}: could not write the checkpoint ({reason}); {kept}") from None


def load_training_state(path: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})[_TRAINER_KEY])
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise TrainingError(f"{path}: not a readable training checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    target = _unwrap(model)
    from ..models.weights import describe_mismatch

    problem = describe_mismatch(target.state_dict(), model_state)
    if problem:
        raise TrainingError(f"{path}: checkpoint does not fit this run's model ({problem}); was it made with another preset?")
    target.load_state_dict(model_state, strict=True)
    state: dict[int, dict[str, Any]] = {}
    for pid in meta["optimizer_state_ids"]:
        state[int(pid)] = dict(meta["optimizer_scalars"].get(pid, {}))
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(64) if f"rng.cuda.{i}" in tensors]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return meta


# ---------------------------------------------------------------------------------------------
# Logging


class _RunLog:
    """CSV rows (rewritten atomically) + TensorBoard scalars; rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.path = out_dir / LOG_CSV
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        if resume_step > 0 and self.path.exists():
            # Drop rows a killed run logged after its last checkpoint: they will be redone.
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / TB_DIR), purge_step=resume_step if resume_step > 0 else None)
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def add(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch", "phase") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{row['phase']}/{k}", v, int(row["step"]))

    def flush(self) -> None:
        if not self.enabled:
            return
        keys: list[str] = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------


LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Trainer:
    """Runs one stage. ``loss_fn(model, batch)`` gets the (possibly DDP-wrapped) model and a batch
    already on the device and returns this process's objective (see ``distributed`` for the
    gradient bookkeeping). ``val_fn(model)`` (optional) runs at each epoch end on the unwrapped
    model in eval mode and returns ``{"val_loss": float, ...}``; ``on_best(model, epoch, val)`` is
    called on rank 0 when ``val_loss`` improves, ``on_end(model)`` after the last step."""

    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: LossFn,
        train_dataset: Dataset,
        out_dir: str | Path,
        optim: OptimSettings,
        train: TrainConfig,
        ctx: DistContext,
        val_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        on_best: Callable[[nn.Module, int, dict[str, float]], None] | None = None,
        on_end: Callable[[nn.Module], None] | None = None,
        resume: bool = False,
        checkpoint_every: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
        description: str = "train",
        on_step: Callable[[int, float], None] | None = None,
        collate_fn: Callable | None = None,
        time_limit_s: float | None = None,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.dataset = train_dataset
        self.out_dir = Path(out_dir)
        self.optim = optim
        self.cfg = train
        self.ctx = ctx
        self.val_fn = val_fn
        self.on_best = on_best
        self.on_end = on_end
        self.resume = resume
        self.checkpoint_every = int(checkpoint_every)
        self.progress = progress
        self.tensorboard = tensorboard
        self.description = description
        self.on_step = on_step
        self.collate_fn = collate_fn
        self.global_step = 0
        self.time_limit_s = time_limit_s

    # -- setup ------------------------------------------------------------------------------

    def _local_batch(self) -> tuple[int, int]:
        """(global batch actually used, per-process batch). The global batch is clamped to the
        dataset size (a tiny site) and must split evenly over the processes."""
        world = self.ctx.world_size
        n = len(self.dataset)
        global_batch = self.optim.batch_size
        if global_batch > n:
            global_batch = max(world, (n // world) * world)
        if global_batch % world:
            raise ConfigError(f"global batch size {global_batch} does not split evenly over {world} processes")
        if n < world:
            raise TrainingError(f"{n} training frame(s) cannot feed {world} processes")
        return global_batch, global_batch // world

    def _say(self, text: str) -> None:
        if self.ctx.is_main:
            print(text, file=sys.stderr, flush=True)

    def fit(self) -> TrainResult:
        ctx, cfg = self.ctx, self.cfg
        device = ctx.device
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.out_dir / CHECKPOINT
        if ckpt_path.exists() and not self.resume:
            raise TrainingError(
                f"{self.out_dir}: already holds a training run ({CHECKPOINT}); pass --resume to continue it or choose another --out"
            )
        model = self.model
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        if ctx.distributed:
            model = convert_batchnorm(model, device)
        model = model.to(device)
        self.model = model
        if device.type == "cuda":
            # Speed over bit-reproducibility on GPUs (CPU runs stay exact).
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        optimizer = build_optimizer(model.parameters(), self.optim)
        global_batch, local_batch = self._local_batch()
        if global_batch != self.optim.batch_size:
            self._say(f"note: batch size {self.optim.batch_size} > {len(self.dataset)} training frames; using {global_batch}")
        sampler = DistributedSampler(
            self.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        steps_per_epoch = len(sampler) // local_batch
        if steps_per_epoch < 1:
            raise TrainingError(f"{len(self.dataset)} training frame(s) give no full batch of {global_batch}")
        total_steps = self.optim.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, int(cfg.max_steps))
        warmup = cfg.warmup_epochs * steps_per_epoch
        planned_steps = total_steps
        lr_factor = LRFactor(cfg.schedule, total_steps, warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

        start_step, best_val, best_epoch = 0, None, None
        if self.resume and ckpt_path.exists():
            meta = load_training_state(ckpt_path, model, optimizer, scheduler)
            start_step = int(meta["global_step"])
            best_val, best_epoch = meta.get("best_val"), meta.get("best_epoch")
            self._say(f"resuming {ckpt_path} at step {start_step}")
        elif self.resume:
            self._say(f"note: --resume given but {ckpt_path} does not exist; starting a new run")
        else:
            # Dropout streams differ per rank but are fixed by the seed (the model's init was seeded
            # by the stage before it was built, identically on every rank).
            from ..data.datasets import sample_seed

            torch.manual_seed(sample_seed(cfg.seed, 0, ctx.rank, "engine"))

        ddp_model = model
        if ctx.distributed:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        log = _RunLog(self.out_dir, ctx.is_main, self.tensorboard, start_step)
        use_amp = bool(cfg.amp) and device.type == "cuda"
        loader_gen = torch.Generator()  # keeps DataLoader seeding off the global RNG (exact resume)
        loader_gen.manual_seed(cfg.seed)

        epoch_sampler = _EpochSampler(sampler)
        loader = DataLoader(
            self.dataset,
            batch_size=local_batch,
            sampler=epoch_sampler,
            drop_last=True,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,  # no worker start-up cost per epoch
            generator=loader_gen,
            collate_fn=self.collate_fn,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
        )

        def make_loader(epoch: int, skip_batches: int) -> DataLoader:
            epoch_sampler.start(epoch, skip_batches * local_batch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            return loader

        def save(step: int, epoch: int) -> None:
            if ctx.is_main:
                save_training_state(
                    ckpt_path,
                    model,
                    optimizer,
                    scheduler,
                    {
                        "global_step": step,
                        "epoch": epoch,
                        "best_val": best_val,
                        "best_epoch": best_epoch,
                        "total_steps": total_steps,
                        "batch_size": global_batch,
                    },
                )
                log.flush()
            barrier()

        progress = None
        task = None
        if self.progress and ctx.is_main:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(stderr=True)
            if console.is_terminal:
                progress = Progress(
                    TextColumn(f"[bold]{self.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"),
                    TimeRemainingColumn(),
                    console=console,
                    transient=False,
                )
                task = progress.add_task(self.description, total=total_steps, completed=start_step, status="")
                progress.start()
        t0 = time.perf_counter()
        step = start_step
        last_loss = float("nan")
        epochs_done = start_step // steps_per_epoch
        out_of_time = False
        try:
            while step < total_steps and not out_of_time:
                epoch = step // steps_per_epoch
                skip = step - epoch * steps_per_epoch
                ddp_model.train()
                loss_sum, loss_n = 0.0, 0
                for batch in make_loader(epoch, skip):
                    batch = _to_device(batch, device)
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                        loss = self.loss_fn(ddp_model, batch)
                    loss = loss.float()
                    reported = all_reduce_mean(loss.detach())
                    finite = all_ranks_true(bool(torch.isfinite(loss).item()), device)
                    if not finite:
                        kept = f"last good checkpoint kept: {ckpt_path}" if ckpt_path.exists() else "no checkpoint had been written yet"
                        raise TrainingError(
                            f"{self.description}: loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}); "
                            f"stopped before updating the weights; {kept} (try a lower learning rate)"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.grad_clip))
                    optimizer.step()
                    lr_now = optimizer.param_groups[0]["lr"]
                    scheduler.step()
                    step += 1
                    last_loss = float(reported.item())
                    loss_sum += last_loss
                    loss_n += 1
                    if step % max(1, cfg.log_every) == 0 or step == total_steps:
                        log.add({"step": step, "epoch": epoch + 1, "phase": "train", "loss": last_loss, "lr": lr_now,
                                 "elapsed_s": round(time.perf_counter() - t0, 3)})
                        if progress is None and self.progress and ctx.is_main:
                            self._say(f"[{self.description}] step {step}/{total_steps} epoch {epoch + 1} "
                                      f"loss {last_loss:.4f} lr {lr_now:.2e} {time.perf_counter() - t0:.0f}s")
                    if progress is not None:
                        progress.update(task, completed=step, status=f"ep {epoch + 1} loss {last_loss:.4f}")
                    if self.on_step is not None:
                        self.on_step(step, last_loss)
                    epoch_end = step % steps_per_epoch == 0
                    if self.time_limit_s is not None:
                        # Every rank takes part in the vote (a collective), and any rank over time stops all.
                        over = time.perf_counter() - t0 > self.time_limit_s
                        out_of_time = not all_ranks_true(not over, device)
                        done = step - start_step
                        if (done in (5, 10, 20) or done % 25 == 0 or epoch_end) and not out_of_time:
                            # Time-budgeted schedule: shrink the planned steps to what the measured
                            # pace (start-up and validation included) fits, so the cosine still anneals.
                            new_total = _fit_steps(step, start_step, time.perf_counter() - t0, self.time_limit_s)
                            new_total = int(all_reduce_mean(torch.tensor(float(new_total), device=device)).item())
                            total_steps = min(planned_steps, max(step + 1, new_total))
                            lr_factor.total = max(1, total_steps)
                    if step >= total_steps or epoch_end or out_of_time:
                        break
                    if self.checkpoint_every and step % self.checkpoint_every == 0:
                        save(step, epoch)
                epoch_end = step % steps_per_epoch == 0 or step >= total_steps or out_of_time
                if out_of_time:
                    self._say(f"[{self.description}] time limit {self.time_limit_s:.0f}s reached at step {step}/{total_steps}")
                if epoch_end:
                    epochs_done = epoch + 1
                    if self.val_fn is not None:
                        ddp_model.eval()
                        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                            val = self.val_fn(model)
                        row = {"step": step, "epoch": epoch + 1, "phase": "val", **val}
                        log.add(row)
                        n_epochs = max(1, math.ceil(total_steps / steps_per_epoch))
                        if (epoch + 1) % max(1, n_epochs // 8) == 0 or step >= total_steps or out_of_time:
                            self._say(f"[{self.description}] epoch {epoch + 1}: train loss {loss_sum / max(1, loss_n):.4f}, "
                                      + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                        if best_val is None or val["val_loss"] < best_val:
                            best_val, best_epoch = float(val["val_loss"]), epoch + 1
                            if ctx.is_main and self.on_best is not None:
                                self.on_best(model, epoch + 1, val)
                    save(step, epoch + 1)
            self.global_step = step
            if self.on_end is not None and ctx.is_main:
                self.on_end(model)
            barrier()
        finally:
            if progress is not None:
                progress.stop()
            log.close()
        return TrainResult(
            out_dir=self.out_dir,
            global_step=step,
            epochs_done=epochs_done,
            last_loss=last_loss,
            best_val=best_val,
            best_epoch=best_epoch,
            batch_size=global_batch,
            steps_per_epoch=steps_per_epoch,
            history=list(log.rows),
            seconds=time.perf_counter() - t0,
            stopped_early=out_of_time,
        )


def _fit_steps(step: int, start_step: int, elapsed: float, limit: float) -> int:
    """Planned total steps that fit ``limit`` seconds at the pace measured so far (5% margin)."""
    done = max(1, step - start_step)
    return step + int(max(0.0, limit - elapsed) * 0.95 * done / max(elapsed, 1e-6))


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def read_log(out_dir: str | Path) -> list[dict[str, str]]:
    """Rows of a run's CSV log."""
    with open(Path(out_dir) / LOG_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


__all__: Sequence[str] = [
    "CHECKPOINT",
    "LOG_CSV",
    "OptimSettings",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "LRFactor",
    "load_training_state",
    "save_training_state",
    "read_log",
]
