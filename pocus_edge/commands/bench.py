"""`benchmark` (every available format on this machine) and `benchmark compare` (reports from
several machines side by side)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import CheckFailed, ConfigError
from .options import (
    DEVICE_HELP,
    CompileMode,
    FusionFormula,
    FusionMethod,
    FusionNorm,
    Preset,
    complete_device,
    resolve_device,
)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{option} expects positive integers, got {text!r}")
    return values


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(
        help=(
            "Accuracy and speed of every available format/precision in one table.\n\n"
            "`pocus-edge benchmark --generative G --contrastive C --data SITE` measures each format "
            "(PyTorch eager two-model = the paper's way and the baseline, fused fp32/bf16/fp16, "
            "torch.compile, ONNX fp32/fp16/int8 in onnxruntime, OpenVINO fp32/bf16/int8, TensorRT, "
            "Core ML): status, size, Dice/IoU, agreement with the fp32 reference, latency p50/p95, "
            "FPS, GFLOPs, the fraction of this machine's measured matmul peak for the row's "
            "precision, peak memory.\n\n"
            "`pocus-edge benchmark --model fused.onnx [--data SITE]` benchmarks an exported model as it "
            "is (no torch needed): its own backend, plus OpenVINO where installed.\n\n"
            "`--student NAME` (random weights) or `--student-checkpoint FILE` adds a compact student's rows "
            "beside the teacher's: its eager PyTorch forms and every exported format (`--no-teacher`: "
            "students only).\n\n"
            "`pocus-edge benchmark frontier REPORT.json --dice STUDY.json` draws target Dice against FPS "
            "for every model and format, with the frontier.\n\n"
            "`pocus-edge benchmark compare A.json B.json` sets machines side by side.\n\n"
            "Exit status 1 when a row failed (its reason is in the table and the report), 0 when every row ran or was skipped."
        ),
        invoke_without_command=True,
        no_args_is_help=False,
    )

    @bench_app.callback()
    def benchmark(
        ctx: typer.Context,
        generative: Optional[Path] = typer.Option(None, "--generative", "-g", help="Fine-tuned generative (MIM) branch checkpoint (.safetensors)."),
        contrastive: Optional[Path] = typer.Option(None, "--contrastive", "-c", help="Fine-tuned contrastive branch checkpoint (.safetensors)."),
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="An exported model to benchmark as it is (.onnx, OpenVINO .xml, TensorRT engine): no checkpoints or torch needed."),
        data: Optional[Path] = typer.Option(None, "--data", "-d", help="Target site folder: Dice/IoU on its labeled test frames. Without it: random frames, no Dice/IoU."),
        preset: Optional[Preset] = typer.Option(None, "--preset", help="paper | small | tiny: random weights of this preset when no checkpoints are given (speed only)."),
        formats: Optional[str] = typer.Option(None, "--formats", "-f", help="Comma-separated subset, e.g. eager-2model,fused-bf16,onnx-int8 (default: all). See --list-formats."),
        batch: str = typer.Option("1,8", "--batch", "-b", help="Comma-separated batch sizes to time."),
        runs: int = typer.Option(20, "--runs", "-n", min=1, help="Timed calls per batch size (fewer if --time-per-batch runs out first, never under 3)."),
        warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed calls per batch size before timing (torch.compile compiles here; reported as warm-up seconds)."),
        time_per_batch: float = typer.Option(30.0, "--time-per-batch", help="Seconds of timing per batch size before stopping early."),
        format_timeout: float = typer.Option(600.0, "--format-timeout", help="Hard limit in seconds per format (setup, evaluation and timing); the row then fails and the next one runs."),
        max_frames: int = typer.Option(32, "--max-frames", min=1, help="Evaluate on at most this many labeled test frames."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP, autocompletion=complete_device),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads for torch and onnxruntime (default: the libraries' own)."),
        fusion: FusionMethod = typer.Option("entropy", "--fusion", help="Fusion confidence: entropy | margin | average."),
        fusion_norm: FusionNorm = typer.Option("image", "--fusion-norm", help="Confidence normalization: image (per frame, streaming) | batch (released code)."),
        fusion_formula: FusionFormula = typer.Option("weighted", "--fusion-formula", help="Fusion formula: weighted (released code) | paper."),
        compile_mode: Optional[CompileMode] = typer.Option(None, "--compile-mode", help="torch.compile mode (default: reduce-overhead on CUDA = CUDA graphs, default on CPU)."),
        device_name: Optional[str] = typer.Option(None, "--device-name", help="Name recorded for this device (matches devices.yaml in `compare`), e.g. 'Jetson Orin Nano Super'."),
        providers: Optional[str] = typer.Option(None, "--providers", help=(
            "onnxruntime execution providers for the ONNX rows, in priority order: cpu, cuda, tensorrt, openvino, "
            "coreml (those installed; CPU is always the fallback)."
        )),
        hostname: bool = typer.Option(False, "--hostname", help="Record this machine's hostname in the report (left out by default)."),
        report_path: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here (updated after every format, atomically)."),
        workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keep exported artifacts here (default: a temporary folder)."),
        list_formats: bool = typer.Option(False, "--list-formats", help="List the formats and exit."),
        student: Optional[str] = typer.Option(None, "--student", "-s", help=(
            "Compact student(s) to add, random weights: comma-separated names (mobilenetv3, efficientvit, fastvit) "
            "or 'all'. Their rows carry their name."
        )),
        student_checkpoint: Optional[list[Path]] = typer.Option(None, "--student-checkpoint", help="A trained student checkpoint (.safetensors with a 'kind: student' card); repeatable."),
        student_preset: Optional[Preset] = typer.Option(None, "--student-preset", help=(
            "Preset of the random-weight students (default: --preset, else the teacher checkpoints' preset, else "
            "paper = 224 px)."
        )),
        teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Measure the fused teacher (default) or only the students."),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="With --model: the name its rows carry (e.g. generative for an exported branch; default from its card)."),
    ) -> None:
        if ctx.invoked_subcommand is not None:
            return
        from rich.console import Console

        from ..benchmark import FORMATS, BenchmarkOptions, render_report, run_benchmark
        from ..benchmark.runner import fmt_fps
        from ..io import write_json_atomic

        console = Console(width=max(Console().width, 160) if not sys.stdout.isatty() else None)
        if list_formats:
            from ..benchmark.formats import STUDENT_FORMATS

            for spec in FORMATS.values():
                console.print(f"{spec.name:15s} {spec.precision:5s} {spec.engine:14s} {spec.summary}", markup=False)
            for name in STUDENT_FORMATS.keys() - FORMATS.keys():
                spec = STUDENT_FORMATS[name]
                console.print(f"{spec.name:15s} {spec.precision:5s} {spec.engine:14s} student rows: {spec.summary}", markup=False)
            return
        opts = BenchmarkOptions(
            generative=generative,
            contrastive=contrastive,
            model=model,
            preset=preset,
            data=data,
            formats=[f.strip() for f in formats.split(",") if f.strip()] if formats else None,
            batches=_int_list(batch, "--batch"),
            runs=runs,
            warmup=warmup,
            time_per_batch_s=time_per_batch,
            format_timeout_s=format_timeout,
            max_frames=max_frames,
            device=resolve_device(device, "torch"),
            threads=threads,
            method=fusion,
            norm=fusion_norm,
            formula=fusion_formula,
            compile_mode=compile_mode,
            device_name=device_name,
            providers=[p.strip() for p in providers.split(",") if p.strip()] if providers else None,
            hostname=hostname,
            workdir=workdir,
            command=shlex.join(["pocus-edge", *sys.argv[1:]]),
            students=_student_names(student),
            student_checkpoints=tuple(student_checkpoint or ()),
            student_preset=student_preset,
            teacher=teacher,
            model_name=model_name,
        )

        from ..benchmark.schema import row_label

        def on_start(spec) -> None:
            console.print(f"[dim]... {spec.name}[/dim]")

        def on_row(row, report) -> None:
            note = "" if row["status"] == "ok" else f": {row['reason']}"
            fps = ", ".join(f"b{lat['batch']} {fmt_fps(lat['fps'])} FPS" for lat in row["latency"])
            console.print(f"    {row_label(row)}: {row['status']}{note} {fps}", markup=False, highlight=False)
            if report_path:
                write_json_atomic(report_path, report)

        report = run_benchmark(opts, on_row=on_row, on_start=on_start)
        if report_path:
            write_json_atomic(report_path, report)
        render_report(report, console)
        if report_path:
            console.print(f"report: {report_path}")
        failed = [row_label(r) for r in report["rows"] if r["status"] == "failed"]
        if failed:
            raise CheckFailed(f"{len(failed)} of {len(report['rows'])} benchmark rows failed: {', '.join(failed)}")

    @bench_app.command("compare")
    def compare(
        reports: list[Path] = typer.Argument(..., help="Benchmark JSON reports (from `pocus-edge benchmark --report`); the first is the reference for ratios."),
        report_path: Optional[Path] = typer.Option(None, "--report", help="Also write the comparison as JSON."),
    ) -> None:
        """Reports from several machines side by side: FPS, ratio to the first report, compute floor
        (GFLOPs per frame / the device's peak rate from devices.yaml) and the measured fraction of peak."""
        from rich.console import Console

        from ..benchmark import compare_reports, load_report, render_comparison
        from ..io import write_json_atomic

        loaded = [load_report(p) for p in reports]
        comparison = compare_reports(loaded, labels=[p.stem for p in reports])
        console = Console(width=max(Console().width, 160) if not sys.stdout.isatty() else None)
        render_comparison(comparison, console)
        if report_path:
            write_json_atomic(report_path, comparison)

    @bench_app.command("plot")
    def plot(
        reports: list[Path] = typer.Argument(..., help="Benchmark JSON reports (from `pocus-edge benchmark --report`), one bar colour each."),
        out: Path = typer.Option(Path("benchmark.png"), "--out", "-o", help="Figure path (.png, .svg or .pdf)."),
        batch: int = typer.Option(1, "--batch", "-b", min=1, help="Batch size whose FPS is drawn."),
    ) -> None:
        """One figure: FPS of every measured format (with its speed-up over the eager two-model
        baseline) next to its mask agreement with fp32 and the agreement bar."""
        from ..benchmark import load_report
        from ..benchmark.plot import plot_reports

        loaded = [load_report(p) for p in reports]
        _, data = plot_reports(loaded, [p.stem for p in reports], out, batch=batch)
        typer.echo(f"wrote {out}: {len(data['formats'])} formats x {len(loaded)} report(s) at batch {batch}")

    @bench_app.command("frontier")
    def frontier(
        reports: list[Path] = typer.Argument(..., help="Benchmark JSON reports (from `pocus-edge benchmark --report`): FPS per model and format."),
        dice: Optional[list[Path]] = typer.Option(None, "--dice", help=(
            "Target Dice per model (JSON: {\"models\": {NAME: DICE or {dice, ci}}}, or a study report with per-arm "
            "Dice and CI); repeatable."
        )),
        as_: Optional[list[str]] = typer.Option(None, "--as", help="ARM=MODEL: a study arm's name -> the benchmark's model name (the teacher is 'fused', a student its name)."),
        out: Path = typer.Option(Path("frontier.png"), "--out", "-o", help="Figure path (.png, .svg or .pdf)."),
        batch: int = typer.Option(1, "--batch", "-b", min=1, help="Batch size whose FPS is drawn."),
        fps_goal: Optional[float] = typer.Option(None, "--fps-goal", help="Draw a vertical line at this FPS (e.g. 30 or 60)."),
    ) -> None:
        """Target Dice against FPS for every model and format, and the frontier a user picks from.
        Accuracy comes from --dice files; a model without one uses the Dice its benchmark rows
        measured on labeled target frames (`benchmark --data TARGET_SITE`), if any."""
        from ..benchmark import load_report
        from ..benchmark.frontier import load_accuracy, plot_frontier
        rename = {}
        for item in as_ or []:
            arm, sep, name = item.partition("=")
            if not sep or not arm.strip() or not name.strip():
                raise ConfigError(f"--as expects ARM=MODEL, got {item!r}")
            rename[arm.strip()] = name.strip()
        accuracy: dict = {}
        for path in dice or []:
            accuracy.update(load_accuracy(path, rename))
        loaded = [load_report(p) for p in reports]
        _, data = plot_frontier(loaded, [p.stem for p in reports], accuracy, out, batch=batch, fps_goal=fps_goal)
        for s in data["series"]:
            front = [s["points"][i]["label"] for i in s["frontier"]]
            typer.echo(f"{s['label']}: {len(s['points'])} points; frontier (slow to fast): {', '.join(front)}")
        if data["left_out"]:
            typer.echo(f"not plotted: {len(data['left_out'])} rows (reasons under the figure)")
        typer.echo(f"wrote {out}")

    app.add_typer(bench_app, name="benchmark")


def _student_names(text: Optional[str]) -> tuple[str, ...]:
    """--student NAME[,NAME] or 'all' -> registered student names (unknown ones refused)."""
    if not text:
        return ()
    from ..models.students import student_names

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return tuple(student_names())
    unknown = [n for n in names if n not in student_names()]
    if unknown:
        raise ConfigError(f"--student: unknown student(s) {', '.join(unknown)}; choose from {', '.join(student_names())} or all")
    return tuple(dict.fromkeys(names))
