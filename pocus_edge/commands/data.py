"""`import`, `split`: bringing users' own data into the site layout."""

from __future__ import annotations

from pathlib import Path

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_(
        videos: Path = typer.Argument(..., help="Folder of cine videos (mp4/avi) or multi-frame DICOM."),
        out: Path = typer.Argument(..., help="Site folder to write."),
    ) -> None:
        """Turn cine videos (+ optional ITK-SNAP segmentations) into a site folder."""
        not_built("import", "foundation issue")

    @app.command("split")
    def split(site: Path = typer.Argument(..., help="Site folder whose manifest gets a split column.")) -> None:
        """Assign deterministic patient-level train/val/test splits."""
        not_built("split", "foundation issue")
