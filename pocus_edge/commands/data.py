"""`import`, `split`: bringing users' own data into the site layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import Domain, EmptySlices


def _parse_fractions(text: str) -> tuple[float, float, float]:
    from ..errors import ConfigError

    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--source-fractions: expected three numbers like 0.68,0.16,0.16, got {text!r}") from None
    if len(parts) != 3:
        raise ConfigError(f"--source-fractions: expected three numbers (train,val,test), got {text!r}")
    return parts  # type: ignore[return-value]


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_(
        videos: Path = typer.Argument(
            ..., help="Folder of cine videos (mp4/avi/mov/mkv via OpenCV) and/or DICOM files (multi-frame, via pydicom); searched recursively."
        ),
        out: Path = typer.Argument(..., help="Site folder to create (Images/, Masks/, manifest.csv); must not exist yet."),
        labels: Optional[Path] = typer.Option(
            None,
            help="Folder of ITK-SNAP segmentations (.nii.gz/.nii/.nrrd/.mha), one volume per video, matched by file "
            "name (an optional -seg suffix is ignored); slice z labels frame z.",
        ),
        patient_from: Optional[str] = typer.Option(
            None,
            help="Regular expression searched in each video's relative path (no extension); its first group is the "
            "patient ID, e.g. '^(P\\d+)/'. Default: DICOM PatientID, else the video name up to the first '_'.",
        ),
        view_from: Optional[str] = typer.Option(
            None, help="Regular expression for the view (dorsal, volar, ...) in the relative path; its first group is kept."
        ),
        empty_slices: EmptySlices = typer.Option(
            "unlabeled", "--empty-slices",
            help="Frames whose label slice is all zero: 'unlabeled' (sparse annotation, the usual ITK-SNAP case) or "
            "'background' (every frame was annotated; an empty slice means no bone).",
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it already holds a site."),
    ) -> None:
        """Turn cine videos (+ optional ITK-SNAP segmentations) into a site folder; nothing is written on error."""
        from ..data.importer import import_summary, import_videos

        def report(source, frames: int) -> None:
            typer.echo(f"  {source.videoname}: {frames} frames")

        site = import_videos(
            videos,
            out,
            labels_dir=labels,
            patient_from=patient_from,
            view_from=view_from,
            empty_slices=empty_slices,
            overwrite=overwrite,
            progress=report,
        )
        s = import_summary(site)
        typer.echo(
            f"wrote {site.root}: {s.videos} videos, {s.frames} frames ({s.labeled} labeled), {s.patients} patients; "
            f"next: pocus-edge split {site.root} --domain source|target"
        )

    @app.command("split")
    def split(
        site: Path = typer.Argument(..., help="Site folder (Images/, Masks/, manifest.csv); its manifest is rewritten."),
        domain: Domain = typer.Option(
            ..., "--domain",
            help="source: train/val/test by patient (labeled probe). target: SSL train / labeled test by patient, "
            "plus the upper-bound baseline's ub_split train/val (unlabeled deployment probe).",
        ),
        seed: int = typer.Option(0, help="Random seed; the same seed and patients give the same split."),
        source_fractions: str = typer.Option(
            "0.68,0.16,0.16", help="Source only: train,val,test shares of the patients (paper: 74/17/18 of 109)."
        ),
        target_test_fraction: float = typer.Option(
            0.125, help="Target only: share of patients held out as test (their labeled frames; paper: 17 of 136)."
        ),
        ub_val_fraction: float = typer.Option(
            17 / 119,
            help="Target only: share of the SSL patients with labels whose labeled frames form the upper-bound "
            "baseline's val set (paper: 17 of 119); 0 skips the upper-bound split.",
        ),
    ) -> None:
        """Assign deterministic patient-level splits (no patient in two splits) and print a summary."""
        from rich.console import Console
        from rich.table import Table

        from ..data.splits import split_site, split_summary

        if domain == "source":
            options = {"source_fractions": _parse_fractions(source_fractions)}
        else:
            options = {"target_test_fraction": target_test_fraction, "ub_val_fraction": ub_val_fraction}
        result = split_site(site, domain=domain, seed=seed, **options)
        table = Table(title=f"{result.name} ({domain}, seed {seed})")
        for column in ("split", "patients", "frames", "labeled frames"):
            table.add_column(column, justify="left" if column == "split" else "right")
        for row in split_summary(result.records):
            table.add_row(row.name, str(row.patients), str(row.frames), str(row.labeled))
        Console().print(table)
