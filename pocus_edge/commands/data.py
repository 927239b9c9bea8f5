"""`import`, `split`: bringing users' own data into the site layout."""

from __future__ import annotations

from pathlib import Path

import typer

from . import not_built


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
        videos: Path = typer.Argument(..., help="Folder of cine videos (mp4/avi) or multi-frame DICOM."),
        out: Path = typer.Argument(..., help="Site folder to write."),
    ) -> None:
        """Turn cine videos (+ optional ITK-SNAP segmentations) into a site folder."""
        not_built("import", "foundation issue")

    @app.command("split")
    def split(
        site: Path = typer.Argument(..., help="Site folder (Images/, Masks/, manifest.csv); its manifest is rewritten."),
        domain: str = typer.Option(
            ...,
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
