"""Checks of the core-only ("lean") install, run by that venv's Python from .ci/lean_runtime.sh.

    python .ci/lean_checks.py WORK FULL_POCUS_EDGE

WORK holds what the full install made: data/ (the tiny simulator) and fused.onnx.
FULL_POCUS_EDGE is the full install's console script (the reference masks).
Prints one line per check and "lean runtime: N passed, M failed"; exits 1 on any failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import cv2
import numpy as np

WORK = Path(sys.argv[1])
FULL = sys.argv[2]
LEAN = str(Path(sys.executable).parent / "pocus-edge")
MODEL = WORK / "fused.onnx"
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
ENV.update(COLUMNS="200", NO_COLOR="1", OMP_NUM_THREADS="1")
FULL_ENV = {**ENV, "PYTHONPATH": os.environ.get("FULL_PYTHONPATH", "")}
RESULTS: list[tuple[str, str | None]] = []


def check(fn):
    """Run one named check, record pass/fail with the reason."""
    try:
        fn()
        RESULTS.append((fn.__name__, None))
        print(f"ok    {fn.__name__}", flush=True)
    except Exception as exc:  # report every failing check, not only the first
        reason = f"{type(exc).__name__}: {exc}"
        RESULTS.append((fn.__name__, reason))
        print(f"FAIL  {fn.__name__}: {reason}", flush=True)
        traceback.print_exc(limit=3)
    return fn


def run(*args: str, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = FULL_ENV if args[0] == FULL else ENV
    return subprocess.run(list(args), input=stdin, capture_output=True, timeout=timeout, env=env, cwd=WORK)


def masks_of(path: Path) -> list[np.ndarray]:
    with np.load(path) as archive:
        return [archive[name] for name in sorted(archive.files)]


def sweep_frames() -> list[np.ndarray]:
    """The longest video of the simulated source site (the one the tiny model was fine-tuned on,
    so that its masks are not empty), in frame order."""
    import csv

    site = WORK / "data" / "source"
    with open(site / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    videos: dict[str, list] = {}
    for row in rows:
        videos.setdefault(row["videoname"], []).append(row)
    longest = max(sorted(videos), key=lambda v: len(videos[v]))
    rows = sorted(videos[longest], key=lambda r: int(r["framenum"]))
    frames = [cv2.imread(str(site / "Images" / r["filename"]), cv2.IMREAD_GRAYSCALE) for r in rows]
    return [f for f in frames if f is not None and f.shape == frames[0].shape]


FRAMES = sweep_frames()
BORDER = (10, 6)  # the B-mode panel sits inside a larger "screen" frame in the recording


@check
def torch_is_not_installed():
    for module in ("torch", "torchvision", "timm"):
        assert importlib.util.find_spec(module) is None, f"{module} is importable in the lean venv"
    import pocus_edge

    assert "site-packages" in pocus_edge.__file__, f"not the installed copy: {pocus_edge.__file__}"


@check
def every_help_works():
    from pocus_edge.commands import COMMANDS

    for argv in [[]] + [[c] for c in COMMANDS]:
        proc = run(LEAN, *argv, "--help")
        out = proc.stdout.decode()
        assert proc.returncode == 0 and "Usage" in out, (argv, proc.stderr.decode()[-500:])
        assert "not installed here" not in out, (argv, "a command module imports an extra at its top")


@check
def a_training_command_names_its_extra():
    proc = run(LEAN, "flops", "--preset", "tiny")
    err = proc.stderr.decode().strip()
    assert proc.returncode == 3, (proc.returncode, err)  # cannot run on this install (docs/cli.md)
    assert len(err.splitlines()) == 1 and "needs the 'train' extra" in err and "pip install 'pocus-edge[train]'" in err, err


@check
def stream_a_tvd_recording():
    from pocus_edge.runtime.sources import write_tvd_h5

    top, left = BORDER
    h, w = FRAMES[0].shape
    screen = np.full((len(FRAMES), h + top + 4, w + left + 4), 12, np.uint8)
    for k, frame in enumerate(FRAMES):
        screen[k, top : top + h, left : left + w] = frame
    write_tvd_h5(WORK / "sweep.tvd.h5", screen, np.arange(len(FRAMES)) * 33.3, roi=(left + 1, left + w, top + 1, top + h))
    proc = run(LEAN, "stream", "sweep.tvd.h5", "--model", str(MODEL), "--report", "lean.json", "--masks", "lean.npz",
               "--overlay", "lean.mp4", "--threads", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr.decode()[-800:]
    report = json.loads((WORK / "lean.json").read_text())
    n = len(FRAMES)
    assert (report["frames_in"], report["frames_processed"], report["frames_dropped"], report["frames_invalid"]) == (n, n, 0, 0), report
    assert report["backend"] == "ort" and report["gflops_per_frame"] > 0
    masks = masks_of(WORK / "lean.npz")
    assert len(masks) == n and masks[0].shape == FRAMES[0].shape


@check
def same_masks_as_the_full_install():
    proc = run(FULL, "stream", "sweep.tvd.h5", "--model", str(MODEL), "--masks", "full.npz", "--threads", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr.decode()[-800:]
    lean, full = masks_of(WORK / "lean.npz"), masks_of(WORK / "full.npz")
    assert len(lean) == len(full)
    agreement = min(float((a == b).mean()) for a, b in zip(lean, full))
    # onnxruntime versions may differ between the two installs: pixels at the threshold may flip.
    assert agreement >= 0.999, f"pixel agreement {agreement:.5f}"
    assert any(m.any() for m in full), "the reference masks are empty: the check would prove nothing"


@check
def the_overlay_is_h264_and_decodes():
    import av

    with av.open(str(WORK / "lean.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    cap = cv2.VideoCapture(str(WORK / "lean.mp4"))
    count = 0
    while cap.read()[0]:
        count += 1
    assert count == len(FRAMES), count


def pef1_bytes() -> bytes:
    from pocus_edge.runtime.protocol import encode_frame

    return b"".join(encode_frame(frame, 33.3 * k, k) for k, frame in enumerate(FRAMES))


@check
def stream_pef1_on_stdin():
    proc = run(LEAN, "stream", "-", "--model", str(MODEL), "--masks", "stdin.npz", "--report", "stdin.json",
               "--threads", "1", "--no-progress", stdin=pef1_bytes())
    assert proc.returncode == 0, proc.stderr.decode()[-800:]
    report = json.loads((WORK / "stdin.json").read_text())
    assert report["frames_processed"] == len(FRAMES) and report["frames_invalid"] == 0, report
    for a, b in zip(masks_of(WORK / "stdin.npz"), masks_of(WORK / "lean.npz")):
        np.testing.assert_array_equal(a, b)  # same frames, same install: the same masks


@check
def stream_pef1_over_tcp():
    import socket

    proc = subprocess.Popen([LEAN, "stream", "tcp:0", "--model", str(MODEL), "--masks", "tcp.npz", "--report", "tcp.json",
                             "--threads", "1", "--accept-timeout", "60", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=WORK)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            if not line:
                break
            if "listening on tcp://" in line:
                port = int(line.strip().rsplit(":", 1)[1])
        assert port is not None, "the stream never said where it listens"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(pef1_bytes())
        rest = threading.Thread(target=proc.stderr.read, daemon=True)
        rest.start()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    report = json.loads((WORK / "tcp.json").read_text())
    assert report["frames_processed"] == len(FRAMES), report
    for a, b in zip(masks_of(WORK / "tcp.npz"), masks_of(WORK / "lean.npz")):
        np.testing.assert_array_equal(a, b)


@check
def benchmark_onnxruntime_rows():
    proc = run(LEAN, "benchmark", "--model", str(MODEL), "--batch", "1", "--runs", "3", "--warmup", "1",
               "--threads", "1", "--report", "bench.json", timeout=600)
    assert proc.returncode == 0, (proc.stdout.decode()[-600:], proc.stderr.decode()[-600:])
    report = json.loads((WORK / "bench.json").read_text())
    ok = [row for row in report["rows"] if row["status"] == "ok"]
    assert ok, [(row["format"], row["status"], row.get("reason")) for row in report["rows"]]
    assert all("onnxruntime" in str(row.get("engine", "")).lower() or "ort" in str(row.get("engine", "")).lower()
               for row in ok), [(row["format"], row.get("engine")) for row in ok]
    assert all(lat["fps"] > 0 for row in ok for lat in row["latency"])


failed = [(name, reason) for name, reason in RESULTS if reason is not None]
print(f"lean runtime: {len(RESULTS) - len(failed)} passed, {len(failed)} failed", flush=True)
sys.exit(1 if failed else 0)
