"""`pocus-edge benchmark`: every available format of the fused segmenter, one row each, and
the same for each compact student asked for (its own rows, tagged with its name).

For each format (formats.FORMATS): status (ok / skipped: reason / failed: reason), artifact
size, Dice and IoU on the site's labeled test frames, mask Dice agreement with the PyTorch fp32
reference (the paper's two-model eager path), latency p50/p95 per batch size, frames per second,
GFLOPs per frame, the fraction of the machine's measured matmul peak for the row's precision,
and peak memory. A failure inside one format (an exception, a time-out, an agreement below its
bar) becomes that row's status and never stops the others.

Students (``--student NAME`` with random weights, ``--student-checkpoint FILE``) get the
exported formats of the same table plus their own eager PyTorch rows (``torch-*``); a student's
agreement is measured against its own fp32 PyTorch output, its speed ratio against the teacher's
two-model baseline. Every row names its ``model`` ("fused" for the teacher).

``--model ARTIFACT`` benchmarks an exported model as it is (an ONNX file, an OpenVINO IR, a
TensorRT engine) without torch: its own backend, plus OpenVINO at fp32/bf16 for an ONNX file
where OpenVINO is installed; agreement is then measured against the artifact's first row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.util
import math
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, DataError, PocusError
from ..metrics import THRESHOLD
from .formats import (
    AGREEMENT_BARS,
    BASELINE,
    STUDENT_BASELINE,
    STUDENT_FORMATS,
    BenchContext,
    FormatSpec,
    Prepared,
    resolve_formats,
)
from .machine import describe_machine, device_label, load_average, probe_matmul
from .schema import SCHEMA_VERSION, row_label, validate_report


@dataclass
class BenchmarkOptions:
    """Everything one benchmark run needs. Either two checkpoints or a preset (random weights)
    for the teacher, and optionally students: registered names (random weights at
    ``student_preset``, default the teacher's preset, else paper) and student checkpoints."""

    generative: Path | None = None
    contrastive: Path | None = None
    model: Path | None = None  # an exported artifact, benchmarked as it is (no torch needed)
    preset: str | None = None
    data: Path | None = None  # a site folder: its labeled test frames are the eval set
    formats: list[str] | None = None  # None = every format
    batches: tuple[int, ...] = (1, 8)
    runs: int = 20  # timed calls per batch size (fewer if time_per_batch_s runs out first)
    warmup: int = 2  # untimed calls per batch size before the timed ones (compilation happens here)
    time_per_batch_s: float = 30.0  # stop timing a batch size after this long (at least min_runs)
    min_runs: int = 3
    format_timeout_s: float = 600.0  # hard limit per format (setup + eval + timing)
    max_frames: int = 32  # eval frames taken from the site's labeled test split
    eval_batch: int | None = None  # batch for the accuracy pass; None = the largest timed batch (max 32)
    device: str = "cpu"
    threads: int | None = None  # torch and onnxruntime intra-op threads (None = library default)
    method: str = "entropy"
    norm: str = "image"
    formula: str = "weighted"
    compile_mode: str | None = None
    compile_backend: str = "inductor"  # tests use "aot_eager": same tracing, no C++/Triton codegen
    device_name: str | None = None  # override the recorded device name (e.g. "Jetson Orin Nano")
    probe: bool = True  # measure a matmul rate for devices without a devices.yaml entry
    workdir: Path | None = None
    providers: list[str] | None = None  # onnxruntime execution providers (cpu, cuda, tensorrt, openvino, coreml)
    hostname: bool = False  # record the machine's hostname in the report
    seed: int = 0
    command: str = ""
    students: tuple[str, ...] = ()  # registered student names, random weights
    student_checkpoints: tuple[Path, ...] = ()  # student checkpoints (.safetensors, kind: student)
    student_preset: str | None = None  # preset of the random-weight students
    teacher: bool = True  # False: student rows only (no fused teacher)
    model_name: str | None = None  # the model label of an exported artifact's rows (--model)


# ---------------------------------------------------------------------------------------------
# Inputs: models and frames


def _build_fused(opts: BenchmarkOptions, device):
    """The fp32 FusedSegmenter from two checkpoints, or from a preset with random weights."""
    import torch

    from ..models.fused import FusedSegmenter, load_fused

    fusion = dict(method=opts.method, norm=opts.norm, formula=opts.formula)
    if opts.generative or opts.contrastive:
        if not (opts.generative and opts.contrastive):
            raise ConfigError("give both --generative and --contrastive checkpoints (or neither, with --preset)")
        fused = load_fused(opts.generative, opts.contrastive, **fusion)
        weights = f"{opts.generative} + {opts.contrastive}"
        preset = (fused.cards.get("generative") or {}).get("preset") or fused.generative.cfg.name
    else:
        if not opts.preset:
            raise ConfigError("give --generative and --contrastive checkpoints, --preset for random weights, or --model for an exported artifact")
        from ..config import model_preset
        from ..models.transunet import TransUNet

        cfg = model_preset(opts.preset)
        torch.manual_seed(opts.seed)
        generative = TransUNet(cfg)
        torch.manual_seed(opts.seed + 1)
        contrastive = TransUNet(cfg)
        fused = FusedSegmenter(generative, contrastive, **fusion)
        weights = "random"
        preset = opts.preset
    return fused.eval().to(device), preset, weights


def _eval_frames(opts: BenchmarkOptions, img_size: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(frames float32 (N,3,S,S), masks float32 (N,1,S,S) or None, description)."""
    from ..data.transforms import preprocess_frame, preprocess_mask

    if opts.data is None:
        rng = np.random.default_rng(opts.seed)
        n = max(opts.eval_batch or 1, min(opts.max_frames, 8))
        # Smooth random blobs rather than white noise: closer to ultrasound texture statistics,
        # so reduced-precision errors are measured on inputs of a realistic spectrum.
        import cv2

        frames = []
        for _ in range(n):
            small = rng.random((img_size // 8, img_size // 8)).astype(np.float32)
            frames.append(cv2.resize(small, (img_size, img_size), interpolation=cv2.INTER_CUBIC).clip(0, 1))
        stack = np.stack(frames)[:, None].repeat(3, axis=1).astype(np.float32)
        return stack, None, "random (no --data)"
    from ..data.layout import load_site

    site = load_site(opts.data)
    records = site.select("test", labeled=True)
    if not records:
        raise DataError(f"{opts.data}: no labeled frames in the test split (run `pocus-edge split` first?)")
    records = records[: opts.max_frames]
    frames = np.stack([preprocess_frame(site.read_image(r), img_size) for r in records])
    masks = np.stack([preprocess_mask(site.read_mask(r), img_size) for r in records])
    return frames, masks, f"{site.root} test split ({len(records)} labeled frames)"


def _decisive_random_head(fused, frames: np.ndarray, device) -> None:
    """Random weights give all-empty masks on which every format "agrees" trivially: rescale each
    branch's output head (logits median 0, standard deviation 4 on the eval frames) so that the
    agreement check measures real disagreement. Only done for random weights."""
    import torch

    from ..export.parity import spread_head_logits

    x = torch.from_numpy(frames).to(device)
    for branch in (fused.generative, fused.contrastive):
        spread_head_logits(branch, x, std=4.0)


# ---------------------------------------------------------------------------------------------
# Measurement helpers


class _RssSampler:
    """Peak resident set size while a format prepares and runs, sampled from /proc every 10 ms
    (ru_maxrss is a process-lifetime high-water mark, useless after the first big format)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = self.read()

    @staticmethod
    def read() -> int | None:
        """Resident bytes now (Linux /proc), else the peak so far (ru_maxrss, macOS/BSD), else
        None where neither exists (Windows: the row's memory stays unmeasured)."""
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * _page_size()
        except (OSError, ValueError, IndexError):
            try:
                import resource
            except ImportError:  # Windows
                return None
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _loop(self) -> None:
        while not self._stop.is_set() and self.baseline is not None:
            self.peak = max(self.peak, self.read())
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RssSampler":
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.baseline is not None:
            self.peak = max(self.peak, self.read())

    @property
    def delta(self) -> int | None:
        return None if self.baseline is None else max(0, self.peak - self.baseline)


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


class FormatTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise FormatTimeout in the main thread after ``seconds`` (SIGALRM; a no-op where signals
    are unavailable: other threads, Windows). Long C++ calls are interrupted when they return."""
    usable = seconds and seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise FormatTimeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _predict(prepared: Prepared, frames: np.ndarray, batch: int) -> np.ndarray:
    """Probabilities for ``frames`` in chunks of exactly ``batch`` (the last chunk is padded with
    repeated frames, whose outputs are dropped): one input shape, so a compiled or fixed-batch
    format is not rebuilt for a short tail."""
    outs = []
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out = prepared.to_numpy(prepared.infer(prepared.to_input(chunk)))
        outs.append(np.asarray(out, dtype=np.float32).reshape(-1, 1, *frames.shape[2:])[:n])
    return np.concatenate(outs)


def _dice_iou(prediction: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU with smoothing 1 (pocus_edge.metrics, docs/method.md)."""
    from ..metrics import dice_iou_per_image

    return dice_iou_per_image(prediction, target, threshold=THRESHOLD)


def _time_batch(prepared: Prepared, frames: np.ndarray, batch: int, opts: BenchmarkOptions) -> dict[str, Any]:
    reps = math.ceil(batch / len(frames))
    native = prepared.to_input(np.concatenate([frames] * reps)[:batch])
    t0 = time.perf_counter()
    for _ in range(max(1, opts.warmup)):
        prepared.infer(native)
    warmup_s = time.perf_counter() - t0
    times: list[float] = []
    cpu_times: list[float] = []
    budget_end = time.perf_counter() + opts.time_per_batch_s
    while len(times) < opts.runs and (len(times) < opts.min_runs or time.perf_counter() < budget_end):
        c = time.process_time()
        t = time.perf_counter()
        prepared.infer(native)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    ms = np.asarray(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {
        "batch": batch,
        "p50_ms": p50,
        "p95_ms": float(np.percentile(ms, 95)),
        "fps": batch / (p50 / 1e3),
        "runs": len(times),
        "warmup_s": warmup_s,
        # CPU seconds this process used per call (all threads): on a shared, oversubscribed
        # machine wall time measures the neighbours too; CPU time measures the work.
        "cpu_p50_ms": float(np.percentile(np.asarray(cpu_times) * 1e3, 50)),
    }


def _load1() -> float | None:
    load = load_average()
    return load[0] if load else None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else type(exc).__name__
    if "timed out after" in text:  # a FormatTimeout re-wrapped by a library (InductorError, ...)
        text = text[text.index("timed out after"):]
        return text[:300]
    if not isinstance(exc, (PocusError, FormatTimeout)):
        text = f"{type(exc).__name__}: {text}"
    return text[:300]


def _empty_row(spec: FormatSpec, device: str, gflops: float) -> dict[str, Any]:
    return {
        "format": spec.name,
        "precision": spec.precision,
        "engine": spec.engine,
        "device": device,
        "status": "skipped",
        "reason": "",
        "artifact_bytes": None,
        "dice": None,
        "iou": None,
        "agreement_dice": None,
        "agreement_bar": spec.agreement_bar,
        "max_abs_diff": None,
        "gflops_per_frame": gflops,
        "peak_memory_bytes": None,
        "memory_kind": None,
        "setup_s": None,
        "latency": [],
        "load_average": None,
    }


def run_format(
    spec: FormatSpec,
    ctx: BenchContext,
    opts: BenchmarkOptions,
    frames: np.ndarray,
    masks: np.ndarray | None,
    reference: np.ndarray | None,
    gflops: float,
) -> dict[str, Any]:
    """Measure one format; every outcome (skip, exception, time-out, agreement below the bar)
    is recorded in the returned row rather than raised."""
    row = _empty_row(spec, str(ctx.device), gflops)
    try:
        reason = spec.check(ctx)
    except Exception as exc:  # a broken availability check is a failure of that format only
        reason = None
        row.update(status="failed", reason=f"availability check: {_one_line(exc)}")
        return row
    if reason:
        row["reason"] = reason
        return row
    cuda = ctx.device.type == "cuda"
    prepared: Prepared | None = None
    sampler = _RssSampler()
    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    load_before = _load1()
    try:
        with _time_limit(opts.format_timeout_s), sampler:
            t0 = time.perf_counter()
            prepared = spec.prepare(ctx)
            row["setup_s"] = time.perf_counter() - t0
            row["artifact_bytes"] = prepared.artifact_bytes
            # Timing first: a compiled format compiles in its warm-up calls, so the compilation
            # time is reported as warm-up (the accuracy pass reuses the largest batch's graph).
            for batch in opts.batches:
                row["latency"].append(_time_batch(prepared, frames, batch, opts))
            probs = _predict(prepared, frames, opts.eval_batch)
            if masks is not None:
                dice, iou = _dice_iou(probs, masks)
                row["dice"], row["iou"] = float(dice.mean()), float(iou.mean())
            if reference is not None:
                agreement, _ = _dice_iou(probs, (reference > THRESHOLD).astype(np.float32))
                row["agreement_dice"] = float(agreement.mean())
                row["max_abs_diff"] = float(np.abs(probs - reference).max())
        if cuda:
            row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(ctx.device))
            row["memory_kind"] = "cuda_max_allocated"
        else:
            row["peak_memory_bytes"] = sampler.delta
            row["memory_kind"] = "rss_delta"
        if row["agreement_dice"] is not None and row["agreement_dice"] < spec.agreement_bar:
            row.update(
                status="failed",
                reason=f"mask agreement {row['agreement_dice']:.4f} below the {spec.precision} bar {spec.agreement_bar}",
            )
        else:
            row["status"] = "ok"
    except Exception as exc:
        # Latencies measured before the failure stay: a compile that times out at batch 1
        # after finishing batch 32 still tells the batch-32 speed.
        row.update(status="failed", reason=_one_line(exc))
    finally:
        # The 1-minute load average before and after: timings on a shared machine need it.
        row["load_average"] = [load_before, _load1()] if load_before is not None else None
        if prepared is not None and prepared.close is not None:
            with contextlib.suppress(Exception):
                prepared.close()
    return row


# ---------------------------------------------------------------------------------------------
# The run


def gflops_per_frame(fused) -> float:
    """GFLOPs (2 x multiply-adds, torch.utils.flop_counter via pocus_edge.models.flops) of one
    frame through both branches and the fusion head. Counted on a weightless twin on the meta
    device: the shapes fix the count, and no arithmetic (seconds for the paper preset) runs."""
    import torch

    from ..models.flops import count_flops
    from ..models.fused import FusedSegmenter
    from ..models.transunet import TransUNet

    shape = (1, 3, fused.img_size, fused.img_size)
    try:
        with torch.device("meta"):
            twin = FusedSegmenter(
                TransUNet(fused.generative.cfg), TransUNet(fused.contrastive.cfg),
                method=fused.method, norm=fused.norm, formula=fused.formula,
            )
        return count_flops(twin, shape) / 1e9
    except Exception:  # a layer without a meta kernel: count the real model instead
        return count_flops(fused, shape) / 1e9


class _Device(str):
    """The CPU device where torch is absent: ``.type`` like a torch.device."""

    @property
    def type(self) -> str:
        return str(self).split(":")[0]


def _resolve_device(name: str):
    try:
        import torch
    except ImportError:
        if name != "cpu":
            from ..errors import ToolchainUnavailable

            raise ToolchainUnavailable(f"--device {name}: benchmarking on a GPU without torch is not supported; use --device cpu") from None
        return _Device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..errors import ToolchainUnavailable

        raise ToolchainUnavailable(f"--device {name}: no CUDA GPU is visible on this machine")
    return device


def run_benchmark(
    opts: BenchmarkOptions,
    *,
    on_row: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    on_start: Callable[[FormatSpec], None] | None = None,
) -> dict[str, Any]:
    """Run every selected format of every model and return the report (schema.REPORT_SCHEMA).

    ``on_start(spec)`` is called before each format and ``on_row(row, report)`` after it with the
    report so far, so callers can print progress and write partial JSON.
    """
    if any(b < 1 for b in opts.batches) or not opts.batches:
        raise ConfigError(f"--batch sizes must be positive integers, got {list(opts.batches)}")
    students = bool(opts.students or opts.student_checkpoints)
    if opts.model is not None and (opts.generative or opts.contrastive or opts.formats or students):
        raise ConfigError("--model benchmarks one exported artifact: drop --generative/--contrastive/--formats/--student")
    if opts.model is None and not opts.teacher and not students:
        raise ConfigError("--no-teacher leaves nothing to measure: add --student NAME or --student-checkpoint FILE")
    _check_choices(opts)
    device = _resolve_device(opts.device)
    if opts.eval_batch is None:
        # The largest timed batch: a compiled format then sees no extra input shape.
        opts = dataclasses.replace(opts, eval_batch=min(max(opts.batches), 32))
    if opts.threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(opts.threads)
    with contextlib.ExitStack() as stack:
        workdir = opts.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pocus-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        setups = [_artifact_setup(opts, device, workdir)] if opts.model is not None else _model_setups(opts, device, workdir)
        report = _new_report(opts, device, setups)
        for setup in setups:
            for spec in setup["specs"]:
                if on_start:
                    on_start(spec)
                row = run_format(spec, setup["ctx"], opts, setup["frames"], setup["masks"], setup["reference"], setup["gflops"])
                row["model"] = setup["label"]
                annotate_peak_fraction(row, report["machine"])
                report["rows"].append(row)
                if on_row:
                    on_row(row, report)
    validate_report(report, source="benchmark report (internal)")
    return report


def _check_choices(opts: BenchmarkOptions) -> None:
    """Format, preset and student names are refused before any model is built or loaded."""
    from ..config import model_preset

    if opts.formats:
        resolve_formats(opts.formats)
    for preset in (opts.preset, opts.student_preset):
        if preset:
            model_preset(preset)
    if opts.students:
        from ..models.students import student_config

        for name in opts.students:
            student_config(name, opts.student_preset or opts.preset or "paper")


def _model_setups(opts: BenchmarkOptions, device, workdir: Path) -> list[dict[str, Any]]:
    """The teacher's setup (unless ``--no-teacher``), then one per student."""
    setups = [_model_setup(opts, device, workdir)] if opts.teacher else []
    teacher_preset = setups[0]["model"]["preset"] if setups else None
    preset = opts.student_preset or opts.preset or teacher_preset or "paper"
    sources = [("name", name) for name in opts.students] + [("checkpoint", Path(p)) for p in opts.student_checkpoints]
    labels: list[str] = []
    for kind, value in sources:
        setup = _student_setup(opts, device, workdir, preset if kind == "name" else None, value)
        if setup["label"] in labels and kind == "checkpoint":  # two checkpoints of one student: name the file
            setup["label"] = f"{setup['label']}:{Path(value).stem}"
        if setup["label"] in labels:
            raise ConfigError(f"student {setup['label']!r} is given twice")
        setup["ctx"].label = "student-" + setup["label"].replace(":", "-")
        labels.append(setup["label"])
        setups.append(setup)
    return setups


def _model_setup(opts: BenchmarkOptions, device, workdir: Path) -> dict[str, Any]:
    """The fused model (checkpoints or a preset's random weights), its eval frames, the
    registry's formats and the agreement reference: the paper's two-model fp32 path."""
    from ..models.flops import count_params

    specs = resolve_formats(opts.formats)
    fused, preset, weights = _build_fused(opts, device)
    frames, masks, frames_source = _eval_frames(opts, fused.img_size)
    if weights == "random":
        _decisive_random_head(fused, frames, device)
    ctx = BenchContext(
        fused=fused,
        device=device,
        img_size=fused.img_size,
        workdir=workdir,
        calibration=frames[: max(1, min(len(frames), 16))],
        checkpoints=(Path(opts.generative), Path(opts.contrastive)) if opts.generative else None,
        max_batch=max(64, max(opts.batches)),
        threads=opts.threads,
        compile_mode=opts.compile_mode,
        compile_backend=opts.compile_backend,
        providers=opts.providers,
    )
    model = {"preset": preset, "img_size": fused.img_size, "gflops_per_frame": gflops_per_frame(fused),
             "params": count_params(fused), "fusion": {"method": opts.method, "norm": opts.norm, "formula": opts.formula},
             "weights": weights, "name": "fused"}
    # Computed once, outside the rows, so that a planted or real failure of the baseline row
    # cannot remove it.
    reference = _reference_probs(ctx, frames, opts, BASELINE)
    return {"specs": specs, "ctx": ctx, "frames": frames, "masks": masks, "frames_source": frames_source,
            "reference": reference, "gflops": model["gflops_per_frame"], "model": model, "label": "fused"}


def _build_student(opts: BenchmarkOptions, device, preset: str | None, source) -> tuple[Any, str, str]:
    """(the student as a SingleSegmenter in its reparameterized inference form, its label,
    where its weights came from): a checkpoint, or a registered name with random weights."""
    import torch

    from ..models.fused import SingleSegmenter, load_single
    from ..models.students import build_student

    if preset is None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: student checkpoint not found")
        model = load_single(path)
        if model.kind != "student":
            raise ConfigError(f"{path}: not a student checkpoint (its card's kind is not 'student'); benchmark a "
                              "fused pair with --generative/--contrastive")
        return model.to(device), str(model.cfg.name), str(path)
    torch.manual_seed(opts.seed)
    network = build_student(str(source), preset).eval().reparameterize()
    return SingleSegmenter(network).eval().to(device), str(source), "random"


def _student_setup(opts: BenchmarkOptions, device, workdir: Path, preset: str | None, source) -> dict[str, Any]:
    """One student's rows: its eval frames at its own input size, the student formats, and its
    own fp32 PyTorch output as the agreement reference."""
    from ..export.parity import spread_head_logits
    from ..models.flops import count_flops, count_params

    student, label, weights = _build_student(opts, device, preset, source)
    frames, masks, frames_source = _eval_frames(opts, student.img_size)
    if weights == "random":
        import torch

        spread_head_logits(student.network, torch.from_numpy(frames).to(device), std=4.0)
    ctx = BenchContext(fused=student, device=device, img_size=student.img_size, workdir=workdir,
                       calibration=frames[: max(1, min(len(frames), 16))],
                       checkpoints=(Path(source),) if weights != "random" else None,
                       max_batch=max(64, max(opts.batches)), threads=opts.threads, compile_mode=opts.compile_mode,
                       compile_backend=opts.compile_backend, providers=opts.providers)
    gflops = count_flops(student, tuple(student.input_shape(1))) / 1e9
    model = {"name": label, "kind": "student", "preset": student.cfg.preset, "encoder": student.cfg.encoder,
             "img_size": student.img_size, "gflops_per_frame": gflops, "params": count_params(student),
             "weights": weights, "frames_source": frames_source}
    reference = _reference_probs(ctx, frames, opts, STUDENT_BASELINE)
    return {"specs": resolve_formats(opts.formats, STUDENT_FORMATS), "ctx": ctx, "frames": frames, "masks": masks,
            "frames_source": frames_source, "reference": reference, "gflops": gflops, "model": model, "label": label}


def _artifact_label(card: dict[str, Any], opts: BenchmarkOptions) -> str:
    """The model an exported artifact holds, as rows name it: --model-name, else its card's
    student name, "fused" for the fused pair, "network" otherwise."""
    from ..card import is_student_card

    if opts.model_name:
        return opts.model_name
    if is_student_card(card):
        return str(card.get("student") or (card.get("model") or {}).get("name") or "student")
    return "fused" if card.get("kind") == "fused-two-branch" or card.get("fusion") else "network"


def _artifact_setup(opts: BenchmarkOptions, device, workdir: Path) -> dict[str, Any]:
    """An exported artifact as it is: its own backend first (the agreement reference), then
    OpenVINO on the same ONNX file at fp32 and bf16 where OpenVINO is installed."""
    from ..inference import backend_for, open_backend

    path = Path(opts.model)
    kind = backend_for(path)
    kwargs: dict[str, Any] = {"device": str(device), "threads": opts.threads}  # threads: a hint the backend may ignore
    if opts.providers:
        kwargs["providers"] = opts.providers
    first = open_backend(path, kind, **kwargs)
    card = first.card or {}
    precision = first.precision if first.precision in AGREEMENT_BARS else "unknown"
    label = "+".join(p.replace("ExecutionProvider", "").lower() for p in getattr(first, "providers", [])) or kind
    specs = [_artifact_spec(f"{kind}-{precision}", precision, kind, f"{path.name} in {label}", lambda ctx: first)]
    if kind == "ort" and device.type == "cpu" and importlib.util.find_spec("openvino") is not None:
        from .machine import native_bf16_cpu

        # An fp32 graph at fp32 and bf16; an int8 graph as it is (its fp32 parts pinned to f32).
        hints = {"fp32": ("fp32", "bf16"), "unknown": ("fp32", "bf16"), "int8": ("int8",)}.get(precision, ())
        for hint in hints:
            if hint == "bf16" and not native_bf16_cpu():
                continue
            specs.append(_artifact_spec(f"openvino-{hint}", hint, "openvino", f"{path.name} compiled by OpenVINO at {hint}",
                                        lambda ctx, hint=hint: open_backend(path, "openvino", device="cpu", threads=opts.threads, precision=hint)))
    frames, masks, frames_source = _eval_frames(opts, first.img_size)
    ctx = BenchContext(fused=None, device=device, img_size=first.img_size, workdir=workdir, calibration=frames[:1],
                       threads=opts.threads, providers=opts.providers, artifact=path)
    reference = _predict(_artifact_prepared(first, path), frames, opts.eval_batch)
    gflops = first.gflops_per_frame
    name = _artifact_label(card, opts)
    model = {"preset": card.get("preset") or "unknown", "img_size": int(first.img_size), "gflops_per_frame": gflops or 0.0,
             "params": None, "fusion": card.get("fusion") or {}, "weights": f"exported artifact {path.name}", "name": name,
             "artifact": {"file": str(path), "backend": kind, "precision": first.precision, "card": bool(card)}}
    return {"specs": specs, "ctx": ctx, "frames": frames, "masks": masks, "frames_source": frames_source,
            "reference": reference, "gflops": gflops, "model": model, "label": name}


def _artifact_prepared(backend, path: Path) -> Prepared:
    from .formats import _backend_prepared

    return _backend_prepared(backend, path)


def _artifact_spec(name: str, precision: str, engine: str, summary: str, opener) -> FormatSpec:
    return FormatSpec(name, precision, engine, summary, lambda ctx: None, lambda ctx: _artifact_prepared(opener(ctx), ctx.artifact))


def _new_report(opts: BenchmarkOptions, device, setups: list[dict[str, Any]]) -> dict[str, Any]:
    machine = describe_machine(hostname=opts.hostname)
    machine["device"] = str(device)
    machine["device_name"] = opts.device_name or device_label(machine, str(device))
    if opts.probe:
        # The peak each row's achieved rate is divided by, measured in this run, per precision.
        with contextlib.suppress(Exception):
            probe = probe_matmul(str(device), threads=opts.threads)
            machine["matmul_gflops"], machine["matmul_engine"] = probe["gflops"], probe["engine"]
    torch = sys.modules.get("torch")
    main = setups[0]  # the teacher (or the artifact, or the first student when there is no teacher)
    model = dict(main["model"])
    model.setdefault("fusion", {})
    return {
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command,
        "machine": machine,
        "model": model,
        "students": [s["model"] for s in setups if s["model"].get("kind") == "student"],
        "data": {"source": main["frames_source"], "frames": int(len(main["frames"])), "labeled": main["masks"] is not None},
        "settings": {
            "batches": list(opts.batches),
            "runs": opts.runs,
            "warmup": opts.warmup,
            "time_per_batch_s": opts.time_per_batch_s,
            "format_timeout_s": opts.format_timeout_s,
            "threads": opts.threads or (torch.get_num_threads() if torch is not None else None),
            "providers": opts.providers,
            "formats": list(dict.fromkeys(s.name for setup in setups for s in setup["specs"])),
        },
        "rows": [],
    }


def annotate_peak_fraction(row: dict[str, Any], machine: dict[str, Any]) -> None:
    """Each timed batch of ``row`` gets ``fraction_of_peak``: achieved GFLOP/s (FPS x GFLOPs
    per frame) over the machine's measured matmul rate for the row's precision."""
    peak = (machine.get("matmul_gflops") or {}).get(row["precision"])
    gflops = row.get("gflops_per_frame")
    for lat in row["latency"]:
        if peak and gflops:
            lat["fraction_of_peak"] = lat["fps"] * gflops / peak


def _reference_probs(ctx: BenchContext, frames: np.ndarray, opts: BenchmarkOptions, baseline: str) -> np.ndarray:
    """The agreement reference: ``baseline`` (the teacher's two-model path, or a student's
    torch-fp32) on the eval frames."""
    from .formats import FORMATS

    prepared = {**FORMATS, **STUDENT_FORMATS}[baseline].prepare(ctx)
    return _predict(prepared, frames, opts.eval_batch)


# ---------------------------------------------------------------------------------------------
# Presentation


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_fps(fps: float) -> str:
    """Frames per second with 3 significant digits at least (0.134, 7.52, 31.4, 2,480)."""
    return f"{fps:,.0f}" if fps >= 100 else f"{fps:.3g}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_report(report: dict[str, Any], console=None) -> None:
    """Print the report as a rich table (one row per format, one latency column per batch)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    machine, model = report["machine"], report["model"]
    batches = report["settings"]["batches"]
    baseline = next((r for r in report["rows"] if r["format"] == BASELINE and r["status"] == "ok"), None)
    base_fps = {lat["batch"]: lat["fps"] for lat in baseline["latency"]} if baseline else {}
    title = (
        f"pocus-edge benchmark: {model.get('name', 'fused')} at {model['preset']} ({model['weights']} weights), {model['gflops_per_frame']:.4g} GFLOPs/frame, "
        f"{machine['device_name']} [{machine['device']}], {machine['cpu']['cores']} cores, "
        f"eval: {report['data']['source']}"
    )
    table = Table(title=escape(title), title_justify="left")
    for col, justify in (("format", "left"), ("status", "left"), ("size", "right"), ("Dice", "right"), ("IoU", "right"), ("agree", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    cpu_device = machine["device"] == "cpu"
    for b in batches:
        table.add_column(f"b{b} p50/p95 ms", justify="right")
        if cpu_device:
            table.add_column(f"b{b} cpu ms", justify="right")
        table.add_column(f"b{b} FPS (x)", justify="right")
        table.add_column(f"b{b} % peak", justify="right")
    table.add_column("peak mem", justify="right")
    table.add_column("setup s", justify="right")
    notes: list[str] = []
    for row in report["rows"]:
        style = {"ok": "green", "skipped": "yellow", "failed": "red"}[row["status"]]
        status = row["status"]
        if row["reason"]:
            # Reasons are long sentences: footnotes keep the table narrow enough to read.
            notes.append(f"[{len(notes) + 1}] {row_label(row)}: {row['status']}: {row['reason']}")
            status = f"{status} [{len(notes)}]"
        lat = {l["batch"]: l for l in row["latency"]}
        cells = []
        for b in batches:
            if b in lat:
                ratio = f" ({lat[b]['fps'] / base_fps[b]:.2f}x)" if base_fps.get(b) else ""
                cells.append(f"{lat[b]['p50_ms']:.1f}/{lat[b]['p95_ms']:.1f}")
                if cpu_device:
                    cells.append(_fmt(lat[b].get("cpu_p50_ms"), ".1f"))
                cells.append(f"{fmt_fps(lat[b]['fps'])}{ratio}")
                fraction = lat[b].get("fraction_of_peak")
                cells.append("-" if fraction is None else f"{100 * fraction:.0f}%")
            else:
                cells += ["-"] * (4 if cpu_device else 3)
        table.add_row(
            row_label(row),
            f"[{style}]{status}[/{style}]",
            _fmt_bytes(row["artifact_bytes"]),
            _fmt(row["dice"], ".4f"),
            _fmt(row["iou"], ".4f"),
            _fmt(row["agreement_dice"], ".4f"),
            *cells,
            _fmt_bytes(row["peak_memory_bytes"]),
            _fmt(row["setup_s"], ".1f"),
        )
    console.print(table)
    for student in report.get("students") or []:
        console.print(f"student {student['name']}: {student['encoder']} at preset {student['preset']} ({student['img_size']} px), "
                      f"{student['params']:,} parameters, {student['gflops_per_frame']:.3g} GFLOPs/frame, {student['weights']} weights; "
                      f"agreement against its own fp32 PyTorch output", highlight=False, markup=False)
    for note in notes:
        console.print(note, highlight=False, markup=False)
    probe = machine.get("matmul_gflops") or {}
    if probe:
        engines = machine.get("matmul_engine") or {}
        rates = ", ".join(f"{p} {v:,.0f}" + (f" ({engines[p]})" if p in engines else "") for p, v in probe.items())
        console.print(f"% peak: achieved GFLOP/s over this run's measured matmul rate per precision (GFLOP/s; int8 GOPS): {rates}",
                      highlight=False, markup=False)
