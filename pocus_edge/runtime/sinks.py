"""Output sinks of a stream: the overlay video, the per-frame masks, a callback, and
:class:`OutputSet`, the sinks of one run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import OutputError
from .base import FrameResult, Sink


class OverlayVideoSink(Sink):
    def __init__(self, path: str | Path, fps: float | None = None, *, weight_map: bool = True):
        from .overlay import VideoSink

        self.path = Path(path)
        self.video = VideoSink(path, fps or 30.0)
        self.weight_map = weight_map

    def write(self, r: FrameResult) -> None:
        from .overlay import render_overlay

        self.video.write(render_overlay(r.frame, r.mask, r.weight if self.weight_map else None))

    def close(self, ok: bool = True) -> None:
        self.video.close(ok)


class MaskFileSink(Sink):
    def __init__(self, path: str | Path):
        from .overlay import MaskSink

        self.path = Path(path)
        self.masks = MaskSink(path)

    def write(self, r: FrameResult) -> None:
        self.masks.write(r.index, r.mask)
        if r.risk is not None:
            self.masks.write_risk(r.index, r.risk, r.alarm)

    def close(self, ok: bool = True) -> None:
        self.masks.close(ok)


class CallbackSink(Sink):
    def __init__(self, fn: Callable[[FrameResult], None]):
        self.fn = fn

    def write(self, r: FrameResult) -> None:
        self.fn(r)


class OutputSet:
    """The sinks of one run: a sink whose write fails is discarded (never renamed into place),
    the others keep what was processed; write errors become one line naming the output.

    Only errors (``Exception``) mark a sink failed. An interrupt never reaches a write (the
    pipeline turns Ctrl-C and SIGTERM into a stop between batches, :mod:`.interrupts`), and a
    sink never catches one: what it wrote before stays valid."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.failed: set[int] = set()
        self.want_frame_res = any(getattr(s, "needs_frame_resolution", True) for s in sinks)

    def write(self, result: FrameResult) -> None:
        for k, sink in enumerate(self.sinks):
            try:
                sink.write(result)
            except Exception as exc:
                self.failed.add(k)
                raise _output_error(sink, exc) from None

    def close(self, keep: bool = True) -> BaseException | None:
        """Close every sink, keeping its output (renamed into place) unless it failed or
        ``keep`` is False; return the first error (the others are closed regardless)."""
        first = None
        for k, sink in enumerate(self.sinks):
            try:
                # What was processed is complete and valid, so keep it even when the run stopped early.
                sink.close(ok=keep and k not in self.failed)
            except Exception as exc:
                first = first or _output_error(sink, exc)
        return first


def _output_error(sink: Sink, exc: BaseException) -> BaseException:
    from ..io import output_error

    if isinstance(exc, OSError) and not isinstance(exc, OutputError) and sink.path is not None:
        return output_error(sink.path, exc)
    return exc
