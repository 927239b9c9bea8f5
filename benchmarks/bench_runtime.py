"""End-to-end runtime speed vs bare model inference.

For each preset: build the fused two-branch graph (random weights: speed does not depend on
them), export it to ONNX fp32 (and int8 with --int8, calibrated on synthetic frames: speed
only, accuracy is measured elsewhere), then measure at batch 1 on onnxruntime:

* bare:    ``session.run`` on an already preprocessed frame, nothing else;
* runtime: ``run_stream`` over TeleMED-sized (480x640) uint8 frames from memory, offline
           (no pacing, no drops): decode + preprocess (shared function) + infer + threshold.

overhead = runtime wall time per frame / bare mean inference time - 1 (goal < 10 %). On a
shared machine the bare and runtime runs see different load, so the script also reports the
in-run overhead: wall time per frame / mean model-call time inside the same runtime run - 1,
which cancels the load drift (both sides are measured on the same frames, at the same time).

    python benchmarks/bench_runtime.py --presets small paper --frames 200 --paper-frames 12 --int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_fused(preset: str, seed: int = 0):
    import torch

    from pocus_edge.config import model_preset
    from pocus_edge.export.fused import FusedSegmenter
    from pocus_edge.models.transunet import TransUNet

    torch.manual_seed(seed)
    cfg = model_preset(preset)
    return FusedSegmenter(TransUNet(cfg), TransUNet(cfg)).eval()


def export(model, path: Path) -> Path:
    from pocus_edge.export.onnx import export_onnx

    return export_onnx(model, path)


def _synthetic_reader(input_name: str, size: int, n: int = 16):
    """onnxruntime CalibrationDataReader over synthetic speckle frames (speed runs only)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_SyntheticFrames, CalibrationDataReader):
        pass

    return Reader(input_name, size, n)


class _SyntheticFrames:
    def __init__(self, input_name: str, size: int, n: int = 16):
        from pocus_edge.data.transforms import preprocess_frame

        rng = np.random.default_rng(1)
        self._items = iter(
            [{input_name: preprocess_frame(rng.gamma(2.0, 40.0, (480, 640)).clip(0, 255).astype(np.uint8), size)[None]} for _ in range(n)]
        )

    def get_next(self):
        return next(self._items, None)


def quantize(fp32: Path, dst: Path, size: int) -> Path:
    from pocus_edge.export.quantize import quantize_int8

    return quantize_int8(fp32, dst, _synthetic_reader("frames", size))


class CycleSource:
    """n frames cycling over a small in-memory pool: decoding costs nothing, so the figure is the
    runtime's own overhead, not disk or codec speed."""

    live = False
    fps = 30.0
    last_decode_ms = None
    invalid_reasons: dict = {}

    def __init__(self, n: int, shape=(480, 640), period_ms: float = 33.3):
        self.period_ms = period_ms
        rng = np.random.default_rng(0)
        self.pool = [rng.gamma(2.0, 40.0, shape).clip(0, 255).astype(np.uint8) for _ in range(8)]
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield self.pool[i % len(self.pool)], i * self.period_ms, i

    def describe(self):
        return {"kind": "CycleSource", "frames": self.n, "shape": list(self.pool[0].shape)}


def bare_infer_ms(backend, frames: int, warmup: int = 0) -> list[float]:
    x = backend.prepare(CycleSource(1).pool[0])[None]
    feed = {backend.input_name: x}
    for _ in range(warmup):
        backend.session.run(None, feed)
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        backend.session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def measure(path: Path, frames: int, threads: int | None, batch: int = 1, rounds: int = 3) -> dict:
    """Alternate bare and runtime runs ``rounds`` times and keep the median of each, so a load
    change on a shared machine hits both sides alike."""
    from pocus_edge.inference import open_backend
    from pocus_edge.runtime.pipeline import StreamOptions, run_stream

    backend = open_backend(path, "ort", threads=threads)
    bare_infer_ms(backend, 10)  # warm-up: thread pool, arena allocations
    run_stream(CycleSource(5), backend, options=StreamOptions(progress=False))
    bare_means, bare_all, per_frame, reports, in_run = [], [], [], [], []
    for _ in range(rounds):
        bare = bare_infer_ms(backend, frames)
        bare_all += bare
        bare_means.append(statistics.fmean(bare))
        # queue_size=1: the producer still prepares the next frame during inference, but frames do
        # not wait behind a deep queue, so the e2e latency is what one frame experiences.
        report = run_stream(CycleSource(frames), backend, options=StreamOptions(batch_size=batch, queue_size=1, progress=False))
        per_frame.append(report["wall_s"] * 1000.0 / report["frames_processed"])
        in_run.append(per_frame[-1] / report["stages_ms"]["infer"]["mean"] - 1.0)
        reports.append(report)
    bare_mean = statistics.median(bare_means)
    per_frame_ms = statistics.median(per_frame)
    report = reports[per_frame.index(sorted(per_frame)[len(per_frame) // 2])]
    # Latency as a live probe sees it: frames arriving at 80 % of the measured capacity,
    # realtime mode (drop-oldest queue), so no frame waits behind a backlog.
    live = run_stream(CycleSource(frames, period_ms=per_frame_ms / 0.8), backend,
                      options=StreamOptions(realtime=True, batch_size=batch, progress=False))
    return {
        "model": str(path.name),
        "precision": backend.precision,
        "gflops_per_frame": backend.gflops_per_frame,
        "frames": frames,
        "rounds": rounds,
        "batch": batch,
        "bare_infer_ms": {"median": round(statistics.median(bare_all), 2), "mean": round(bare_mean, 2)},
        "runtime": {
            "fps": round(1000.0 / per_frame_ms, 2),
            "per_frame_ms": round(per_frame_ms, 2),
            "latency_ms": report["latency_ms"],
            "stages_p50_ms": {k: v["p50"] for k, v in report["stages_ms"].items()},
        },
        "paced_at_80pct": {
            "input_fps": round(0.8 * 1000.0 / per_frame_ms, 2),
            "latency_ms": live["latency_ms"],
            "frames_dropped": live["frames_dropped"],
            "frames_in": live["frames_in"],
        },
        "bare_fps": round(1000.0 / bare_mean, 2),
        "overhead_pct": round(100.0 * (per_frame_ms / bare_mean - 1.0), 1),
        "overhead_in_run_pct": round(100.0 * statistics.median(in_run), 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "paper"])
    ap.add_argument("--frames", type=int, default=200, help="frames per measurement (small/tiny)")
    ap.add_argument("--paper-frames", type=int, default=12, help="frames per measurement for the paper preset")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = all cores)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare/runtime rounds (median kept)")
    ap.add_argument("--int8", action="store_true", help="also measure the int8 (QDQ) export")
    ap.add_argument("--workdir", type=Path, default=None, help="keep exported models here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads or "default",
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "rows": [],
    }
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    for preset in args.presets:
        n = args.paper_frames if preset == "paper" else args.frames
        fp32 = work / f"{preset}_fp32.onnx"
        if not fp32.exists():
            t0 = time.perf_counter()
            export(build_fused(preset), fp32)
            print(f"[{preset}] exported fp32 in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        paths = [fp32]
        if args.int8:
            int8 = work / f"{preset}_int8.onnx"
            if not int8.exists():
                from pocus_edge.config import model_preset

                t0 = time.perf_counter()
                quantize(fp32, int8, model_preset(preset).img_size)
                print(f"[{preset}] quantized int8 in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            paths.append(int8)
        for path in paths:
            row = {"preset": preset, **measure(path, n, args.threads or None, rounds=args.rounds)}
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
    print(markdown(results))
    if args.out:
        from pocus_edge.io import write_json_atomic

        write_json_atomic(args.out, results)
    return 0


def markdown(results: dict) -> str:
    lines = [
        "| preset | precision | GFLOPs/frame | bare infer ms (median) | bare FPS | runtime FPS (offline) | overhead vs bare "
        "| overhead in run | live latency p50 / p95 / p99 ms (input at 80 % of capacity) | dropped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lat = r["paced_at_80pct"]["latency_ms"]
        g = r["gflops_per_frame"]
        lines.append(
            f"| {r['preset']} | {r['precision']} | {'-' if g is None else f'{g:.2f}'} | {r['bare_infer_ms']['median']} | "
            f"{r['bare_fps']} | {r['runtime']['fps']} | {r['overhead_pct']:+.1f} % | {r['overhead_in_run_pct']:+.1f} % | {lat['p50']} / {lat['p95']} / {lat['p99']} | "
            f"{r['paced_at_80pct']['frames_dropped']}/{r['paced_at_80pct']['frames_in']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
