"""Fuzz the real stream receiver: random damaged PEF1 streams through `pocus-edge stream`.

Each stream is random intact frames (random size, pixel format, with or without payload CRC)
with faults between them (pocus_edge.runtime.faults: garbage, frames cut short, lying headers,
bit flips, reserved flags, bad versions, oversize frames, non-finite timestamps), sent to a
fresh `pocus-edge stream` process alternately on stdin and over TCP (in random-sized writes).
For each run the script checks what docs/streaming.md promises:

* the command exits 0 without a traceback;
* no intact frame is lost: frames_processed + frames_dropped == intact frames sent;
* every fault is counted: frames_invalid == faults when faults are separated by intact frames;
  when faults are adjacent, at most one event per fault, and a frame without payload CRC that
  was cut short and followed by another fault's bytes may pass as an extra frame (it cannot be
  told from a whole one), so: intact <= processed + dropped and invalid + extra <= faults;
* the report's counts add up: frames_in == processed + dropped + invalid;
* a stream without any frame or fault (nothing at all) is refused: exit 2, one line, no report.

The interrupt variant (``--interrupts N``, default 60) sends a random prefix of a random stream
over TCP to a receiver that also writes ``--masks m.npz``, waits a moment and sends it SIGINT
(Ctrl-C) while the connection is open. Each run must exit 130 with the one line "interrupted",
write its report with ``interrupted_by: SIGINT`` and counts that add up (frames_in == processed
+ dropped + invalid + interrupted), and keep a masks archive holding exactly the processed
frames.

Then a few fixed scenarios: a lying 4096x4096 header followed by 20 frames, a slow-drip TCP
sender (bounded by the per-frame deadline and the idle timeout), a second TCP sender (refused
and counted). The model is a one-node ONNX graph (mean over channels): the receiver is under
test, not the network.

    python benchmarks/fuzz_stream.py --streams 354 --interrupts 60 --seed 0 --out benchmarks/notes/fuzz_stream.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pocus_edge.runtime import faults, protocol  # noqa: E402


def mean_model(path: Path) -> Path:
    """A one-node ONNX graph: fused = mean over the 3 input channels, 32x32."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", 3, 32, 32])
    out = helper.make_tensor_value_info("fused", TensorProto.FLOAT, ["batch", 1, 32, 32])
    node = helper.make_node("ReduceMean", ["frames"], ["fused"], axes=[1], keepdims=1)
    model = helper.make_model(helper.make_graph([node], "mean", [inp], [out]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def stream_command(source: str, model: Path, report: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pocus_edge", "stream", source, "--model", str(model), "--report", str(report),
            "--threads", "1", "--no-progress", "--frame-timeout", "2", "--idle-timeout", "5", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}


def run_stdin(data: bytes, model: Path, report: Path) -> tuple[int, str]:
    proc = subprocess.run(stream_command("-", model, report), input=data, capture_output=True, timeout=300, env=_env())
    return proc.returncode, proc.stderr.decode(errors="replace")


def _listen_port(proc: subprocess.Popen) -> int:
    line = proc.stderr.readline().decode(errors="replace")
    m = re.search(r"listening on tcp://[^ ]+:(\d+)", line)
    if not m:
        raise RuntimeError(f"no listening line from the receiver: {line!r}")
    return int(m.group(1))


def run_tcp(data: bytes, model: Path, report: Path, rng: np.random.Generator, *,
            sender=None, extra: tuple[str, ...] = ()) -> tuple[int, str, dict]:
    """Start the receiver on tcp:0, send ``data`` in random-sized writes (or run ``sender(port)``)."""
    proc = subprocess.Popen(stream_command("tcp:0", model, report, "--accept-timeout", "30", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    info: dict = {}
    try:
        port = _listen_port(proc)
        if sender is not None:
            info = sender(port) or {}
        else:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                i = 0
                while i < len(data):
                    n = int(rng.integers(1, 4096))
                    s.sendall(data[i : i + n])
                    i += n
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode(errors="replace"), info


def check(stream: faults.FuzzStream, rc: int, stderr: str, report_path: Path) -> tuple[dict, list[str]]:
    """The report's counts and the list of broken promises (empty when all hold)."""
    broken = []
    if "Traceback" in stderr:
        broken.append("traceback")
    if not stream.frames and not stream.faults:  # nothing at all: refused like an empty folder
        lines = [line for line in stderr.splitlines() if line.strip()]
        if rc != 2 or len(lines) != 1 or "before its first frame" not in lines[0]:
            broken.append(f"empty stream: exit {rc}, stderr {lines!r}")
        if report_path.is_file():
            broken.append("empty stream left a report")
        return {"frames_in": 0, "frames_processed": 0, "frames_dropped": 0, "frames_invalid": 0}, broken
    if rc != 0:
        broken.append(f"exit {rc}")
    if not report_path.is_file():
        return {}, broken + ["no report"]
    r = json.loads(report_path.read_text())
    counts = {k: r[k] for k in ("frames_in", "frames_processed", "frames_dropped", "frames_invalid")}
    intact, n_faults = len(stream.frames), len(stream.faults)
    parsed = counts["frames_processed"] + counts["frames_dropped"]
    # Adjacent faults may yield extra frames: a frame without payload CRC cut short and followed
    # by another fault's bytes cannot be told from a whole one. Intact frames are never lost.
    extra = parsed - intact
    if extra < 0 or (stream.separated and extra != 0):
        broken.append(f"intact frames: {intact} sent, {counts['frames_processed']} processed + {counts['frames_dropped']} dropped")
    if stream.separated and counts["frames_invalid"] != n_faults:
        broken.append(f"faults: {n_faults} sent, {counts['frames_invalid']} counted invalid")
    if not stream.separated and not (min(1, n_faults) <= counts["frames_invalid"] + max(extra, 0) <= n_faults):
        broken.append(f"adjacent faults: {n_faults} sent, {counts['frames_invalid']} counted invalid, {extra} extra frames")
    if counts["frames_in"] != counts["frames_processed"] + counts["frames_dropped"] + counts["frames_invalid"]:
        broken.append("counts do not add up")
    return counts, broken


def send_and_check(stream: faults.FuzzStream, transport: str, model: Path, report: Path,
                   rng: np.random.Generator) -> tuple[dict, list[str], str, int]:
    """Send one stream to a fresh receiver on ``transport``: (counts, broken promises, stderr, exit)."""
    if transport == "stdin":
        rc, err = run_stdin(stream.data, model, report)
    else:
        rc, err, _ = run_tcp(stream.data, model, report, rng)
    counts, broken = check(stream, rc, err, report)
    return counts, broken, err, rc


def fuzz(n_streams: int, seed: int, model: Path, work: Path, *, adjacent_share: float = 0.25) -> dict:
    rng = np.random.default_rng(seed)
    tally = collections.Counter()
    kinds = collections.Counter()
    failures = []
    for k in range(n_streams):
        transport = "stdin" if k % 2 == 0 else "tcp"
        stream = faults.random_stream(rng, separated=bool(rng.random() >= adjacent_share))
        counts, broken, err, rc = send_and_check(stream, transport, model, work / f"r{k}.json", rng)
        tally.update({f"streams_{transport}": 1, "streams": 1, "bytes": len(stream.data), "frames_sent": len(stream.frames),
                      "faults_sent": len(stream.faults), "adjacent_streams": int(not stream.separated), **counts})
        tally["tracebacks"] += "Traceback" in err
        tally["nonzero_exits"] += rc != 0
        tally["empty_streams"] += not stream.frames and not stream.faults  # refused by design (exit 2)
        kinds.update(stream.faults)
        if broken:
            failures.append({"stream": k, "transport": transport, "broken": broken, "faults": stream.faults})
        if (k + 1) % 25 == 0:
            print(f"  {k + 1}/{n_streams} streams, {len(failures)} broken", file=sys.stderr, flush=True)
    return {"tally": dict(tally), "fault_kinds": dict(kinds), "failures": failures}


def interrupt_run(stream: faults.FuzzStream, model: Path, work: Path, rng: np.random.Generator, k: int) -> tuple[dict, list[str]]:
    """Send a random prefix of ``stream`` over TCP, wait, SIGINT the receiver; check its promises."""
    report, masks = work / f"int{k}.json", work / f"int{k}.npz"
    proc = subprocess.Popen(stream_command("tcp:0", model, report, "--accept-timeout", "30", "--masks", str(masks)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    cut = int(rng.integers(0, len(stream.data) + 1))
    wait_s = float(rng.uniform(0.05, 0.5))
    try:
        port = _listen_port(proc)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(stream.data[:cut])
            time.sleep(wait_s)
            proc.send_signal(signal.SIGINT)  # while the sender is still connected
            _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.decode(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    broken = []
    if proc.returncode != 130 or lines != ["interrupted"]:
        broken.append(f"exit {proc.returncode}, stderr {lines[-3:]!r}")
    if not report.is_file():
        return {}, broken + ["no report"]
    r = json.loads(report.read_text())
    counts = {key: r.get(key) for key in ("frames_in", "frames_processed", "frames_dropped", "frames_invalid", "frames_interrupted")}
    if r.get("interrupted_by") != "SIGINT":
        broken.append(f"interrupted_by {r.get('interrupted_by')!r}")
    if counts["frames_in"] != counts["frames_processed"] + counts["frames_dropped"] + counts["frames_invalid"] + counts["frames_interrupted"]:
        broken.append(f"counts do not add up: {counts}")
    if not masks.is_file():
        broken.append("no masks archive")
    else:
        with np.load(masks) as archive:
            if len(archive.files) != counts["frames_processed"]:
                broken.append(f"masks archive holds {len(archive.files)} frames, {counts['frames_processed']} processed")
    # Frames whose every byte was sent before the interrupt (the receiver had wait_s to take them).
    sent_whole, offset = 0, 0
    for frame_bytes, _ in stream.frames:
        offset = stream.data.find(frame_bytes, offset)
        if offset < 0 or offset + len(frame_bytes) > cut:
            break
        offset += len(frame_bytes)
        sent_whole += 1
    counts.update(frames_sent_whole=sent_whole, wait_ms=round(wait_s * 1000))
    return counts, broken


def interrupts(n_streams: int, seed: int, model: Path, work: Path) -> dict:
    rng = np.random.default_rng(seed + 1)
    tally = collections.Counter()
    failures = []
    for k in range(n_streams):
        stream = faults.random_stream(rng, separated=bool(rng.random() >= 0.25))
        counts, broken = interrupt_run(stream, model, work, rng, k)
        tally.update({"runs": 1, **{key: v for key, v in counts.items() if key != "wait_ms"}})
        tally["runs_with_processed_frames"] += bool(counts.get("frames_processed"))
        if broken:
            failures.append({"run": k, "broken": broken})
        if (k + 1) % 20 == 0:
            print(f"  {k + 1}/{n_streams} interrupted runs, {len(failures)} broken", file=sys.stderr, flush=True)
    return {"tally": dict(tally), "failures": failures}


def scenarios(model: Path, work: Path) -> dict:
    """The fixed cases: each returns its report counts and whether it held."""
    rng = np.random.default_rng(1)
    out = {}
    frames = [faults.random_frame(rng, k) for k in range(20)]
    lying = faults.header_bytes(flags=protocol.FLAG_PAYLOAD_CRC, width=4096, height=4096)
    stream = faults.FuzzStream(lying + b"".join(f for f, _ in frames), frames=frames, faults=["lying_header"])
    for transport in ("stdin", "tcp"):
        counts, broken, _, _ = send_and_check(stream, transport, model, work / f"lying_{transport}.json", rng)
        out[f"lying 4096x4096 header + 20 frames ({transport})"] = {"counts": counts, "held": not broken, "broken": broken}

    def drip(port: int) -> dict:
        data = protocol.encode_frame(np.zeros((64, 64), np.uint8), 1.0) * 50
        t0 = time.monotonic()
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            try:
                while sent < len(data) and time.monotonic() - t0 < 60:
                    s.send(data[sent : sent + 1])
                    sent += 1
                    time.sleep(0.1)
            except OSError:
                pass
        return {"bytes_dripped": sent, "receiver_gave_up_after_s": round(time.monotonic() - t0, 1)}

    report = work / "drip.json"
    rc, err, info = run_tcp(b"", model, report, rng, sender=drip)
    r = json.loads(report.read_text()) if report.is_file() else {}
    out["slow-drip sender, 1 byte / 0.1 s (--frame-timeout 2, --idle-timeout 5)"] = {
        **info, "exit": rc, "frames_invalid": r.get("frames_invalid"), "invalid_reasons": r.get("invalid_reasons"),
        "held": rc == 0 and "Traceback" not in err and info.get("receiver_gave_up_after_s", 99) < 15,
    }

    def two_senders(port: int) -> dict:
        good = [faults.random_frame(rng, k)[0] for k in range(5)]
        result = {"second_sender_error": None}
        with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
            first.sendall(good[0])
            time.sleep(0.3)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as second:
                    for _ in range(50):
                        second.sendall(good[1])
                        time.sleep(0.02)
            except OSError as exc:
                result["second_sender_error"] = type(exc).__name__
            for f in good[1:]:
                first.sendall(f)
        return result

    report = work / "two.json"
    rc, err, info = run_tcp(b"", model, report, rng, sender=two_senders)
    r = json.loads(report.read_text()) if report.is_file() else {}
    out["second TCP sender while one is served"] = {
        **info, "exit": rc, "frames_processed": r.get("frames_processed"),
        "senders_refused": (r.get("source") or {}).get("senders_refused"),
        "held": rc == 0 and r.get("frames_processed") == 5 and (r.get("source") or {}).get("senders_refused") == 1,
    }
    return out


def describe_machine() -> dict:
    from pocus_edge.benchmark.machine import describe_machine as describe

    d = describe()
    return {k: d.get(k) for k in ("os", "arch", "python", "cpu", "load_average", "gpu")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=354, help="random streams (alternately stdin and TCP)")
    ap.add_argument("--interrupts", type=int, default=60, help="runs interrupted with SIGINT mid-stream (TCP, with --masks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scenarios", action="store_true", help="skip the fixed scenarios")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="pocus-fuzz-") as tmp:
        work = Path(tmp)
        model = mean_model(work / "mean.onnx")
        result = fuzz(args.streams, args.seed, model, work)
        if args.interrupts:
            result["interrupts"] = interrupts(args.interrupts, args.seed, model, work)
        if not args.no_scenarios:
            result["scenarios"] = scenarios(model, work)
    result.update(
        command=" ".join(["python", "benchmarks/fuzz_stream.py", *sys.argv[1:]]),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=describe_machine(),
        wall_s=round(time.time() - started, 1),
    )
    text = json.dumps(result, indent=2, default=str)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    t = result["tally"]
    print(f"\n{t['streams']} streams ({t.get('streams_stdin', 0)} stdin, {t.get('streams_tcp', 0)} TCP), "
          f"{t['frames_sent']} intact frames, {t['faults_sent']} faults: {t.get('frames_processed', 0)} processed, "
          f"{t.get('frames_dropped', 0)} dropped, {t.get('frames_invalid', 0)} invalid; "
          f"{len(result['failures'])} streams broke a promise; {t['tracebacks']} tracebacks", file=sys.stderr)
    if "interrupts" in result:
        i = result["interrupts"]["tally"]
        print(f"{i.get('runs', 0)} interrupted runs: {i.get('frames_processed', 0)} frames processed (all in the masks), "
              f"{i.get('frames_interrupted', 0)} interrupted, {i.get('frames_invalid', 0)} invalid, "
              f"{i.get('frames_sent_whole', 0)} frames sent whole before the interrupts; "
              f"{len(result['interrupts']['failures'])} runs broke a promise", file=sys.stderr)
    broken_interrupts = result.get("interrupts", {}).get("failures")
    sys.exit(1 if result["failures"] or broken_interrupts or not all(s["held"] for s in result.get("scenarios", {}).values()) else 0)


if __name__ == "__main__":
    main()
