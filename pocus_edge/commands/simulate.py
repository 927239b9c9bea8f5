"""`simulate`: the bundled two-probe wrist POCUS simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import DataPreset, TargetTestLabels


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        out: Path = typer.Argument(..., help="Output folder; OUT/source and OUT/target are written."),
        data_preset: DataPreset = typer.Option(
            "demo", "--data-preset",
            help="Data set size: tiny (tests, ~430 small frames), demo (CPU demo, ~1300 frames), "
            "bench (benchmark, a few thousand frames per site), study (bench-sized, 12 fully labeled target "
            "test patients: `pocus-edge study`).",
        ),
        seed: int = typer.Option(0, help="Random seed: the same seed writes byte-identical files."),
        montage: Optional[Path] = typer.Option(
            None, help="Also write a PNG montage of labeled source and target frames with mask contours."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace sites already in OUT."),
        source_profile: str = typer.Option(
            "lumify", help="Source probe profile: a bundled name (lumify, telemed) or a profile YAML path."
        ),
        target_profile: str = typer.Option(
            "telemed", help="Target probe profile: a bundled name (lumify, telemed) or a profile YAML path."
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        workers: int = typer.Option(
            1, min=1, help="Processes rendering patients in parallel (the files are identical for any number)."
        ),
        target_test_patients: Optional[int] = typer.Option(
            None, "--target-test-patients", min=1,
            help="Target test patients (default: the preset's; 12.5 % of patients, 12 for the study preset).",
        ),
        shift_severity: Optional[float] = typer.Option(
            None, "--shift-severity", min=0.0, max=1.0,
            help="Render the target with the probe this far from the source profile to the target profile (every "
            "knob interpolated: 0 = the source probe, 1 = the target probe; default: the target profile).",
        ),
        label_target_test: Optional[TargetTestLabels] = typer.Option(
            None, "--label-target-test",
            help="all: label every frame of the target test patients (a powered test set); sparse: the paper's "
            "12.5 % like every target patient (default: the preset's; all for the study preset).",
        ),
    ) -> None:
        """Simulate two-probe wrist POCUS sweeps (source: Lumify-like, target: TeleMED-like) with exact
        bone masks and the paper's patient splits, in the site layout `pocus-edge` trains on."""
        from ..data.phantom import simulate as run_simulation
        from ..data.phantom import write_montage
        from ..data.splits import split_summary
        from ..io import check_output_dir, check_output_file

        check_output_dir(out, what="OUT (a folder)")
        if montage is not None:
            check_output_file(montage, what="--montage (a PNG file)")
        source, target = run_simulation(
            out,
            preset=data_preset,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
            source_profile=source_profile,
            target_profile=target_profile,
            workers=workers,
            target_test_patients=target_test_patients,
            label_all_target_test=None if label_target_test is None else label_target_test == "all",
            shift_severity=shift_severity,
        )
        for site in (source, target):
            labeled = sum(r.labeled for r in site.records)
            splits = ", ".join(f"{row.name} {row.patients}p/{row.frames}f" for row in split_summary(site.records))
            typer.echo(f"{site.root}: {len(site.records)} frames ({labeled} labeled); {splits}")
        if montage is not None:
            typer.echo(f"montage: {write_montage(source.root, target.root, montage)}")
