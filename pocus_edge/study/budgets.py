"""A study's settings: fixed step counts per stage kind (:data:`BUDGETS`), the options a run
depends on (:class:`StudyOptions`, read from a config file and the command line), and the
record in the study folder that keeps a rerun from mixing results made under other settings."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConfigError
from ..io import write_text_atomic

if TYPE_CHECKING:
    from .folder import Study

CONFIG = "study_config.yaml"
STAGE_KINDS = ("mim", "contrastive", "finetune", "distill")


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
    # 2-core CPU, small preset, about 5-6 CPU-hours for the default arms at 10 seeds: two
    # pretraining runs per method (benchmarks/notes/study_protocol_v2.md) at the cost of the
    # earlier single runs (1,200 + 1,600 steps), long enough that MIM passes its trivial
    # inpainting baseline and the contrastive loss leaves chance; fine-tuning 600 x 16 (3.5
    # passes over the study preset's 2,720 source frames) with checkpoint selection.
    # Distillation: as many steps as fine-tuning.
    "cpu": Budget("cpu", mim=(800, 32), contrastive=(1000, 32), finetune=(600, 16), distill=(600, 16)),
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
    # The primary comparison (fused vs lower) with its control (two lower-bound seeds through the
    # same fusion) and the two branches; the uniform-batch contrastive branch: on the bundled
    # simulator the video-clustered one (arms `contrastive`, `fused`) collapsed to a constant
    # embedding (benchmarks/notes/study_protocol.md).
    arms: Sequence[str] = ("lower", "mim", "contrastive_uniform", "fused_uniform", "ensemble")
    seeds: int = 10
    first_seed: int = 0
    # Pretraining runs per SSL method: fine-tuning seed s starts from pretraining seed
    # (s - first_seed) mod pretrain_seeds, so the seed-level interval includes pretraining's
    # run-to-run variance instead of resting on one pretraining run.
    pretrain_seeds: int = 2
    # The one primary comparison, decided before the run: this arm against its comparison arm
    # (the lower bound), tested alone at alpha 0.05 outside any multiple-comparison family.
    primary: str = "fused_uniform"
    budget: str = "cpu"
    recipe: str = "default"
    preset: str = "small"
    device: str = "auto"
    steps: dict[str, int] = field(default_factory=dict)
    min_frame_gap: int = 15
    temperature: float = 0.5  # MT-NXent's tau for the contrastive pretrainings
    bootstrap: int = 10_000
    progress: bool = True
    # A finished study's ``study.json`` (or a pilot's): its per-seed SDs of the paired differences
    # size this run in the estimate (seeds needed for 0.03 and 0.05 Dice at 80 % power).
    sd_from: str | None = None

    def protocol(self) -> dict[str, Any]:
        """The settings a finished unit's result depends on: a rerun must not change them."""
        budget = self.resolved_budget()
        return {"preset": self.preset, "recipe": self.recipe, "first_seed": self.first_seed,
                "min_frame_gap": self.min_frame_gap, "budget": dataclasses.asdict(budget),
                "pretrain_seeds": self.pretrain_seeds, "temperature": self.temperature}

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
# Reading the options, and recording them in the study folder


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
    if options.seeds < 1 or options.bootstrap < 100 or options.pretrain_seeds < 1:
        raise ConfigError("study needs --seeds >= 1, --pretrain-seeds >= 1 and at least 100 bootstrap draws")
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
