"""`benchmark`, `flops`."""

from __future__ import annotations

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    @app.command("benchmark")
    def benchmark() -> None:
        """Accuracy and speed of every available format/precision in one table."""
        not_built("benchmark", "benchmark issue")

    @app.command("flops")
    def flops() -> None:
        """Parameters and GFLOPs per branch and for the fused model."""
        not_built("flops", "models issue")
