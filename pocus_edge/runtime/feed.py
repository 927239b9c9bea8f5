"""The feeding side of a stream: the producer thread that pulls frames from the source, paces
and preprocesses them, and the bounded queue it fills for the pipeline's inference loop.

Counting: a frame is counted in ``frames_in`` when the producer accepts it, in the same step
(under the stats lock, only while the run has not been asked to stop) as it is queued, dropped
(the realtime queue's oldest) or counted invalid (preprocessing refused it). From the queue it is
taken by the inference loop and processed or - when the run stops early - counted interrupted.
A frame that arrives after the run was told to stop is not accepted, so none is half-counted.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from .stats import RunStats

END = object()  # the producer's last item: the source is exhausted (or failed)


@dataclass
class Item:
    frame: np.ndarray
    timestamp_ms: float
    index: int
    t_start: float  # perf_counter when decoding of this frame began
    x: np.ndarray  # the backend's input for this frame


class FrameQueue:
    """Bounded FIFO. ``put`` either blocks while full or drops the oldest item (returned)."""

    def __init__(self, maxsize: int, drop_oldest: bool):
        self.maxsize = max(1, int(maxsize))
        self.drop_oldest = drop_oldest
        self._dq: collections.deque = collections.deque()
        self._cond = threading.Condition()

    def put(self, item, stop: threading.Event) -> Any:
        with self._cond:
            dropped = None
            if item is not END and len(self._dq) >= self.maxsize:
                if self.drop_oldest:
                    dropped = self._dq.popleft()
                else:
                    while len(self._dq) >= self.maxsize and not stop.is_set():
                        self._cond.wait(0.1)
            self._dq.append(item)
            self._cond.notify_all()
            return dropped

    def get_batch(self, n: int, *, wait_full: bool, stop: threading.Event) -> list:
        """Block for one item, then take up to ``n`` (waiting for all ``n`` only if ``wait_full``).
        Returns an empty list once ``stop`` is set: the run is stopping, queued frames stay queued."""
        with self._cond:
            while not self._dq:
                if stop.is_set():
                    return []
                self._cond.wait(0.1)
            out = [self._dq.popleft()]
            while len(out) < n and out[-1] is not END and not stop.is_set():
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


class Pacer:
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


def produce(source, backend, max_frames: int | None, stats: RunStats, queue: FrameQueue, stop: threading.Event,
            pacer: Pacer | None, errors: list[BaseException]) -> None:
    """The producer thread: decode (pull from the source), pace, preprocess, enqueue."""
    try:
        it = iter(source)
        while not stop.is_set():
            if max_frames is not None and stats.frames_in >= max_frames:
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
            t2 = time.perf_counter()
            try:
                item, invalid = Item(frame, float(ts), int(index), t_start, backend.prepare(frame)), None
                stats.stages["preprocess"].add((time.perf_counter() - t2) * 1000.0)
            except DataError as exc:
                item, invalid = None, f"preprocess: {str(exc).split(': ', 1)[-1][:80]}"
            # Counting and enqueueing happen together under the lock, and only while the run goes
            # on: once the pipeline has set ``stop`` and taken the lock, no frame is added.
            with stats.lock:
                if stop.is_set():  # arrived after the run was told to stop: not accepted, not counted
                    break
                stats.frames_in += 1
                if invalid is not None:
                    stats.add_invalid({invalid: 1}, arrived=True)
                elif queue.put(item, stop) is not None:
                    stats.frames_dropped += 1
    except BaseException as exc:  # re-raised in the calling thread
        errors.append(exc)
    finally:
        queue.put(END, stop)
