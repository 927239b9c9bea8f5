"""`export`: both branches plus the fusion head as one graph."""

from __future__ import annotations

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export() -> None:
        """Export the fused two-branch segmenter to ONNX, TensorRT or Core ML."""
        not_built("export", "export issue")
