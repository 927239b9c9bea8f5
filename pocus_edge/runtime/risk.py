"""The per-frame risk in a stream: where its threshold and drift band come from, and what the
run makes of it (the risk of every processed frame, its level, the drift alarm, the report's
``risk`` section).

A graph exported with its risk output returns ``out["risk"]`` (N, 1) from the backend's ``run``.
Its model card may hold ``risk: {formula, threshold, drift}`` (``pocus-edge qualify`` sets the
threshold and the band; the backend exposes the entry as ``describe()["risk"]``); a qualify
file given to the stream (``--qualify``) overrides it. Per frame the run does one comparison
and one EWMA update (:class:`~pocus_edge.runtime.drift.DriftMonitor`): outside the timed
inference, on the frames actually processed, in frame order (batches are unrolled in order,
dropped frames never reach it).

Levels, what the Android app's traffic light and the OpenIGTLink metadata show:
``alarm`` (red) while the drift alarm is on; else ``high`` (amber) when this frame's risk is
above the threshold (``risk > threshold``, the mask rule's comparison); else ``ok`` (green).
Without a threshold only ``alarm`` and ``ok`` occur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..qualify_file import read_qualify_risk
from .drift import DriftBand, DriftMonitor
from .stats import LatencyRecorder

__all__ = ["RiskSetup", "RiskTracker", "FrameRisk", "risk_setup", "read_qualify_risk", "level_of",
           "LEVELS", "NO_BAND_NOTE"]

LEVELS = ("ok", "high", "alarm")  # green, amber, red
NO_BAND_NOTE = "no drift band (run pocus-edge qualify)"


def level_of(risk: float, threshold: float | None, alarm: bool) -> str:
    if alarm:
        return "alarm"
    if threshold is not None and risk > threshold:
        return "high"
    return "ok"


@dataclass(frozen=True)
class RiskSetup:
    """What a run knows about the risk before its first frame."""

    formula: str | None = None
    threshold: float | None = None
    band: DriftBand | None = None
    source: str | None = None  # where threshold and band came from: "model card" or "qualify file PATH"

    def describe(self) -> dict[str, Any]:
        return {"formula": self.formula, "threshold": self.threshold, "from": self.source}


@dataclass(frozen=True)
class FrameRisk:
    risk: float
    alarm: bool  # the drift alarm after this frame (False without a band)
    level: str
    ewma: float | None  # the monitor's statistic after this frame (None without a band)


def _finite_or_none(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} {value!r} is not a finite number")
    return float(value)


def _entry_setup(entry: dict[str, Any], source: str, where: str) -> RiskSetup:
    """A card's or qualify file's ``risk`` object -> RiskSetup; ConfigError naming ``where``."""
    try:
        threshold = _finite_or_none(entry.get("threshold"), "risk threshold")
        drift = entry.get("drift")
        if drift is not None and not isinstance(drift, dict):
            raise ConfigError(f"drift band is {type(drift).__name__}, expected an object (DriftBand.to_dict())")
        band = DriftBand.from_dict(drift) if drift is not None else None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    formula = entry.get("formula")
    return RiskSetup(formula=str(formula) if formula is not None else None, threshold=threshold, band=band, source=source)


def graph_has_risk(backend) -> bool:
    """Whether the opened artifact computes the risk output (the backend says so; an older
    backend is asked for its output names)."""
    stated = getattr(backend, "has_risk", None)
    if stated is not None:
        return bool(stated)
    return "risk" in (getattr(backend, "output_names", None) or ())


def card_risk_entry(backend) -> dict[str, Any] | None:
    """The card's risk entry as the backend exposes it (``describe()["risk"]``), with a
    fallback to the card itself for backends that do not expose it yet."""
    desc = backend.describe() if hasattr(backend, "describe") else {}
    if "risk" in desc:
        entry = desc.get("risk")
    else:
        entry = (getattr(backend, "card", None) or {}).get("risk") if graph_has_risk(backend) else None
    return entry if isinstance(entry, dict) else None


def risk_setup(backend, *, model_name: str = "model", qualify: str | Path | None = None,
               qualify_model: str | None = None) -> RiskSetup | None:
    """The run's risk setup: the qualify file's (``qualify``) over the card's; None when the
    graph has no risk output and no qualify file was given. A qualify file for a model without
    the risk output, or of another formula than its card's, is refused (exit 2)."""
    card_entry = card_risk_entry(backend)
    card = _entry_setup(card_entry, "model card", f"{model_name}: model card") if card_entry is not None else None
    if qualify is None:
        if card is None and graph_has_risk(backend):
            return RiskSetup(source=None)
        return card
    name, entry = read_qualify_risk(qualify, qualify_model)
    if not graph_has_risk(backend):
        raise DataError(f"{model_name}: the model has no risk output, so --qualify {qualify} has nothing to watch "
                        "(export it with --risk)")
    setup = _entry_setup(entry, f"qualify file {qualify} (model {name})", f"{qualify}: model {name!r}")
    if card is not None and card.formula and setup.formula and card.formula != setup.formula:
        raise DataError(f"{qualify}: model {name!r} was qualified with risk formula {setup.formula!r}, but "
                        f"{model_name} computes {card.formula!r}")
    return setup


class RiskTracker:
    """The run's risk state: bounded-memory summary of every processed frame's risk, the
    threshold count and the drift monitor. ``active`` once a frame with a risk was seen."""

    def __init__(self, setup: RiskSetup | None):
        self.setup = setup or RiskSetup()
        self.monitor = DriftMonitor(self.setup.band) if self.setup.band is not None else None
        self.values = LatencyRecorder(seed=7)  # a reservoir of risks (the recorder is unit-agnostic)
        self.over_threshold = 0
        self.nonfinite = 0
        self.frames = 0
        self.last: FrameRisk | None = None

    @property
    def active(self) -> bool:
        return self.frames > 0

    def update(self, risk: float, index: int) -> FrameRisk:
        """One processed frame, in stream order."""
        r = float(risk)
        self.frames += 1
        threshold = self.setup.threshold
        if math.isfinite(r):
            self.values.add(r)
            if threshold is not None and r > threshold:
                self.over_threshold += 1
        else:
            self.nonfinite += 1
        alarm, ewma = False, None
        if self.monitor is not None:
            alarm = self.monitor.update(r, index)
            ewma = float(self.monitor.z)
        self.last = FrameRisk(r, alarm, level_of(r, threshold, alarm) if math.isfinite(r) else ("alarm" if alarm else "ok"), ewma)
        return self.last

    def status(self) -> str:
        """For the progress line."""
        if self.last is None:
            return ""
        alarm = "" if self.monitor is None else (" | DRIFT ALARM" if self.last.alarm else " | drift ok")
        return f" | risk {self.last.risk:.3f}{alarm}"

    def report(self) -> dict[str, Any] | None:
        if not self.active:
            return None
        s = self.values.samples
        median, p95 = (np.percentile(s, [50, 95]) if s.size else (None, None))
        out: dict[str, Any] = {
            **self.setup.describe(),
            "frames": self.frames,
            "median": _round(median),
            "p95": _round(p95),
            "mean": _round(self.values.total / self.values.count) if self.values.count else None,
            "max": _round(self.values.max) if self.values.count else None,
            "frames_over_threshold": self.over_threshold if self.setup.threshold is not None else None,
            "nonfinite": self.nonfinite,
            "samples_exact": self.values.exact,
            "level_now": self.last.level if self.last else None,
        }
        if self.monitor is not None:
            out["drift"] = self.monitor.report()
        else:
            out["drift"] = None
            out["note"] = NO_BAND_NOTE
        return out


def _round(v) -> float | None:
    return None if v is None else float(f"{float(v):.6g}")
