"""Runs a study's units: each once its inputs are done, each claimed with a lock on its folder
so that several processes can share one study folder, failures recorded and passed on to the
units built from them."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from ..errors import TrainingError
from .markers import FAILED, UnitFailed, mark_done, mark_failed, read_done

if TYPE_CHECKING:
    from .plan import Unit


def run_units(units: list[Unit], say: Callable[[str], None], poll_s: float = 15.0) -> int:
    """Run every unit not yet done, in plan order, each as soon as the units it is built from
    are done. Several processes may work on one study folder at once (e.g. one per core, each
    with one thread): a unit is claimed with an exclusive lock on its folder, so each runs
    exactly once, and a process whose next units wait on another's work polls until they can
    start. A lock dies with its process, so a killed unit is picked up again by the next run.

    A unit that raises :class:`UnitFailed` is recorded as failed (``failed.json``), and so is
    every unit built from it; the others go on, and reruns skip them. Any other error stops the
    run (bad data or settings would fail every unit alike)."""
    t_start = time.perf_counter()
    ran = 0
    waiting_on: str | None = None
    while True:
        pending = [(i, u) for i, u in enumerate(units, 1) if not u.finished()]
        if not pending:
            return ran
        for i, unit in pending:
            lost = unit.failed_inputs()
            if not lost and not unit.ready():
                continue
            with _claim(unit.folder) as mine:
                if not mine or unit.finished():
                    continue
                if lost:
                    reason = f"not run: it needs {', '.join(str(f) for f in lost)}, which failed"
                    mark_failed(unit.folder, {"reason": reason, "inputs_failed": [str(f) for f in lost]})
                    say(f"[{i}/{len(units)}] {unit.label}: {reason}")
                    break
                left = sum(u.cost_s for _, u in pending)
                eta = f", ~{left / 60:.0f} min of planned work left" if left else ""
                say(f"[{i}/{len(units)}] {unit.label}{eta}")
                t0 = time.perf_counter()
                try:
                    info = unit.work()
                except UnitFailed as exc:
                    mark_failed(unit.folder, {"reason": str(exc), **exc.facts,
                                              "seconds": round(time.perf_counter() - t0, 1)})
                    say(f"[{i}/{len(units)}] {unit.label}: FAILED, recorded in {unit.folder / FAILED} "
                        f"(the comparisons that need it use the other seeds): {exc}")
                    break
                mark_done(unit.folder, info)
                ran += 1
                say(f"[{i}/{len(units)}] {unit.label}: done in {time.perf_counter() - t0:.0f} s "
                    f"({(time.perf_counter() - t_start) / 60:.0f} min so far)")
            waiting_on = None
            break
        else:  # nothing could start: every remaining unit is held, or waits on one held, by another process
            busy = [u.label for _, u in pending if _claimed_elsewhere(u.folder)]
            if not busy:
                blocked = pending[0][1]
                raise TrainingError(f"{blocked.folder}: {blocked.label} waits for "
                                    f"{', '.join(str(f) for f in blocked.after if read_done(f) is None)}, which no process is making")
            if waiting_on != busy[0]:
                say(f"waiting for another process: {'; '.join(busy)}")
                waiting_on = busy[0]
            time.sleep(poll_s)


LOCK = ".claim"


@contextlib.contextmanager
def _claim(folder: Path):
    """Yield True while this process holds the unit's exclusive lock, False if another holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # no advisory locks here: one process per study folder
        yield True
        return
    with open(folder / LOCK, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _claimed_elsewhere(folder: Path) -> bool:
    if fcntl is None or not (Path(folder) / LOCK).is_file():
        return False
    with _claim(folder) as mine:
        return not mine
