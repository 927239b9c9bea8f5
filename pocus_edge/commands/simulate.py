"""`simulate`: the bundled two-probe wrist POCUS simulator."""

from __future__ import annotations

from pathlib import Path

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        out: Path = typer.Argument(..., help="Output folder; OUT/source and OUT/target are written."),
        preset: str = typer.Option("demo", help="tiny | demo | bench"),
        seed: int = typer.Option(0, help="Random seed (same seed, identical files)."),
    ) -> None:
        """Simulate two-probe wrist POCUS sweeps (source: Lumify, target: TeleMED) with exact masks."""
        not_built("simulate", "simulator issue")

