"""`flops`: parameter and FLOP counts of a preset."""

from __future__ import annotations

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    @app.command("flops")
    def flops() -> None:
        """Parameters and GFLOPs per branch and for the fused model."""
        not_built("flops", "models issue")
