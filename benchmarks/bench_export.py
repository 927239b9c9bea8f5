"""Export speed benchmark: the paper's way (two separate PyTorch models + fusion in Python)
versus the ONE fused ONNX graph in onnxruntime (fp32, int8, optionally fp16), batch 1, CPU.

Rounds are interleaved (every variant once per round, in turn), so load from other jobs on a
shared machine hits all variants alike; medians over ``--runs`` rounds after ``--warmup``.
Mask agreement: mean per-image Dice of each variant's thresholded mask versus the eager path.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_export.py --preset paper --runs 20 \
        --out benchmarks/notes/export_paper.json

Random weights by default (each head rescaled so logits spread like a trained model's; raw
random heads give p ~ 0.5 everywhere and a meaningless Dice); pass --generative/--contrastive
to time real checkpoints, and --site to measure agreement on real frames.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def ort_session(path: Path, threads: int, level: str = "all", optimized_out: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    if optimized_out is not None:
        opts.optimized_model_filepath = str(optimized_out)
    opts.log_severity_level = 3
    # No busy-waiting after a run: with interleaved rounds on 2 cores, spinning onnxruntime
    # workers would steal the CPU from the next variant (PyTorch) and skew the comparison.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def size_mb(path: Path) -> float:
    files = [path] + list(path.parent.glob(path.name + ".data"))
    return round(sum(f.stat().st_size for f in files if f.exists()) / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8, help="frames for the mask-agreement check")
    ap.add_argument("--calib-frames", type=int, default=16)
    ap.add_argument("--site", default=None, help="site whose frames are used for calibration (train split) and agreement (test split)")
    ap.add_argument("--generative", default=None)
    ap.add_argument("--contrastive", default=None)
    ap.add_argument("--fp16", action="store_true", help="also time the fp16 graph (slow on most CPUs)")
    ap.add_argument("--dynamic-int8", action="store_true", help="also time onnxruntime dynamic int8 quantization")
    ap.add_argument("--opt-levels", action="store_true", help="also time fp32 at ORT_ENABLE_BASIC / EXTENDED")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse fused.fp32.onnx / fused.int8.onnx already in --workdir (same seed, same weights)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from pocus_edge.config import model_preset
    from pocus_edge.export import parity as parity_mod
    from pocus_edge.export.onnx import export_onnx
    from pocus_edge.export.parity import spread_head_logits
    from pocus_edge.export.quantize import ArrayCalibrationReader, SiteCalibrationReader, convert_fp16, quantize_int8
    from pocus_edge.models.fused import FusedSegmenter, load_fused
    from pocus_edge.models.fusion import fuse
    from pocus_edge.models.transunet import TransUNet

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.generative:
        fused_model = load_fused(args.generative, args.contrastive)
        weights = "checkpoints"
    else:
        cfg = model_preset(args.preset)
        torch.manual_seed(0)
        g, c = TransUNet(cfg).eval(), TransUNet(cfg).eval()
        probe, _ = parity_mod.parity_frames(None, cfg.img_size, n=2, seed=99)
        spread_head_logits(g, probe)
        spread_head_logits(c, probe)
        fused_model = FusedSegmenter(g, c).eval()
        weights = "random (head rescaled: logits median 0, std 3)"
    size = fused_model.img_size
    generative, contrastive = fused_model.generative, fused_model.contrastive
    frames, frames_source = parity_mod.parity_frames(args.site, size, n=args.frames)
    timings_log: dict[str, float] = {}

    t0 = time.perf_counter()
    fp32_path = work / "fused.fp32.onnx"
    if not (args.reuse and fp32_path.is_file()):
        export_onnx(fused_model, fp32_path, batch=1)
        timings_log["export_fp32_s"] = round(time.perf_counter() - t0, 1)
    if args.site:
        reader = SiteCalibrationReader(args.site, size, n_frames=args.calib_frames)
    else:
        calib, _ = parity_mod.parity_frames(None, size, n=args.calib_frames, seed=7)
        reader = ArrayCalibrationReader(calib, source="random frames")
    t0 = time.perf_counter()
    int8_path = work / "fused.int8.onnx"
    if not (args.reuse and int8_path.is_file()):
        quantize_int8(fp32_path, int8_path, reader)
        timings_log["quantize_int8_s"] = round(time.perf_counter() - t0, 1)

    variants: dict[str, object] = {}

    def eager(x: np.ndarray) -> np.ndarray:
        # The paper's way: two models, two forward passes, fusion in Python on their outputs.
        t = torch.from_numpy(x)
        with torch.inference_mode():
            p_g = generative.predict(t)
            p_c = contrastive.predict(t)
            return fuse(p_g, p_c, method="entropy", norm="image", formula="weighted").numpy()

    variants["pytorch eager, 2 models + python fusion"] = eager
    sessions = {"onnxruntime fused fp32": ort_session(fp32_path, args.threads, optimized_out=work / "fused.fp32.opt.onnx"),
                "onnxruntime fused int8 (QDQ static)": ort_session(int8_path, args.threads)}
    artifacts = {"fused.fp32.onnx": size_mb(fp32_path), "fused.int8.onnx": size_mb(int8_path)}
    if args.opt_levels:
        sessions["onnxruntime fused fp32 (ORT_ENABLE_BASIC)"] = ort_session(fp32_path, args.threads, level="basic")
        sessions["onnxruntime fused fp32 (ORT_ENABLE_EXTENDED)"] = ort_session(fp32_path, args.threads, level="extended")
    if args.fp16:
        fp16_path = convert_fp16(fp32_path, work / "fused.fp16.onnx")
        sessions["onnxruntime fused fp16"] = ort_session(fp16_path, args.threads)
        artifacts["fused.fp16.onnx"] = size_mb(fp16_path)
    if args.dynamic_int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        dyn_path = work / "fused.int8dyn.onnx"
        quantize_dynamic(str(fp32_path), str(dyn_path), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Conv"])
        sessions["onnxruntime fused int8 (dynamic)"] = ort_session(dyn_path, args.threads)
        artifacts["fused.int8dyn.onnx"] = size_mb(dyn_path)
    for name, sess in sessions.items():
        input_name = sess.get_inputs()[0].name
        variants[name] = (lambda s, n: (lambda x: s.run(None, {n: x})[0]))(sess, input_name)
    artifacts["two .safetensors checkpoints (fp32, for reference)"] = round(
        sum(p.numel() * 4 for p in fused_model.parameters()) / 1e6, 1)

    # Mask agreement versus the eager path, on every frame (batch 1 each).
    reference = np.concatenate([eager(frames[i : i + 1]) for i in range(len(frames))])
    agreement = {}
    for name, fn in variants.items():
        out = np.concatenate([fn(frames[i : i + 1]) for i in range(len(frames))])
        stats = parity_mod.compare(reference, out)
        agreement[name] = {k: round(stats[k], 6) for k in ("max_abs_diff", "mean_abs_diff", "mask_dice_mean", "mask_dice_min")}

    x = frames[:1].copy()
    for _ in range(args.warmup):
        for fn in variants.values():
            fn(x)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(x)
            samples[name].append((time.perf_counter() - t0) * 1000)
    med = {name: statistics.median(v) for name, v in samples.items()}
    eager_ms = med["pytorch eager, 2 models + python fusion"]
    fp32_ms = med["onnxruntime fused fp32"]
    rows = []
    for name in variants:
        rows.append({
            "variant": name,
            "median_ms": round(med[name], 1),
            "p10_ms": round(float(np.percentile(samples[name], 10)), 1),
            "p90_ms": round(float(np.percentile(samples[name], 90)), 1),
            "speedup_vs_eager": round(eager_ms / med[name], 2),
            "speedup_vs_fused_fp32": round(fp32_ms / med[name], 2),
            **agreement[name],
        })
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "preset": fused_model.generative.cfg.name, "img_size": size, "batch": 1, "threads": args.threads,
        "runs": args.runs, "warmup": args.warmup, "weights": weights, "agreement_frames": frames_source,
        "setup": timings_log, "torch_threads": torch.get_num_threads(), "ort_spinning": False, "artifacts_mb": artifacts, "rows": rows,
    }
    print(json.dumps(result, indent=2))
    print()
    print("| variant | median ms | p10-p90 ms | x vs eager | x vs fused fp32 | mask Dice vs eager | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_ms']} | {r['p10_ms']}-{r['p90_ms']} | {r['speedup_vs_eager']} | "
              f"{r['speedup_vs_fused_fp32']} | {r['mask_dice_mean']:.4f} | {r['max_abs_diff']:.2g} |")
    if args.out:
        from pocus_edge.io import write_json_atomic

        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
