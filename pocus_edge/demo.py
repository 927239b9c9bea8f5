"""The one-command demo (``pocus-edge demo``): the whole method and product on the bundled
simulator, ending in ``DIR/report.md``.

1. simulate the two probes (``DIR/data/source``: labeled Lumify-like; ``DIR/data/target``:
   TeleMED-like, 12.5 % labeled);
2. pretrain the generative (MIM) and the contrastive (MT-NXent) encoders on the TARGET
   site's unlabeled training frames;
3. fine-tune both on the SOURCE site's labels; train the lower-bound baseline (source only,
   no pretraining);
4. evaluate all on the TARGET test split, plus the entropy fusion of the two branches;
5. export the fused two-branch graph to ONNX (fusion weights as extra outputs);
6. stream one target test sweep through it from a TeleMED ``.tvd.h5`` recording (the B-mode
   panel inside a larger screen frame, cropped by the recording's ROI), the sweep played back to
   back until the recording holds at least ``STREAM_MIN_FRAMES`` frames, so that its latency
   percentiles rest on hundreds of frames;
7. distil a phone-size student (``mobilenetv3``) from the two fine-tuned branches on the TARGET
   site's unlabeled training frames (plus the SOURCE labels), evaluate it on the TARGET test
   split, export it to ONNX and stream the same sweep through it;
8. write ``DIR/report.md`` with the accuracy table, latency/FPS/GFLOPs, plots and overlays.

Sites are never pooled: every training call reads exactly one site folder.

Rerunnable: the settings are recorded in ``DIR/demo_settings.json``; a rerun with the same
settings reuses the simulated data and every finished training stage (a stage killed midway
continues exactly where it stopped) and redoes the quick steps after them; the report keeps the
times the reused stages took when they ran (``DIR/stage_times.json``) and marks them reused.
Other settings in the same folder are refused; ``fresh=True`` (``pocus-edge demo --fresh``) deletes the demo's
own outputs first and starts over.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ConfigError, DataError

# Optimizer steps per stage (fixed counts, so a busy machine changes the duration, not the
# result). The defaults aim at about 10 minutes on a 2-core CPU on the `demo` data with the
# `small` model; `quick` is a smoke run. Batch sizes and pretraining learning rates come from the
# training presets (pocus_edge.train.common.PRESET_STAGE_DEFAULTS). The contrastive stage needs
# its steps: its loss sits at chance (ln 63 for 32 pairs) for its first ~200-300 steps
# (benchmarks/notes/contrastive_plateau.md).
SCHEDULES: dict[str, dict[str, int]] = {
    # Contrastive: 400 steps of 32 pairs, the fewest that left chance on the demo data (340 did not
    # in one run, and 16 pairs stayed at chance for 400 steps); the other stages are sized around it
    # for 10-12 minutes on 2 CPU cores (RESULTS.md section 9).
    "full": {"mim": 80, "contrastive": 400, "finetune": 140, "baseline": 140, "distill": 120},
    "quick": {"mim": 10, "contrastive": 10, "finetune": 20, "baseline": 20, "distill": 20},
}
# The student the demo distils (pocus_edge.models.students), and its batch: 8 unlabeled target +
# 8 labeled source frames per step (half the small preset's, for the demo's time budget).
DEMO_STUDENT = "mobilenetv3"
DEMO_DISTILL_BATCH = 8
# Every fine-tuning of the demo (both branches and the lower bound) uses the same recipe.
DEMO_RECIPE = "default"
# Contrastive pretraining: uniform batches at lr 3e-4 (after the stage's 5 % warm-up). On the demo
# data the loss stays at chance for 360+ steps at the preset's 1e-4 and leaves it at ~220 steps at
# 3e-4 (3.52 against a chance level of 4.13 at step 360; benchmarks/notes/study_protocol.md).
DEMO_CONTRASTIVE_LR = 3e-4

# evaluate() names files after the model names, so they stay path-safe; the report shows these.
DISPLAY_NAMES = {
    "generative_mim": "generative (MIM)",
    "contrastive_mtnxent": "contrastive (MT-NXent)",
    "fused-entropy": "fused (entropy)",
    "lower_bound": "lower bound (source only)",
    "student_mobilenetv3": "student (mobilenetv3, distilled)",
}
PAPER_TARGET_DSC = {"generative (MIM)": 0.7116, "contrastive (MT-NXent)": 0.7181, "fused (entropy)": 0.7221, "lower bound (source only)": 0.6605}
SCREEN_BORDER = (16, 8)  # rows above, columns left of the B-mode panel in the simulated recording
SETTINGS_FILE = "demo_settings.json"
# Wall and CPU seconds of every finished stage, kept across reruns (a reused stage keeps its time).
STAGE_TIMES_FILE = "stage_times.json"
# Everything the demo writes into its folder (what --fresh deletes, and nothing else).
DEMO_OUTPUTS = ("data", "runs", "eval", "export", "stream", "stream_student", "plots", "report.md", "report.json",
                SETTINGS_FILE, STAGE_TIMES_FILE)
# The streamed recording plays the target test sweep back to back until it holds at least this many
# frames: p95 and p99 latency need hundreds of samples (a sweep of the demo data has a few dozen).
STREAM_MIN_FRAMES = 300


@dataclass
class DemoResult:
    out: Path
    report_md: Path
    accuracy: dict[str, dict[str, float]]
    stream_report: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    student_stream_report: dict[str, Any] | None = None


class _Stages:
    """Stage banners and wall/CPU time per stage. A stage whose every part an earlier run in this
    folder did (``part(reused=True)``) keeps that run's times from ``record`` and is marked reused,
    so a rerun's report does not show the near-zero time of loading a finished stage."""

    def __init__(self, total: int, say: Callable[[str], None], record: Path | None = None):
        self.total = total
        self.say = say
        self.k = 0
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self.record = record
        self.earlier = _read_stage_times(record)
        self._parts: list[bool] = []

    def part(self, reused: bool) -> None:
        """Inside a stage: one piece of its work was (``reused``) or was not done by an earlier run."""
        self._parts.append(reused)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.k += 1
        self.say(f"[{self.k}/{self.total}] {name}")
        self._parts = []
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = fn()
        wall, cpu = round(time.perf_counter() - t0, 1), round(_cpu_seconds() - c0, 1)
        reused = bool(self._parts) and all(self._parts)
        if reused:
            self.reused.append(name)
            earlier = self.earlier.get(name, {})
            wall, cpu = earlier.get("wall_s", wall), earlier.get("cpu_s", cpu)
        self.seconds[name], self.cpu_seconds[name] = wall, cpu
        self._save()
        self.say(f"      reused (ran in {wall:.0f} s)" if reused else f"      done in {wall:.0f} s")
        return out

    def _save(self) -> None:
        if self.record is None:
            return
        from .io import write_json_atomic

        times = {**self.earlier, **{n: {"wall_s": self.seconds[n], "cpu_s": self.cpu_seconds[n]} for n in self.seconds}}
        write_json_atomic(self.record, times)


def _read_stage_times(path: Path | None) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (Windows, without ``resource``:
    this process only)."""
    try:
        import resource
    except ImportError:
        return time.process_time()
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _prepare_folder(out: Path, settings: dict[str, Any], *, fresh: bool, say: Callable[[str], None]) -> None:
    """Make ``out`` ready for a run with ``settings``: refuse a demo folder made with other
    settings (unless ``fresh``), delete the demo's own outputs when ``fresh``, record the settings."""
    stamp = out / SETTINGS_FILE
    recorded = None
    if stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = {}
    # A folder from a demo that did not record its settings: simulated data or training runs in it.
    unrecorded = recorded is None and ((out / "data" / "demo_data.json").is_file() or (out / "runs").is_dir())
    if fresh and (recorded is not None or unrecorded):
        say(f"      --fresh: deleting the demo outputs in {out}")
        for name in DEMO_OUTPUTS:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    elif recorded is not None and recorded != settings:
        changed = ", ".join(f"{k} {settings.get(k)!r} (folder: {recorded.get(k)!r})" for k in settings
                            if recorded.get(k) != settings.get(k))
        raise ConfigError(f"{out}: holds a demo run with other settings ({changed}); pass --fresh to start over "
                          "or choose another --out")
    elif unrecorded:
        raise ConfigError(f"{out}: holds a demo run whose settings were not recorded; pass --fresh to start over "
                          "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    from .io import write_json_atomic

    write_json_atomic(stamp, settings)


def _with_last_loss(result):
    """A resumed run that had already finished makes no step, so its ``last_loss`` is NaN: take
    the last logged training loss instead."""
    if not _finite(result.last_loss):
        losses = [float(r["loss"]) for r in (result.history or []) if r.get("phase") == "train" and _finite(r.get("loss"))]
        if losses:
            result.last_loss = losses[-1]
    return result


def run_demo(
    out: str | Path,
    *,
    data_preset: str = "demo",
    preset: str = "small",
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    max_steps: int | None = None,
    device: str = "auto",
    fresh: bool = False,
    say: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole demo into ``out``; returns where the report is and its headline numbers.
    A rerun with the same settings reuses the data and the finished training stages in ``out``;
    ``fresh`` starts over. ``max_steps`` caps every training stage (smoke tests)."""
    from .data.layout import MANIFEST, load_site
    from .data.phantom import PRESETS as SIM_PRESETS
    from .data.phantom import simulate
    from .train import distill, evaluate, finetune, pretrain_contrastive, pretrain_mim
    from .train.engine import CHECKPOINT

    if data_preset not in SIM_PRESETS:
        raise ConfigError(f"unknown data preset {data_preset!r}; choose one of {', '.join(SIM_PRESETS)}")
    if preset not in ("tiny", "small", "paper"):
        raise ConfigError(f"unknown model preset {preset!r}; choose tiny, small or paper")
    if say is None:
        from rich.console import Console

        console = Console(stderr=True)
        say = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    out = Path(out)
    settings = {"data_preset": data_preset, "preset": preset, "quick": quick, "seed": seed, "max_steps": max_steps}
    _prepare_folder(out, settings, fresh=fresh, say=say)
    data, runs = out / "data", out / "runs"
    schedule = SCHEDULES["quick" if quick else "full"]
    stages = _Stages(11, say, record=out / STAGE_TIMES_FILE)
    t_start, c_start = time.perf_counter(), _cpu_seconds()
    # preload: the demo sites are small, so decoding every PNG once saves a few seconds per epoch.
    common = dict(preset=preset, seed=seed, progress=progress, tensorboard=False, device=device, preload=True,
                  epochs=1_000_000)

    def steps(stage: str) -> int:
        return min(schedule[stage], max_steps) if max_steps else schedule[stage]

    def do_simulate():
        stamp = data / "demo_data.json"
        if (stamp.is_file() and json.loads(stamp.read_text()) == {"preset": data_preset, "seed": seed}
                and (data / "source" / MANIFEST).is_file() and (data / "target" / MANIFEST).is_file()):
            say(f"      reusing {data}")
            stages.part(reused=True)
            return
        simulate(data, preset=data_preset, seed=seed, overwrite=True, progress=progress)
        from .io import write_json_atomic

        write_json_atomic(stamp, {"preset": data_preset, "seed": seed})

    stages.run("simulate source (Lumify-like) and target (TeleMED-like) probes", do_simulate)
    source, target = data / "source", data / "target"
    def train(fn, site, run_dir, **kw):
        # A run folder that already holds a checkpoint is resumed: a finished run returns at once
        # with its history, a run killed midway continues exactly where it stopped.
        resume = (run_dir / CHECKPOINT).is_file()
        if resume:
            say(f"      reusing {run_dir}")
        result = fn(site, run_dir, resume=resume, **kw, **common)
        stages.part(reused=resume and not _finite(result.last_loss))  # a finished run makes no step
        return _with_last_loss(result)

    mim = stages.run("pretrain the generative branch (MIM) on unlabeled TARGET frames",
                     lambda: train(pretrain_mim, target, runs / "pretrain_mim", max_steps=steps("mim")))
    con = stages.run("pretrain the contrastive branch (MT-NXent) on unlabeled TARGET frames",
                     lambda: train(pretrain_contrastive, target, runs / "pretrain_contrastive",
                                   max_steps=steps("contrastive"), lr=DEMO_CONTRASTIVE_LR))

    def do_finetune():
        a = train(finetune, source, runs / "finetune_mim", init=mim.encoder_path, recipe=DEMO_RECIPE,
                  max_steps=steps("finetune"))
        b = train(finetune, source, runs / "finetune_contrastive", init=con.encoder_path, recipe=DEMO_RECIPE,
                  max_steps=steps("finetune"))
        return a, b

    ft_mim, ft_con = stages.run("fine-tune both branches on labeled SOURCE frames", do_finetune)
    lower = stages.run("train the lower-bound baseline (SOURCE only, no pretraining)",
                       lambda: train(finetune, source, runs / "baseline_lower", recipe=DEMO_RECIPE,
                                     max_steps=steps("baseline")))

    def do_evaluate():
        branches = evaluate(target, [ft_mim.model_path, ft_con.model_path], out / "eval" / "branches",
                            names=["generative_mim", "contrastive_mtnxent"], fusion=["entropy"], device=device)
        baseline = evaluate(target, [lower.model_path], out / "eval" / "baseline", names=["lower_bound"], device=device)
        return branches, baseline

    ev_branches, ev_lower = stages.run("evaluate on the TARGET test split (per-image Dice/IoU)", do_evaluate)

    def do_export():
        from .export.fused import load_fused
        from .export.onnx import export_onnx

        model = load_fused(ft_mim.model_path, ft_con.model_path, method="entropy", norm="image", return_branches=True)
        return export_onnx(model, out / "export" / "fused.onnx")

    onnx_path = stages.run("export the fused two-branch graph to ONNX", do_export)
    recording = out / "stream" / "target_test_sweep.tvd.h5"

    sweep: dict[str, int] = {}

    def do_stream():
        sweep.update(_write_sweep_recording(load_site(target), recording))
        return _stream(recording, onnx_path, out / "stream", threads=threads, progress=progress)

    stream_report, latency, overlays = stages.run("stream a TARGET test sweep (.tvd.h5) through the ONNX graph", do_stream)

    def do_distill():
        # The teacher is the two branches just fine-tuned (the same seed): distil from them.
        def run(generative, out_dir, **kw):
            return distill(generative, ft_con.model_path, target, source, out_dir, **kw)

        return train(run, ft_mim.model_path, runs / "distill_student", student=DEMO_STUDENT, max_steps=steps("distill"),
                     batch_size=DEMO_DISTILL_BATCH)

    student = stages.run(f"distil a phone-size student ({DEMO_STUDENT}) from both branches on unlabeled TARGET frames",
                         do_distill)

    def do_student():
        return _student_row(student.model_path, target, out, recording, device=device, threads=threads,
                            progress=progress)

    ev_student, student_stream, student_onnx = stages.run(
        "evaluate the student on the TARGET test split, export it to ONNX and stream the same sweep", do_student)

    def do_report():
        total_s = time.perf_counter() - t_start
        total_cpu = _cpu_seconds() - c_start
        return _write_report(
            out, data_preset=data_preset, preset=preset, quick=quick, seed=seed, schedule=schedule,
            runs={"MIM pretraining": mim, "contrastive pretraining": con, "fine-tune MIM": ft_mim,
                  "fine-tune contrastive": ft_con, "lower bound": lower, "distil student": student},
            evals=(ev_branches, ev_lower, ev_student), stream_report=stream_report, latency=latency, overlays=overlays,
            student_stream=student_stream, student_onnx=student_onnx,
            onnx_path=onnx_path, recording=recording, sweep=sweep, stages=stages, total_s=total_s,
            total_cpu=total_cpu,
        )

    report_md, accuracy = stages.run("write the report", do_report)
    say(f"report: {report_md}")
    return DemoResult(out, report_md, accuracy, stream_report, dict(stages.seconds), student_stream)


# ---------------------------------------------------------------------------------------------
# Streaming part


def _write_sweep_recording(site, path: Path, min_frames: int = STREAM_MIN_FRAMES) -> dict[str, int]:
    """The longest target test video (labeled and unlabeled frames, in order) as a TeleMED
    ``.tvd.h5``: each frame is placed inside a larger 'screen' with the B-mode panel at an
    offset, and the ROI attributes point at the panel, as the probe's software records it. The
    sweep is played back to back (timestamps running on) until the recording holds at least
    ``min_frames`` frames. Returns ``{"sweep_frames", "passes", "frames"}``."""
    from .runtime.sources import write_tvd_h5

    test_videos = {r.videoname for r in site.records if r.split == "test"}
    if not test_videos:
        raise DataError(f"{site.root}: no target test split to stream")
    by_video: dict[str, list] = {}
    test_patients = {r.patient for r in site.records if r.split == "test"}
    for r in site.records:
        if r.videoname in test_videos and r.patient in test_patients:
            by_video.setdefault(r.videoname, []).append(r)
    video = max(sorted(by_video), key=lambda v: len(by_video[v]))
    records = sorted(by_video[video], key=lambda r: r.framenum)
    frames = [site.read_image(r) for r in records]
    shape = frames[0].shape
    keep = [(r, f) for r, f in zip(records, frames) if f.shape == shape]
    top, left = SCREEN_BORDER
    h, w = shape
    screen = np.full((len(keep), h + top + 8, w + left + 8), 12, dtype=np.uint8)
    for k, (_, f) in enumerate(keep):
        screen[k, top : top + h, left : left + w] = f
    # The cine loop's frame number at ~30 frames per second gives the acquisition time.
    times = np.array([r.framenum * 1000.0 / 30.0 for r, _ in keep], dtype=np.float64)
    passes = max(1, -(-int(min_frames) // len(keep)))
    period = float(times[-1] - times[0]) + 1000.0 / 30.0  # the next pass starts one frame after the last
    screen = np.concatenate([screen] * passes)
    times = np.concatenate([times + k * period for k in range(passes)])
    roi = (left + 1, left + w, top + 1, top + h)  # 1-based, inclusive
    write_tvd_h5(path, screen, times, roi=roi)
    return {"sweep_frames": len(keep), "passes": passes, "frames": len(screen)}


def _stream(recording: Path, onnx_path: Path, out: Path, *, threads: int | None, progress: bool):
    from .inference import open_backend
    from .runtime.overlay import render_overlay, save_overlay_png
    from .runtime.pipeline import CallbackSink, MaskFileSink, OverlayVideoSink, StreamOptions, run_stream
    from .runtime.sources import TvdH5Source
    from .runtime.stats import RunStats

    backend = open_backend(onnx_path, "ort", threads=threads)
    overlays: list[Path] = []
    with TvdH5Source(recording) as source:
        n = len(source)
        wanted = sorted({int(round(i)) for i in np.linspace(0, n - 1, num=min(3, n))})

        def keep(r):
            if r.index in wanted:
                path = out / f"overlay_frame{r.index:03d}.png"
                save_overlay_png(path, render_overlay(r.frame, r.mask, r.weight))
                overlays.append(path)

        stats = RunStats()
        sinks = [OverlayVideoSink(out / "overlay.mp4", source.fps), MaskFileSink(out / "masks.npz"), CallbackSink(keep)]
        report = run_stream(source, backend, sinks=sinks, report_path=out / "stream_report.json", stats=stats,
                            options=StreamOptions(progress=None if progress else False),
                            extra_report={"model": str(onnx_path), "recording": str(recording)})
    latency = {"end_to_end": stats.end_to_end.samples.copy(), "infer": stats.stages["infer"].samples.copy()}
    return report, latency, overlays


def _student_row(checkpoint: Path, target: Path, out: Path, recording: Path, *, device: str, threads: int | None,
                 progress: bool):
    """(evaluation on the target test split, stream report, ONNX path) of the distilled student:
    scored like the other models, exported like the fused graph, streamed over the same sweep."""
    from .export.fused import load_single
    from .export.onnx import export_onnx
    from .train import evaluate

    evaluation = evaluate(target, [checkpoint], out / "eval" / "student", names=[f"student_{DEMO_STUDENT}"],
                          device=device)
    onnx_path = export_onnx(load_single(checkpoint), out / "export" / "student.onnx")
    report, _, _ = _stream(recording, onnx_path, out / "stream_student", threads=threads, progress=progress)
    return evaluation, report, onnx_path


# ---------------------------------------------------------------------------------------------
# Report


def _plots(out: Path, runs: dict, evals, latency: dict) -> dict[str, Path]:
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import write_bytes_atomic

    def save(fig, name: str) -> Path:
        buf = _io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return write_bytes_atomic(out / "plots" / name, buf.getvalue())

    paths: dict[str, Path] = {}
    # Loss curves: pretraining losses have different units, so each gets its own panel.
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, (title, keys) in zip(
        axes,
        [("MIM pretraining (masked L1)", ["MIM pretraining"]),
         ("contrastive pretraining (MT-NXent)", ["contrastive pretraining"]),
         ("fine-tuning (DiceBCE; dashed = source val)", ["fine-tune MIM", "fine-tune contrastive", "lower bound"]),
         ("distillation (soft BCE + DiceBCE; dashed = source val DiceBCE)", ["distil student"])],
    ):
        for key in keys:
            hist = runs[key].history or []
            tr = [(float(r["step"]), float(r["loss"])) for r in hist if r.get("phase") == "train" and _finite(r.get("loss"))]
            va = [(float(r["step"]), float(r["val_loss"])) for r in hist if r.get("phase") == "val" and _finite(r.get("val_loss"))]
            if tr:
                line = ax.plot(*zip(*tr), label=key, lw=1.2)[0]
                if va:
                    ax.plot(*zip(*va), ls="--", marker="o", ms=3, color=line.get_color())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    paths["loss"] = save(fig, "loss_curves.png")

    dice = {n: d for ev in evals for n, d in ev.dice.items()}
    names = [n for ev in evals for n in ev.names]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.boxplot([dice[n] for n in names], showfliers=False)
    rng = np.random.default_rng(0)
    for i, n in enumerate(names, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, size=len(dice[n])), dice[n], s=8, alpha=0.6)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([DISPLAY_NAMES.get(n, n).replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("per-image Dice (target test)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)
    paths["dice"] = save(fig, "per_image_dice.png")

    fig, ax = plt.subplots(figsize=(7, 3.4))
    for key, label in (("end_to_end", "end to end"), ("infer", "inference only")):
        s = latency[key]
        if s.size:
            ax.hist(s, bins=min(40, max(5, s.size // 3)), alpha=0.6, label=f"{label} (p50 {np.percentile(s, 50):.1f} ms)")
    ax.set_xlabel("latency per frame (ms)")
    ax.set_ylabel("frames")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths["latency"] = save(fig, "latency_histogram.png")
    return paths


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _paired_difference(ev_a, name_a: str, ev_b, name_b: str, n_boot: int = 10_000) -> dict[str, Any]:
    """Model a's paired Dice difference to model b on the same frames, averaged per target test
    patient (frames of one patient are not independent), with a 95 % bootstrap CI over the patients."""
    from .metrics import hierarchical_bootstrap, percentile_interval

    if [r.filename for r in ev_a.records] != [r.filename for r in ev_b.records]:
        raise DataError(f"{name_a} and {name_b} were scored on different frames; cannot pair them")
    patients = [r.patient for r in ev_b.records]
    order = sorted(set(patients))
    diff = ev_a.dice[name_a] - ev_b.dice[name_b]
    per_patient = np.array([[diff[[p == q for p in patients]].mean() for q in order]])
    draws = hierarchical_bootstrap(per_patient, n_boot, seed=0)
    return {"mean": float(per_patient.mean()), "ci95": percentile_interval(draws), "patients": len(order),
            "frames": int(diff.size)}


def _differences_to_lower(ev_branches, ev_lower, n_boot: int = 10_000) -> dict[str, dict[str, Any]]:
    """Each evaluated model's paired Dice difference to the lower bound (:func:`_paired_difference`)."""
    return {name: _paired_difference(ev_branches, name, ev_lower, ev_lower.names[0], n_boot)
            for name in ev_branches.names}


def _student_lines(ev_branches, ev_student, teacher_stream: dict[str, Any], student_stream: dict[str, Any],
                   student_onnx: Path, out: Path) -> tuple[list[str], dict[str, Any]]:
    """The report's student section (the distilled student next to its fused teacher: target Dice
    and streaming FPS) and its JSON record."""
    teacher, student = "fused-entropy", ev_student.names[0]
    diff = _paired_difference(ev_student, student, ev_branches, teacher)
    t_dice, s_dice = float(ev_branches.summaries[teacher].dice_mean), float(ev_student.summaries[student].dice_mean)
    t_fps, s_fps = float(teacher_stream["fps"]), float(student_stream["fps"])
    t_gf, s_gf = teacher_stream["gflops_per_frame"], student_stream["gflops_per_frame"]
    low, high = diff["ci95"]
    ratio = f"1/{t_gf / s_gf:.0f} of the teacher's GFLOPs" if t_gf and s_gf else "its GFLOPs"
    lines = [
        "", "## Phone-size student", "",
        f"A `{DEMO_STUDENT}` student distilled from the two fine-tuned branches: the fused teacher's soft masks on "
        "unlabeled TARGET training frames plus Dice+BCE on SOURCE labels (`pocus-edge distill`, docs/students.md); "
        "scored on the same target test frames and streamed over the same sweep, batch 1:", "",
        "| model | target Dice | FPS (stream) | GFLOPs per frame | ONNX |", "|---|---:|---:|---:|---|",
        f"| fused (entropy) teacher | {t_dice:.4f} | {t_fps:.1f} | {t_gf} | `export/fused.onnx` |",
        f"| {DISPLAY_NAMES.get(student, student)} | {s_dice:.4f} | {s_fps:.1f} | {s_gf} | `{_rel(student_onnx, out)}` |",
        "",
        f"The student runs at {ratio} and streams {s_fps / max(t_fps, 1e-9):.1f}x as fast; its target Dice differs "
        f"from its teacher's by {diff['mean']:+.3f} (95 % CI over the {diff['patients']} test patients "
        f"[{low:+.3f}, {high:+.3f}], one seed), so this demo shows the speed distillation buys, while whether the "
        "student keeps its teacher's accuracy is the study's `student` arm's question (several seeds).",
    ]
    record = {"model": DISPLAY_NAMES.get(student, student), "dice": s_dice, "fps": s_fps, "gflops_per_frame": s_gf,
              "teacher_dice": t_dice, "teacher_fps": t_fps, "difference_to_teacher": diff,
              "onnx": _rel(student_onnx, out), "stream": student_stream}
    return lines, record


def _difference_lines(differences: dict[str, dict[str, Any]], display: dict[str, str], contrastive, schedule) -> list[str]:
    """The report's honest part: each branch against the lower bound with its uncertainty, and
    what a one-seed, few-patient demo can and cannot show."""
    n_patients = next(iter(differences.values()))["patients"] if differences else 0
    lines = ["", "## Each branch against the lower bound", "",
             f"Paired difference in target Dice (branch - lower bound), averaged per test patient, with a 95 % "
             f"bootstrap interval over the {n_patients} test patients (one training seed):", "",
             "| model | Dice difference | 95 % CI |", "|---|---:|---|"]
    below = []
    for name, d in differences.items():
        low, high = d["ci95"]
        lines.append(f"| {display[name]} | {d['mean']:+.4f} | [{low:+.3f}, {high:+.3f}] |")
        if d["mean"] < -0.02:
            below.append(f"{display[name]} ({d['mean']:+.3f})")
    chance = (contrastive.extras or {}).get("chance")
    lines += [
        "",
        f"**What this demo can show**: the whole pipeline working on one machine in minutes: target-only pretraining "
        f"(the contrastive loss ended at {contrastive.last_loss:.3f}"
        + (f" against a chance level of {chance:.3f}" if chance is not None else "")
        + f"), source fine-tuning with one recipe for every model (`{DEMO_RECIPE}`: AdamW, encoder at 0.1x the "
        "decoder's learning rate), fusion, export and streaming.",
        "",
        f"**What it cannot show**: whether pretraining helps. It trains each model once, for "
        f"{', '.join(f'{k} {v}' for k, v in schedule.items())} steps, and scores {n_patients} test patients: "
        "differences between two runs of the same recipe with another seed are of the same size as these "
        "(benchmarks/RESULTS.md section 3 measures the seed-to-seed spread). The intervals above cover the test "
        "patients only, not the training seed. `pocus-edge study` answers the question with paired seeds, "
        "per-patient bootstrap intervals and a verdict (docs/study.md).",
    ]
    if below:
        lines += ["", f"Below the lower bound by more than 0.02 here: {', '.join(below)}. With one seed and "
                  f"{n_patients} test patients this is within the run-to-run spread, not evidence that the branch "
                  "hurts; the study's verdicts are the evidence."]
    lines += ["", "The paper column of the accuracy table is for orientation only (real data, full training)."]
    return lines


def _write_report(out: Path, *, data_preset, preset, quick, seed, schedule, runs, evals, stream_report, latency,
                  overlays, onnx_path, recording, sweep, stages, total_s, total_cpu, student_stream, student_onnx):
    import datetime as _dt
    import platform

    from .io import write_text_atomic

    plots = _plots(out, runs, evals, latency)
    ev_branches, ev_lower, ev_student = evals
    summaries = {n: s for ev in evals for n, s in ev.summaries.items()}
    names = [n for ev in evals for n in ev.names]
    display = {n: DISPLAY_NAMES.get(n, n) for n in names}
    accuracy = {display[n]: {"dice": float(summaries[n].dice_mean), "iou": float(summaries[n].iou_mean), "n": int(summaries[n].n)} for n in names}

    lines = [
        "# pocus-edge demo report",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()} on "
        f"{platform.machine()} ({platform.processor() or 'cpu'}), data preset `{data_preset}`, model preset `{preset}`"
        f"{' (quick schedule)' if quick else ''}, seed {seed}. This run: {total_s / 60:.1f} min wall, {total_cpu / 60:.1f} min CPU"
        + (f" ({len(stages.reused)} stages reused from an earlier run; 'Time per stage' gives their own times)."
           if stages.reused else "."),
        "",
        "Simulated data (bundled phantom): the SOURCE probe (Lumify-like) is fully labeled; the TARGET probe "
        "(TeleMED-like) has no training labels. Both branches were pretrained on unlabeled TARGET frames, "
        "fine-tuned on SOURCE labels, and scored on the TARGET test split; the two sites were never pooled.",
        "",
        "## Accuracy on the target test split",
        "",
        "| model | n | Dice (mean ± sd) | IoU (mean ± sd) | paper DSC (real data, full training) |",
        "|---|---|---|---|---|",
    ]
    untrained = {n for ev in (ev_branches, ev_lower, ev_student) if ev is not None
                 for n, flag in getattr(ev, "did_not_train", {}).items() if flag}
    for n in names:
        s = summaries[n]
        paper = PAPER_TARGET_DSC.get(display[n])
        label = display[n] + (" **(did not train)**" if n in untrained else "")
        lines.append(f"| {label} | {s.n} | {s.dice_mean:.4f} ± {s.dice_std:.4f} | {s.iou_mean:.4f} ± {s.iou_std:.4f} | "
                     + (f"{paper:.4f} |" if paper is not None else "- |"))
    if untrained:
        lines += ["", "**Did not train:** " + ", ".join(display.get(n, n) for n in sorted(untrained)) + ": source-validation "
                  "Dice below 0.1 at the first validation (the flag in its model card). Such a model predicts (almost) "
                  "empty masks; its row says nothing about the method. Run the demo with another `--seed`."]
    differences = _differences_to_lower(ev_branches, ev_lower)
    lines += _difference_lines(differences, display, runs["contrastive pretraining"], schedule)
    student_lines, student_record = _student_lines(ev_branches, ev_student, stream_report, student_stream,
                                                   student_onnx, out)
    lines += student_lines
    lines += [
        "",
        f"![per-image Dice]({_rel(plots['dice'], out)})",
        "",
        "## Speed of the exported model",
        "",
    ]
    r = stream_report
    lat, st = r["latency_ms"], r["stages_ms"]
    lines += [
        f"One target test sweep of {sweep.get('sweep_frames', '?')} frames, played {sweep.get('passes', '?')} times back to "
        f"back ({r['frames_in']} frames, `{_rel(recording, out)}`, ROI-cropped), streamed offline "
        f"through `{_rel(onnx_path, out)}` with `{r['backend']}` ({r['precision']}, {r['device']}), batch 1:",
        "",
        "| frames in / processed / dropped / invalid | FPS | end-to-end latency p50 / p95 / p99 (ms) | GFLOPs per frame |",
        "|---|---|---|---|",
        f"| {r['frames_in']} / {r['frames_processed']} / {r['frames_dropped']} / {r['frames_invalid']} | {r['fps']:.1f} | "
        f"{lat['p50']} / {lat['p95']} / {lat['p99']} | {r['gflops_per_frame']} |",
        "",
        "| stage | p50 (ms) | p95 (ms) | p99 (ms) |",
        "|---|---|---|---|",
    ]
    for stage in ("decode", "preprocess", "infer", "postprocess"):
        lines.append(f"| {stage} | {st[stage]['p50']} | {st[stage]['p95']} | {st[stage]['p99']} |")
    lines += [
        "",
        "End-to-end latency runs from decoding a frame to its outputs being written, queue wait included "
        "(offline mode keeps up to 4 frames queued). Full report: `stream/stream_report.json`; overlay video: "
        "`stream/overlay.mp4`; masks: `stream/masks.npz`.",
        "",
        f"![latency histogram]({_rel(plots['latency'], out)})",
        "",
        "## Overlays",
        "",
        "Frames of the streamed sweep: left, the fused mask (fill and contour); right, the fusion weight of the "
        "generative branch, c_g / (c_g + c_c) (red: the MIM branch is trusted more, blue: the contrastive branch).",
        "",
    ]
    lines += [f"![stream frame]({_rel(p, out)})" for p in overlays]
    eval_overlays = [p for p in (ev_branches.overlays or []) if "fused" in Path(p).name][:2]
    if eval_overlays:
        lines += ["", "Evaluation overlays of the fused model (worst and best target test frames; see `eval/`):", ""]
        lines += [f"![eval overlay]({_rel(p, out)})" for p in eval_overlays]
    lines += [
        "",
        "## Training",
        "",
        f"![loss curves]({_rel(plots['loss'], out)})",
        "",
        "| run | steps | epochs | last train loss | best source val loss |",
        "|---|---|---|---|---|",
    ]
    for name, res in runs.items():
        best = f"{res.best_val:.4f}" if res.best_val is not None else "-"
        chance = f" (chance {res.extras['chance']:.3f})" if "chance" in (res.extras or {}) else ""
        lines.append(f"| {name} | {res.global_step} | {res.epochs_done} | {res.last_loss:.4f}{chance} | {best} |")
    lines += ["", "## Time per stage", "", "| stage | wall (s) | CPU (s) |", "|---|---|---|"]
    for name, sec in stages.seconds.items():
        mark = " (reused)" if name in stages.reused else ""
        lines.append(f"| {name}{mark} | {sec:.0f} | {stages.cpu_seconds.get(name, float('nan')):.0f} |")
    if stages.reused:
        lines += ["", "*(reused)*: done by an earlier run in this folder and reused by this one; the times are those "
                  "of the run that did the stage."]
    lines += ["", f"Reproduce: `pocus-edge demo --out {out} --data-preset {data_preset} --preset {preset}{' --quick' if quick else ''}`", ""]
    report_md = write_text_atomic(out / "report.md", "\n".join(lines))
    from .io import write_json_atomic

    write_json_atomic(out / "report.json", {
        "accuracy": accuracy, "differences_to_lower_bound": {display[k]: v for k, v in differences.items()},
        "recipe": DEMO_RECIPE, "stream": stream_report, "student": student_record, "stage_seconds": stages.seconds,
        "stage_cpu_seconds": stages.cpu_seconds, "stages_reused": stages.reused, "total_seconds": round(total_s, 1),
        "stream_sweep": sweep, "schedule": schedule,
        "data_preset": data_preset, "preset": preset, "quick": quick, "seed": seed,
    })
    return report_md, accuracy
