"""`study`: does target-only SSL pretraining help on this probe pair? (the Table 3 protocol with
paired seeds, seed-level tests and verdicts)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .options import DEVICE_HELP, Budget, Preset, Recipe, complete_device


def register(app: typer.Typer) -> None:
    @app.command("study")
    def study(
        source: Optional[Path] = typer.Option(None, "--source", metavar="SITE", help="The labeled SOURCE site (e.g. OUT/source)."),
        target: Optional[Path] = typer.Option(None, "--target", metavar="SITE", help="The TARGET site: unlabeled train frames for pretraining, labeled test frames for scoring."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study folder: pretrain/, runs/, eval/, study.md, study.json, study.png. A rerun resumes."),
        arms: Optional[str] = typer.Option(
            None, "--arms",
            help="Comma-separated arms, each NAME, NAME@RECIPE, NAME:SEEDS or NAME@RECIPE:SEEDS; names: lower, mim, contrastive, simclr, fused, adabn, intensity, "
            "upper, student (a mobilenetv3 distilled from fused, compared with it), contrastive_uniform, fused_uniform, "
            "student_uniform, lower_b, ensemble (the fusion head over two lower-bound models: the control of every "
            "fused arm) (default: lower,mim,contrastive_uniform,fused_uniform,ensemble). "
            "Arms an arm needs or is compared with (its comparison arm and controls) are added.",
        ),
        seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Paired fine-tuning seeds per arm (default 10; fewer than 6 can never reach p < 0.05)."),
        pretrain_seeds: Optional[int] = typer.Option(None, "--pretrain-seeds", min=1, help="Pretraining runs per SSL method; seed s fine-tunes from run s mod N (default 2)."),
        primary: Optional[str] = typer.Option(
            None, "--primary", metavar="ARM",
            help="The one primary comparison, decided before the run: this arm against its comparison arm (default fused_uniform).",
        ),
        temperature: Optional[float] = typer.Option(None, "--temperature", min=0.01, help="MT-NXent temperature of the contrastive pretrainings (default 0.5)."),
        sd_from: Optional[Path] = typer.Option(
            None, "--sd-from", metavar="STUDY_JSON",
            help="With --estimate: size the run from an earlier study.json (seeds needed for 0.03 and 0.05 Dice at 80 % "
            "power, this run's minimal detectable effect).",
        ),
        budget: Optional[Budget] = typer.Option(None, "--budget", help="Fixed step counts: cpu (default), gpu, smoke (pipeline check)."),
        recipe: Optional[Recipe] = typer.Option(None, "--recipe", help="Fine-tuning recipe of the arms that name none: default | paper."),
        preset: Optional[Preset] = typer.Option(None, "--preset", help="Model preset: small (default), tiny, paper."),
        steps: Optional[List[str]] = typer.Option(None, "--steps", metavar="KIND=N", help="Override the budget's steps: mim=N, contrastive=N, finetune=N, distill=N (repeatable)."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP, autocompletion=complete_device),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML with any of these options (source, target, out, arms, seeds, ...); command-line options win."),
        estimate: bool = typer.Option(False, "--estimate", help="Print the plan and the time estimate, then stop."),
        report_only: bool = typer.Option(False, "--report-only", help="Write the report from the finished units, train nothing."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars of each training."),
    ) -> None:
        """Pretrain each SSL method on the TARGET's unlabeled frames (--pretrain-seeds runs), fine-tune every arm on
        the SOURCE with paired seeds, score every arm per target test patient (Dice, IoU, HD95, ASD), and test at the
        level of training seeds: the primary comparison by an exact sign-flip test with a t-interval and its minimal
        detectable effect, secondary comparisons Holm-corrected (under 10 seeds: underpowered, no verdict); verdicts
        helps / hurts / inconclusive. Resumable; processes started on the same --out share its units (e.g. one per
        core). Prints a time estimate first. See docs/study.md."""
        from ..study import run_study, study_options

        options = study_options(
            config, source=source, target=target, out=out, arms=arms, seeds=seeds, budget=budget, recipe=recipe,
            preset=preset, steps=steps, device=device, progress=progress, pretrain_seeds=pretrain_seeds, primary=primary,
            temperature=temperature, sd_from=str(sd_from) if sd_from is not None else None,
        )
        result = run_study(options, say=typer.echo, estimate_only=estimate, report_only=report_only)
        if result.report_md is not None:
            typer.echo(f"study report -> {result.report_md}")
