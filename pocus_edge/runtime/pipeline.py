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
"""

from __future__ import annotations

import collections
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
from .sinks import CallbackSink, MaskFileSink, OutputSet, OverlayVideoSink  # noqa: F401  (importable from here, as before)
from .stats import ProgressLine, RunStats

_END = object()


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


@dataclass
class _Item:
    frame: np.ndarray
    timestamp_ms: float
    index: int
    t_start: float  # perf_counter when decoding of this frame began
    x: np.ndarray  # the backend's input for this frame


class _FrameQueue:
    """Bounded FIFO. ``put`` either blocks while full or drops the oldest item (returned)."""

    def __init__(self, maxsize: int, drop_oldest: bool):
        self.maxsize = max(1, int(maxsize))
        self.drop_oldest = drop_oldest
        self._dq: collections.deque = collections.deque()
        self._cond = threading.Condition()

    def put(self, item, stop: threading.Event) -> Any:
        with self._cond:
            dropped = None
            if item is not _END and len(self._dq) >= self.maxsize:
                if self.drop_oldest:
                    dropped = self._dq.popleft()
                else:
                    while len(self._dq) >= self.maxsize and not stop.is_set():
                        self._cond.wait(0.1)
            self._dq.append(item)
            self._cond.notify_all()
            return dropped

    def get_batch(self, n: int, *, wait_full: bool) -> list:
        """Block for one item, then take up to ``n`` (waiting for all ``n`` only if ``wait_full``)."""
        with self._cond:
            while not self._dq:
                self._cond.wait(0.1)
            out = [self._dq.popleft()]
            while len(out) < n and out[-1] is not _END:
                if not self._dq:
                    if not wait_full:
                        break
                    self._cond.wait(0.1)
                    continue
                out.append(self._dq.popleft())
            self._cond.notify_all()
            return out

    def drain(self) -> list:
        with self._cond:
            items = list(self._dq)
            self._dq.clear()
            self._cond.notify_all()
            return items


class _Pacer:
    """Realtime release of recorded frames at their own timestamps. A jump of more than
    ``max_jump_s`` (wall-clock seconds at the playback speed) in either direction re-bases the
    clock at that frame instead of being slept on, so a corrupt timestamp never hangs a run."""

    def __init__(self, speed: float, max_jump_s: float, stop: threading.Event):
        self.speed = speed
        self.max_jump_s = max_jump_s
        self.stop = stop
        self.rebased = 0
        self._wall0: float | None = None
        self._ts0 = self._prev = 0.0

    def wait_for(self, ts: float) -> None:
        now = time.perf_counter()
        if self._wall0 is not None and not abs(ts - self._prev) / 1000.0 / self.speed <= self.max_jump_s:
            self.rebased += 1
            self._wall0 = None
        if self._wall0 is None:
            self._wall0, self._ts0 = now, ts
        self._prev = ts
        delay = self._wall0 + (ts - self._ts0) / 1000.0 / self.speed - now
        if delay > 0:
            self.stop.wait(delay)


def _check_options(opts: StreamOptions) -> None:
    if opts.batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {opts.batch_size}")
    if not (np.isfinite(opts.speed) and opts.speed > 0):
        raise ConfigError(f"speed must be a positive number, got {opts.speed}")
    if not (np.isfinite(opts.max_time_jump_s) and opts.max_time_jump_s > 0):
        raise ConfigError(f"max time jump must be a positive number of seconds, got {opts.max_time_jump_s}")


def _produce(source, backend, opts: StreamOptions, stats: RunStats, queue: _FrameQueue, stop: threading.Event,
             pacer: _Pacer | None, errors: list[BaseException]) -> None:
    """The producer thread: decode (pull from the source), pace, preprocess, enqueue."""
    try:
        it = iter(source)
        while not stop.is_set():
            if opts.max_frames is not None and stats.frames_in >= opts.max_frames:
                break
            t0 = time.perf_counter()
            try:
                frame, ts, index = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            decode_ms = source.last_decode_ms if getattr(source, "last_decode_ms", None) is not None else (t1 - t0) * 1000.0
            if pacer is not None:
                pacer.wait_for(float(ts))
                # In realtime the frame "arrives" now; its decode happened just before.
                t_start = time.perf_counter() - decode_ms / 1000.0
            else:
                t_start = t1 - decode_ms / 1000.0
            stats.stages["decode"].add(decode_ms)
            with stats.lock:
                stats.frames_in += 1
            t2 = time.perf_counter()
            try:
                x = backend.prepare(frame)
            except DataError as exc:
                with stats.lock:
                    # Already counted in frames_in on arrival: only move it to invalid.
                    stats.add_invalid({f"preprocess: {str(exc).split(': ', 1)[-1][:80]}": 1}, arrived=True)
                continue
            stats.stages["preprocess"].add((time.perf_counter() - t2) * 1000.0)
            dropped = queue.put(_Item(frame, float(ts), int(index), t_start, x), stop)
            if dropped is not None:
                with stats.lock:
                    stats.frames_dropped += 1
    except BaseException as exc:  # re-raised in the calling thread
        errors.append(exc)
    finally:
        queue.put(_END, stop)


def run_stream(
    source,
    backend,
    *,
    options: StreamOptions | None = None,
    sinks: Iterable[Sink] = (),
    report_path: str | os.PathLike | None = None,
    extra_report: dict | None = None,
    stats: RunStats | None = None,
) -> dict[str, Any]:
    """Stream ``source`` through ``backend`` into ``sinks``; return (and optionally write,
    atomically) the JSON report. Pass a fresh ``stats`` to keep the latency samples (plots)."""
    opts = options or StreamOptions()
    _check_options(opts)
    outputs = OutputSet(list(sinks))
    stats = stats if stats is not None else RunStats()
    threshold = float(opts.threshold if opts.threshold is not None else getattr(backend, "threshold", 0.5))
    queue = _FrameQueue(opts.queue_size, drop_oldest=opts.dropping)
    stop = threading.Event()
    producer_error: list[BaseException] = []
    paced = opts.realtime and not getattr(source, "live", False)
    pacer = _Pacer(opts.speed, opts.max_time_jump_s, stop) if paced else None
    total = None
    try:
        total = len(source)
        if opts.max_frames is not None:
            total = min(total, opts.max_frames)
    except TypeError:
        pass

    producer = threading.Thread(target=_produce, args=(source, backend, opts, stats, queue, stop, pacer, producer_error),
                                name="pocus-edge-source", daemon=True)

    def write_report(final: bool) -> dict[str, Any]:
        stats.timestamps_rebased = pacer.rebased if pacer is not None else 0
        report = _build_report(stats, backend, source, opts, threshold, extra_report, final)
        if report_path is not None:
            from ..io import write_json_atomic

            write_json_atomic(report_path, report)
        return report

    stats.start()
    producer.start()
    try:
        _consume(queue, backend, opts, stats, outputs, threshold, total, write_report if report_path is not None else None)
    finally:
        stop.set()
        producer.join(timeout=5.0)
        # Frames still queued when the run stops early (Ctrl-C, an error) were never processed.
        leftover = [i for i in queue.drain() if i is not _END]
        stats.frames_dropped += len(leftover)
        stats.stop()
        stats.add_invalid(dict(getattr(source, "invalid_reasons", {}) or {}))
        output_error = outputs.close()
        try:
            report = write_report(final=True)
        except Exception as exc:
            report, output_error = None, output_error or exc
    if producer_error:
        raise producer_error[0]
    if output_error is not None:
        raise output_error
    return report


def _consume(queue: _FrameQueue, backend, opts: StreamOptions, stats: RunStats, outputs: OutputSet, threshold: float,
             total: int | None, write_report: Callable[[bool], Any] | None) -> None:
    """The calling thread: batch, infer, threshold, feed the sinks, refresh the report."""
    from ..inference import to_frame_resolution

    last_report = time.perf_counter()
    with ProgressLine(stats, total=total, enabled=opts.progress) as progress:
        finished = False
        while not finished:
            batch = queue.get_batch(opts.batch_size, wait_full=not opts.dropping)
            if batch[-1] is _END:
                batch.pop()
                finished = True
            if not batch:
                continue
            t0 = time.perf_counter()
            out = backend.run(np.stack([item.x for item in batch]))
            infer_ms = (time.perf_counter() - t0) * 1000.0
            prob, weight = out["prob"], out.get("weight")
            for k, item in enumerate(batch):
                t0 = time.perf_counter()
                p = prob[k, 0]
                if outputs.sinks:
                    if outputs.want_frame_res:
                        p_frame = to_frame_resolution(p, item.frame.shape)
                        w_frame = to_frame_resolution(weight[k, 0], item.frame.shape) if weight is not None else None
                    else:
                        p_frame, w_frame = p, (weight[k, 0] if weight is not None else None)
                    outputs.write(FrameResult(item.index, item.timestamp_ms, item.frame, p_frame, binarize(p_frame, threshold), w_frame))
                else:
                    _ = binarize(p, threshold)  # the threshold is part of the measured work
                t1 = time.perf_counter()
                stats.stages["infer"].add(infer_ms)
                stats.stages["postprocess"].add((t1 - t0) * 1000.0)
                stats.end_to_end.add((t1 - item.t_start) * 1000.0)
                stats.frames_processed += 1
            progress.update()
            if write_report is not None and opts.report_every_s and time.perf_counter() - last_report >= opts.report_every_s:
                last_report = time.perf_counter()
                write_report(False)


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
) -> dict[str, Any]:
    """Open SOURCE and MODEL, stream with the given outputs, return the report (what the
    ``pocus-edge stream`` command runs). Outputs are checked before anything is opened.
    ``send`` (``igtl://HOST:PORT``) also serves each mask to OpenIGTLink clients
    (:class:`pocus_edge.runtime.igtl.IgtlMaskSink`)."""
    from ..inference import open_backend
    from .sources import open_source

    check_stream_outputs(source, model, report=report, overlay=overlay, masks=masks)
    be = open_backend(model, backend, device=device, threads=threads, providers=providers)
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
        return run_stream(src, be, options=opts, sinks=sinks, report_path=report, extra_report=extra)
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
            check_output_dir(path, what="--masks (a folder of PNGs, or a .npz file name)")
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
