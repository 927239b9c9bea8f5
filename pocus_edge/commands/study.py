"""`study`: does target-only SSL pretraining help on this probe pair? (the Table 3 protocol with
paired seeds, per-patient bootstrap CIs and verdicts)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("study")
    def study(
        source: Optional[Path] = typer.Option(None, "--source", metavar="SITE", help="The labeled SOURCE site (e.g. OUT/source)."),
        target: Optional[Path] = typer.Option(None, "--target", metavar="SITE", help="The TARGET site: unlabeled train frames for pretraining, labeled test frames for scoring."),
        out: Optional[Path] = typer.Option(None, "--out", help="Study folder: pretrain/, runs/, eval/, study.md, study.json, study.png. A rerun resumes."),
        arms: Optional[str] = typer.Option(
            None, "--arms",
            help="Comma-separated arms, each NAME, NAME@RECIPE, NAME:SEEDS or NAME@RECIPE:SEEDS; names: lower, mim, contrastive, simclr, fused, adabn, intensity, "
            "upper, student (a mobilenetv3 distilled from fused, compared with it), contrastive_uniform, fused_uniform, "
            "student_uniform (default: lower,mim,contrastive_uniform,fused_uniform,adabn,intensity,upper,lower@paper:2,mim@paper:2). "
            "Arms an arm needs or is compared with are added.",
        ),
        seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Paired fine-tuning seeds per arm (default 5)."),
        budget: Optional[str] = typer.Option(None, "--budget", help="Fixed step counts: cpu (default), gpu, smoke (pipeline check)."),
        recipe: Optional[str] = typer.Option(None, "--recipe", help="Fine-tuning recipe of the arms that name none: default | paper."),
        preset: Optional[str] = typer.Option(None, "--preset", help="Model preset: small (default), tiny, paper."),
        steps: Optional[List[str]] = typer.Option(None, "--steps", metavar="KIND=N", help="Override the budget's steps: mim=N, contrastive=N, finetune=N, distill=N (repeatable)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda."),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML with any of these options (source, target, out, arms, seeds, ...); command-line options win."),
        estimate: bool = typer.Option(False, "--estimate", help="Print the plan and the time estimate, then stop."),
        report_only: bool = typer.Option(False, "--report-only", help="Write the report from the finished units, train nothing."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars of each training."),
    ) -> None:
        """Pretrain once per SSL arm on the TARGET's unlabeled frames, fine-tune every arm on the SOURCE with
        paired seeds, score every arm per target test patient (Dice, IoU, HD95, ASD), and report each arm's
        difference to the lower bound with a hierarchical-bootstrap CI (seeds, then patients), Holm-corrected,
        and a verdict: helps / hurts / inconclusive. Resumable; processes started on the same --out share its
        units (e.g. one per core). Prints a time estimate first. See docs/study.md."""
        from ..study import run_study, study_options

        options = study_options(
            config, source=source, target=target, out=out, arms=arms, seeds=seeds, budget=budget, recipe=recipe,
            preset=preset, steps=steps, device=device, progress=progress,
        )
        result = run_study(options, say=typer.echo, estimate_only=estimate, report_only=report_only)
        if result.report_md is not None:
            typer.echo(f"study report -> {result.report_md}")
