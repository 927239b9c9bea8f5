"""`flops`: parameter and FLOP counts of a preset."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, List, Optional

import typer

from .options import Preset

if TYPE_CHECKING:
    from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command("flops")
    def flops(
        preset: Preset = typer.Option("paper", "--preset", help="Model preset: paper (R50-ViT-B/16 @224) | small | tiny."),
        as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON on stdout instead of a table."),
        set_: Optional[List[str]] = typer.Option(
            None,
            "--set",
            help="Override a model field: key=value (img_size, hidden_size, num_layers, decoder_channels=32,16,16,8, ...); "
            "a 'model.' prefix is accepted.",
        ),
        students: bool = typer.Option(
            True, "--students/--no-students",
            help="Also list the compact students at every preset (their shapes are fixed; --set changes the teacher only).",
        ),
    ) -> None:
        """Parameters and GFLOPs per branch, for the fused model and for the compact students (one frame,
        FLOPs = 2 x multiply-adds)."""
        from ..config import parse_set_options
        from ..models.flops import model_report

        overrides = {k.removeprefix("model."): v for k, v in parse_set_options(set_).items()}
        report = model_report(preset, **overrides)
        if students:
            from ..models.flops import students_report

            report["students"] = students_report()
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
        if students:
            Console().print(_students_table(report["students"]))
            typer.echo("\n".join(_student_encoders(report["students"])))
        typer.echo(report["flop_convention"])


def _students_table(students: dict) -> "Table":
    from rich.table import Table

    table = Table(title="students (deployed form; paper = the 224 px input)")
    for column in ("student", "preset", "px", "parameters", "GFLOPs", "of teacher"):
        table.add_column(column, justify="left" if column in ("student", "preset") else "right")
    for row in students["rows"]:
        table.add_row(row["student"], row["preset"], str(row["img_size"]), f"{row['params']:,}",
                      f"{row['gflops']:.3g}", f"1/{1 / row['teacher_fraction']:.0f}")
    return table


def _student_encoders(students: dict) -> list[str]:
    """One line per student: its timm encoder at each preset (narrowed = widths cut for tests)."""
    encoders: dict[str, dict[str, list[str]]] = {}
    for row in students["rows"]:
        label = row["encoder"] + (" narrowed" if row.get("encoder_args") else "")
        encoders.setdefault(row["student"], {}).setdefault(label, []).append(row["preset"])
    return [f"{name}: " + ", ".join(f"{label} ({'/'.join(presets)})" for label, presets in labels.items())
            for name, labels in encoders.items()]
