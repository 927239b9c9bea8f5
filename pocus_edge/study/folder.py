"""A study folder and the two sites it reads: where each unit's files live, the models and
encoders finished units left, and the options of one training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrainingError
from .arms import ArmChoice, ArmRun, parse_arms
from .budgets import StudyOptions
from .markers import read_done


class Study:
    """A study folder and the sites it reads. Units: ``pretrain/NAME/seedP``, ``runs/ARM@RECIPE/seedS``
    (training) and ``eval/ARM@RECIPE/seedS`` (scores)."""

    def __init__(self, options: StudyOptions):
        from ..train.common import open_one_site
        from ..train.distributed import resolve_device

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

    def pretrain_seed(self, seed: int) -> int:
        """The pretraining run fine-tuning seed ``seed`` starts from: (seed - first seed) mod
        ``pretrain_seeds``, so consecutive seeds alternate between pretraining runs."""
        return (seed - self.options.first_seed) % self.options.pretrain_seeds

    def pretrain_folder(self, pretraining: str, pretrain_seed: int) -> Path:
        return self.out / "pretrain" / pretraining / f"seed{pretrain_seed}"

    def encoder(self, pretraining: str, seed: int) -> Path:
        """The encoder fine-tuning seed ``seed`` starts from."""
        folder = self.pretrain_folder(pretraining, self.pretrain_seed(seed))
        info = read_done(folder)
        if info is None:
            raise TrainingError(f"{folder}: pretraining {pretraining} has not run")
        return Path(info["encoder"])

    def run_options(self, kind: str, run_dir: Path, seed: int | None = None):
        """Options of one training: the budget's fixed steps; a killed run resumes from its
        checkpoint. ``seed`` None leaves the seed to the caller (fine-tuning passes its own)."""
        from ..train.common import RunOptions
        from ..train.engine import CHECKPOINT

        steps, batch = self.budget.steps(kind)
        return RunOptions(
            preset=self.options.preset, max_steps=steps, batch_size=batch, epochs=1_000_000, device=str(self.device),
            resume=(Path(run_dir) / CHECKPOINT).is_file(), num_workers=self.budget.workers, preload=self.budget.preload, progress=self.options.progress,
            tensorboard=False, overrides={"log_every": self.budget.log_every}, seed=seed,
        )

    def seeds_of(self, choice: ArmChoice) -> list[int]:
        return self.seeds[: choice.seeds]
