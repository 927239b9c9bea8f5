"""`golden`: golden vectors for ports of the pre/post-processing (the Android demo's Kotlin core)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import Student


def register(app: typer.Typer) -> None:
    @app.command("golden")
    def golden(
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write index.json and the .npy arrays into."),
        model: Optional[Path] = typer.Option(
            None,
            "--model",
            "-m",
            help="Exported model (from `pocus-edge export`; .onnx, or an OpenVINO .xml), run by its runtime backend: its probabilities and input size are used. "
            "Default: two seeded random-weight tiny TransUNets fused in PyTorch (input size 64).",
        ),
        student: Optional[Student] = typer.Option(
            None,
            "--student",
            "-s",
            help="Instead of the fused default: a seeded random-weight tiny compact student (mobilenetv3, efficientvit, fastvit) in its "
            "inference form, as the Android app ships it. The committed Android set: --student mobilenetv3.",
        ),
        data: Optional[Path] = typer.Option(
            None, "--data", "-d", help="Site folder to take frames from (e.g. the simulator's target site). Default: synthetic frames."
        ),
        frames: int = typer.Option(4, "--frames", min=1, help="Number of frames."),
        seed: int = typer.Option(0, "--seed", help="Seed of the synthetic frames and the random model."),
    ) -> None:
        """Write golden vectors: raw frames, the exact preprocessing outputs, the model's probabilities and masks."""
        from ..export.golden import write_golden

        index = write_golden(out, model=model, site=data, n=frames, seed=seed, student=student)
        probs = index["probabilities"]["kind"] if index["probabilities"] else "none (model code unavailable)"
        typer.echo(
            f"wrote {len(index['cases'])} frames to {out} (sizes {index['sizes']}, "
            f"interpolation: {index['interpolation']}; probabilities: {probs}; mask rule: {index['mask_rule']} "
            f"at {index['threshold']})"
        )
