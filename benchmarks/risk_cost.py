"""Latency cost of the in-graph risk output: the fused graph exported without and with ``risk``
(same weights, same frames), timed in onnxruntime on the CPU with one thread, batch 1.

Rounds are interleaved (both graphs once per round, in turn; the order alternates), so load from
other jobs on a shared machine hits both alike; the medians over ``--runs`` rounds after
``--warmup`` untimed calls per graph are reported with their ratio (the issue's goal: < 5 %
added latency per frame). The risk is two per-frame sums of elementwise products after the
branch sigmoids, so its cost is expected to be small next to the two networks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/risk_cost.py --preset small --runs 200 \
        --out benchmarks/notes/risk_cost_small.json

Random weights (each head rescaled so logits spread like a trained model's; see
``spread_head_logits``); the timing does not depend on the weights' values.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from bench_export import ort_session  # noqa: E402  (the sessions bench_export times: no spinning, 1 inter-op thread)


def build_pair(preset: str, seed: int):
    from pocus_edge.config import model_preset
    from pocus_edge.export.parity import parity_frames, spread_head_logits
    from pocus_edge.models.transunet import TransUNet

    cfg = model_preset(preset)
    torch.manual_seed(seed)
    generative, contrastive = TransUNet(cfg).eval(), TransUNet(cfg).eval()
    frames, _ = parity_frames(None, cfg.img_size, n=4, seed=seed + 1)
    spread_head_logits(generative, frames)
    spread_head_logits(contrastive, frames)
    return generative, contrastive, frames


def export_both(generative, contrastive, folder: Path) -> dict[str, Path]:
    from pocus_edge.export.onnx import export_onnx
    from pocus_edge.models.fused import FusedSegmenter

    return {
        name: export_onnx(FusedSegmenter(generative, contrastive, risk=risk).eval(), folder / f"fused-{name}.onnx", batch=1)
        for name, risk in (("plain", False), ("risk", True))
    }


def time_interleaved(sessions: dict, frame: np.ndarray, runs: int, warmup: int) -> dict[str, list[float]]:
    feeds = {name: {s.get_inputs()[0].name: frame} for name, s in sessions.items()}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for round_index in range(runs):
        for name in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--runs", type=int, default=200, help="interleaved rounds (each times both graphs once)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))

    generative, contrastive, frames = build_pair(args.preset, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_both(generative, contrastive, Path(tmp))
        sessions = {name: ort_session(path, args.threads) for name, path in paths.items()}
        frame = np.ascontiguousarray(frames[:1])
        outputs = {name: s.run(None, {s.get_inputs()[0].name: frame}) for name, s in sessions.items()}
        # Same fused probability either way: the risk output adds nodes, it changes nothing else.
        fused_diff = float(np.abs(outputs["plain"][0] - outputs["risk"][0]).max())
        times = time_interleaved(sessions, frame, args.runs, args.warmup)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "preset": args.preset,
        "runs": args.runs,
        "warmup": args.warmup,
        "threads": args.threads,
        "batch": 1,
        "median_ms_per_frame": {name: round(value, 4) for name, value in median.items()},
        "p90_ms_per_frame": {name: round(float(np.percentile(t, 90)), 4) for name, t in times.items()},
        "added_ms": round(median["risk"] - median["plain"], 4),
        "added_percent": round(100.0 * (median["risk"] / median["plain"] - 1.0), 2),
        "risk_output_example": float(outputs["risk"][-1].ravel()[0]),
        "fused_max_abs_diff_plain_vs_risk": fused_diff,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "onnxruntime": __import__("onnxruntime").__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        from pocus_edge.io import write_text_atomic

        write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
