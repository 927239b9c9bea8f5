"""`stream`: run an exported model over a frame source."""

from __future__ import annotations

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    @app.command("stream")
    def stream() -> None:
        """Stream frames (TeleMED .tvd.h5, raw socket/stdin, video, images, DICOM) through a model."""
        not_built("stream", "runtime issue")
