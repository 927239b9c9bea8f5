"""The types the runtime's modules share: a frame source, a processed frame and an output
sink. Sources (:mod:`.sources`, :mod:`.igtl`), the pipeline (:mod:`.pipeline`) and the sinks
(:mod:`.sinks`, :mod:`.igtl`) import them from here, so none of them imports another to get a
base class (the runtime's imports form no cycle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

Frame = tuple[np.ndarray, float, int]


class FrameSource:
    """Base class: iterate to get frames; ``close()`` (or ``with``) releases the file/socket."""

    name: str = "source"
    live: bool = False  # frames arrive in real time (no pacing needed)
    # Live sources set this per frame: their iterator also waits for the network, which is not decoding.
    last_decode_ms: float | None = None
    fps: float | None = None  # nominal frame rate, if the container says

    def __init__(self) -> None:
        self._invalid_reasons: dict[str, int] = {}

    @property
    def frames_invalid(self) -> int:
        """Frames seen but unusable (corrupt, truncated, undecodable), skipped."""
        return sum(self._invalid_reasons.values())

    @property
    def invalid_reasons(self) -> dict[str, int]:
        return dict(self._invalid_reasons)

    def _reject(self, reason: str) -> None:
        self._invalid_reasons[reason] = self._invalid_reasons.get(reason, 0) + 1

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:  # number of frames when known; raises TypeError otherwise
        raise TypeError(f"{self.name}: length unknown")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "name": self.name, "live": self.live, "fps": self.fps}


@dataclass
class FrameResult:
    index: int
    timestamp_ms: float
    frame: np.ndarray  # uint8 HxW, as decoded
    prob: np.ndarray  # float32 HxW fused probability at frame resolution
    mask: np.ndarray  # bool HxW
    weight: np.ndarray | None = None  # float32 HxW fusion weight of the generative branch
    # The graph's per-frame risk and what the run made of it (None: the model has no risk output).
    risk: float | None = None
    alarm: bool | None = None  # the drift alarm after this frame (None: no band)
    risk_level: str | None = None  # "ok" | "high" | "alarm" (runtime.risk.LEVELS)


class Sink:
    """Receives each processed frame; ``close(ok)`` finalizes (atomically: renamed into place)
    or discards, and does nothing when called again. ``path``: the output it writes (named in
    error messages), if any. A sink lets errors out of ``write`` and never catches an interrupt:
    the pipeline decides what is kept (:class:`~pocus_edge.runtime.sinks.OutputSet`)."""

    needs_frame_resolution = True
    path: Path | None = None

    def write(self, result: FrameResult) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self, ok: bool = True) -> None:
        pass
