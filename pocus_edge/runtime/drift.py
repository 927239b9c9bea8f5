"""Drift alarm: an EWMA of the per-frame risk score against a band calibrated on frames the
model was qualified on.

``z_t = lam * r_t + (1 - lam) * z_{t-1}``, started at the band's center. The band is two-sided:
a probe that makes both branches return empty masks drives the risk *down* (they agree on
nothing), which is as much a change as a rise. Calibration (:meth:`DriftBand.calibrate`) runs the
same EWMA over in-distribution risk sequences in stream order and sets
``center = mean(r)``, ``half = k * sd(z)``; the alarm switches on when ``z`` leaves
``[center - half, center + half]`` and off only once ``z`` is back within ``hysteresis * half``
of the center, so one excursion is one alarm interval, not a flicker of them.

Numpy only: the runtime's lean install has no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["DriftBand", "DriftMonitor", "DEFAULT_LAMBDA", "DEFAULT_K"]

DEFAULT_LAMBDA = 0.1
DEFAULT_K = 5.0
DEFAULT_HYSTERESIS = 0.5


@dataclass(frozen=True)
class DriftBand:
    """The calibrated band of the risk EWMA (stored in the model card under ``risk.drift``)."""

    center: float
    half_width: float
    lam: float = DEFAULT_LAMBDA
    hysteresis: float = DEFAULT_HYSTERESIS
    k: float = DEFAULT_K
    calibration_frames: int = 0

    def __post_init__(self):
        for name in ("center", "half_width", "lam", "hysteresis", "k"):
            if not np.isfinite(getattr(self, name)):
                raise ConfigError(f"drift band: {name} is not a finite number")
        if not 0.0 < self.lam <= 1.0:
            raise ConfigError(f"drift band: lambda {self.lam} outside (0, 1]")
        if self.half_width <= 0.0:
            raise ConfigError(f"drift band: half width {self.half_width} must be > 0")
        if not 0.0 <= self.hysteresis <= 1.0:
            raise ConfigError(f"drift band: hysteresis {self.hysteresis} outside [0, 1]")

    @property
    def lower(self) -> float:
        return self.center - self.half_width

    @property
    def upper(self) -> float:
        return self.center + self.half_width

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lower": self.lower, "upper": self.upper}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DriftBand":
        try:
            return cls(center=float(d["center"]), half_width=float(d["half_width"]), lam=float(d.get("lam", DEFAULT_LAMBDA)),
                       hysteresis=float(d.get("hysteresis", DEFAULT_HYSTERESIS)), k=float(d.get("k", DEFAULT_K)),
                       calibration_frames=int(d.get("calibration_frames", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"drift band: {exc!s} in {d!r}") from None

    @classmethod
    def calibrate(cls, sequences: Iterable[Sequence[float]], *, lam: float = DEFAULT_LAMBDA, k: float = DEFAULT_K,
                  hysteresis: float = DEFAULT_HYSTERESIS, min_frames: int = 50) -> "DriftBand":
        """Band from in-distribution risk sequences, each in stream order (one per recording)."""
        seqs = [np.asarray(s, np.float64).ravel() for s in sequences]
        seqs = [s for s in seqs if s.size]
        values = np.concatenate(seqs) if seqs else np.empty(0)
        if values.size < min_frames:
            raise ConfigError(f"drift band: {values.size} calibration frames; at least {min_frames} are needed")
        if not np.all(np.isfinite(values)):
            raise ConfigError("drift band: calibration risks contain NaN or inf")
        center = float(values.mean())
        z = np.concatenate([ewma(s, lam, center) for s in seqs])
        spread = float(z.std())
        # A constant risk (e.g. a model that is always certain) still needs a band of some width.
        half = max(k * spread, 1e-3)
        return cls(center=center, half_width=half, lam=lam, hysteresis=hysteresis, k=k, calibration_frames=int(values.size))


def ewma(values: Sequence[float], lam: float, start: float) -> np.ndarray:
    """The EWMA trajectory ``z_t`` of ``values`` started at ``start`` (reference implementation)."""
    out = np.empty(len(values), np.float64)
    z = float(start)
    for t, r in enumerate(values):
        z = lam * float(r) + (1.0 - lam) * z
        out[t] = z
    return out


@dataclass
class DriftMonitor:
    """Streaming state: feed one risk per frame (:meth:`update`), read the alarm and intervals."""

    band: DriftBand
    z: float = field(init=False)
    alarm: bool = field(init=False, default=False)
    frames: int = field(init=False, default=0)
    intervals: list[list[int]] = field(init=False, default_factory=list)
    nonfinite: int = field(init=False, default=0)

    def __post_init__(self):
        self.z = self.band.center

    def update(self, risk: float, index: int | None = None) -> bool:
        """Add one frame's risk; returns whether the alarm is on after it. A non-finite risk is
        counted and leaves the statistic unchanged."""
        index = self.frames if index is None else int(index)
        self.frames += 1
        r = float(risk)
        if not np.isfinite(r):
            self.nonfinite += 1
            return self.alarm
        b = self.band
        self.z = b.lam * r + (1.0 - b.lam) * self.z
        dev = abs(self.z - b.center)
        if not self.alarm and dev > b.half_width:
            self.alarm = True
            self.intervals.append([index, index])
        elif self.alarm and dev <= b.hysteresis * b.half_width:
            self.alarm = False
        if self.alarm:
            self.intervals[-1][1] = index
        return self.alarm

    def report(self) -> dict[str, Any]:
        return {"band": self.band.to_dict(), "frames": self.frames, "alarm_now": self.alarm, "ewma": self.z,
                "alarm_intervals": [list(iv) for iv in self.intervals], "alarms": len(self.intervals),
                "nonfinite_risks": self.nonfinite}
