"""A study's units (pretrainings, then per seed each arm's training and evaluation), the folders
each waits for, and the work each runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import TrainingError
from .arms import ARMS, PRETRAININGS, ArmKind, ArmRun
from .folder import Study
from .markers import read_done, read_failed
from .scoring import score_arm

if TYPE_CHECKING:
    from .pace import Pace


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
    used = sorted({study.pretrain_seed(s) for s in study.seeds})
    for name in dict.fromkeys(ARMS[c.arm].pretraining for c in needed):
        kind = "mim" if name == "mim" else "contrastive"
        for pseed in used:
            folder = study.pretrain_folder(name, pseed)
            units.append(Unit("pretrain", f"pretrain {name} seed {pseed}", folder,
                              _pretrain_work(study, name, folder, pseed), pace.stage_seconds(kind, study.budget)))
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
                pretrained = ((study.pretrain_folder(kind.pretraining, study.pretrain_seed(seed)),)
                              if kind.pretraining else ())
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


def _pretrain_work(study: Study, name: str, folder: Path, seed: int) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        t0 = time.perf_counter()
        res = PRETRAININGS[name].run(study, folder / "train", seed)
        if res.encoder_path is None:
            raise TrainingError(f"{folder}: pretraining {name} wrote no encoder")
        return {"encoder": str(res.encoder_path), "seed": seed, "steps": res.global_step, "last_loss": res.last_loss,
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
        t0 = time.perf_counter()
        n = score_arm(study, run, study.eval_folder(run) / "per_image.csv")
        return {"arm": run.arm, "recipe": run.recipe, "seed": run.seed, "images": n,
                "seconds": round(time.perf_counter() - t0, 1)}

    return work
