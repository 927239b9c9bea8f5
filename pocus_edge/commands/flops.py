"""`flops`: parameter and FLOP counts of a preset."""

from __future__ import annotations

import json
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("flops")
    def flops(
        preset: str = typer.Option("paper", help="Model preset: paper (R50-ViT-B/16 @224) | small | tiny."),
        as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON instead of a table."),
        set_: Optional[List[str]] = typer.Option(
            None,
            "--set",
            help="Override a model field: key=value (img_size, hidden_size, num_layers, decoder_channels=32,16,16,8, ...); "
            "a 'model.' prefix is accepted.",
        ),
    ) -> None:
        """Parameters and GFLOPs per branch and for the fused model (one frame, FLOPs = 2 x multiply-adds)."""
        from ..config import parse_set_options
        from ..models.flops import model_report

        overrides = {k.removeprefix("model."): v for k, v in parse_set_options(set_).items()}
        report = model_report(preset, **overrides)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"pocus-edge flops: preset {report['preset']!r}, input {tuple(report['input_shape'])}")
        table.add_column("model")
        table.add_column("parameters", justify="right")
        table.add_column("GFLOPs / frame", justify="right")
        table.add_row("one branch (TransUNet, 1 output)", f"{report['branch']['params']:,}", f"{report['branch']['gflops']:.4g}")
        table.add_row("fused (2 branches + fusion head)", f"{report['fused']['params']:,}", f"{report['fused']['gflops']:.4g}")
        Console().print(table)
        typer.echo(report["flop_convention"])
