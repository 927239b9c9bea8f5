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
weights, so the last checkpoint on disk stays the last good one. A failed write (full disk,
read-only folder: ``OSError`` or safetensors' ``SafetensorError``) raises a one-line
TrainingError naming the file and leaves the previous file intact.

Stages plug in through small pieces: :class:`OptimSettings` (optimizer, parameter groups from
:mod:`.recipes`), a sampler factory (e.g. :class:`.sampler.VideoClusteredSampler`),
:class:`Hooks` (validation, best/end callbacks), an optional :class:`Companion` (a second
dataset in its own loader, e.g. labeled source frames beside unlabeled target frames) and the
shared :class:`.common.RunOptions`.
``Trainer.fit`` is a short loop over named steps: prepare, train an epoch (step, time budget,
progress), end of epoch (validation, checkpoint), finish.
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
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..config import TrainConfig
from ..errors import ConfigError, NonFiniteLoss, TrainingError
from ..io import atomic_path, write_text_atomic
from .distributed import (
    DistContext,
    all_ranks_true,
    all_reduce_mean,
    barrier,
    convert_batchnorm,
)
from .recipes import ParamGroup, parameter_groups

CHECKPOINT = "checkpoint.safetensors"
CONFIG_FILE = "config.yaml"
LOG_CSV = "log.csv"
TB_DIR = "tensorboard"
_TRAINER_KEY = "pocus_edge_trainer"
OPTIMIZERS = ("adamw", "adam", "sgd")
# The pre-declared "did not train" rule of every supervised stage (fine-tuning, baselines,
# distillation): thresholded source-validation Dice below this at the FIRST validation. A network
# caught in the all-background regime predicts empty masks from the start (Dice ~0.002) while its
# DiceBCE keeps falling, so the checkpoint rule alone cannot see it.
DID_NOT_TRAIN_DICE = 0.1
SCHEDULES = ("cosine", "constant")


@dataclass
class OptimSettings:
    """Stage hyperparameters the engine needs. ``batch_size`` is the GLOBAL batch (all processes).
    ``groups(model)`` splits the parameters into :class:`ParamGroup` s (lr scale, weight decay,
    LP-FT hold); by default the one optimizer rule of :func:`.recipes.parameter_groups` (no decay
    on norms, biases, position embeddings and tokens unless ``decay_all_parameters``)."""

    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    momentum: float = 0.9
    groups: Callable[[nn.Module], list[ParamGroup]] | None = None
    decay_all_parameters: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        if self.groups is not None:
            return self.groups(model)
        return parameter_groups(model, weight_decay=self.weight_decay, decay_all_parameters=self.decay_all_parameters)


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
    # Mean over this process's steps of the extra values a loss function reported (e.g. the
    # contrastive stage's share of masked negatives).
    extras: dict[str, float] = field(default_factory=dict)
    # Source-validation Dice at the first validation and the "did not train" flag
    # (:data:`DID_NOT_TRAIN_DICE`); None for stages without a Dice validation.
    first_val_dice: float | None = None
    did_not_train: bool | None = None


def build_optimizer(groups: Sequence[ParamGroup], s: OptimSettings) -> torch.optim.Optimizer:
    torch_groups = [{"params": g.params, "lr": s.lr * g.lr_scale, "weight_decay": g.weight_decay, "name": g.name,
                     "hold_steps": g.hold_steps} for g in groups if g.params]
    if s.optimizer == "adamw":
        return torch.optim.AdamW(torch_groups, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        # Adam with L2 weight decay, as the released contrastive code.
        return torch.optim.Adam(torch_groups, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(torch_groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


class LRFactor:
    """Multiplier of a group's base LR at a step: 0 for ``hold_steps`` (LP-FT), linear warm-up,
    then cosine to 0 or constant. Plain attributes only: LambdaLR saves them in checkpoints."""

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int, hold_steps: int = 0):
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.schedule, self.total, self.warmup = schedule, max(1, total_steps), max(0, warmup_steps)
        self.hold = max(0, hold_steps)

    def __call__(self, step: int) -> float:
        if step < self.hold:
            return 0.0
        if step - self.hold < self.warmup:
            return (step - self.hold + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    return max(cfg.warmup_epochs * steps_per_epoch, int(round(cfg.warmup_fraction * total_steps)))


def batch_plan(n_frames: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """(global batch actually used, per-process batch). The global batch is clamped to the
    dataset size (a tiny site) and must split evenly over the processes."""
    global_batch = batch_size
    if global_batch > n_frames:
        global_batch = max(world_size, (n_frames // world_size) * world_size)
    if global_batch % world_size:
        raise ConfigError(f"global batch size {global_batch} does not split evenly over {world_size} processes")
    if n_frames < world_size:
        raise TrainingError(f"{n_frames} training frame(s) cannot feed {world_size} processes")
    return global_batch, global_batch // world_size


class _EpochSampler(Sampler):
    """Yields ``(index, epoch)`` keys of a per-rank sampler's epoch (a DistributedSampler or any
    sampler with ``set_epoch``), minus the first ``skip`` (resuming in the middle of an epoch).
    Carrying the epoch in the key lets persistent DataLoader workers, which hold their own
    dataset copy, seed each sample by epoch."""

    def __init__(self, sampler: Sampler):
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
# Writing files: one error contract


T = TypeVar("T")


def write_or_fail(path: Path, what: str, write: Callable[[], T]) -> T:
    """Run ``write`` (an atomic write of ``path``); a full disk or read-only folder becomes one
    TrainingError line naming the file. The atomic write left no partial file behind."""
    from safetensors import SafetensorError

    try:
        return write()
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        kept = f"the previous {what} is intact" if Path(path).exists() else f"no {what} was written"
        raise TrainingError(f"{path}: could not write the {what} ({reason}); {kept}") from None


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

    def write() -> None:
        with atomic_path(path) as tmp:
            _write_safetensors(tensors, tmp, {_TRAINER_KEY: json.dumps(meta, default=str)})

    write_or_fail(path, "checkpoint", write)


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
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    except ValueError as exc:  # another number or size of parameter groups (another recipe)
        raise TrainingError(f"{path}: its optimizer state does not fit this run ({exc}); was it made with another recipe?") from None
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
        write_or_fail(self.path, "training log", lambda: write_text_atomic(self.path, buf.getvalue()))
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.writer is not None:
                self.writer.close()


class _Progress:
    """A rich progress bar on a terminal; otherwise a log line every ``log_every`` steps."""

    def __init__(self, enabled: bool, description: str, total: int, start: int):
        self.bar = None
        self.task = None
        self.lines = enabled
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if console.is_terminal:
            self.bar = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console,
                                transient=False)
            self.task = self.bar.add_task(description, total=total, completed=start, status="")
            self.bar.start()
            self.lines = False

    def update(self, step: int, total: int, status: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, total=total, status=status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------


LossFn = Callable[[nn.Module, Any], Any]  # -> loss tensor, or (loss tensor, {name: float})
SamplerFactory = Callable[[Dataset, DistContext, int], Sampler]  # (dataset, ctx, seed) -> per-rank sampler


def uniform_sampler(dataset: Dataset, ctx: DistContext, seed: int) -> Sampler:
    """Frames in a fresh random order every epoch (the released code's batches), split over ranks."""
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                              drop_last=True)


@dataclass
class RunState:
    """Where a run stands; handed to the hooks."""

    global_batch: int
    local_batch: int
    steps_per_epoch: int
    total_steps: int
    planned_steps: int
    step: int = 0
    start_step: int = 0  # where this process started (a resumed run: the checkpoint's step)
    epoch: int = 0
    epochs_done: int = 0
    last_loss: float = float("nan")
    best_val: float | None = None
    best_epoch: int | None = None
    out_of_time: bool = False
    t0: float = 0.0
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0
    extras_sum: dict[str, float] = field(default_factory=dict)
    extras_n: int = 0
    first_val_dice: float | None = None  # source-validation Dice at the run's first validation

    @property
    def did_not_train(self) -> bool | None:
        """The "did not train" flag (:data:`DID_NOT_TRAIN_DICE`); None before a validation with Dice."""
        return None if self.first_val_dice is None else bool(self.first_val_dice < DID_NOT_TRAIN_DICE)

    def train_check(self) -> dict[str, Any]:
        """The flag and the figure it rests on, for model cards and study records."""
        return {"first_val_dice": self.first_val_dice, "did_not_train": self.did_not_train}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


@dataclass
class Hooks:
    """Stage callbacks. ``val_fn(model)`` runs at each epoch end on the unwrapped model in eval
    mode and returns ``{"val_loss": float, ...}``; ``on_best(model, state, val)`` is called on
    rank 0 when ``val_loss`` improves, ``on_end(model, state)`` after the last step, and
    ``on_step(step, loss)`` after every optimizer step (tests use it to simulate a kill)."""

    val_fn: Callable[[nn.Module], dict[str, float]] | None = None
    on_best: Callable[[nn.Module, RunState, dict[str, float]], None] | None = None
    on_end: Callable[[nn.Module, RunState], None] | None = None
    on_step: Callable[[int, float], None] | None = None


@dataclass
class Companion:
    """A second training dataset read beside the main one, through its own sampler and loader
    (two sites are never pooled into one dataset). Each step's batch becomes ``(main batch,
    companion batch)``. ``batch_size`` is its GLOBAL batch. Its batch at global step ``s`` is a
    function of ``s`` and the seed alone (its own epochs, its own fresh order each epoch), so a
    resumed run draws exactly what an uninterrupted one does."""

    dataset: Dataset
    batch_size: int
    sampler: SamplerFactory | None = None
    collate_fn: Callable | None = None


class _CompanionStream:
    """Batches of a :class:`Companion` by global step (restarting its loader where a resumed run
    or a new companion epoch begins)."""

    def __init__(self, companion: Companion, ctx: DistContext, cfg: TrainConfig):
        self.dataset = companion.dataset
        self.global_batch, self.local_batch = batch_plan(len(companion.dataset), companion.batch_size, ctx.world_size)
        self.sampler = _EpochSampler((companion.sampler or uniform_sampler)(companion.dataset, ctx, cfg.seed))
        self.steps_per_epoch = len(self.sampler.sampler) // self.local_batch
        if self.steps_per_epoch < 1:
            raise TrainingError(f"{len(companion.dataset)} companion frame(s) give no full batch of {self.global_batch}")
        generator = torch.Generator()
        generator.manual_seed(cfg.seed)
        self.loader = DataLoader(
            companion.dataset, batch_size=self.local_batch, sampler=self.sampler, drop_last=True,
            num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
            generator=generator, collate_fn=companion.collate_fn, prefetch_factor=4 if cfg.num_workers > 0 else None,
        )
        self._batches: Iterator[Any] | None = None
        self._next_step = -1

    def batch(self, step: int) -> Any:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if self._batches is None or step != self._next_step or offset == 0:
            self.sampler.start(epoch, offset * self.local_batch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            self._batches = iter(self.loader)
        self._next_step = step + 1
        return next(self._batches)


class Trainer:
    """Runs one stage. ``loss_fn(model, batch)`` gets the (possibly DDP-wrapped) model and a batch
    already on the device and returns this process's objective (see ``distributed`` for the
    gradient bookkeeping), optionally with a dict of extra values to log. ``config_record`` (the
    resolved configs) is written to ``RUN/config.yaml``. With a ``companion``, the batch is
    ``(main batch, companion batch)``."""

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
        options: Any = None,
        hooks: Hooks | None = None,
        description: str = "train",
        collate_fn: Callable | None = None,
        sampler: SamplerFactory | None = None,
        config_record: dict[str, Any] | None = None,
        companion: Companion | None = None,
    ):
        from .common import RunOptions

        self.model = model
        self.loss_fn = loss_fn
        self.dataset = train_dataset
        self.out_dir = Path(out_dir)
        self.optim = optim
        self.cfg = train
        self.ctx = ctx
        self.options = options if options is not None else RunOptions()
        self.hooks = hooks or Hooks(on_step=self.options.on_step)
        if self.hooks.on_step is None:
            self.hooks.on_step = self.options.on_step
        self.description = description
        self.collate_fn = collate_fn
        self.sampler_factory = sampler or uniform_sampler
        self.config_record = config_record
        self.companion = companion
        self._companion_stream: _CompanionStream | None = None
        self.global_step = 0
        self.global_batch, self.local_batch = batch_plan(len(train_dataset), optim.batch_size, ctx.world_size)

    def _say(self, text: str) -> None:
        if self.ctx.is_main:
            print(text, file=sys.stderr, flush=True)

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        state = self._prepare()
        try:
            while state.step < state.total_steps and not state.out_of_time:
                self._train_epoch(state)
                self._end_of_epoch(state)
            self._finish(state)
        finally:
            self._progress.close()
            self._log.close()
        return self._result(state)

    # -- prepare ----------------------------------------------------------------------------

    def _prepare(self) -> RunState:
        self._check_out_dir()
        self._place_model()
        self.optimizer = build_optimizer(self.optim.param_groups(self.model), self.optim)
        if self.global_batch != self.optim.batch_size:
            self._say(f"note: batch size {self.optim.batch_size} > {len(self.dataset)} training frames; using {self.global_batch}")
        state = self._plan()
        self._restore_or_seed(state)
        self._write_config()
        self.ddp_model = self.model
        if self.ctx.distributed:
            device = self.ctx.device
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self._log = _RunLog(self.out_dir, self.ctx.is_main, self.options.tensorboard, state.step)
        self._make_loader()
        if self.companion is not None:
            self._companion_stream = _CompanionStream(self.companion, self.ctx, self.cfg)
        self._progress = _Progress(self.options.progress and self.ctx.is_main, self.description, state.total_steps,
                                   state.step)
        state.epochs_done = state.step // state.steps_per_epoch
        state.start_step = state.step
        state.t0 = time.perf_counter()
        return state

    def _check_out_dir(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise TrainingError(f"{self.out_dir}: is a file; --out must be a folder for the run")
        if self.ctx.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrainingError(f"{self.out_dir}: cannot create the run folder ({exc.strerror or exc})") from None
        if (self.out_dir / CHECKPOINT).exists() and not self.options.resume:
            raise TrainingError(
                f"{self.out_dir}: already holds a training run ({CHECKPOINT}); pass --resume to continue it or choose another --out"
            )

    def _place_model(self) -> None:
        device = self.ctx.device
        if self.cfg.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        if self.ctx.distributed:
            self.model = convert_batchnorm(self.model, device)
        self.model = self.model.to(device)
        if device.type == "cuda":
            # Speed over bit-reproducibility on GPUs (CPU runs stay exact).
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _plan(self) -> RunState:
        self.sampler = self.sampler_factory(self.dataset, self.ctx, self.cfg.seed)
        steps_per_epoch = len(self.sampler) // self.local_batch
        if steps_per_epoch < 1:
            raise TrainingError(f"{len(self.dataset)} training frame(s) give no full batch of {self.global_batch}")
        total = self.optim.epochs * steps_per_epoch
        if self.cfg.max_steps is not None:
            total = min(total, int(self.cfg.max_steps))
        warmup = warmup_steps(self.cfg, steps_per_epoch, total)
        holds = [g.get("hold_steps", 0) for g in self.optimizer.param_groups]
        self.lr_factors = [LRFactor(self.cfg.schedule, total, warmup, hold) for hold in holds]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self.lr_factors if len(self.lr_factors) > 1 else self.lr_factors[0]
        )
        return RunState(self.global_batch, self.local_batch, steps_per_epoch, total, total)

    def _restore_or_seed(self, state: RunState) -> None:
        ckpt_path = self.out_dir / CHECKPOINT
        if self.options.resume and ckpt_path.exists():
            meta = load_training_state(ckpt_path, self.model, self.optimizer, self.scheduler)
            state.step = int(meta["global_step"])
            state.best_val, state.best_epoch = meta.get("best_val"), meta.get("best_epoch")
            state.first_val_dice = meta.get("first_val_dice")
            self._say(f"resuming {ckpt_path} at step {state.step}")
            return
        if self.options.resume:
            self._say(f"note: --resume given but {ckpt_path} does not exist; starting a new run")
        # Dropout streams differ per rank but are fixed by the seed (the model's init was seeded by
        # the stage before it was built, identically on every rank). A --resume without a
        # checkpoint seeds exactly like a fresh run.
        from ..data.datasets import sample_seed

        torch.manual_seed(sample_seed(self.cfg.seed, 0, self.ctx.rank, "engine"))

    def _write_config(self) -> None:
        if self.config_record is None or not self.ctx.is_main:
            return
        import yaml

        path = self.out_dir / CONFIG_FILE
        text = yaml.safe_dump(self.config_record, sort_keys=False)
        write_or_fail(path, "run config", lambda: write_text_atomic(path, text))

    def _make_loader(self) -> None:
        cfg, device = self.cfg, self.ctx.device
        loader_gen = torch.Generator()  # keeps DataLoader seeding off the global RNG (exact resume)
        loader_gen.manual_seed(cfg.seed)
        self._epoch_sampler = _EpochSampler(self.sampler)
        self._loader = DataLoader(
            self.dataset,
            batch_size=self.local_batch,
            sampler=self._epoch_sampler,
            drop_last=True,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,  # no worker start-up cost per epoch
            generator=loader_gen,
            collate_fn=self.collate_fn,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
        )

    def _epoch_batches(self, epoch: int, skip_batches: int) -> DataLoader:
        self._epoch_sampler.start(epoch, skip_batches * self.local_batch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self._loader

    # -- one epoch --------------------------------------------------------------------------

    def _train_epoch(self, state: RunState) -> None:
        spe = state.steps_per_epoch
        state.epoch = state.step // spe
        skip = state.step - state.epoch * spe
        self.ddp_model.train()
        state.epoch_loss_sum, state.epoch_loss_n = 0.0, 0
        for batch in self._epoch_batches(state.epoch, skip):
            self._step(state, batch)
            epoch_end = state.step % spe == 0
            self._time_budget(state, epoch_end)
            if state.step >= state.total_steps or epoch_end or state.out_of_time:
                break
            if self.options.checkpoint_every and state.step % self.options.checkpoint_every == 0:
                self._save(state, state.epoch)

    def _step(self, state: RunState, batch: Any) -> None:
        device = self.ctx.device
        if self._companion_stream is not None:
            batch = (batch, self._companion_stream.batch(state.step))
        batch = _to_device(batch, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self._use_amp()):
            loss, extras = _split_loss(self.loss_fn(self.ddp_model, batch))
        loss = loss.float()
        reported = all_reduce_mean(loss.detach())
        if not all_ranks_true(bool(torch.isfinite(loss).item()), device):
            self._stop_non_finite(state, loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.cfg.grad_clip))
        self.optimizer.step()
        lr_now = max(g["lr"] for g in self.optimizer.param_groups)
        self.scheduler.step()
        state.step += 1
        state.last_loss = float(reported.item())
        state.epoch_loss_sum += state.last_loss
        state.epoch_loss_n += 1
        for k, v in extras.items():
            state.extras_sum[k] = state.extras_sum.get(k, 0.0) + float(v)
        state.extras_n += 1 if extras else 0
        self._report_step(state, lr_now, extras)
        if self.hooks.on_step is not None:
            self.hooks.on_step(state.step, state.last_loss)

    def _use_amp(self) -> bool:
        return bool(self.cfg.amp) and self.ctx.device.type == "cuda"

    def _stop_non_finite(self, state: RunState, loss: torch.Tensor) -> None:
        ckpt_path = self.out_dir / CHECKPOINT
        kept = f"last good checkpoint kept: {ckpt_path}" if ckpt_path.exists() else "no checkpoint had been written yet"
        raise NonFiniteLoss(
            f"{self.description}: loss became {loss.item()} at step {state.step + 1} (epoch {state.epoch + 1}); "
            f"stopped before updating the weights; {kept} (try a lower learning rate)",
            step=state.step + 1,
        )

    def _report_step(self, state: RunState, lr_now: float, extras: dict[str, float]) -> None:
        if state.step % max(1, self.cfg.log_every) == 0 or state.step == state.total_steps:
            self._log.add({"step": state.step, "epoch": state.epoch + 1, "phase": "train", "loss": state.last_loss,
                           "lr": lr_now, **{k: float(v) for k, v in extras.items()},
                           "elapsed_s": round(state.elapsed(), 3)})
            if self._progress.lines:
                self._say(f"[{self.description}] step {state.step}/{state.total_steps} epoch {state.epoch + 1} "
                          f"loss {state.last_loss:.4f} lr {lr_now:.2e} {state.elapsed():.0f}s")
        self._progress.update(state.step, state.total_steps, f"ep {state.epoch + 1} loss {state.last_loss:.4f}")

    def _time_budget(self, state: RunState, epoch_end: bool) -> None:
        """With ``time_limit_s``: stop when over time (every rank votes) and re-fit the planned
        steps to the measured pace, so a cosine schedule still anneals within the limit."""
        limit = self.options.time_limit_s
        if limit is None:
            return
        device = self.ctx.device
        over = state.elapsed() > limit
        state.out_of_time = not all_ranks_true(not over, device)
        done = state.step - state.start_step
        if (done in (5, 10, 20) or done % 25 == 0 or epoch_end) and not state.out_of_time:
            new_total = _fit_steps(state.step, state.start_step, state.elapsed(), limit)
            new_total = int(all_reduce_mean(torch.tensor(float(new_total), device=device)).item())
            state.total_steps = min(state.planned_steps, max(state.step + 1, new_total))
            for factor in self.lr_factors:
                factor.total = max(1, state.total_steps)

    # -- end of an epoch, end of the run ----------------------------------------------------

    def _end_of_epoch(self, state: RunState) -> None:
        epoch_end = state.step % state.steps_per_epoch == 0 or state.step >= state.total_steps or state.out_of_time
        if state.out_of_time:
            self._say(f"[{self.description}] time limit {self.options.time_limit_s:.0f}s reached at step "
                      f"{state.step}/{state.total_steps}")
        if not epoch_end:
            return
        state.epochs_done = state.epoch + 1
        if self.hooks.val_fn is not None:
            self._validate(state)
        self._save(state, state.epoch + 1)

    def _validate(self, state: RunState) -> None:
        device = self.ctx.device
        self.ddp_model.eval()
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self._use_amp()):
            val = self.hooks.val_fn(self.model)
        self._log.add({"step": state.step, "epoch": state.epoch + 1, "phase": "val", **val})
        if state.first_val_dice is None and "val_dice" in val:
            state.first_val_dice = float(val["val_dice"])
            if state.did_not_train:
                self._say(f"[{self.description}] DID NOT TRAIN: source-validation Dice {state.first_val_dice:.4f} < "
                          f"{DID_NOT_TRAIN_DICE} at the first validation (step {state.step}); the model predicts "
                          "(almost) empty masks. The run goes on and its card records the flag.")
        n_epochs = max(1, math.ceil(state.total_steps / state.steps_per_epoch))
        if (state.epoch + 1) % max(1, n_epochs // 8) == 0 or state.step >= state.total_steps or state.out_of_time:
            self._say(f"[{self.description}] epoch {state.epoch + 1}: train loss "
                      f"{state.epoch_loss_sum / max(1, state.epoch_loss_n):.4f}, "
                      + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if state.best_val is None or val["val_loss"] < state.best_val:
            state.best_val, state.best_epoch = float(val["val_loss"]), state.epoch + 1
            if self.ctx.is_main and self.hooks.on_best is not None:
                self.hooks.on_best(self.model, state, val)

    def _save(self, state: RunState, epoch: int) -> None:
        if self.ctx.is_main:
            save_training_state(
                self.out_dir / CHECKPOINT, self.model, self.optimizer, self.scheduler,
                {"global_step": state.step, "epoch": epoch, "best_val": state.best_val, "best_epoch": state.best_epoch,
                 "total_steps": state.total_steps, "batch_size": state.global_batch,
                 "first_val_dice": state.first_val_dice},
            )
            self._log.flush()
        barrier()

    def _finish(self, state: RunState) -> None:
        self.global_step = state.step
        if self.hooks.on_end is not None and self.ctx.is_main:
            self.hooks.on_end(self.model, state)
        barrier()

    def _result(self, state: RunState) -> TrainResult:
        extras = {k: v / max(1, state.extras_n) for k, v in state.extras_sum.items()}
        return TrainResult(
            out_dir=self.out_dir, global_step=state.step, epochs_done=state.epochs_done, last_loss=state.last_loss,
            best_val=state.best_val, best_epoch=state.best_epoch, batch_size=state.global_batch,
            steps_per_epoch=state.steps_per_epoch, history=list(self._log.rows), seconds=state.elapsed(),
            stopped_early=state.out_of_time, extras=extras, first_val_dice=state.first_val_dice,
            did_not_train=state.did_not_train,
        )


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple):
        loss, extras = out
        return loss, dict(extras)
    return out, {}


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


__all__: Sequence[str] = [
    "CHECKPOINT",
    "CONFIG_FILE",
    "Companion",
    "LOG_CSV",
    "Hooks",
    "RunState",
    "batch_plan",
    "uniform_sampler",
    "write_or_fail",
    "OptimSettings",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "LRFactor",
    "load_training_state",
    "save_training_state",
]
