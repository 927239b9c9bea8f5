"""The registries of a study: SSL pretrainings (:data:`PRETRAININGS`) and arms (:data:`ARMS`),
the built-in arms, and the parsing of ``NAME[@RECIPE][:SEEDS]`` selections into the arms to run
(with the arms they need and are compared with)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import ConfigError, NonFiniteLoss, TrainingError
from .markers import UnitFailed

if TYPE_CHECKING:
    from .folder import Study


# ---------------------------------------------------------------------------------------------
# Registries: pretrainings and arms


@dataclass(frozen=True)
class Pretraining:
    """One SSL pretraining on the target's unlabeled frames; ``run(study, out_dir)`` returns the
    stage result (with ``.encoder_path``)."""

    name: str
    describe: str
    run: Callable[["Study", Path, int], Any]  # (study, out_dir, pretraining seed) -> stage result


def _pretrain_mim(study: "Study", out: Path, seed: int):
    from ..train.mim import pretrain_mim

    return pretrain_mim(study.target, out, study.run_options("mim", out, seed=seed))


def _pretrain_contrastive(gap: int | None, clustered: bool, lr: float | None = None):
    """A contrastive pretraining: ``gap`` None = the study's frame gap; ``clustered``: video-
    clustered batches; ``lr`` None = the preset's."""

    def run(study: "Study", out: Path, seed: int):
        from ..train.contrastive import pretrain_contrastive

        options = study.run_options("contrastive", out, seed=seed)
        if lr is not None:
            options = dataclasses.replace(options, lr=lr)
        return pretrain_contrastive(
            study.target, out, options, min_frame_gap=study.options.min_frame_gap if gap is None else gap,
            frames_per_video=study.budget.frames_per_video if clustered else 0, temperature=study.options.temperature,
        )

    return run


PRETRAININGS: dict[str, Pretraining] = {
    "mim": Pretraining("mim", "masked image modeling (token-aligned cells, ratio 0.6, 20 % speckle)", _pretrain_mim),
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
    >= the lower bound; ``fusion``: >= lower + 0.03 and <= the upper bound); ``controls``: arms it
    is also compared with (secondary comparisons: a fusion against the two-model ensemble of the
    lower bound, which separates ensembling from pretraining); ``seed_offset``: trains with seed +
    offset (a second model of the same arm and seed, e.g. the ensemble's other member).
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
    controls: tuple[str, ...] = ()
    seed_offset: int = 0


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


def _finetune_arm(*, site: str, augment: str | None = None):
    """Fine-tune on ``site``; ``augment`` None = the recipe's augmentation (the same for every arm)."""

    def train(study: "Study", run: ArmRun) -> dict[str, Any]:
        from ..train.finetune import finetune

        kind = ARMS[run.arm]
        init = study.encoder(kind.pretraining, run.seed) if kind.pretraining else None

        def run_it():
            return finetune(
                study.target if site == "target" else study.source, run.folder / "train",
                study.run_options("finetune", run.folder / "train"),
                init=init, recipe=run.recipe, seed=run.seed + kind.seed_offset, augment=augment,
                max_val_frames=study.budget.val_frames,
            )

        return _train_or_keep_best(run, "fine-tuning", run_it)

    return train


def _train_or_keep_best(run: ArmRun, what: str, run_it: Callable[[], Any]) -> dict[str, Any]:
    """Run one arm's training. A run whose loss turns non-finite stops there (the engine never
    updates the weights with it); its model is then the checkpoint the selection rule had kept
    from the validations before that step (lowest source-validation DiceBCE), and the facts
    record where it diverged, for the report. Without such a checkpoint the unit fails."""
    from ..models.weights import read_checkpoint
    from ..train.finetune import MODEL_FILE

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
                "best_val_dicebce": kept.get("best_val_dicebce"), "first_val_dice": kept.get("first_val_dice"),
                "did_not_train": kept.get("did_not_train")}
    if res.model_path is None:
        raise TrainingError(f"{run.folder}: {what} wrote no model")
    info = {"steps": res.global_step, "best_val_dicebce": res.best_val, "best_epoch": res.best_epoch,
            "last_loss": res.last_loss, "seconds": round(res.seconds, 1), "model": str(res.model_path),
            "first_val_dice": res.first_val_dice, "did_not_train": res.did_not_train}
    if getattr(res, "card", None) and "student" in res.card:
        info["student"] = res.card["student"]
    return info


def _segmenter_predictor(study: "Study", run: ArmRun) -> Callable:
    from ..models.weights import build_segmenter

    net, _ = build_segmenter(study.model_file(run), device=study.device)
    return net.predict


def _adabn_train(study: "Study", run: ArmRun) -> dict[str, Any]:
    from ..train.adabn import adabn_checkpoint

    base = study.arm_run("lower", run.recipe, run.seed)
    out = run.folder / "model.safetensors"
    card = adabn_checkpoint(study.model_file(base), study.target_site, out, max_frames=study.budget.adabn_frames,
                            device=str(study.device))
    return {"model": str(out), "adabn_frames": card["adabn"]["frames"]}


def _fused_predictor(generative: str, contrastive: str):
    """Entropy fusion of two arms of the same recipe and seed (the ensemble control fuses two
    lower-bound models the same way)."""
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
        from ..train.distill import distill

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
    # The control for every fusion: the same fusion head over two lower-bound models (seeds s and
    # s + 1000), so "fused beats lower" can be told apart from "any two models beat one".
    register_arm(ArmKind("lower_b", "source only, random init, seed + 1000 (the ensemble's second member)", seg,
                         _finetune_arm(site="source"), compare_to=None, seed_offset=1000))
    register_arm(ArmKind("ensemble", "entropy fusion of two lower-bound models (seeds s and s + 1000): the control "
                         "for the fused arms", _fused_predictor("lower", "lower_b"), needs=("lower", "lower_b"),
                         convergence_check=False, claim="control"))
    register_arm(ArmKind("fused", "entropy fusion of the MIM and contrastive arms (same seed)",
                         _fused_predictor("mim", "contrastive"), needs=("mim", "contrastive"), convergence_check=False,
                         claim="fusion", controls=("ensemble",)))
    register_arm(ArmKind("contrastive_uniform", "MT-NXent-pretrained encoder (uniform batches), source fine-tuning",
                         seg, _finetune_arm(site="source"), pretraining="contrastive_uniform", claim="branch"))
    register_arm(ArmKind("fused_uniform", "entropy fusion of the MIM and contrastive_uniform arms (same seed)",
                         _fused_predictor("mim", "contrastive_uniform"), needs=("mim", "contrastive_uniform"),
                         convergence_check=False, claim="fusion", controls=("ensemble",)))
    # Students: compared with their own teacher (the paired difference is student - teacher).
    register_arm(ArmKind("student", "mobilenetv3 student distilled from the fused arm (same seed and recipe)", seg,
                         _student_arm("mim", "contrastive"), needs=("mim", "contrastive"), compare_to="fused",
                         convergence_check=False, cost="distill"))
    register_arm(ArmKind("student_uniform", "mobilenetv3 student distilled from the fused_uniform arm (same seed and recipe)",
                         seg, _student_arm("mim", "contrastive_uniform"), needs=("mim", "contrastive_uniform"),
                         compare_to="fused_uniform", convergence_check=False, cost="distill"))
    register_arm(ArmKind("adabn", "lower bound with decoder BatchNorm statistics re-estimated on target frames", seg,
                         _adabn_train, needs=("lower",), convergence_check=False, cost=None))
    register_arm(ArmKind("intensity", "source only, random init, probe-agnostic intensity augmentation instead of the "
                         "recipe's", seg, _finetune_arm(site="source", augment="intensity")))
    register_arm(ArmKind("upper", "target labels (ub_split), random init (the upper bound)", seg,
                         _finetune_arm(site="target"), convergence_check=False))


_register_builtin_arms()


# ---------------------------------------------------------------------------------------------
# Choosing arms


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
    compared with (comparison arm and controls) added (in dependency order)."""
    from ..train.recipes import get_recipe

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
        for other, other_recipe in comparisons_of(name, recipe, default_recipe):
            add(other, other_recipe, n)
        order.append(ArmChoice(name, recipe, n))

    for c in chosen.values():
        add(c.arm, c.recipe, c.seeds)
    return order


def comparisons_of(arm: str, recipe: str, default_recipe: str) -> list[tuple[str, str]]:
    """Every (arm, recipe) an arm is compared with: its comparison arm, then its controls."""
    base = comparison_of(arm, recipe, default_recipe)
    return ([base] if base else []) + [(control, recipe) for control in ARMS[arm].controls]


def comparison_of(arm: str, recipe: str, default_recipe: str) -> tuple[str, str] | None:
    """(arm, recipe) an arm's paired difference is taken against: its kind's ``compare_to`` under
    the same recipe; the baseline under another recipe is compared with the study's baseline."""
    kind = ARMS[arm]
    if kind.compare_to is not None:
        return kind.compare_to, recipe
    if recipe != default_recipe:
        return arm, default_recipe
    return None
