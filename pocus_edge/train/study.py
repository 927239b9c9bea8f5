"""`pocus-edge study`: does target-only SSL pretraining help on MY probe pair? The paper's
Table 3 protocol as a library function, with paired seeds and confidence intervals.

    run_study(StudyOptions(source="data/source", target="data/target", out="study"))

What it does (each step reads ONE site; only weights move between steps):

1. **Pretrains once per SSL pretraining** the selected arms need (MIM, contrastive MT-NXent with
   video-clustered batches, optionally SimCLR) on the target's unlabeled ``train`` frames.
2. **Fine-tunes every arm with K paired seeds**: seed s gives every arm the same decoder init
   and the same data order, so arm differences are paired within a seed.
3. **Evaluates every (arm, seed) per target test patient**: Dice, IoU, HD95 and average surface
   distance per image, averaged per patient; plus Dice on the source validation frames (a
   convergence check).
4. **Reports** (:mod:`.study_report`): per arm the mean with a 95 % hierarchical-bootstrap CI
   (seeds, then patients); each arm's paired difference to its comparison arm with a Holm-level
   CI and a verdict (helps / hurts / inconclusive); a figure of the per-seed differences.

Arms come from a registry (:data:`ARMS`): a new arm plugs in with :func:`register_arm` without
touching the loop. The ``student`` arms distil a compact student from the same seed's fused
teacher (:mod:`.distill`) and are compared with that teacher, so their paired difference is
student minus teacher. ``NAME@RECIPE`` runs an arm with another recipe
(compared with ``lower@RECIPE``), ``NAME:K`` on the first K seeds only.

Everything is resumable: a finished unit (pretraining, training or evaluation of one arm and
seed) leaves ``done.json`` and is skipped on a rerun; a killed training resumes from its
checkpoint. Processes started on the same folder share its units (each is claimed with a lock
on its folder and starts once its inputs are done). Steps are FIXED counts, never wall-clock
budgets, so a busy machine changes the duration, not the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from ..errors import ConfigError, NonFiniteLoss, TrainingError
from ..io import write_json_atomic, write_text_atomic

DONE = "done.json"
FAILED = "failed.json"
CONFIG = "study_config.yaml"
STAGE_KINDS = ("mim", "contrastive", "finetune", "distill")


class UnitFailed(TrainingError):
    """A unit ended without a result to score, as a possible outcome of the method (a training
    that diverged before its first validation), not as a fault of the data or the setup. The study
    records it and goes on; the comparisons that need it use the seeds that have one."""

    def __init__(self, message: str, **facts: Any):
        super().__init__(message)
        self.facts = facts


# ---------------------------------------------------------------------------------------------
# Budgets: fixed step counts per stage kind


@dataclass(frozen=True)
class Budget:
    """Planned (steps, global batch) per stage kind and the evaluation settings of a study.
    ``distill``: the student arms' distillation (global batch of target frames; the source batch
    is the same)."""

    name: str
    mim: tuple[int, int]
    contrastive: tuple[int, int]
    finetune: tuple[int, int]
    distill: tuple[int, int]
    frames_per_video: int = 4  # contrastive batches: k frames of each sampled video
    val_frames: int | None = 256  # source-validation frames scored per epoch (evenly spaced)
    adabn_frames: int | None = 1024
    workers: int = 0
    preload: bool = True
    log_every: int = 25

    def steps(self, kind: str) -> tuple[int, int]:
        return getattr(self, kind)


BUDGETS: dict[str, Budget] = {
    # Checks the pipeline end to end in a minute (tiny preset); numbers meaningless.
    "smoke": Budget("smoke", mim=(4, 8), contrastive=(4, 8), finetune=(6, 8), distill=(6, 8), frames_per_video=2,
                    val_frames=16,
                    adabn_frames=64, log_every=2),
    # 2-core CPU, small preset, about 4 CPU-hours for the default arms: pretraining long enough
    # that MIM trains and the contrastive loss leaves chance (it escapes after ~200-300 steps,
    # benchmarks/notes/contrastive_plateau.md); fine-tuning as long as the pilot that measured a
    # seed-to-seed spread of ~0.06 Dice in the paired difference, with checkpoint selection.
    # Distillation: as many steps as fine-tuning.
    "cpu": Budget("cpu", mim=(1200, 32), contrastive=(1600, 32), finetune=(600, 16), distill=(600, 16)),
    # One H100/H200, small preset: the 2x2 factorial of benchmarks/gpu_run.sh (random vs MIM init
    # x two recipes x 3 seeds) in about 5 minutes.
    "gpu": Budget("gpu", mim=(2000, 128), contrastive=(2000, 128), finetune=(1000, 32), distill=(1000, 32),
                  frames_per_video=8,
                  val_frames=None, adabn_frames=None, workers=8, log_every=100),
}


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class StudyOptions:
    """Everything a study run depends on. ``arms``: registry names with optional ``@RECIPE``
    and ``:SEEDS`` (e.g. ``mim@paper:2``); ``steps``: per-kind step overrides of the budget."""

    source: str | Path
    target: str | Path
    out: str | Path
    # The uniform-batch contrastive branch by default: on the bundled simulator the video-clustered
    # one (arms `contrastive`, `fused`) collapsed to a constant embedding (benchmarks/notes/study_protocol.md).
    arms: Sequence[str] = ("lower", "mim", "contrastive_uniform", "fused_uniform", "adabn", "intensity", "upper",
                           "lower@paper:2", "mim@paper:2")
    seeds: int = 5
    first_seed: int = 0
    budget: str = "cpu"
    recipe: str = "default"
    preset: str = "small"
    device: str = "auto"
    steps: dict[str, int] = field(default_factory=dict)
    min_frame_gap: int = 15
    bootstrap: int = 10_000
    progress: bool = True

    def protocol(self) -> dict[str, Any]:
        """The settings a finished unit's result depends on: a rerun must not change them."""
        budget = self.resolved_budget()
        return {"preset": self.preset, "recipe": self.recipe, "first_seed": self.first_seed,
                "min_frame_gap": self.min_frame_gap, "budget": dataclasses.asdict(budget)}

    def resolved_budget(self) -> Budget:
        if self.budget not in BUDGETS:
            raise ConfigError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        budget = BUDGETS[self.budget]
        changes = {}
        for kind, steps in (self.steps or {}).items():
            if kind not in STAGE_KINDS:
                raise ConfigError(f"--steps {kind}={steps}: kind must be one of {', '.join(STAGE_KINDS)}")
            if int(steps) < 1:
                raise ConfigError(f"--steps {kind}={steps}: must be >= 1")
            changes[kind] = (int(steps), budget.steps(kind)[1])
        return dataclasses.replace(budget, **changes)


# ---------------------------------------------------------------------------------------------
# Registries: pretrainings and arms


@dataclass(frozen=True)
class Pretraining:
    """One SSL pretraining on the target's unlabeled frames; ``run(study, out_dir)`` returns the
    stage result (with ``.encoder_path``)."""

    name: str
    describe: str
    run: Callable[["Study", Path], Any]


def _pretrain_mim(study: "Study", out: Path):
    from .mim import pretrain_mim

    return pretrain_mim(study.target, out, study.run_options("mim", out))


def _pretrain_contrastive(gap: int | None, clustered: bool, lr: float | None = None):
    """A contrastive pretraining: ``gap`` None = the study's frame gap; ``clustered``: video-
    clustered batches; ``lr`` None = the preset's."""

    def run(study: "Study", out: Path):
        from .contrastive import pretrain_contrastive

        options = study.run_options("contrastive", out)
        if lr is not None:
            options = dataclasses.replace(options, lr=lr)
        return pretrain_contrastive(
            study.target, out, options, min_frame_gap=study.options.min_frame_gap if gap is None else gap,
            frames_per_video=study.budget.frames_per_video if clustered else 0,
        )

    return run


PRETRAININGS: dict[str, Pretraining] = {
    "mim": Pretraining("mim", "masked image modeling (7x7 grid, ratio 0.6, 20 % speckle)", _pretrain_mim),
    "contrastive": Pretraining("contrastive", "MT-NXent (frame gap 15, tau 0.5), video-clustered batches",
                               _pretrain_contrastive(None, clustered=True)),
    "simclr": Pretraining("simclr", "NT-Xent (no temporal mask), uniform batches", _pretrain_contrastive(0, False)),
    # The released code's batches: drawn uniformly, so the temporal mask removes almost nothing. At
    # lr 3e-4: on the simulator's `small` preset, lr 1e-4 left the loss at chance for 500+ steps
    # where 3e-4 left it after ~250 (benchmarks/notes/study_protocol.md, amendment 2).
    "contrastive_uniform": Pretraining("contrastive_uniform", "MT-NXent (frame gap 15, tau 0.5), uniform batches, lr 3e-4",
                                       _pretrain_contrastive(None, clustered=False, lr=3e-4)),
}


@dataclass(frozen=True)
class ArmKind:
    """How one arm is trained and scored.

    ``train(study, run)`` makes the arm's model for one seed under ``run.folder`` and returns a
    dict of facts for the report (None: the arm has nothing to train). ``predictor(study, run)``
    returns a function from a float batch (N, 3, S, S) to probabilities (N, 1, S, S).
    ``pretraining``: the :data:`PRETRAININGS` entry it starts from; ``needs``: other arms (same
    recipe and seed) it is built from; ``compare_to``: the arm its paired difference is taken
    against (None: it is the baseline); ``convergence_check``: whether it trains on the source,
    so its source-validation Dice should match its comparison arm's; ``cost``: the stage kind
    whose measured step time prices its training for the estimate (None: about one evaluation);
    ``claim``: which of the method's claims the report checks for it (``branch``: an SSL branch
    >= the lower bound; ``fusion``: >= lower + 0.03 and <= the upper bound).
    """

    name: str
    describe: str
    predictor: Callable[["Study", "ArmRun"], Callable]
    train: Callable[["Study", "ArmRun"], dict[str, Any] | None] | None = None
    pretraining: str | None = None
    needs: tuple[str, ...] = ()
    compare_to: str | None = "lower"
    convergence_check: bool = True
    cost: str | None = "finetune"
    claim: str | None = None


ARMS: dict[str, ArmKind] = {}


def register_arm(kind: ArmKind) -> ArmKind:
    """Add (or replace) an arm in the registry; returns it."""
    for dep in kind.needs:
        if dep not in ARMS and dep != kind.name:
            raise ConfigError(f"arm {kind.name!r} needs arm {dep!r}, which is not registered")
    if kind.pretraining is not None and kind.pretraining not in PRETRAININGS:
        raise ConfigError(f"arm {kind.name!r} starts from unknown pretraining {kind.pretraining!r}")
    ARMS[kind.name] = kind
    return kind


@dataclass(frozen=True)
class ArmRun:
    """One arm under one recipe with one seed; its files live in ``folder``."""

    arm: str
    recipe: str
    seed: int
    folder: Path

    @property
    def key(self) -> str:
        return f"{self.arm}@{self.recipe}"


# -- arm implementations ----------------------------------------------------------------------


def _finetune_arm(*, site: str, augment: str = "none"):
    def train(study: "Study", run: ArmRun) -> dict[str, Any]:
        from .finetune import finetune

        kind = ARMS[run.arm]
        init = study.encoder(kind.pretraining) if kind.pretraining else None
        def run_it():
            return finetune(
                study.target if site == "target" else study.source, run.folder / "train",
                study.run_options("finetune", run.folder / "train"),
                init=init, recipe=run.recipe, seed=run.seed, augment=augment, max_val_frames=study.budget.val_frames,
            )

        return _train_or_keep_best(run, "fine-tuning", run_it)

    return train


def _train_or_keep_best(run: ArmRun, what: str, run_it: Callable[[], Any]) -> dict[str, Any]:
    """Run one arm's training. A run whose loss turns non-finite stops there (the engine never
    updates the weights with it); its model is then the checkpoint the selection rule had kept
    from the validations before that step (lowest source-validation DiceBCE), and the facts
    record where it diverged, for the report. Without such a checkpoint the unit fails."""
    from ..models.weights import read_checkpoint
    from .finetune import MODEL_FILE

    try:
        res = run_it()
    except NonFiniteLoss as exc:
        model = run.folder / "train" / MODEL_FILE
        if not model.is_file():
            raise UnitFailed(f"{run.folder}: {what} diverged at step {exc.step} before its first validation: {exc}",
                             diverged_at_step=exc.step) from None
        kept = read_checkpoint(model)[1].get("hyperparameters", {})
        return {"steps": exc.step - 1, "diverged_at_step": exc.step, "diverged": str(exc), "model": str(model),
                "best_epoch": kept.get("best_epoch"), "best_step": kept.get("best_step"),
                "best_val_dicebce": kept.get("best_val_dicebce")}
    if res.model_path is None:
        raise TrainingError(f"{run.folder}: {what} wrote no model")
    info = {"steps": res.global_step, "best_val_dicebce": res.best_val, "best_epoch": res.best_epoch,
            "last_loss": res.last_loss, "seconds": round(res.seconds, 1), "model": str(res.model_path)}
    if getattr(res, "card", None) and "student" in res.card:
        info["student"] = res.card["student"]
    return info


def _segmenter_predictor(study: "Study", run: ArmRun) -> Callable:
    from ..models.weights import build_segmenter

    net, _ = build_segmenter(study.model_file(run), device=study.device)
    return net.predict


def _adabn_train(study: "Study", run: ArmRun) -> dict[str, Any]:
    from .adabn import adabn_checkpoint

    base = study.arm_run("lower", run.recipe, run.seed)
    out = run.folder / "model.safetensors"
    card = adabn_checkpoint(study.model_file(base), study.target_site, out, max_frames=study.budget.adabn_frames,
                            device=str(study.device))
    return {"model": str(out), "adabn_frames": card["adabn"]["frames"]}


def _fused_predictor(generative: str, contrastive: str):
    def predictor(study: "Study", run: ArmRun) -> Callable:
        from ..models.fusion import fuse

        g = _segmenter_predictor(study, study.arm_run(generative, run.recipe, run.seed))
        c = _segmenter_predictor(study, study.arm_run(contrastive, run.recipe, run.seed))
        # Per-image confidence normalization: a frame's output never depends on its batch mates.
        return lambda x: fuse(g(x), c(x), method="entropy", norm="image")

    return predictor


def _student_arm(generative: str, contrastive: str):
    """Distil the default student from the fused teacher of the same recipe and seed (the
    ``generative`` and ``contrastive`` arms' models)."""

    def train(study: "Study", run: ArmRun) -> dict[str, Any]:
        from .distill import distill

        teacher = [study.model_file(study.arm_run(arm, run.recipe, run.seed)) for arm in (generative, contrastive)]
        def run_it():
            return distill(*teacher, study.target, study.source, run.folder / "train",
                           study.run_options("distill", run.folder / "train"), seed=run.seed,
                           max_val_frames=study.budget.val_frames)

        info = _train_or_keep_best(run, "distillation", run_it)
        return {**info, "teachers": [str(p) for p in teacher]}

    return train


def _register_builtin_arms() -> None:
    seg = _segmenter_predictor
    register_arm(ArmKind("lower", "source only, random init (the lower bound)", seg, _finetune_arm(site="source"),
                         compare_to=None))
    register_arm(ArmKind("mim", "MIM-pretrained encoder, source fine-tuning", seg, _finetune_arm(site="source"),
                         pretraining="mim", claim="branch"))
    register_arm(ArmKind("contrastive", "MT-NXent-pretrained encoder (video-clustered batches), source fine-tuning",
                         seg, _finetune_arm(site="source"), pretraining="contrastive", claim="branch"))
    register_arm(ArmKind("simclr", "SimCLR-pretrained encoder, source fine-tuning", seg, _finetune_arm(site="source"),
                         pretraining="simclr", claim="branch"))
    register_arm(ArmKind("fused", "entropy fusion of the MIM and contrastive arms (same seed)",
                         _fused_predictor("mim", "contrastive"), needs=("mim", "contrastive"), convergence_check=False,
                         claim="fusion"))
    register_arm(ArmKind("contrastive_uniform", "MT-NXent-pretrained encoder (uniform batches), source fine-tuning",
                         seg, _finetune_arm(site="source"), pretraining="contrastive_uniform", claim="branch"))
    register_arm(ArmKind("fused_uniform", "entropy fusion of the MIM and contrastive_uniform arms (same seed)",
                         _fused_predictor("mim", "contrastive_uniform"), needs=("mim", "contrastive_uniform"),
                         convergence_check=False, claim="fusion"))
    # Students: compared with their own teacher (the paired difference is student - teacher).
    register_arm(ArmKind("student", "mobilenetv3 student distilled from the fused arm (same seed and recipe)", seg,
                         _student_arm("mim", "contrastive"), needs=("mim", "contrastive"), compare_to="fused",
                         convergence_check=False, cost="distill"))
    register_arm(ArmKind("student_uniform", "mobilenetv3 student distilled from the fused_uniform arm (same seed and recipe)",
                         seg, _student_arm("mim", "contrastive_uniform"), needs=("mim", "contrastive_uniform"),
                         compare_to="fused_uniform", convergence_check=False, cost="distill"))
    register_arm(ArmKind("adabn", "lower bound with decoder BatchNorm statistics re-estimated on target frames", seg,
                         _adabn_train, needs=("lower",), convergence_check=False, cost=None))
    register_arm(ArmKind("intensity", "source only, random init, probe-agnostic intensity augmentation", seg,
                         _finetune_arm(site="source", augment="intensity")))
    register_arm(ArmKind("upper", "target labels (ub_split), random init (the upper bound)", seg,
                         _finetune_arm(site="target"), convergence_check=False))


_register_builtin_arms()


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class ArmChoice:
    arm: str
    recipe: str
    seeds: int

    @property
    def key(self) -> str:
        return f"{self.arm}@{self.recipe}"


def parse_arms(items: Sequence[str], default_recipe: str, seeds: int) -> list[ArmChoice]:
    """``NAME[@RECIPE][:SEEDS]`` items -> choices, with the arms they need and the arms they are
    compared with added (in dependency order)."""
    from .recipes import get_recipe

    chosen: dict[str, ArmChoice] = {}
    for item in items:
        text = item.strip()
        if not text:
            continue
        name_recipe, _, n = text.partition(":")
        name, _, recipe = name_recipe.partition("@")
        recipe = recipe or default_recipe
        if name not in ARMS:
            raise ConfigError(f"unknown arm {name!r}; registered: {', '.join(ARMS)}")
        get_recipe(recipe)
        if n and (not n.isdigit() or not 1 <= int(n) <= seeds):
            raise ConfigError(f"arm {text!r}: seeds after ':' must be 1..{seeds}")
        choice = ArmChoice(name, recipe, int(n) if n else seeds)
        if choice.key in chosen:
            raise ConfigError(f"arm {choice.key} is listed twice")
        chosen[choice.key] = choice
    if not chosen:
        raise ConfigError("no arms selected")
    order: list[ArmChoice] = []

    def add(name: str, recipe: str, n: int) -> None:
        key = f"{name}@{recipe}"
        existing = next((c for c in order if c.key == key), None)
        if existing is not None:
            if existing.seeds < n:
                order[order.index(existing)] = dataclasses.replace(existing, seeds=n)
            return
        kind = ARMS[name]
        for dep in kind.needs:
            add(dep, recipe, n)
        base = comparison_of(name, recipe, default_recipe)
        if base is not None:
            add(base[0], base[1], n)
        order.append(ArmChoice(name, recipe, n))

    for c in chosen.values():
        add(c.arm, c.recipe, c.seeds)
    return order


def comparison_of(arm: str, recipe: str, default_recipe: str) -> tuple[str, str] | None:
    """(arm, recipe) an arm's paired difference is taken against: its kind's ``compare_to`` under
    the same recipe; the baseline under another recipe is compared with the study's baseline."""
    kind = ARMS[arm]
    if kind.compare_to is not None:
        return kind.compare_to, recipe
    if recipe != default_recipe:
        return arm, default_recipe
    return None


# ---------------------------------------------------------------------------------------------
# The study


class Study:
    """A study folder and the sites it reads. Units: ``pretrain/NAME``, ``runs/ARM@RECIPE/seedS``
    (training) and ``eval/ARM@RECIPE/seedS`` (scores)."""

    def __init__(self, options: StudyOptions):
        from .common import open_one_site
        from .distributed import resolve_device

        self.options = options
        self.budget = options.resolved_budget()
        self.out = Path(options.out)
        self.source, self.target = Path(options.source), Path(options.target)
        self.source_site = open_one_site(self.source, what="study --source", check_images=True)
        self.target_site = open_one_site(self.target, what="study --target", check_images=True)
        if self.source_site.root.resolve() == self.target_site.root.resolve():
            raise ConfigError(f"{self.source}: --source and --target are the same site")
        self.device = resolve_device(options.device)
        self.choices = parse_arms(options.arms, options.recipe, options.seeds)
        self.seeds = [options.first_seed + k for k in range(options.seeds)]
        self._frames: dict[str, Any] = {}

    # -- paths and options --------------------------------------------------------------------

    def arm_run(self, arm: str, recipe: str, seed: int) -> ArmRun:
        return ArmRun(arm, recipe, seed, self.out / "runs" / f"{arm}@{recipe}" / f"seed{seed}")

    def eval_folder(self, run: ArmRun) -> Path:
        return self.out / "eval" / run.key / f"seed{run.seed}"

    def model_file(self, run: ArmRun) -> Path:
        info = read_done(run.folder)
        if info is None or not info.get("model"):
            raise TrainingError(f"{run.folder}: arm {run.key} seed {run.seed} has not been trained")
        return Path(info["model"])

    def encoder(self, pretraining: str) -> Path:
        info = read_done(self.out / "pretrain" / pretraining)
        if info is None:
            raise TrainingError(f"{self.out / 'pretrain' / pretraining}: pretraining {pretraining} has not run")
        return Path(info["encoder"])

    def run_options(self, kind: str, run_dir: Path):
        """Options of one training: the budget's fixed steps; a killed run resumes from its
        checkpoint."""
        from .common import RunOptions
        from .engine import CHECKPOINT

        steps, batch = self.budget.steps(kind)
        return RunOptions(
            preset=self.options.preset, max_steps=steps, batch_size=batch, epochs=1_000_000, device=str(self.device),
            resume=(Path(run_dir) / CHECKPOINT).is_file(), num_workers=self.budget.workers, preload=self.budget.preload, progress=self.options.progress,
            tensorboard=False, overrides={"log_every": self.budget.log_every},
        )

    def seeds_of(self, choice: ArmChoice) -> list[int]:
        return self.seeds[: choice.seeds]


def _read_marker(folder: Path, name: str) -> dict[str, Any] | None:
    """A unit's JSON marker, or None if it is missing or damaged (then the unit runs again)."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_done(folder: Path) -> dict[str, Any] | None:
    return _read_marker(folder, DONE)


def mark_done(folder: Path, info: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / DONE, info)


def read_failed(folder: Path) -> dict[str, Any] | None:
    """The record of a unit that failed (:class:`UnitFailed`, or an input that failed); a rerun
    skips it. Deleting ``failed.json`` makes the next run try the unit again."""
    return _read_marker(folder, FAILED)


def mark_failed(folder: Path, info: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / FAILED, info)


# ---------------------------------------------------------------------------------------------
# Units


@dataclass
class Unit:
    """One resumable piece of work, with its planned cost for the estimate and the display."""

    kind: str  # pretrain | train | eval
    label: str
    folder: Path
    work: Callable[[], dict[str, Any]]
    cost_s: float = 0.0
    after: tuple[Path, ...] = ()  # folders of the units that must be done before this one

    def done(self) -> bool:
        return read_done(self.folder) is not None

    def failed(self) -> bool:
        return read_failed(self.folder) is not None

    def finished(self) -> bool:
        """Done, or failed for good: nothing left to run."""
        return self.done() or self.failed()

    def ready(self) -> bool:
        return all(read_done(folder) is not None for folder in self.after)

    def failed_inputs(self) -> list[Path]:
        return [folder for folder in self.after if read_failed(folder) is not None]


def plan_units(study: Study, pace: "Pace") -> list[Unit]:
    """Pretrainings first; then, seed by seed, each arm's training and evaluation (so an
    interrupted study already holds complete seeds)."""
    units: list[Unit] = []
    needed = [c for c in study.choices if ARMS[c.arm].pretraining]
    for name in dict.fromkeys(ARMS[c.arm].pretraining for c in needed):
        kind = "mim" if name == "mim" else "contrastive"
        folder = study.out / "pretrain" / name
        units.append(Unit("pretrain", f"pretrain {name}", folder, _pretrain_work(study, name, folder),
                          pace.stage_seconds(kind, study.budget)))
    for seed in study.seeds:
        for choice in study.choices:
            if seed not in study.seeds_of(choice):
                continue
            run = study.arm_run(choice.arm, choice.recipe, seed)
            kind = ARMS[choice.arm]
            built_from = tuple(study.arm_run(dep, choice.recipe, seed).folder for dep in kind.needs
                               if ARMS[dep].train is not None)
            if kind.train is not None:
                cost = pace.stage_seconds(kind.cost, study.budget) if kind.cost else pace.eval_s
                pretrained = (study.out / "pretrain" / kind.pretraining,) if kind.pretraining else ()
                units.append(Unit("train", f"train {choice.key} seed {seed}", run.folder,
                                  _train_work(study, run), cost, after=pretrained + built_from))
            units.append(Unit("eval", f"evaluate {choice.key} seed {seed}", study.eval_folder(run),
                              _eval_work(study, run), pace.eval_s * _networks_scored(kind),
                              after=(run.folder,) if kind.train is not None else built_from))
    return units


def _networks_scored(kind: ArmKind) -> int:
    """How many networks an arm's evaluation runs: an arm with nothing to train predicts with the
    arms it needs (a fusion runs both branches), every other arm with its own model."""
    return max(1, len(kind.needs)) if kind.train is None else 1


def _pretrain_work(study: Study, name: str, folder: Path) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        t0 = time.perf_counter()
        res = PRETRAININGS[name].run(study, folder / "train")
        if res.encoder_path is None:
            raise TrainingError(f"{folder}: pretraining {name} wrote no encoder")
        return {"encoder": str(res.encoder_path), "steps": res.global_step, "last_loss": res.last_loss,
                "loss_curve": _loss_curve(res.history), "extras": res.extras,
                "seconds": round(time.perf_counter() - t0, 1)}

    return work


def _loss_curve(history: list[dict[str, Any]]) -> list[list[float]]:
    return [[int(r["step"]), float(r["loss"])] for r in history if r.get("phase") == "train"]


def _train_work(study: Study, run: ArmRun) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        t0 = time.perf_counter()
        info = ARMS[run.arm].train(study, run) or {}
        return {**info, "arm": run.arm, "recipe": run.recipe, "seed": run.seed,
                "seconds": round(time.perf_counter() - t0, 1)}

    return work


def _eval_work(study: Study, run: ArmRun) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        from .study_report import score_arm

        t0 = time.perf_counter()
        n = score_arm(study, run, study.eval_folder(run) / "per_image.csv")
        return {"arm": run.arm, "recipe": run.recipe, "seed": run.seed, "images": n,
                "seconds": round(time.perf_counter() - t0, 1)}

    return work


# ---------------------------------------------------------------------------------------------
# Time estimate: measured steps on this machine, times the planned steps


@dataclass
class Pace:
    """Seconds per optimizer step of each stage kind and per evaluated arm, measured here."""

    step_s: dict[str, float]
    forward_s_per_frame: float
    eval_s: float

    def stage_seconds(self, kind: str, budget: Budget) -> float:
        steps, _ = budget.steps(kind)
        seconds = steps * self.step_s.get(kind, 0.0)
        if kind in ("finetune", "distill") and budget.val_frames:
            seconds += 8 * budget.val_frames * self.forward_s_per_frame  # ~8 validations per run
        return seconds


def measure_pace(study: Study, repeats: int = 3) -> Pace:
    """Time a few optimizer steps of each stage kind on random inputs of the planned batch sizes
    (after one warm-up step) and a forward pass; no data is read. The fastest repeat is kept: on a
    busy machine it is the closest to what an idle one gives."""
    import torch

    from ..config import model_preset
    from ..models.heads import ContrastiveModel, MIMModel
    from ..models.transunet import TransUNet
    from .common import stage_defaults
    from .mim import resolve_mask_cell

    cfg = model_preset(study.options.preset)
    size, dev = cfg.img_size, study.device
    step_s: dict[str, float] = {}
    for kind in ("mim", "contrastive", "finetune"):
        _, batch = study.budget.steps(kind)
        torch.manual_seed(0)
        if kind == "mim":
            model = MIMModel(cfg, resolve_mask_cell(size, stage_defaults("mim", study.options.preset))).to(dev)
            x = torch.rand(batch, 3, size, size, device=dev)
            mask, speckle = model.mask_generator(batch, device=dev)
            loss_of = lambda: model(x, mask, speckle)[0]  # noqa: E731
        elif kind == "contrastive":
            model = ContrastiveModel(cfg).to(dev)
            x = torch.rand(2 * batch, 3, size, size, device=dev)
            loss_of = lambda: model(x).sum()  # noqa: E731
        else:
            model = TransUNet(cfg).to(dev)
            x = torch.rand(batch, 3, size, size, device=dev)
            loss_of = lambda: model(x).sigmoid().mean()  # noqa: E731
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss_of().backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_s[kind] = float(min(times[1:]))
    # A distillation step (the student on target + source frames, the teacher cached) is priced
    # like a fine-tuning step.
    step_s["distill"] = step_s["finetune"]
    net = TransUNet(cfg).to(dev).eval()
    x = torch.rand(32, 3, size, size, device=dev)
    with torch.no_grad():
        net(x)
        forward = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            forward = min(forward, (time.perf_counter() - t0) / 32)
    frames = len(study.target_site.select("test", labeled=True)) + (study.budget.val_frames or 256)
    # Boundary metrics cost about as much as the forward pass on small frames.
    return Pace(step_s, forward, frames * forward * 2.0 + 2.0)


def format_estimate(units: list[Unit], pace: Pace) -> str:
    todo = [u for u in units if not u.finished()]
    by_kind: dict[str, list[Unit]] = {}
    for u in todo:
        by_kind.setdefault(u.kind, []).append(u)
    lines = [f"measured here: {', '.join(f'{k} {v * 1000:.0f} ms/step' for k, v in pace.step_s.items())}, "
             f"forward {pace.forward_s_per_frame * 1000:.1f} ms/frame"]
    for kind, group in by_kind.items():
        lines.append(f"  {len(group):3d} {kind} unit(s): ~{sum(u.cost_s for u in group) / 60:.0f} min")
    total = sum(u.cost_s for u in todo)
    skipped = len(units) - len(todo)
    lines.append(f"estimate: ~{total / 3600:.1f} h on this machine if it is otherwise idle"
                 + (f" ({skipped} finished unit(s) skipped)" if skipped else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class StudyResult:
    out: Path
    report_md: Path | None
    report_json: Path | None
    figure: Path | None
    summary: dict[str, Any] | None
    units_run: int
    units_total: int


def options_record(options: StudyOptions) -> dict[str, Any]:
    """The options as plain data (what ``--config`` reads back)."""
    out = {}
    for f in dataclasses.fields(options):
        v = getattr(options, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def study_options(config: str | Path | None = None, **given: Any) -> StudyOptions:
    """StudyOptions from a YAML config file (top-level option names, or the ``options`` section of
    a study's own ``study_config.yaml``) and explicit values (not None) that win over it.
    ``steps`` may be a list of ``KIND=N`` items; ``arms`` a comma-separated string."""
    import yaml

    data: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (IsADirectoryError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: not a YAML config file ({str(exc).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a study config is a mapping of option names")
        data = dict(loaded.get("options", loaded))
        known = {f.name for f in dataclasses.fields(StudyOptions)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data.update({k: v for k, v in given.items() if v is not None})
    if isinstance(data.get("arms"), str):
        data["arms"] = tuple(a.strip() for a in data["arms"].split(",") if a.strip())
    if isinstance(data.get("steps"), (list, tuple)):
        data["steps"] = _parse_steps(data["steps"])
    missing = [k for k in ("source", "target", "out") if not data.get(k)]
    if missing:
        raise ConfigError(f"study needs {', '.join('--' + m for m in missing)} (on the command line or in --config)")
    try:
        options = StudyOptions(**data)
    except TypeError as exc:
        raise ConfigError(f"study options: {exc}") from None
    if options.seeds < 1 or options.bootstrap < 100:
        raise ConfigError("study needs --seeds >= 1 and at least 100 bootstrap draws")
    options.resolved_budget()  # refuse a bad budget or step override before any work
    return options


def _parse_steps(items: Sequence[str]) -> dict[str, int]:
    steps: dict[str, int] = {}
    for item in items:
        kind, _, value = str(item).partition("=")
        if not value.strip().isdigit():
            raise ConfigError(f"--steps {item!r}: expected KIND=N, e.g. contrastive=2000")
        steps[kind.strip()] = int(value)
    return steps


def check_protocol(study: Study) -> None:
    """Record the resolved options on the first run (``study_config.yaml``, usable as
    ``--config``); refuse a rerun that would mix results made under other settings (arms and
    seeds may be added)."""
    import yaml

    path = study.out / CONFIG
    current = study.options.protocol()
    if path.is_file():
        try:
            recorded = (yaml.safe_load(path.read_text()) or {}).get("protocol")
        except yaml.YAMLError:
            recorded = None
        comparable = _as_recorded(json.loads(json.dumps(current)), recorded)
        if recorded is not None and json.loads(json.dumps(recorded)) != comparable:
            changed = sorted(k for k in comparable if recorded.get(k) != comparable[k])
            raise ConfigError(f"{path}: this study folder was run with other settings ({', '.join(changed)}); "
                              "use another --out or the recorded settings")
    record = {"options": options_record(study.options), "protocol": current}
    write_text_atomic(path, yaml.safe_dump(json.loads(json.dumps(record)), sort_keys=False))


def _as_recorded(current: dict[str, Any], recorded: dict[str, Any] | None) -> dict[str, Any]:
    """``current`` without the budget entries a study folder's record predates (a stage kind
    added to the budgets later, e.g. ``distill``): units made before it cannot depend on it."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("budget"), dict):
        return current
    budget = {k: v for k, v in current.get("budget", {}).items() if k in recorded["budget"] or k not in NEW_BUDGET_KINDS}
    return {**current, "budget": budget}


# Budget entries added after studies were first recorded (absent from older study_config.yaml).
NEW_BUDGET_KINDS = ("distill",)


def run_study(options: StudyOptions, *, say: Callable[[str], None] | None = None, estimate_only: bool = False,
              report_only: bool = False) -> StudyResult:
    """Run (or resume) a study and write its report; see the module docstring."""
    from .study_report import write_report

    say = say or (lambda text: print(text, flush=True))
    study = Study(options)
    study.out.mkdir(parents=True, exist_ok=True)
    if not report_only:
        check_protocol(study)
    say(f"study {study.out}: arms {', '.join(c.key + (f':{c.seeds}' if c.seeds != options.seeds else '') for c in study.choices)}; "
        f"seeds {study.seeds}; preset {options.preset}; budget {study.budget.name} "
        f"(mim {study.budget.mim[0]}x{study.budget.mim[1]}, contrastive {study.budget.contrastive[0]}x"
        f"{study.budget.contrastive[1]}, finetune {study.budget.finetune[0]}x{study.budget.finetune[1]}, distill "
        f"{study.budget.distill[0]}x{study.budget.distill[1]}); device {study.device}")
    pace = measure_pace(study) if not report_only else Pace(dict.fromkeys(STAGE_KINDS, 0.0), 0, 0)
    units = plan_units(study, pace)
    if not report_only:
        say(format_estimate(units, pace))
    ran = 0
    if not (estimate_only or report_only):
        ran = _run_units(units, say)
    if estimate_only:
        return StudyResult(study.out, None, None, None, None, 0, len(units))
    md, js, fig, summary = write_report(study, say=say)
    return StudyResult(study.out, md, js, fig, summary, ran, len(units))


def _run_units(units: list[Unit], say: Callable[[str], None], poll_s: float = 15.0) -> int:
    """Run every unit not yet done, in plan order, each as soon as the units it is built from
    are done. Several processes may work on one study folder at once (e.g. one per core, each
    with one thread): a unit is claimed with an exclusive lock on its folder, so each runs
    exactly once, and a process whose next units wait on another's work polls until they can
    start. A lock dies with its process, so a killed unit is picked up again by the next run.

    A unit that raises :class:`UnitFailed` is recorded as failed (``failed.json``), and so is
    every unit built from it; the others go on, and reruns skip them. Any other error stops the
    run (bad data or settings would fail every unit alike)."""
    t_start = time.perf_counter()
    ran = 0
    waiting_on: str | None = None
    while True:
        pending = [(i, u) for i, u in enumerate(units, 1) if not u.finished()]
        if not pending:
            return ran
        for i, unit in pending:
            lost = unit.failed_inputs()
            if not lost and not unit.ready():
                continue
            with _claim(unit.folder) as mine:
                if not mine or unit.finished():
                    continue
                if lost:
                    reason = f"not run: it needs {', '.join(str(f) for f in lost)}, which failed"
                    mark_failed(unit.folder, {"reason": reason, "inputs_failed": [str(f) for f in lost]})
                    say(f"[{i}/{len(units)}] {unit.label}: {reason}")
                    break
                left = sum(u.cost_s for _, u in pending)
                eta = f", ~{left / 60:.0f} min of planned work left" if left else ""
                say(f"[{i}/{len(units)}] {unit.label}{eta}")
                t0 = time.perf_counter()
                try:
                    info = unit.work()
                except UnitFailed as exc:
                    mark_failed(unit.folder, {"reason": str(exc), **exc.facts,
                                              "seconds": round(time.perf_counter() - t0, 1)})
                    say(f"[{i}/{len(units)}] {unit.label}: FAILED, recorded in {unit.folder / FAILED} "
                        f"(the comparisons that need it use the other seeds): {exc}")
                    break
                mark_done(unit.folder, info)
                ran += 1
                say(f"[{i}/{len(units)}] {unit.label}: done in {time.perf_counter() - t0:.0f} s "
                    f"({(time.perf_counter() - t_start) / 60:.0f} min so far)")
            waiting_on = None
            break
        else:  # nothing could start: every remaining unit is held, or waits on one held, by another process
            busy = [u.label for _, u in pending if _claimed_elsewhere(u.folder)]
            if not busy:
                blocked = pending[0][1]
                raise TrainingError(f"{blocked.folder}: {blocked.label} waits for "
                                    f"{', '.join(str(f) for f in blocked.after if read_done(f) is None)}, which no process is making")
            if waiting_on != busy[0]:
                say(f"waiting for another process: {'; '.join(busy)}")
                waiting_on = busy[0]
            time.sleep(poll_s)


LOCK = ".claim"


@contextlib.contextmanager
def _claim(folder: Path):
    """Yield True while this process holds the unit's exclusive lock, False if another holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # no advisory locks here: one process per study folder
        yield True
        return
    with open(folder / LOCK, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _claimed_elsewhere(folder: Path) -> bool:
    if fcntl is None or not (Path(folder) / LOCK).is_file():
        return False
    with _claim(folder) as mine:
        return not mine


__all__ = [
    "ARMS",
    "ArmKind",
    "ArmRun",
    "BUDGETS",
    "Budget",
    "PRETRAININGS",
    "Pretraining",
    "Study",
    "StudyOptions",
    "StudyResult",
    "UnitFailed",
    "parse_arms",
    "register_arm",
    "run_study",
    "study_options",
]
