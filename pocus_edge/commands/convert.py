"""`convert`: checkpoints of the paper's released research code -> this project's safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import ConvertStage


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        checkpoint: Path = typer.Argument(
            ..., help="A .pth/.pt file of the released code: a fine-tuned model's state_dict (module. prefixes are fine), "
            "a training checkpoint with model_state_dict, or a pretrained encoder."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="The .safetensors checkpoint to write (atomically)."),
        stage: Optional[ConvertStage] = typer.Option(
            None, "--stage",
            help="Stage recorded in the model card: finetune (default for a full model) or baseline; for an encoder "
            "(required): pretrain-mim or pretrain-contrastive.",
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    ) -> None:
        """Convert a released .pth checkpoint into a safetensors checkpoint with a model card marking its origin.

        Loaded with torch.load(weights_only=True): a pickle holding anything but tensors and plain
        containers is refused. The result works wherever a checkpoint of this project does
        (export -g/-c, evaluate --model, stream --backend torch, finetune --init for an encoder).
        """
        from ..models.released import convert_checkpoint

        converted, card = convert_checkpoint(checkpoint, out, stage=stage, overwrite=overwrite)
        what = (
            f"TransUNet with {converted.out_channels} output channel(s)" if converted.kind == "segmenter" else "encoder"
        )
        typer.echo(
            f"wrote {out}: {what}, preset {card['preset']!r}, stage {card['stage']!r}, {len(converted.state)} tensors"
            + (f"; {len(converted.dropped)} released keys not used (e.g. {converted.dropped[0]})" if converted.dropped else "")
        )
        typer.echo("note: a few fixed operations differ from the released implementation (listed in the card's "
                   "origin.architecture_notes); check the model with `pocus-edge evaluate` on labeled frames")
