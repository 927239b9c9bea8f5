"""The study's scheduler alone, driven with plain callables in temporary folders (no training):
dependency order, failures recorded and passed on to the units built from them, reruns, and
several workers sharing one study folder."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from pocus_edge.errors import DataError, TrainingError
from pocus_edge.study.markers import FAILED, UnitFailed, read_done, read_failed
from pocus_edge.study.plan import Unit
from pocus_edge.study.scheduler import run_units


def quiet(_: str) -> None:
    pass


class Recorder:
    """Work functions that log their label when called and check that every unit they are built
    from is done at that moment."""

    def __init__(self):
        self.ran: list[str] = []

    def work(self, label: str, after: tuple[Path, ...] = (), error: BaseException | None = None):
        def run():
            missing = [str(f) for f in after if read_done(f) is None]
            assert not missing, f"{label} started before {missing} were done"
            self.ran.append(label)
            if error is not None:
                raise error
            return {"label": label}

        return run

    def unit(self, label: str, folder: Path, after: tuple[Path, ...] = (), error: BaseException | None = None) -> Unit:
        return Unit("train", label, folder, self.work(label, after, error), after=after)


def test_units_run_once_each_after_the_units_they_are_built_from(tmp_path):
    """The plan lists a unit before its inputs: it still runs only once they are done."""
    rec = Recorder()
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    units = [rec.unit("c", c, after=(a, b)), rec.unit("b", b, after=(a,)), rec.unit("a", a)]
    assert run_units(units, say=quiet, poll_s=0.01) == 3
    assert rec.ran == ["a", "b", "c"]
    assert [read_done(f) for f in (a, b, c)] == [{"label": "a"}, {"label": "b"}, {"label": "c"}]


def test_a_failed_unit_is_recorded_and_only_what_is_built_from_it_is_skipped(tmp_path):
    """`UnitFailed` ends one unit, not the run: the units built from it (directly or through
    another) are recorded as failed without running, the independent ones run."""
    rec = Recorder()
    a, b, c, d, e = (tmp_path / n for n in "abcde")
    units = [rec.unit("a", a, error=UnitFailed("a diverged", diverged_at_step=3)),
             rec.unit("b", b),
             rec.unit("c", c, after=(a,)),
             rec.unit("d", d, after=(b,)),
             rec.unit("e", e, after=(c, d))]
    said: list[str] = []
    assert run_units(units, say=said.append, poll_s=0.01) == 2
    assert rec.ran == ["a", "b", "d"]
    failed_a = read_failed(a)
    assert failed_a == {"reason": "a diverged", "diverged_at_step": 3, "seconds": failed_a["seconds"]}
    assert failed_a["seconds"] >= 0 and read_done(a) is None
    assert read_failed(c)["inputs_failed"] == [str(a)] and read_done(c) is None
    assert read_failed(e)["inputs_failed"] == [str(c)] and read_done(e) is None
    assert read_done(b) == {"label": "b"} and read_done(d) == {"label": "d"}
    assert read_failed(b) is None and read_failed(d) is None
    assert any("FAILED" in line and str(a / FAILED) in line for line in said)


def test_a_rerun_skips_done_and_failed_units_and_a_deleted_record_retries(tmp_path):
    rec = Recorder()
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    units = [rec.unit("a", a, error=UnitFailed("a diverged")), rec.unit("b", b), rec.unit("c", c, after=(a,))]
    assert run_units(units, say=quiet, poll_s=0.01) == 1
    assert rec.ran == ["a", "b"]
    # Nothing left: neither the done unit nor the failed ones run again.
    assert run_units(units, say=quiet, poll_s=0.01) == 0 and rec.ran == ["a", "b"]
    # Deleting a unit's failed.json retries that unit (now succeeding); the unit built from it keeps
    # its own record until that is deleted too.
    (a / FAILED).unlink()
    units[0] = rec.unit("a", a)
    assert run_units(units, say=quiet, poll_s=0.01) == 1
    assert rec.ran == ["a", "b", "a"] and read_done(a) == {"label": "a"} and read_failed(c) is not None
    (c / FAILED).unlink()
    assert run_units(units, say=quiet, poll_s=0.01) == 1
    assert rec.ran == ["a", "b", "a", "c"] and read_done(c) == {"label": "c"}


def test_any_other_error_stops_the_run_and_records_nothing(tmp_path):
    """A fault of the data or the setup is not an outcome of the method: it would fail every unit
    alike, so it propagates and the units after it do not run."""
    rec = Recorder()
    e, f = tmp_path / "e", tmp_path / "f"
    fault = DataError("frame 3 is truncated")
    with pytest.raises(DataError) as raised:
        run_units([rec.unit("e", e, error=fault), rec.unit("f", f)], say=quiet, poll_s=0.01)
    assert raised.value is fault
    assert rec.ran == ["e"]
    assert read_failed(e) is None and read_done(e) is None and read_done(f) is None
    # Once the fault is fixed, the next run does the unit and the ones after it.
    assert run_units([rec.unit("e", e), rec.unit("f", f)], say=quiet, poll_s=0.01) == 2
    assert rec.ran == ["e", "e", "f"]


def test_a_unit_whose_inputs_no_process_makes_fails_instead_of_waiting(tmp_path):
    orphan = Unit("eval", "evaluate x", tmp_path / "eval" / "x", lambda: {}, after=(tmp_path / "runs" / "missing",))
    with pytest.raises(TrainingError, match="which no process is making"):
        run_units([orphan], say=quiet, poll_s=0.01)


# -- several workers on one folder ------------------------------------------------------------


def shared_plan(root: Path) -> list[tuple[str, Path, tuple[Path, ...]]]:
    """(label, folder, inputs) of a study-shaped plan: two pretrainings, then per seed two trainings
    and a unit built from both."""
    pre = {n: root / "pretrain" / n for n in ("a", "b")}
    plan = [("pretrain a", pre["a"], ()), ("pretrain b", pre["b"], ())]
    for seed in range(3):
        run_a, run_b = root / "runs" / f"a{seed}", root / "runs" / f"b{seed}"
        plan += [(f"train a {seed}", run_a, (pre["a"],)), (f"train b {seed}", run_b, (pre["b"],)),
                 (f"fuse {seed}", root / "eval" / f"fuse{seed}", (run_a, run_b))]
    return plan


def counted_work(root: Path, label: str, after: tuple[Path, ...]):
    """Work that leaves one file per call under ``root/calls`` (the process id, the time it
    started and the time it ended) and checks that its inputs are done when it starts."""

    def run():
        start = time.monotonic()
        missing = [str(f) for f in after if read_done(f) is None]
        time.sleep(0.05)
        calls = root / "calls"
        calls.mkdir(exist_ok=True)
        name = f"{label.replace(' ', '_')}.{os.getpid()}.{uuid.uuid4().hex}"
        (calls / name).write_text(f"{os.getpid()} {start!r} {time.monotonic()!r} {' '.join(missing)}")
        return {"label": label}

    return run


def worker_process(root: str, start, errors) -> None:
    """One process of a shared study folder: builds its own units and runs the scheduler."""
    base = Path(root)
    units = [Unit("train", label, folder, counted_work(base, label, after), 1.0, after=after)
             for label, folder, after in shared_plan(base)]
    start.wait(timeout=60)
    try:
        run_units(units, say=quiet, poll_s=0.01)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        errors.put(repr(exc))


def test_two_processes_on_one_folder_run_each_unit_exactly_once_in_dependency_order(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker_process, args=(str(tmp_path), start, errors)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert not reported

    plan = shared_plan(tmp_path)
    calls: dict[str, list[tuple[int, float, float, str]]] = {}
    for f in (tmp_path / "calls").iterdir():
        pid, started, ended, *missing = f.read_text().split(" ")
        calls.setdefault(f.name.split(".")[0].replace("_", " "), []).append(
            (int(pid), float(started), float(ended), " ".join(missing).strip()))
    # Each unit ran exactly once, with its inputs done, and left its marker.
    assert sorted(calls) == sorted(label for label, _, _ in plan)
    assert all(len(c) == 1 for c in calls.values()), {k: len(v) for k, v in calls.items()}
    assert all(c[0][3] == "" for c in calls.values())
    by_folder = {folder: label for label, folder, _ in plan}
    for label, folder, after in plan:
        assert read_done(folder) == {"label": label}
        for dep in after:
            assert calls[by_folder[dep]][0][2] <= calls[label][0][1], f"{label} started before {by_folder[dep]} ended"
    # A rerun from this process finds everything done.
    units = [Unit("train", label, folder, lambda: pytest.fail("a done unit ran again"), after=after)
             for label, folder, after in plan]
    assert run_units(units, say=quiet, poll_s=0.01) == 0


def test_threads_sharing_a_study_folder_run_each_unit_once_in_order_and_both_do_work(tmp_path):
    """Two workers in one process, each holding its own lock handles: the lock is per open file,
    so they share the folder as two processes would."""
    log: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(label, after):
        def run():
            missing = [str(f) for f in after if read_done(f) is None]
            assert not missing, f"{label} started before {missing} were done"
            time.sleep(0.05)
            with lock:
                log.append((label, threading.current_thread().name))
            return {"label": label}
        return run

    plan = shared_plan(tmp_path)
    units = [Unit("train", label, folder, work(label, after), 1.0, after=after) for label, folder, after in plan]
    errors: list[BaseException] = []

    def worker():
        try:
            run_units(units, say=quiet, poll_s=0.01)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"w{k}") for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(label for label, _ in log) == sorted(label for label, _, _ in plan)
    assert {who for _, who in log} == {"w0", "w1"}
