"""Streaming statistics with bounded memory: per-stage latency percentiles, frame counts that
add up, end-to-end FPS, and a live progress line.

Latency samples are kept exactly up to ``capacity`` per stage; beyond that a uniform
reservoir sample (Vitter's algorithm R) of ``capacity`` samples stands in for the whole run,
so an all-day stream uses the same memory as a one-minute one. The report says which.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAGES = ("decode", "preprocess", "infer", "postprocess")
DEFAULT_CAPACITY = 50_000


class LatencyRecorder:
    """Bounded-memory latency samples (milliseconds) with percentiles."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, seed: int = 0):
        self.capacity = int(capacity)
        self._buf = np.empty(self.capacity, dtype=np.float64)
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self._rng = random.Random(seed)

    def add(self, ms: float) -> None:
        self.total += ms
        self.max = max(self.max, ms)
        if self.count < self.capacity:
            self._buf[self.count] = ms
        else:
            j = self._rng.randrange(self.count + 1)
            if j < self.capacity:
                self._buf[j] = ms
        self.count += 1

    @property
    def samples(self) -> np.ndarray:
        return self._buf[: min(self.count, self.capacity)]

    @property
    def exact(self) -> bool:
        return self.count <= self.capacity

    def percentile(self, q: float) -> float | None:
        s = self.samples
        return float(np.percentile(s, q)) if s.size else None

    def summary(self) -> dict[str, Any]:
        s = self.samples
        if not s.size:
            return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None, "count": 0}
        p50, p95, p99 = np.percentile(s, [50, 95, 99])
        return {
            "p50": round(float(p50), 3),
            "p95": round(float(p95), 3),
            "p99": round(float(p99), 3),
            "mean": round(self.total / self.count, 3),
            "max": round(self.max, 3),
            "count": self.count,
        }


@dataclass
class RunStats:
    """Counters and recorders of one pipeline run. Invariant once the run ends, however it
    ends (the source's end, Ctrl-C, SIGTERM, an error):
    frames_in == frames_processed + frames_dropped + frames_invalid + frames_interrupted.

    ``frames_interrupted``: frames that arrived but were not processed because the run stopped
    early (queued, or in the batch being inferred when an error or a second interrupt struck);
    0 when the source ran to its end. ``interrupted_by``: "SIGINT" or "SIGTERM" when a signal
    stopped the run."""

    capacity: int = DEFAULT_CAPACITY
    frames_in: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    frames_invalid: int = 0
    frames_interrupted: int = 0
    interrupted_by: str | None = None
    invalid_reasons: dict = field(default_factory=dict)
    timestamps_rebased: int = 0  # realtime pacing: timestamp jumps re-based instead of slept on
    started: float | None = None
    finished: float | None = None

    def __post_init__(self) -> None:
        self.stages = {s: LatencyRecorder(self.capacity, seed=i) for i, s in enumerate(STAGES)}
        self.end_to_end = LatencyRecorder(self.capacity, seed=99)
        self.lock = threading.Lock()

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.finished = time.perf_counter()

    @property
    def wall_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.perf_counter()) - self.started

    @property
    def fps(self) -> float:
        wall = self.wall_s
        return self.frames_processed / wall if wall > 0 else 0.0

    def add_invalid(self, reasons: dict[str, int], *, arrived: bool = False) -> None:
        """Count invalid frames by reason. ``arrived``: already counted in ``frames_in``
        (rejected by the pipeline); otherwise (rejected inside the source) they are added."""
        for k, v in reasons.items():
            self.invalid_reasons[k] = self.invalid_reasons.get(k, 0) + v
            self.frames_invalid += v
            if not arrived:
                self.frames_in += v

    def report(self, **extra: Any) -> dict[str, Any]:
        stage_summaries = {s: r.summary() for s, r in self.stages.items()}
        out: dict[str, Any] = {
            "frames_in": self.frames_in,
            "frames_processed": self.frames_processed,
            "frames_dropped": self.frames_dropped,
            "frames_invalid": self.frames_invalid,
            "frames_interrupted": self.frames_interrupted,
            "interrupted_by": self.interrupted_by,
            # End-to-end: from the frame leaving the source to its sinks being done (queue wait included).
            "latency_ms": {k: self.end_to_end.summary()[k] for k in ("p50", "p95", "p99", "mean", "max")},
            "stages_ms": stage_summaries,
            "fps": round(self.fps, 3),
            "wall_s": round(self.wall_s, 3),
            "latency_samples_exact": all(r.exact for r in [*self.stages.values(), self.end_to_end]),
            "invalid_reasons": dict(self.invalid_reasons),
            "timestamps_rebased": self.timestamps_rebased,
        }
        out.update(extra)
        return out


class ProgressLine:
    """One live status line on stderr (rich), refreshed at most ``hz`` times a second.
    Silent when stderr is not a terminal unless ``force``."""

    def __init__(self, stats: RunStats, *, total: int | None = None, enabled: bool | None = None, hz: float = 4.0,
                 status=None):
        self.stats = stats
        self.status = status  # optional callable -> text appended to the line (the risk and drift alarm)
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.period = 1.0 / hz
        self._last = 0.0
        self._live = None

    def _text(self) -> str:
        s = self.stats
        infer = s.stages["infer"].percentile(50)
        e2e = s.end_to_end.percentile(50)
        done = f"{s.frames_processed}" + (f"/{self.total}" if self.total else "")
        return (
            f"frames {done} | {s.fps:6.1f} fps | infer p50 {infer or 0:6.1f} ms | "
            f"e2e p50 {e2e or 0:6.1f} ms | dropped {s.frames_dropped} | invalid {s.frames_invalid}"
        ) + (self.status() if self.status is not None else "")

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._Text = Text
            self._live = Live(Text(self._text()), console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def update(self, force: bool = False) -> None:
        if self._live is None:
            return
        now = time.perf_counter()
        if force or now - self._last >= self.period:
            self._last = now
            self._live.update(self._Text(self._text()))

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self.update(force=True)
            self._live.__exit__(*exc)
            self._live = None
