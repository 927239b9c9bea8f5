"""`demo`: the README's main job."""

from __future__ import annotations

from pathlib import Path

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(out: Path = typer.Option(Path("demo_out"), help="Folder for data, runs and report.")) -> None:
        """End to end on the bundled simulator: simulate, pretrain, finetune, evaluate, export, stream, report."""
        not_built("demo", "runtime issue")
