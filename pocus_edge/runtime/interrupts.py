"""The one place a stream handles Ctrl-C (SIGINT) and SIGTERM.

While :func:`~pocus_edge.runtime.pipeline.run_stream` runs in the main thread, the first signal
does not raise anywhere: it only asks the run to stop. The pipeline then finishes the batch it
is inferring (those frames reach every output), counts the frames still queued as
``frames_interrupted``, closes and keeps every output, writes the report, and only then raises
the interrupt again (``KeyboardInterrupt``, or :class:`~pocus_edge.errors.Terminated` for
SIGTERM) so the caller stops as it would have. No sink ever sees the interrupt in the middle of
a write, so no sink can be left half-written or be discarded for it.

A second signal during the same run aborts at once (a backend that hangs must not trap the
user): the interrupt is raised where the run is, and every output is discarded rather than kept
half-written under its name. A signal that the process ignores (``SIG_IGN``, e.g. SIGINT of a
background job) stays ignored. Outside the main thread signals are not delivered to the run, so
nothing is installed there.
"""

from __future__ import annotations

import signal
import threading

from ..errors import Terminated

SIGNALS = ("SIGINT", "SIGTERM")


class InterruptGuard:
    """Context manager: while active, SIGINT/SIGTERM set ``stop`` (first) or abort (second)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.received: str | None = None  # name of the first signal, once one arrived
        self.forced = False  # a second signal aborted the run: outputs must be discarded
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in SIGNALS:
            signum = getattr(signal, name)
            try:
                current = signal.getsignal(signum)
                if current is signal.SIG_IGN or current is None:
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError):  # pragma: no cover - no signals on this platform
                continue
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self.forced = True
            raise _exception(name)
        self.received = name
        self.stop.set()

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous)
            except (ValueError, OSError):  # pragma: no cover
                pass
        self._previous.clear()

    def raise_if_received(self) -> None:
        """Raise the interrupt that stopped the run (call once the run is wrapped up)."""
        if self.received is not None:
            raise _exception(self.received)


def _exception(name: str) -> BaseException:
    return KeyboardInterrupt() if name == "SIGINT" else Terminated()
