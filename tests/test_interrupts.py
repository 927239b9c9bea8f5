"""Ctrl-C and SIGTERM during a stream: every frame processed before the interrupt is in every
output (masks archive, masks folder, overlay video, a callback, the report), the counts add up
(frames_in = processed + dropped + invalid + interrupted), nothing is left half-written.

The signal is sent at many points of a run: from another thread at fixed times (the producer
decoding, the queue, inference), and from inside each sink's write (an injected step that
sends the signal to this process in the middle of writing a frame)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pocus_edge.errors import Terminated
from pocus_edge.inference import open_backend
from pocus_edge.runtime import overlay
from pocus_edge.runtime.base import FrameSource
from pocus_edge.runtime.pipeline import CallbackSink, MaskFileSink, OverlayVideoSink, StreamOptions, run_stream

onnx = pytest.importorskip("onnx")
from _models import mean_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 48
SHAPE = (20, 28)


class PacedSource(FrameSource):
    """Random frames, each after ``period_s`` of "decoding" (so a run lasts a known minimum time)."""

    name = "paced"

    def __init__(self, n: int = FRAMES, period_s: float = 0.01, on_start=None):
        super().__init__()
        self.n, self.period_s, self.on_start = n, period_s, on_start

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.on_start is not None:  # the run has begun: its producer pulls the first frame
            self.on_start()
        rng = np.random.default_rng(0)
        for i in range(self.n):
            time.sleep(self.period_s)
            yield rng.integers(0, 256, SHAPE, dtype=np.uint8), i * 33.0, i


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Ctrl-C as an interactive Python has it, whoever started the test run: a runner started in
    the background by a non-interactive shell inherits SIGINT ignored, and the stream rightly
    leaves an ignored signal ignored (docs/streaming.md)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return mean_onnx(tmp_path_factory.mktemp("model") / "mean.onnx")


def _outputs(folder: Path):
    seen: list[tuple[int, np.ndarray]] = []
    sinks = [MaskFileSink(folder / "masks.npz"), MaskFileSink(folder / "masks"), OverlayVideoSink(folder / "overlay.mp4", 30.0),
             CallbackSink(lambda r: seen.append((r.index, r.mask.copy())))]
    return sinks, seen


def _run_interrupted(model, folder: Path, expect: type[BaseException], on_start=None, **options) -> tuple[dict, list]:
    folder.mkdir()
    sinks, seen = _outputs(folder)
    with pytest.raises(expect):
        run_stream(PacedSource(on_start=on_start), open_backend(model, threads=1), sinks=sinks, report_path=folder / "report.json",
                   options=StreamOptions(progress=False, **options))
    return json.loads((folder / "report.json").read_text()), seen


def _check_kept(folder: Path, report: dict, seen: list, signal_name: str = "SIGINT") -> None:
    """Both promises: the counts add up, and every output holds exactly the processed frames."""
    assert report["interrupted_by"] == signal_name and report["final"] is True
    assert report["frames_in"] == (report["frames_processed"] + report["frames_dropped"] + report["frames_invalid"]
                                   + report["frames_interrupted"])
    processed = report["frames_processed"]
    assert len(seen) == processed
    indices = [i for i, _ in seen]
    with np.load(folder / "masks.npz") as archive:
        assert sorted(archive.files) == [f"frame_{i:07d}" for i in indices]
        for i, mask in seen:
            np.testing.assert_array_equal(archive[f"frame_{i:07d}"], mask.astype(np.uint8) * 255)
    pngs = sorted((folder / "masks").iterdir()) if processed else []
    assert [p.name for p in pngs] == [f"{i:07d}.png" for i in indices]
    from pocus_edge.data.layout import read_gray_png

    for (i, mask), png in zip(seen, pngs):
        np.testing.assert_array_equal(read_gray_png(png), mask.astype(np.uint8) * 255)
    if processed:
        assert overlay._PyAVWriter.frames_in(folder / "overlay.mp4") == processed
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary left


class _KillLater:
    """Sends ``signum`` to this process ``delay_s`` after the run's first pull from its source."""

    def __init__(self, delay_s: float, signum: int = signal.SIGINT):
        self.timer = threading.Timer(delay_s, os.kill, args=(os.getpid(), signum))

    def __call__(self) -> None:
        self.timer.start()


@pytest.mark.parametrize("delay_s", [0.0, 0.005, 0.03, 0.08, 0.15, 0.25, 0.35])
def test_sigint_at_a_time_keeps_every_processed_frame_in_every_output(model, tmp_path, delay_s):
    # The run lasts at least FRAMES x 10 ms = 0.48 s after its start, so each signal lands inside it.
    kill = _KillLater(delay_s)
    report, seen = _run_interrupted(model, tmp_path / "out", KeyboardInterrupt, on_start=kill)
    kill.timer.join()
    assert report["frames_processed"] < FRAMES
    _check_kept(tmp_path / "out", report, seen)


def _signal_inside(monkeypatch, owner, name: str, at_call: int, signum: int = signal.SIGINT) -> list[int]:
    """Wrap ``owner.name`` so that its ``at_call``-th call sends ``signum`` to this process in
    the middle of the write (before the real step runs), then finishes the write."""
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            os.kill(os.getpid(), signum)
            time.sleep(0.01)  # the handler has run by now: the write goes on regardless
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("at_call", [1, 5, 17])
@pytest.mark.parametrize("sink", ["npz", "png", "video"])
def test_sigint_inside_each_sinks_write(model, tmp_path, monkeypatch, sink, at_call):
    from pocus_edge.data import layout

    owner, name = {"npz": (np.lib.format, "write_array"), "png": (layout, "write_gray_png"),
                   "video": (overlay._PyAVWriter, "write")}[sink]
    calls = _signal_inside(monkeypatch, owner, name, at_call)
    report, seen = _run_interrupted(model, tmp_path / "out", KeyboardInterrupt)
    assert calls[0] >= at_call
    # The frame whose write was interrupted is finished and counted; nothing after the stop is taken.
    assert report["frames_processed"] >= at_call
    _check_kept(tmp_path / "out", report, seen)


def test_sigint_inside_inference_with_batches_counts_the_queued_frames_as_interrupted(model, tmp_path, monkeypatch):
    from pocus_edge.inference.ort import OrtBackend

    _signal_inside(monkeypatch, OrtBackend, "_run", 3)
    report, seen = _run_interrupted(model, tmp_path / "out", KeyboardInterrupt, batch_size=4, queue_size=8)
    _check_kept(tmp_path / "out", report, seen)
    assert report["frames_processed"] % 4 == 0 or report["frames_processed"] < FRAMES  # whole batches finished


def test_sigterm_stops_the_same_way_and_raises_terminated(model, tmp_path):
    kill = _KillLater(0.1, signal.SIGTERM)
    report, seen = _run_interrupted(model, tmp_path / "out", Terminated, on_start=kill)
    kill.timer.join()
    _check_kept(tmp_path / "out", report, seen, "SIGTERM")


def test_a_second_signal_aborts_and_discards_the_outputs_rather_than_keep_them_half_written(model, tmp_path, monkeypatch):
    from pocus_edge.data import layout

    real = layout.write_gray_png
    calls = [0]

    def twice(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)  # raised here, in the middle of this write
            time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(layout, "write_gray_png", twice)
    folder = tmp_path / "out"
    report, seen = _run_interrupted(model, folder, KeyboardInterrupt)
    assert report["frames_in"] == (report["frames_processed"] + report["frames_dropped"] + report["frames_invalid"]
                                   + report["frames_interrupted"])
    assert report["frames_interrupted"] >= 1  # the frame being written when the run was aborted
    assert sorted(p.name for p in folder.iterdir()) == ["report.json"]  # no output, no temporary


def test_handlers_are_restored_after_a_run(model, tmp_path):
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    run_stream(PacedSource(n=3, period_s=0.0), open_backend(model, threads=1), options=StreamOptions(progress=False))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_an_error_mid_batch_counts_the_unprocessed_frames_as_interrupted(model, tmp_path):
    def fail_at_seven(result):
        if result.index == 7:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        run_stream(PacedSource(period_s=0.0), open_backend(model, threads=1), sinks=[CallbackSink(fail_at_seven)],
                   report_path=tmp_path / "r.json", options=StreamOptions(progress=False, batch_size=4))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["frames_processed"] == 7 and report["interrupted_by"] is None
    assert report["frames_interrupted"] >= 1  # frame 7 (batch 4..7) at least
    assert report["frames_in"] == report["frames_processed"] + report["frames_dropped"] + report["frames_invalid"] + report["frames_interrupted"]


def _wait_for_masks(folder: Path, minimum_bytes: int, timeout_s: float = 60.0) -> None:
    """Until the archive's temporary (the run is writing) has grown past ``minimum_bytes``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        temps = [p for p in folder.iterdir() if p.name.startswith(".m.npz") and p.is_file()]
        if temps and temps[0].stat().st_size > minimum_bytes:
            return
        time.sleep(0.05)
    raise AssertionError("the stream never started writing its masks")


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_the_command_exits_with_one_line_and_keeps_report_and_masks(model, tmp_path, signum, code, word):
    from pocus_edge.runtime.sources import write_tvd_h5

    rng = np.random.default_rng(0)
    write_tvd_h5(tmp_path / "long.tvd.h5", rng.integers(0, 256, (600, *SHAPE), dtype=np.uint8), np.arange(600) * 33.3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pocus_edge", "stream", str(tmp_path / "long.tvd.h5"), "--model", str(model),
                             "--realtime", "--no-progress", "--threads", "1", "--report", str(tmp_path / "r.json"), "--masks", str(tmp_path / "m.npz")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # an ignored SIGINT would be inherited
    try:
        _wait_for_masks(tmp_path, 2000)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code
    assert [line for line in err.splitlines() if line.strip()] == [word]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["frames_in"] == (report["frames_processed"] + report["frames_dropped"] + report["frames_invalid"]
                                   + report["frames_interrupted"])
    assert 0 < report["frames_processed"] < 600
    with np.load(tmp_path / "m.npz") as archive:
        assert len(archive.files) == report["frames_processed"]
