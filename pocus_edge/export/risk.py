"""The ``risk`` entry of an exported model's card: which formula the graph's ``risk`` output
computes, and the alarm threshold and drift band ``pocus-edge qualify`` calibrated for it on the
target's unlabeled frames (its ``qualify.json``).

The file is read by :func:`pocus_edge.qualify_file.read_qualify_risk` (the stream's reader too).
One model in the file is taken as is; with several, ``qualify_model`` names it. A formula other
than the graph's is refused: a threshold calibrated on one score means nothing for another.
Without a qualify file the entry records the formula with ``threshold`` and ``drift`` null (the
graph computes the score; nothing has calibrated an alarm for it yet).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import ExportError

__all__ = ["risk_entry"]


def risk_entry(formula: str, qualify: str | os.PathLike | None = None, qualify_model: str | None = None) -> dict[str, Any]:
    """The card's ``risk`` entry for a graph computing ``formula``: ``{"formula", "threshold",
    "drift"}`` (plus ``qualify``: the file, its SHA-256 and the model name, when one was read).
    ExportError (one line naming the file, exit 2) for a missing or malformed file, an
    ambiguous or unknown model name, or another formula."""
    if qualify is None:
        if qualify_model is not None:
            raise ExportError("--qualify-model names a model of a qualify.json: give that file with --qualify")
        return {"formula": formula, "threshold": None, "drift": None}
    from ..qualify_file import read_qualify_risk

    path = Path(qualify)
    name, risk = read_qualify_risk(path, qualify_model, error=ExportError)
    stated = risk.get("formula")
    if stated != formula:
        raise ExportError(f"{path}: model {name!r} was qualified with risk formula {stated!r}, but this graph computes "
                          f"{formula!r}; qualify the model that is exported")
    threshold = risk.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ExportError(f"{path}: model {name!r}: risk threshold {threshold!r} is not a finite number")
    drift = risk.get("drift")
    if drift is not None:
        _check_drift(path, name, drift)
    from ..io import sha256_file

    return {"formula": formula, "threshold": float(threshold), "drift": drift,
            "qualify": {"file": path.name, "sha256": sha256_file(path), "model": name}}


def _check_drift(path: Path, name: str, drift: Any) -> None:
    """The band must be one the runtime's ``DriftBand.from_dict`` accepts (export sits above the
    runtime and does not import it; tests/test_risk_export.py holds the two checks together):
    finite numbers, ``half_width > 0``, ``0 < lam <= 1``, ``0 <= hysteresis <= 1``."""
    def fail(why: str) -> ExportError:
        return ExportError(f"{path}: model {name!r}: risk drift band {why}")

    if not isinstance(drift, dict):
        raise fail("is not an object (DriftBand.to_dict())")
    for key in ("center", "half_width", "lam", "hysteresis", "k"):
        if key not in drift and key not in ("center", "half_width"):
            continue  # optional: DriftBand's defaults
        value = drift.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"{key} {value!r} is not a finite number")
    if drift["half_width"] <= 0:
        raise fail(f"half_width {drift['half_width']} must be > 0")
    if "lam" in drift and not 0.0 < drift["lam"] <= 1.0:
        raise fail(f"lam {drift['lam']} outside (0, 1]")
    if "hysteresis" in drift and not 0.0 <= drift["hysteresis"] <= 1.0:
        raise fail(f"hysteresis {drift['hysteresis']} outside [0, 1]")
