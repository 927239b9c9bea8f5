"""`demo`: the README's main job."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import DEVICE_HELP, DataPreset, Preset, complete_device


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for data, runs, exported model, stream outputs and report.md."),
        data_preset: DataPreset = typer.Option("demo", "--data-preset", help="Simulator size: demo (the 10-12 minute CPU demo) or tiny (a smoke run); bench and study are larger."),
        preset: Preset = typer.Option("small", "--preset", help="Model size: small (CPU-trainable TransUNet), tiny (tests) or paper (the published network; a GPU)."),
        quick: bool = typer.Option(False, "--quick", help="A few steps per training stage (a smoke run; accuracy is meaningless)."),
        seed: int = typer.Option(0, help="Seed of the simulator and of every training stage."),
        threads: int = typer.Option(0, help="onnxruntime threads for the streaming step (0 = all cores)."),
        max_steps: int = typer.Option(0, help="Cap every training stage at this many steps (0 = the schedule's steps; smoke runs)."),
        device: str = typer.Option("auto", "--device", help="Training/evaluation device. " + DEVICE_HELP, autocompletion=complete_device),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars of each stage."),
        fresh: bool = typer.Option(False, "--fresh", help="Delete the demo's earlier outputs in --out and start over (default: a rerun reuses the data and the finished training stages)."),
    ) -> None:
        """End to end on the bundled simulator: simulate, pretrain, finetune, evaluate, export, stream, distil a phone-size student, report.

        Rerunnable: a second run with the same settings reuses the data and the finished training
        stages in --out and redoes the quick steps (evaluation, export, streaming, report)."""
        from ..demo import run_demo

        result = run_demo(out, data_preset=data_preset, preset=preset, quick=quick, seed=seed, threads=threads or None,
                          max_steps=max_steps or None, device=device, fresh=fresh, progress=progress)
        typer.echo(f"report: {result.report_md}")
        for name, acc in result.accuracy.items():
            typer.echo(f"  {name:<28} Dice {acc['dice']:.4f}  IoU {acc['iou']:.4f}")
        s = result.stream_report
        typer.echo(f"  stream: {s['fps']:.1f} FPS, latency p50 {s['latency_ms']['p50']} ms, {s['gflops_per_frame']} GFLOPs/frame ({s['backend']}, {s['precision']}, {s['device']})")
        st = result.student_stream_report
        if st is not None:
            typer.echo(f"  student stream: {st['fps']:.1f} FPS, latency p50 {st['latency_ms']['p50']} ms, {st['gflops_per_frame']} GFLOPs/frame")
