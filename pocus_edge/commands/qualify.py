"""`qualify`: estimate each model's Dice on the TARGET from its unlabeled frames, rank the models,
and set each one's per-frame risk threshold and drift band (docs/qualify.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .options import DEVICE_HELP, complete_device


def register(app: typer.Typer) -> None:
    @app.command("qualify")
    def qualify(
        models: Optional[List[Path]] = typer.Argument(None, metavar="MODEL...", help=(
            "Models to score: fine-tuned or student checkpoints (.safetensors, one network), fused ONNX exports made "
            "with --branches (or single-network ONNX), or a study folder (every finished model of the study).")),
        target: Optional[Path] = typer.Option(None, "--target", metavar="SITE", help="The TARGET site: its unlabeled frames are scored (labels never read). Default with a study: the study's."),
        source: Optional[Path] = typer.Option(None, "--source", metavar="SITE", help="The SOURCE site: its labeled val frames calibrate the estimate and the risk threshold (default: a study's)."),
        generative: Optional[List[Path]] = typer.Option(None, "--generative", "-g", help="Fine-tuned generative (MIM) branch of a fused pair (repeatable; paired in order with -c)."),
        contrastive: Optional[List[Path]] = typer.Option(None, "--contrastive", "-c", help="Fine-tuned contrastive branch of a fused pair (repeatable)."),
        study: Optional[Path] = typer.Option(None, "--study", metavar="STUDY", help=(
            "A finished study folder: score all its models and also write the selected view (selected.md, selected.json: "
            "qualify's pick per arm vs source-val selection and the oracle).")),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: qualify.json, ranking.csv, frames.csv, qualify.png (and selected.* with --study)."),
        frames: int = typer.Option(240, "--frames", min=0, help="Unlabeled target frames scored per model (contiguous windows of recordings; 0 = all)."),
        calib_frames: int = typer.Option(96, "--calib-frames", min=8, help="SOURCE validation frames the estimate is calibrated on."),
        flag_rate: float = typer.Option(0.05, "--flag-rate", min=0.001, max=0.5, help="Share of in-distribution (source validation) frames the risk threshold flags."),
        bootstrap: int = typer.Option(500, "--bootstrap", min=0, help="Bootstrap draws of the interval (source patients and target recordings resampled; 0 = none)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the frame choice and the bootstrap."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP, autocompletion=complete_device),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the models."),
    ) -> None:
        """Score models on the TARGET's unlabeled frames without its labels: branch agreement (the exported
        graph's risk), confidence, stability under probe nuisances (gain, gamma, blur, speckle, flip) and mask
        shape; an estimated target Dice per model with a 95 % bootstrap interval (calibrated on SOURCE validation
        frames), a ranking, and each model's per-frame risk threshold and drift band. See docs/qualify.md."""
        from ..io import check_output_dir
        from ..qualify import QualifyOptions, resolve_models
        from ..qualify import qualify as run_qualify
        from ..qualify.models import study_models
        from ..qualify.report import write_outputs
        from .options import resolve_device

        specs, studies = resolve_models(list(models or []), list(generative or []), list(contrastive or []))
        if study is not None:
            studies.append(study)
        recorded = None
        for folder in studies:
            found, recorded = study_models(folder)
            specs += found
        if recorded is None and study is None and not specs:
            from ..errors import ConfigError

            raise ConfigError("qualify needs at least one MODEL, -g/-c pair or --study")
        target = target or (recorded or {}).get("target")
        source = source or (recorded or {}).get("source")
        if target is None or source is None:
            from ..errors import ConfigError

            raise ConfigError(f"qualify needs {' and '.join(n for n, v in (('--target', target), ('--source', source)) if v is None)} "
                              "(a study folder supplies both)")
        out_dir = check_output_dir(out)
        options = QualifyOptions(frames=frames, calib_frames=calib_frames, flag_rate=flag_rate, bootstrap=bootstrap,
                                 seed=seed, device=resolve_device(device), progress=progress)
        result = run_qualify(specs, Path(target), Path(source), options, say=typer.echo)
        written = write_outputs(out_dir, result.payload, result.frames)
        top = result.payload["ranking"][:5]
        for name in top:
            m = result.payload["models"][name]
            lo, hi = m["interval95"]
            typer.echo(f"  {m['rank']:>3}. {name}: estimated Dice {m['estimated_dice']:.3f} [{lo:.3f}, {hi:.3f}]")
        if study is not None:
            from ..study.selected import write_selected

            sel = write_selected(study, result.payload, out_dir)
            typer.echo(f"selected view -> {sel['md']}")
        typer.echo(f"qualify -> {written['json']}, {written['ranking']}, {written['frames']}, {written['plot']}")
