"""A study unit's markers: ``done.json`` (its result) and ``failed.json`` (a unit that ended
without a result, or one built from it), and :class:`UnitFailed`, the error that records one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..io import write_json_atomic

DONE = "done.json"
FAILED = "failed.json"


class UnitFailed(TrainingError):
    """A unit ended without a result to score, as a possible outcome of the method (a training
    that diverged before its first validation), not as a fault of the data or the setup. The study
    records it and goes on; the comparisons that need it use the seeds that have one."""

    def __init__(self, message: str, **facts: Any):
        super().__init__(message)
        self.facts = facts



def _read_marker(folder: Path, name: str) -> dict[str, Any] | None:
    """A unit's JSON marker, or None if it is missing or damaged (then the unit runs again)."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_done(folder: Path) -> dict[str, Any] | None:
    return _read_marker(folder, DONE)


def mark_done(folder: Path, info: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / DONE, info)


def read_failed(folder: Path) -> dict[str, Any] | None:
    """The record of a unit that failed (:class:`UnitFailed`, or an input that failed); a rerun
    skips it. Deleting ``failed.json`` makes the next run try the unit again."""
    return _read_marker(folder, FAILED)


def mark_failed(folder: Path, info: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / FAILED, info)

