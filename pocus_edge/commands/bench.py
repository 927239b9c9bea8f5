"""`benchmark`."""

from __future__ import annotations

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    @app.command("benchmark")
    def benchmark() -> None:
        """Accuracy and speed of every available format/precision in one table."""
        not_built("benchmark", "benchmark issue")
