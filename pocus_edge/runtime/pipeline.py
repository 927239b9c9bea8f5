"""source -> preprocess -> infer -> threshold -> sinks, with honest statistics.

A producer thread pulls frames from the source (decode) and preprocesses them into a bounded
queue, so decoding and preprocessing of frame k+1 overlap inference of frame k (onnxruntime
and PyTorch release the GIL); the calling thread runs the backend, thresholds and feeds the
sinks.

* offline (default, ``drop=False``): the producer blocks when the queue is full; every frame
  is processed.
* ``realtime=True``: frames of a recorded source are released at their own timestamps (live
  sources are already paced by the sender). A timestamp that jumps forwards or backwards by
  more than ``max_time_jump_s`` (wall-clock seconds at the playback speed) re-bases the clock
  instead of being slept on; re-bases are counted (``timestamps_rebased``). With ``drop=True`` (the realtime default) a
  full queue drops its OLDEST frame, so the display always shows the newest one; drops are
  counted. ``drop=False`` keeps pacing but never drops (the run falls behind real time).

Nothing grows with the stream's length: the queue is bounded, latency samples live in a
fixed-size reservoir, and sinks write each frame out as it comes.

A graph with the per-frame ``risk`` output (:mod:`.risk`) gets its risk read per frame, compared
with the card's (or a qualify file's) threshold and fed to the drift alarm
(:class:`~.drift.DriftMonitor`) after the timed inference, in frame order; the report gains a
``risk`` section and each frame result carries its risk, alarm and level to the sinks.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import ConfigError, DataError, OutputError
from ..metrics import binarize
from .base import FrameResult, Sink
from .feed import END, FrameQueue, Item, Pacer, produce
from .interrupts import InterruptGuard
from .risk import RiskSetup, RiskTracker, risk_setup
from .sinks import CallbackSink, MaskFileSink, OutputSet, OverlayVideoSink  # noqa: F401  (importable from here, as before)
from .stats import ProgressLine, RunStats


@dataclass
class StreamOptions:
    realtime: bool = False
    drop: bool | None = None  # None: drop when realtime, never offline
    queue_size: int = 4
    batch_size: int = 1
    max_frames: int | None = None
    threshold: float | None = None  # None: the model card's (0.5)
    speed: float = 1.0  # realtime playback speed factor for recorded sources
    max_time_jump_s: float = 10.0  # realtime: a larger timestamp jump re-bases the clock
    progress: bool | None = None  # None: when stderr is a terminal
    report_every_s: float | None = None  # rewrite the JSON report periodically (long streams)

    @property
    def dropping(self) -> bool:
        return self.realtime if self.drop is None else bool(self.drop)


def _check_options(opts: StreamOptions) -> None:
    if opts.batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {opts.batch_size}")
    if not (np.isfinite(opts.speed) and opts.speed > 0):
        raise ConfigError(f"speed must be a positive number, got {opts.speed}")
    if not (np.isfinite(opts.max_time_jump_s) and opts.max_time_jump_s > 0):
        raise ConfigError(f"max time jump must be a positive number of seconds, got {opts.max_time_jump_s}")


def run_stream(
    source,
    backend,
    *,
    options: StreamOptions | None = None,
    sinks: Iterable[Sink] = (),
    report_path: str | os.PathLike | None = None,
    extra_report: dict | None = None,
    stats: RunStats | None = None,
    risk: RiskSetup | None = None,
) -> dict[str, Any]:
    """Stream ``source`` through ``backend`` into ``sinks``; return (and optionally write,
    atomically) the JSON report. Pass a fresh ``stats`` to keep the latency samples (plots).

    Ctrl-C or SIGTERM (in the main thread) stops the run at the next batch: every processed
    frame is in every output, the report is written, then the interrupt is raised again
    (:mod:`.interrupts`). A source that ends before its first frame raises DataError, and its
    outputs are discarded.

    ``risk``: the risk threshold and drift band (:func:`.risk.risk_setup`); None reads them
    from the backend's model card. Used only when the backend returns a ``risk`` output."""
    opts = options or StreamOptions()
    _check_options(opts)
    if risk is None:
        risk = risk_setup(backend, model_name=str(getattr(backend, "path", None) or "model"))
    run = _Run(source, backend, opts, OutputSet(list(sinks)), stats if stats is not None else RunStats(),
               report_path, extra_report, RiskTracker(risk))
    return run.execute()


class _Run:
    """One run's moving parts; :meth:`execute` is the list of steps."""

    def __init__(self, source, backend, opts: StreamOptions, outputs: OutputSet, stats: RunStats, report_path, extra_report,
                 risk: RiskTracker):
        self.source, self.backend, self.opts, self.outputs, self.stats = source, backend, opts, outputs, stats
        self.report_path, self.extra_report, self.risk = report_path, extra_report, risk
        self.threshold = float(opts.threshold if opts.threshold is not None else getattr(backend, "threshold", 0.5))
        self.queue = FrameQueue(opts.queue_size, drop_oldest=opts.dropping)
        self.stop = threading.Event()
        self.pacer = Pacer(opts.speed, opts.max_time_jump_s, self.stop) if opts.realtime and not getattr(source, "live", False) else None
        self.producer_errors: list[BaseException] = []
        # The batch the inference loop holds: its size and frames_processed when it was taken
        # (so the frames in hand are known exactly, whenever the run stops).
        self.batch_size, self.processed_before = 0, 0
        self.total = _known_length(source, opts.max_frames)

    def execute(self) -> dict[str, Any]:
        producer = threading.Thread(target=produce, name="pocus-edge-source", daemon=True,
                                    args=(self.source, self.backend, self.opts.max_frames, self.stats, self.queue,
                                          self.stop, self.pacer, self.producer_errors))
        self.stats.start()
        with InterruptGuard(self.stop) as interrupts:
            producer.start()
            try:
                self._consume()
            finally:
                report, error = self._wrap_up(producer, interrupts)
        if self.producer_errors:
            raise self.producer_errors[0]
        if error is not None:
            raise error
        interrupts.raise_if_received()
        if self.stats.frames_in == 0:
            raise DataError(f"{_source_name(self.source)}: the source ended before its first frame (nothing to segment)")
        return report

    def _wrap_up(self, producer: threading.Thread, interrupts: InterruptGuard) -> tuple[dict | None, BaseException | None]:
        """Stop the producer, count what was never processed, close the outputs and write the
        report. Outputs are kept, except when a second interrupt aborted the run or no frame
        arrived at all (an empty source, or one that failed at once): then nothing is written."""
        self.stop.set()
        with self.stats.lock:  # the producer counts and enqueues under this lock: nothing comes after
            in_hand = self.batch_size - (self.stats.frames_processed - self.processed_before) if self.batch_size else 0
            unprocessed = sum(1 for item in self.queue.drain() if item is not END) + in_hand
            self.stats.frames_interrupted += unprocessed
        producer.join(timeout=5.0)
        self.stats.stop()
        self.stats.add_invalid(dict(getattr(self.source, "invalid_reasons", {}) or {}))
        self.stats.interrupted_by = interrupts.received
        empty = self.stats.frames_in == 0 and interrupts.received is None
        error = self.outputs.close(keep=not (interrupts.forced or empty))
        if empty:
            return None, error
        try:
            return self._write_report(final=True), error
        except Exception as exc:
            return None, error or exc

    def _write_report(self, final: bool) -> dict[str, Any]:
        self.stats.timestamps_rebased = self.pacer.rebased if self.pacer is not None else 0
        report = _build_report(self.stats, self.backend, self.source, self.opts, self.threshold, self.extra_report, final)
        risk = self.risk.report()
        if risk is not None:  # a model without the risk output: the report is as it always was
            report["risk"] = risk
        if self.report_path is not None:
            from ..io import write_json_atomic

            write_json_atomic(self.report_path, report)
        return report

    def _consume(self) -> None:
        """The calling thread: batch, infer, threshold, feed the sinks, refresh the report."""
        opts, stats = self.opts, self.stats
        last_report = time.perf_counter()
        with ProgressLine(stats, total=self.total, enabled=opts.progress, status=self.risk.status) as progress:
            finished = False
            while not finished and not self.stop.is_set():
                batch = self.queue.get_batch(opts.batch_size, wait_full=not opts.dropping, stop=self.stop)
                if batch and batch[-1] is END:
                    batch.pop()
                    finished = True
                if not batch:
                    continue
                self.batch_size, self.processed_before = len(batch), stats.frames_processed
                self._process(batch)
                self.batch_size = 0
                progress.update()
                if self.report_path is not None and opts.report_every_s and time.perf_counter() - last_report >= opts.report_every_s:
                    last_report = time.perf_counter()
                    self._write_report(False)

    def _process(self, batch: list[Item]) -> None:
        """Infer one batch and hand each frame to every output; a frame counts as processed
        once every output has it."""
        from ..inference import to_frame_resolution

        stats, outputs, threshold = self.stats, self.outputs, self.threshold
        t0 = time.perf_counter()
        out = self.backend.run(np.stack([item.x for item in batch]))
        infer_ms = (time.perf_counter() - t0) * 1000.0
        prob, weight, risk = out["prob"], out.get("weight"), out.get("risk")
        for k, item in enumerate(batch):
            t0 = time.perf_counter()
            p = prob[k, 0]
            # One comparison and one EWMA update per frame, in frame order, outside the infer timing.
            fr = self.risk.update(float(np.asarray(risk[k]).reshape(-1)[0]), item.index) if risk is not None else None
            if outputs.sinks:
                if outputs.want_frame_res:
                    p_frame = to_frame_resolution(p, item.frame.shape)
                    w_frame = to_frame_resolution(weight[k, 0], item.frame.shape) if weight is not None else None
                else:
                    p_frame, w_frame = p, (weight[k, 0] if weight is not None else None)
                result = FrameResult(item.index, item.timestamp_ms, item.frame, p_frame, binarize(p_frame, threshold), w_frame)
                if fr is not None:
                    result.risk, result.risk_level = fr.risk, fr.level
                    result.alarm = fr.alarm if self.risk.monitor is not None else None
                outputs.write(result)
            else:
                _ = binarize(p, threshold)  # the threshold is part of the measured work
            t1 = time.perf_counter()
            stats.stages["infer"].add(infer_ms)
            stats.stages["postprocess"].add((t1 - t0) * 1000.0)
            stats.end_to_end.add((t1 - item.t_start) * 1000.0)
            stats.frames_processed += 1


def _known_length(source, max_frames: int | None) -> int | None:
    try:
        total = len(source)
    except TypeError:
        return None
    return min(total, max_frames) if max_frames is not None else total


def _source_name(source) -> str:
    return str(getattr(source, "name", None) or source)


def _build_report(stats: RunStats, backend, source, opts: StreamOptions, threshold: float, extra: dict | None, final: bool) -> dict[str, Any]:
    import datetime as _dt

    desc = backend.describe() if hasattr(backend, "describe") else {}
    report = stats.report(
        gflops_per_frame=_round(desc.get("gflops_per_frame")),
        backend=desc.get("backend", getattr(backend, "name", "?")),
        precision=desc.get("precision", getattr(backend, "precision", "?")),
        device=desc.get("device", getattr(backend, "device", "?")),
        img_size=desc.get("img_size"),
        input_dtype=desc.get("input_dtype"),
        threshold=threshold,
        mode={
            "realtime": opts.realtime,
            "drop_oldest": opts.dropping,
            "queue_size": opts.queue_size,
            "batch_size": opts.batch_size,
            "speed": opts.speed,
        },
        source=source.describe() if hasattr(source, "describe") else {"name": str(source)},
        final=final,
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    )
    if extra:
        report.update(extra)
    return report


def _round(v):
    """6 significant digits: the teacher's 116.781 GFLOPs and a tiny student's 0.00520 alike."""
    return float(f"{float(v):.6g}") if v is not None else None


def stream(
    source: str | os.PathLike,
    model: str | os.PathLike,
    *,
    backend: str = "ort",
    device: str = "cpu",
    threads: int | None = None,
    realtime: bool = False,
    no_drop: bool = False,
    queue_size: int = 4,
    batch_size: int = 1,
    max_frames: int | None = None,
    speed: float = 1.0,
    threshold: float | None = None,
    report: str | os.PathLike | None = None,
    overlay: str | os.PathLike | None = None,
    weight_map: bool = True,
    masks: str | os.PathLike | None = None,
    bind: str = "127.0.0.1",
    fps: float = 30.0,
    frame_timeout: float | None = 2.0,
    idle_timeout: float | None = 10.0,
    accept_timeout: float = 60.0,
    max_time_jump_s: float = 10.0,
    progress: bool | None = None,
    on_listen: Callable[[str, int], None] | None = None,
    providers: list[str] | None = None,
    send: str | None = None,
    on_send_listen: Callable[[str, int], None] | None = None,
    qualify: str | os.PathLike | None = None,
    qualify_model: str | None = None,
) -> dict[str, Any]:
    """Open SOURCE and MODEL, stream with the given outputs, return the report (what the
    ``pocus-edge stream`` command runs). Outputs are checked before anything is opened.
    ``send`` (``igtl://HOST:PORT``) also serves each mask to OpenIGTLink clients
    (:class:`pocus_edge.runtime.igtl.IgtlMaskSink`). ``qualify`` (a qualify file; one of its
    models, or ``qualify_model``) gives the risk threshold and drift band instead of the card."""
    from ..inference import open_backend
    from .risk import read_qualify_risk
    from .sources import open_source

    check_stream_outputs(source, model, report=report, overlay=overlay, masks=masks)
    if qualify is not None:
        read_qualify_risk(qualify, qualify_model)  # a bad file is refused before anything is opened
    elif qualify_model is not None:
        raise ConfigError("--qualify-model names a model of a qualify file: give that file with --qualify")
    be = open_backend(model, backend, device=device, threads=threads, providers=providers)
    try:
        setup = risk_setup(be, model_name=str(model), qualify=qualify, qualify_model=qualify_model)
    except BaseException:
        be.close()
        raise
    src = open_source(source, bind=bind, fps=fps, frame_timeout=frame_timeout, idle_timeout=idle_timeout,
                      accept_timeout=accept_timeout, on_listen=on_listen)
    sinks: list[Sink] = []
    try:
        if overlay is not None:
            sinks.append(OverlayVideoSink(overlay, src.fps, weight_map=weight_map))
        if masks is not None:
            sinks.append(MaskFileSink(masks))
        send_stats = None
        if send is not None:
            from .igtl import IgtlMaskSink

            sinks.append(IgtlMaskSink(send, source=src, bind=bind, on_listen=on_send_listen))
            send_stats = sinks[-1].stats
        opts = StreamOptions(
            realtime=realtime,
            drop=False if no_drop else None,
            queue_size=queue_size,
            batch_size=batch_size,
            max_frames=max_frames,
            threshold=threshold,
            speed=speed,
            max_time_jump_s=max_time_jump_s,
            progress=progress,
            report_every_s=10.0 if report is not None else None,
        )
        extra = {"model": str(model), "outputs": {"report": _str(report), "overlay": _str(overlay), "masks": _str(masks)}}
        if send_stats is not None:
            extra["igtl_send"] = send_stats  # updated live by the sink; read when the report is built
        return run_stream(src, be, options=opts, sinks=sinks, report_path=report, extra_report=extra, risk=setup)
    except BaseException:
        for sink in sinks:  # sinks made before a failure (run_stream closes its own; closing twice is a no-op)
            try:
                sink.close(ok=False)
            except Exception:
                pass
        raise
    finally:
        src.close()
        be.close()


def check_stream_outputs(source, model, *, report=None, overlay=None, masks=None) -> None:
    """Refuse, before any work, outputs that would replace a folder, sit under a file, cannot be
    written, or would overwrite the model, the source or each other."""
    from ..io import check_output_dir, check_output_file

    outputs = {"--report": report, "--overlay": overlay, "--masks": masks}
    for flag, path in outputs.items():
        if path is None:
            continue
        if flag == "--masks" and Path(path).suffix.lower() != ".npz":
            from .overlay import is_masks_folder

            check_output_dir(path, what="--masks (a folder of PNGs, or a .npz file name)")
            if Path(path).is_dir() and any(Path(path).iterdir()) and not is_masks_folder(Path(path)):
                raise OutputError(f"{path}: --masks folder holds other files than masks; refusing to replace it (choose a new or empty folder)")
        else:
            check_output_file(path, what=f"{flag}")
    inputs = [Path(p).resolve() for p in (source, *str(model).split(",")) if p and str(p) not in ("-", "stdin") and not str(p).startswith("tcp:")]
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in inputs:
            raise OutputError(f"{path}: {flag} would overwrite an input of this run")
        if resolved in seen:
            raise OutputError(f"{path}: given to both {seen[resolved]} and {flag}")
        seen[resolved] = flag


def _str(p) -> str | None:
    return None if p is None else str(p)
