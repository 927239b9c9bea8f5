"""Student size and speed at the deployment input: ONNX fp32 and int8, batch 1, onnxruntime CPU.

For each student (``pocus_edge.models.students``) at ``--img-size`` (default 224, the paper
input): build it with random weights (speed and size do not depend on them; the output head is
rescaled so masks are not trivially empty), fuse reparameterizable blocks, export ONNX fp32
(batch 1, opset 18, the toolkit's exporter), quantize it to int8 (static QDQ, per-channel,
calibrated on ``--calib-frames`` frames: a site's train split with ``--site``, else seeded
synthetic frames) and report:

* parameters (deployed network) and GFLOPs (torch.utils.flop_counter, 2 x multiply-adds);
* artifact sizes in MB (10^6 bytes);
* median / p10 / p90 latency and FPS over ``--runs`` interleaved rounds (every model and
  precision once per round, in turn, so load from other jobs hits all alike) after ``--warmup``;
* int8 and fp32 agreement with PyTorch (mask Dice at 0.5, max |p diff|) on ``--frames`` frames;
* the goals: >= 60 FPS with the best format, GFLOPs <= 1/30 of the fused teacher, int8 <= 10 MB.

    OMP_NUM_THREADS=2 python benchmarks/bench_student.py --threads 2 --runs 200 --out benchmarks/notes/student_paper.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import ort_session, size_mb  # noqa: E402  (same session settings as the teacher's benchmark)

FPS_GOAL = 60.0
INT8_MB_GOAL = 10.0
GFLOPS_FRACTION_GOAL = 1.0 / 30.0


class ProbabilityGraph(torch.nn.Module):
    """A student as an exportable graph: frames (N, 3, S, S) in [0, 1] -> probability (N, 1, S, S)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.predict(x)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        size = self.student.img_size
        return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    def output_names(self) -> list[str]:
        return ["prob"]


def build_deployed(name: str, img_size: int, probe: np.ndarray):
    """Random-weight student, head rescaled on ``probe``, reparameterized for inference."""
    from pocus_edge.export.parity import spread_head_logits
    from pocus_edge.models.students import build_student

    torch.manual_seed(0)
    student = build_student(name, "paper", img_size=img_size).eval()
    spread_head_logits(student, probe)
    return student, student.reparameterize()


def export_both(name: str, deployed, work: Path, reader, gflops: float, op_types: tuple[str, ...]) -> tuple[Path, Path]:
    """fp32 ONNX through the toolkit's exporter and its int8 (QDQ) quantization."""
    from pocus_edge.export.onnx import DEFAULT_OPSET, export_onnx
    from pocus_edge.export.quantize import quantize_int8

    card = {"format": "pocus-edge-export/1", "kind": "student", "student": deployed.cfg.to_dict(),
            "precision": "fp32", "batch": 1, "opset": DEFAULT_OPSET, "gflops_per_frame": gflops,
            "weights": "random (benchmark)"}
    fp32 = export_onnx(ProbabilityGraph(deployed), work / f"{name}.fp32.onnx", batch=1, card=card)
    int8 = quantize_int8(fp32, work / f"{name}.int8.onnx", reader, op_types=op_types)
    return fp32, int8


def agreement(reference: np.ndarray, run, frames: np.ndarray) -> dict[str, float]:
    from pocus_edge.export import parity as parity_mod

    out = np.concatenate([run(frames[i : i + 1]) for i in range(len(frames))])
    stats = parity_mod.compare(reference, out)
    return {k: round(stats[k], 5) for k in ("max_abs_diff", "mean_abs_diff", "mask_dice_mean", "mask_dice_min")}


def time_interleaved(runners: dict[str, object], x: np.ndarray, runs: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for run in runners.values():
            run(x)
    samples: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(runs):
        for key, run in runners.items():
            t0 = time.perf_counter()
            run(x)
            samples[key].append((time.perf_counter() - t0) * 1000.0)
    return samples


def prepare_student(name: str, args, work: Path, frames: np.ndarray, reader) -> tuple[dict, dict]:
    """Build, count, export and check one student; returns (row without timings, runners)."""
    from pocus_edge.models.flops import count_flops

    student, deployed = build_deployed(name, args.img_size, frames[:2])
    shape = (1, 3, args.img_size, args.img_size)
    gflops = count_flops(deployed, shape) / 1e9
    t0 = time.perf_counter()
    fp32, int8 = export_both(name, deployed, work, reader, gflops, tuple(args.int8_op_types))
    export_s = time.perf_counter() - t0
    with torch.inference_mode():
        reference = np.concatenate([student.predict(torch.from_numpy(frames[i : i + 1])).numpy() for i in range(len(frames))])
        repar = np.concatenate([deployed.predict(torch.from_numpy(frames[i : i + 1])).numpy() for i in range(len(frames))])
    runners, checks = {}, {}
    for precision, path in (("fp32", fp32), ("int8", int8)):
        session = ort_session(path, args.threads)
        runners[(name, precision)] = (lambda s: (lambda x: s.run(None, {"frames": x})[0]))(session)
        checks[precision] = agreement(reference, runners[(name, precision)], frames)
    row = {
        "student": name,
        "encoder": student.cfg.encoder,
        "params": sum(p.numel() for p in deployed.parameters()),
        "params_training_form": sum(p.numel() for p in student.parameters()),
        "gflops": round(gflops, 4),
        "fp32_mb": size_mb(fp32),
        "int8_mb": size_mb(int8),
        "reparameterized_max_abs_diff": float(np.abs(reference - repar).max()),
        "agreement_with_pytorch": checks,
        "export_and_quantize_s": round(export_s, 1),
    }
    return row, runners


def add_timings(row: dict, samples: dict[tuple[str, str], list[float]], teacher_gflops: float) -> dict:
    for precision in ("fp32", "int8"):
        times = samples[(row["student"], precision)]
        median = statistics.median(times)
        row[precision] = {"median_ms": round(median, 2), "p10_ms": round(float(np.percentile(times, 10)), 2),
                          "p90_ms": round(float(np.percentile(times, 90)), 2), "fps": round(1000.0 / median, 1)}
    best = max(("fp32", "int8"), key=lambda p: row[p]["fps"])
    row["best"] = {"precision": best, "fps": row[best]["fps"]}
    row["goals"] = {
        f"fps_best>={FPS_GOAL:g}": row[best]["fps"] >= FPS_GOAL,
        "gflops<=teacher/30": row["gflops"] <= teacher_gflops * GFLOPS_FRACTION_GOAL,
        f"int8_mb<={INT8_MB_GOAL:g}": row["int8_mb"] <= INT8_MB_GOAL,
    }
    return row


def print_table(result: dict) -> None:
    cpu = result["machine"]["cpu"]
    print(f"\nstudents at {result['img_size']} px, batch 1, {result['threads']} onnxruntime threads "
          f"({cpu['model']}, {cpu['cores']} cores; 1/5/15-min load average at start {result['load_average_start']}, "
          f"at end {result['load_average_end']})")
    print("| student | encoder | params | GFLOPs | fp32 MB | int8 MB | fp32 ms (FPS) | int8 ms (FPS) | int8 mask Dice vs torch | goals |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        goals = "all met" if all(r["goals"].values()) else "missed: " + ", ".join(k for k, v in r["goals"].items() if not v)
        print(f"| {r['student']} | {r['encoder']} | {r['params'] / 1e6:.2f} M | {r['gflops']:.3f} | {r['fp32_mb']} | "
              f"{r['int8_mb']} | {r['fp32']['median_ms']} ({r['fp32']['fps']}) | {r['int8']['median_ms']} ({r['int8']['fps']}) | "
              f"{r['agreement_with_pytorch']['int8']['mask_dice_mean']:.4f} | {goals} |")
    print(f"fused teacher (paper): {result['teacher_gflops']:.2f} GFLOPs -> student goal <= {result['teacher_gflops'] / 30:.2f}")


def main(argv: list[str] | None = None) -> int:
    from pocus_edge.models.students import student_names

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", nargs="+", default=student_names(), choices=student_names())
    ap.add_argument("--img-size", type=int, default=224, help="input side in pixels (a multiple of 32)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--runs", type=int, default=100, help="interleaved timing rounds")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--frames", type=int, default=8, help="frames for the agreement check")
    ap.add_argument("--calib-frames", type=int, default=8, help="int8 calibration frames")
    ap.add_argument("--int8-op-types", nargs="+", default=["Conv", "MatMul", "Gemm"],
                    help="operator types quantized to int8 (Conv alone keeps attention products in fp32)")
    ap.add_argument("--site", default=None, help="site folder: calibrate on its train split, check agreement on its test split")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the ONNX files here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from pocus_edge.export import parity as parity_mod
    from pocus_edge.export.quantize import ArrayCalibrationReader, SiteCalibrationReader
    from pocus_edge.models.flops import model_report

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_student_"))
    work.mkdir(parents=True, exist_ok=True)
    frames, frames_source = parity_mod.parity_frames(args.site, args.img_size, n=args.frames)
    from pocus_edge.benchmark.machine import describe_machine, load_average

    load_start = [round(x, 2) for x in load_average()]
    rows, runners = [], {}
    for name in args.students:
        if args.site:
            reader = SiteCalibrationReader(args.site, args.img_size, n_frames=args.calib_frames)
        else:
            calib, _ = parity_mod.parity_frames(None, args.img_size, n=args.calib_frames, seed=7)
            reader = ArrayCalibrationReader(calib, source="synthetic frames")
        row, student_runners = prepare_student(name, args, work, frames, reader)
        rows.append(row)
        runners.update(student_runners)
        print(f"{name}: exported and quantized in {row['export_and_quantize_s']} s", file=sys.stderr)
    samples = time_interleaved(runners, np.ascontiguousarray(frames[:1]), args.runs, args.warmup)
    teacher_gflops = model_report("paper")["fused"]["gflops"]
    import onnxruntime

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": describe_machine(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "img_size": args.img_size, "batch": 1, "int8_op_types": args.int8_op_types, "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
        "weights": "random (output head rescaled: logits median 0, std 3)", "agreement_frames": frames_source,
        "load_average_start": load_start, "load_average_end": [round(x, 2) for x in load_average()],
        "teacher_gflops": teacher_gflops,
        "rows": [add_timings(row, samples, teacher_gflops) for row in rows],
    }
    if args.out:
        from pocus_edge.io import write_json_atomic

        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
