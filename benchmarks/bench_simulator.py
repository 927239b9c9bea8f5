"""Simulator throughput per preset, and the probe domain gap on the ``bench`` preset.

    .venv/bin/python benchmarks/bench_simulator.py [--presets tiny demo bench] [--repeats 3]
        [--gap-frames 400] [--json out.json]

Throughput: each preset is simulated ``--repeats`` times into a temporary folder (both sites,
PNG writing and split assignment included); the median wall time and frames/s are reported,
with CPU time (process time) beside it because the machine may be shared.

Domain gap: on the ``bench`` preset's labeled frames (up to ``--gap-frames`` per site, evenly
spaced), the mean bone edge sharpness (1/mm, inverse edge width) and bone contrast-to-noise
ratio per probe profile (:func:`pocus_edge.data.phantom_physics.bone_edge_metrics`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pocus_edge.data.phantom import PRESETS, frames_per_site, simulate
from pocus_edge.data.phantom_physics import bone_edge_metrics
from pocus_edge.data.phantom_profiles import load_profile


def time_preset(name: str, repeats: int, keep: Path | None = None) -> dict:
    walls, cpus = [], []
    frames = sum(frames_per_site(name).values())
    for i in range(repeats):
        out = Path(tempfile.mkdtemp(prefix=f"bench_sim_{name}_"))
        t0, c0 = time.perf_counter(), time.process_time()
        simulate(out, preset=name, seed=i, progress=False)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if keep is not None and i == repeats - 1:
            if keep.exists():
                shutil.rmtree(keep)
            shutil.move(str(out), keep)
        else:
            shutil.rmtree(out, ignore_errors=True)
    wall = statistics.median(walls)
    return {
        "preset": name,
        "frames": frames,
        "repeats": repeats,
        "wall_s_median": round(wall, 2),
        "wall_s_all": [round(w, 2) for w in walls],
        "cpu_s_median": round(statistics.median(cpus), 2),
        "frames_per_s": round(frames / wall, 1),
        "frames_per_cpu_s": round(frames / statistics.median(cpus), 1),
    }


def domain_gap(root: Path, max_frames: int) -> dict:
    from pocus_edge.data.layout import load_site

    out = {}
    for domain, profile_name in (("source", "lumify"), ("target", "telemed")):
        site = load_site(root / domain)
        pitch = load_profile(profile_name).geometry.pixel_mm / PRESETS["bench"].scale
        labeled = [r for r in site.records if r.labeled]
        idx = np.linspace(0, len(labeled) - 1, num=min(max_frames, len(labeled))).round().astype(int)
        sharp, cnr = [], []
        for i in idx:
            rec = labeled[i]
            m = bone_edge_metrics(site.read_image(rec), site.read_mask(rec), pitch)
            if np.isfinite(m["sharpness"]):
                sharp.append(m["sharpness"])
                cnr.append(m["cnr"])
        out[profile_name] = {
            "frames": len(sharp),
            "edge_sharpness_per_mm_mean": round(float(np.mean(sharp)), 3),
            "edge_sharpness_per_mm_sd": round(float(np.std(sharp)), 3),
            "bone_cnr_mean": round(float(np.mean(cnr)), 3),
            "bone_cnr_sd": round(float(np.std(cnr)), 3),
        }
    return out


def _simulate_domain(args) -> str:
    root, domain, preset, seed = args
    from pocus_edge.data.phantom import simulate_site

    simulate_site(root, domain=domain, preset=preset, seed=seed)
    return str(root)


def train_check(out: Path, *, model_preset: str, sim_preset, epochs: int, pretrain_epochs: int, device: str) -> dict:
    """Does the simulated shift behave like the paper's? Train the lower bound (source only),
    the upper bound (target labels) and a MIM-pretrained (target images) source fine-tune,
    and score them on the source and target test sets."""
    from concurrent.futures import ProcessPoolExecutor

    from pocus_edge.train import evaluate, finetune, pretrain_mim

    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        src, tgt = pool.map(_simulate_domain, [(out / d, d, sim_preset, 0) for d in ("source", "target")])
    sim_s = time.perf_counter() - t0
    common = dict(
        preset=model_preset, device=device, progress=False, tensorboard=False, preload=True,
        overrides={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    )
    times = {}
    t = time.perf_counter()
    lower = finetune(src, out / "lower", epochs=epochs, batch_size=32, **common)
    times["lower"] = time.perf_counter() - t
    t = time.perf_counter()
    upper = finetune(tgt, out / "upper", epochs=epochs * 3, batch_size=32, **common)
    times["upper"] = time.perf_counter() - t
    t = time.perf_counter()
    mim = pretrain_mim(tgt, out / "mim", preset=model_preset, epochs=pretrain_epochs, batch_size=64, device=device,
                       progress=False, tensorboard=False, preload=True)
    mim_ft = finetune(src, out / "mim_ft", init=mim.encoder_path, epochs=epochs, batch_size=32, **common)
    times["mim+ft"] = time.perf_counter() - t
    models = {"lower (source only)": lower.model_path, "MIM(target)+ft(source)": mim_ft.model_path, "upper (target labels)": upper.model_path}
    result = {"simulate_s": round(sim_s, 1), "train_s": {k: round(v, 1) for k, v in times.items()}, "dice": {}}
    for site, split_name in ((src, "source test"), (tgt, "target test")):
        names = list(models) if split_name == "target test" else list(models)[:2]
        ev = evaluate(site, [models[n] for n in names], names=names, split="test", device=device, overlays=0)
        for n in names:
            s_ = ev.summaries[n]
            result["dice"][f"{n} @ {split_name}"] = {"n": s_.n, "dice": round(s_.dice_mean, 4), "sd": round(s_.dice_std, 4)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "demo", "bench"], choices=sorted(PRESETS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gap-frames", type=int, default=400)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--train-check", type=Path, default=None,
                    help="folder: instead of timing, simulate a mid-size set and train lower/upper bounds and a MIM variant")
    ap.add_argument("--train-sim", default="gap", help="simulator preset for --train-check (gap = 40 patients x 12 frames)")
    ap.add_argument("--train-model", default="small")
    ap.add_argument("--train-epochs", type=int, default=20)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.train_check is not None:
        from dataclasses import replace as dc_replace

        sim = PRESETS["bench"] if args.train_sim == "bench" else (
            dc_replace(PRESETS["bench"], name="gap", patients=40, frames_per_video=12)
            if args.train_sim == "gap" else PRESETS[args.train_sim]
        )
        res = train_check(args.train_check, model_preset=args.train_model, sim_preset=sim, epochs=args.train_epochs,
                          pretrain_epochs=args.pretrain_epochs, device=args.device)
        print(json.dumps(res, indent=1), flush=True)
        if args.json is not None:
            from pocus_edge.io import write_json_atomic

            write_json_atomic(args.json, res)
        return
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "throughput": [],
    }
    keep = Path(tempfile.mkdtemp(prefix="bench_sim_keep_")) / "bench"
    for name in args.presets:
        # bench is slow: one timed run, kept for the domain-gap figure.
        repeats = 1 if name == "bench" else args.repeats
        row = time_preset(name, repeats, keep=keep if name == "bench" else None)
        report["throughput"].append(row)
        print(json.dumps(row), flush=True)
    if "bench" in args.presets:
        report["domain_gap_bench"] = domain_gap(keep, args.gap_frames)
        print(json.dumps(report["domain_gap_bench"]), flush=True)
        shutil.rmtree(keep.parent, ignore_errors=True)
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.json is not None:
        from pocus_edge.io import write_json_atomic

        write_json_atomic(args.json, report)


if __name__ == "__main__":
    main()
