#!/usr/bin/env python
"""The paper's Table 3 on the simulator: the whole protocol on one simulated two-probe data set.

    python benchmarks/table3.py --data bench_data --out bench_runs --preset small --device cpu --budget quick

Stages (each reads ONE site; only weights move between them):
  lower bound    finetune(source)                          random init
  SimMIM branch  pretrain_mim(target) -> finetune(source)
  SimCLR         pretrain_contrastive(target, gap 0) -> finetune(source)
  MT-NXent       pretrain_contrastive(target, gap g) -> finetune(source), for each g in the budget's
                 gaps; the gap is chosen on the target's labeled ub_split=val frames (never the test)
  fused          entropy / margin / average of SimMIM + the chosen MT-NXent branch
  upper bound    finetune(target, ub_split)                random init, target labels
Every model is scored on the target's labeled test frames (and the source test split), with
Wilcoxon signed-rank p-values on per-image Dice against the lower bound.

Budgets: ``quick`` (CPU, 12 min of training + evaluation, small preset), ``gpu`` (one
H100/H200: 220 s of training, bf16, large batches, DataLoader workers, in-memory frames; ~5.5 min
in all with simulation and evaluation), ``full`` (the preset's own epochs: METHOD.md for
``paper``), ``smoke`` (3 steps per stage). Timed budgets give each stage a share of
``--train-seconds`` and fit its cosine schedule to the measured pace, so the run keeps to time on
any machine (slower machine = fewer steps; the JSON records the steps each stage made). Data: ``--data`` holds ``source/`` and ``target/``; missing, it is
simulated (``--sim-preset bench``) with one process per CPU core.

Re-running with the same --out resumes: finished stages are skipped, a killed one resumes.
On a GPU machine whose output folder $OUT should receive only the table and its JSON, keep the runs outside $OUT:
    python benchmarks/table3.py --data /tmp/bench_data --out /tmp/bench_runs --device cuda \
        --budget gpu --table $OUT/table3.md --json $OUT/table3.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# name: (stage, steps, global batch); "gaps": MT-NXent frame gaps tried; "seconds": training time
# budget over all stages (None: no limit); "workers": DataLoader workers.
BUDGETS = {
    # A few steps per stage: checks the script end to end (e.g. with --preset tiny), numbers meaningless.
    "smoke": {
        "mim": (3, 8), "contrastive": (3, 8), "finetune": (3, 8),
        "gaps": [5, 15], "seconds": None, "workers": 2, "ft_lr": None, "seeds": 2, "val_frames": None,
    },
    # Planned steps are upper bounds: with "seconds" set, every stage gets a share of the time
    # (planned steps x batch x cost) and the engine fits its cosine schedule to the pace it measures.
    "quick": {
        "mim": (600, 32), "contrastive": (800, 32), "finetune": (400, 16),
        "gaps": [15], "seconds": 720.0, "workers": 0, "ft_lr": None, "seeds": 1, "val_frames": 64,
    },
    "gpu": {
        "mim": (3000, 128), "contrastive": (2000, 128), "finetune": (2000, 64),
        "gaps": [8, 15], "seconds": 220.0, "workers": 10, "ft_lr": None, "seeds": 2, "val_frames": None,
    },
    "full": {
        "mim": (None, None), "contrastive": (None, None), "finetune": (None, None),
        "gaps": [10, 15, 20], "seconds": None, "workers": 8, "ft_lr": None, "seeds": 1, "val_frames": None,
    },
}
# Relative cost of one sample-step per stage (contrastive: two views; finetune: + validation).
COST = {"mim": 1.0, "contrastive": 1.4, "finetune": 1.1}
PAPER_TARGET_DSC = {
    "lower bound": 0.6605, "SimMIM branch": 0.7116, "SimCLR (gap 0)": 0.6992, "MT-NXent": 0.7181,
    "fused (entropy)": 0.7221, "upper bound": 0.7798,
}


def say(text: str) -> None:
    print(f"[table3 {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def simulate_parallel(out: Path, preset: str, seed: int, workers: int) -> None:
    """The simulator's own parallel mode (byte-identical to a single process)."""
    from pocus_edge.data.phantom import simulate

    t0 = time.perf_counter()
    say(f"simulating {preset} data into {out} with {workers} processes")
    simulate(out, preset=preset, seed=seed, progress=False, workers=workers, overwrite=True)
    say(f"simulated in {time.perf_counter() - t0:.0f}s")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("bench_data"), help="folder with source/ and target/ (simulated if missing)")
    ap.add_argument("--out", type=Path, default=Path("bench_runs"), help="runs, evaluation reports")
    ap.add_argument("--preset", default="small", choices=["small", "paper", "tiny"])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    ap.add_argument("--train-seconds", type=float, default=None, help="override the budget's total training time")
    ap.add_argument("--steps", default=None,
                    help="planned steps per stage kind, e.g. contrastive=800,mim=600 (overrides the budget; "
                         "contrastive pretraining on the small preset sits at chance for its first ~200-300 steps)")
    ap.add_argument("--gaps", default=None, help="comma-separated MT-NXent frame gaps to try (overrides the budget)")
    ap.add_argument("--sim-preset", default="bench", help="simulator preset when --data is missing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=None,
                    help="fine-tuning seeds per model (per-image Dice averaged over them; default per budget)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default per budget)")
    ap.add_argument("--table", type=Path, default=None, help="Markdown table path (default OUT/table3.md)")
    ap.add_argument("--no-source-test", action="store_true", help="score the target test only (saves time on CPU)")
    ap.add_argument("--json", type=Path, default=None, help="JSON results path (default OUT/table3.json)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    import torch

    from pocus_edge.card import code_version
    from pocus_edge.io import write_json_atomic, write_text_atomic
    from pocus_edge.metrics import summarize, wilcoxon_p
    from pocus_edge.train import evaluate, finetune, pretrain_contrastive, pretrain_mim
    from pocus_edge.train.distributed import resolve_device

    device = resolve_device(args.device)
    budget = dict(BUDGETS[args.budget])
    if args.train_seconds is not None:
        budget["seconds"] = args.train_seconds
    for item in filter(None, (args.steps or "").split(",")):
        kind, _, value = item.partition("=")
        if kind not in ("mim", "contrastive", "finetune") or not value.isdigit() or int(value) < 1:
            ap.error(f"--steps: {item!r} is not KIND=N with KIND mim, contrastive or finetune and N >= 1")
        budget[kind] = (int(value), budget[kind][1])
    gaps = [int(g) for g in args.gaps.split(",")] if args.gaps else list(budget["gaps"])
    n_seeds = args.seeds if args.seeds is not None else budget["seeds"]
    # Source-only -> target transfer varies a lot between runs (benchmarks/notes/simulator.md), so
    # every fine-tuned model is trained with n_seeds seeds and scored by its seed-averaged Dice.
    ft_seeds = [args.seed + k for k in range(n_seeds)]
    workers = args.workers if args.workers is not None else (budget["workers"] if device.type == "cuda" else 0)
    cpu_count = os.cpu_count() or 1
    if not (args.data / "source" / "manifest.csv").exists() or not (args.data / "target" / "manifest.csv").exists():
        simulate_parallel(args.data, args.sim_preset, args.seed, max(1, cpu_count))
    source, target = args.data / "source", args.data / "target"
    runs = args.out / "runs"
    say(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
        f"preset {args.preset}, budget {args.budget}, gaps {gaps}, workers {workers}, torch threads {torch.get_num_threads()}")

    # Plan: (name, kind, fn, site, kwargs)
    plan: list[tuple[str, str, dict]] = [("mim", "mim", {})]
    plan.append(("simclr", "contrastive", {"min_frame_gap": 0}))
    plan += [(f"mtnxent_gap{g}", "contrastive", {"min_frame_gap": g}) for g in gaps]
    finetunes = [("lower", {"site": source}), ("ft_mim", {"site": source, "init": "mim"}),
                 ("ft_simclr", {"site": source, "init": "simclr"})]
    finetunes += [(f"ft_mtnxent_gap{g}", {"site": source, "init": f"mtnxent_gap{g}"}) for g in gaps]
    finetunes.append(("upper", {"site": target}))
    for seed in ft_seeds:
        plan += [(f"{name}_seed{seed}", "finetune", {**extra, "seed": seed}) for name, extra in finetunes]

    def work(kind: str) -> float:
        steps, batch = budget[kind]
        return (steps or 1) * (batch or 1) * COST[kind]

    total_work = sum(work(kind) for _, kind, _ in plan)
    train_deadline = None if budget["seconds"] is None else time.perf_counter() + budget["seconds"]
    remaining_work = total_work
    stage_info: dict[str, dict] = {}
    common = dict(preset=args.preset, device=str(device), seed=args.seed, preload=True, num_workers=workers,
                  tensorboard=True, progress=True)

    for name, kind, extra in plan:
        run_dir = runs / name
        done_file = run_dir / "done.json"
        steps, batch = budget[kind]
        share = work(kind) / remaining_work
        remaining_work -= work(kind)
        if done_file.exists():
            stage_info[name] = json.loads(done_file.read_text())
            say(f"{name}: done earlier, skipped")
            continue
        limit = None
        if train_deadline is not None:
            limit = max(5.0, (train_deadline - time.perf_counter()) * share)
        resume = (run_dir / "checkpoint.safetensors").exists()
        kw = dict(common, max_steps=steps, batch_size=batch, resume=resume, time_limit_s=limit)
        if steps is not None:
            kw["overrides"] = {"log_every": max(1, steps // 8)}
        if kind == "finetune":
            # The validation set is scored at each epoch end; with short budgets an "epoch" is capped
            # by max_steps, so the best checkpoint is still chosen among several evaluations.
            if steps is not None:
                kw["epochs"] = 10_000  # the step budget, not epochs, bounds these runs
        elif steps is not None:
            kw["epochs"] = 10_000
        say(f"{name}: {kind}, {steps} steps x batch {batch}" + (f", time limit {limit:.0f}s" if limit else ""))
        t0 = time.perf_counter()
        if kind == "mim":
            res = pretrain_mim(target, run_dir, **kw)
            artifact = res.encoder_path
        elif kind == "contrastive":
            res = pretrain_contrastive(target, run_dir, min_frame_gap=extra["min_frame_gap"], **kw)
            artifact = res.encoder_path
        else:
            init = runs / extra["init"] / "encoder.safetensors" if "init" in extra else None
            if budget["ft_lr"]:
                kw["lr"] = budget["ft_lr"]
            kw["seed"] = extra["seed"]
            kw["max_val_frames"] = budget["val_frames"]
            res = finetune(extra["site"], run_dir, init=init, **kw)
            artifact = res.model_path
        info = {"stage": kind, "steps": res.global_step, "planned_steps": steps, "batch": res.batch_size,
                "seconds": round(time.perf_counter() - t0, 1), "stopped_early": res.stopped_early,
                "last_loss": res.last_loss, "best_val": res.best_val, "artifact": str(artifact)}
        stage_info[name] = info
        write_json_atomic(done_file, info)
        say(f"{name}: {info['steps']} steps in {info['seconds']}s, last loss {res.last_loss:.4f}"
            + (f", best val DiceBCE {res.best_val:.4f}" if res.best_val is not None else ""))

    # --- model selection: the MT-NXent gap with the best Dice on the target's ub_split=val frames
    t_eval = time.perf_counter()
    def model(key: str, seed: int) -> Path:
        return runs / f"{key}_seed{seed}" / "model.safetensors"

    tuning = {}
    if len(gaps) > 1:
        per_seed = []
        for seed in ft_seeds:
            tune = evaluate(target, [model(f"ft_mtnxent_gap{g}", seed) for g in gaps], args.out / f"eval_tuning_seed{seed}",
                            split="val", split_column="ub_split", names=[f"gap{g}" for g in gaps], device=str(device),
                            overlays=0)
            per_seed.append({g: tune.summaries[f"gap{g}"].dice_mean for g in gaps})
        tuning = {g: sum(d[g] for d in per_seed) / len(per_seed) for g in gaps}
        best_gap = max(gaps, key=lambda g: tuning[g])
    else:
        best_gap = gaps[0]
    say(f"MT-NXent gap chosen on target ub_split=val: {best_gap} ({tuning or 'single gap'})")

    rows = [("lower bound", "lower"), ("SimMIM branch", "ft_mim"), ("SimCLR (gap 0)", "ft_simclr")]
    rows += [(f"MT-NXent (gap {g}{', chosen' if g == best_gap else ''})", f"ft_mtnxent_gap{g}") for g in gaps]
    rows.append(("upper bound", "upper"))
    methods = ("entropy", "margin", "average")
    results, per_seed_means = {}, {}
    import numpy as np

    eval_sites = [("target", target)] + ([] if args.no_source_test else [("source", source)])
    for site_name, site in eval_sites:
        dice_runs: dict[str, list] = {}
        iou_runs: dict[str, list] = {}
        for seed in ft_seeds:
            singles = evaluate(site, [model(key, seed) for _, key in rows], args.out / f"eval_{site_name}_seed{seed}",
                               names=[key for _, key in rows], device=str(device), overlays=2 if seed == ft_seeds[0] else 0)
            fused = evaluate(site, [model("ft_mim", seed), model(f"ft_mtnxent_gap{best_gap}", seed)],
                             args.out / f"eval_{site_name}_fused_seed{seed}", names=["g", "c"], fusion=list(methods),
                             device=str(device), overlays=2 if seed == ft_seeds[0] else 0)
            for _, key in rows:
                dice_runs.setdefault(key, []).append(singles.dice[key])
                iou_runs.setdefault(key, []).append(singles.iou[key])
            for m in methods:
                dice_runs.setdefault(f"fused-{m}", []).append(fused.dice[f"fused-{m}"])
                iou_runs.setdefault(f"fused-{m}", []).append(fused.iou[f"fused-{m}"])
        # Per-image Dice averaged over the fine-tuning seeds, then the usual mean / Wilcoxon.
        dice = {k: np.mean(v, axis=0) for k, v in dice_runs.items()}
        iou = {k: np.mean(v, axis=0) for k, v in iou_runs.items()}
        per_seed_means[site_name] = {k: [float(np.mean(d)) for d in v] for k, v in dice_runs.items()}
        results[site_name] = {
            key: {**vars(summarize(dice[key], iou[key])),
                  "dice_mean_per_seed": per_seed_means[site_name][key],
                  "p_vs_lower": (wilcoxon_p(dice[key], dice["lower"]) if key != "lower" else None)}
            for key in dice
        }
    eval_seconds = time.perf_counter() - t_eval

    order = rows[:-1] + [(f"fused ({m})", f"fused-{m}") for m in ("entropy", "margin", "average")] + [rows[-1]]
    tgt, src = results["target"], results.get("source")
    chosen = f"ft_mtnxent_gap{best_gap}"
    singles_ssl = [tgt["ft_mim"]["dice_mean"], tgt["ft_simclr"]["dice_mean"], tgt[chosen]["dice_mean"]]
    fused_best = max(tgt[f"fused-{m}"]["dice_mean"] for m in ("entropy", "margin", "average"))
    checks = {
        "lower < every SSL branch": all(d > tgt["lower"]["dice_mean"] for d in singles_ssl),
        "SSL branches < fused (best fusion)": fused_best > max(singles_ssl),
        "fused (entropy) < upper": tgt["fused-entropy"]["dice_mean"] < tgt["upper"]["dice_mean"],
        "fused (entropy) >= lower + 0.03": tgt["fused-entropy"]["dice_mean"] >= tgt["lower"]["dice_mean"] + 0.03,
    }
    n_t, n_s = tgt["lower"]["n"], (src["lower"]["n"] if src else 0)
    lines = [
        f"Target test: {n_t} labeled frames; source test: {n_s} frames. Preset `{args.preset}`, budget `{args.budget}`, "
        f"device {device}. Per-image Dice averaged over {n_seeds} fine-tuning seed(s) {ft_seeds}; Wilcoxon "
        "signed-rank p on those per-image target Dice vs the lower bound; +- = sd of the per-seed means.",
        "",
        "| method | target DSC | (+- over seeds) | target IoU | p vs lower | source DSC | paper target DSC |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, key in order:
        t = tgt[key]
        source_dsc = f"{src[key]['dice_mean']:.4f}" if src else "-"
        p = "" if t["p_vs_lower"] is None else f"{t['p_vs_lower']:.2g}"
        paper_key = "MT-NXent" if key == chosen else ("fused (entropy)" if key == "fused-entropy" else label)
        paper = PAPER_TARGET_DSC.get(paper_key)
        sd = float(np.std(t["dice_mean_per_seed"])) if len(t["dice_mean_per_seed"]) > 1 else float("nan")
        lines.append(f"| {label} | {t['dice_mean']:.4f} | {'' if sd != sd else f'{sd:.4f}'} | {t['iou_mean']:.4f} | {p} | {source_dsc} | "
                     f"{'' if paper is None else f'{paper:.4f}'} |")
    lines += ["", "Ordering checks (target DSC): " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())]
    table = "\n".join(lines) + "\n"
    total_s = time.perf_counter() - t_start
    payload = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "cpu_count": cpu_count, "platform": platform.platform(), "torch": torch.__version__},
        "code_version": code_version(),
        "preset": args.preset, "budget": args.budget, "budget_spec": {k: v for k, v in budget.items()},
        "gaps": gaps, "gap_tuning_ub_val_dice": tuning, "chosen_gap": best_gap, "finetune_seeds": ft_seeds,
        "stages": stage_info, "results": results, "checks": checks,
        "seconds": {"total": round(total_s, 1), "evaluation": round(eval_seconds, 1),
                    "training": round(sum(i.get("seconds", 0) for i in stage_info.values()), 1)},
    }
    table_path = args.table or args.out / "table3.md"
    json_path = args.json or args.out / "table3.json"
    write_text_atomic(table_path, table)
    write_json_atomic(json_path, payload)
    print(table, flush=True)
    say(f"total {total_s:.0f}s (training {payload['seconds']['training']}s, evaluation {eval_seconds:.0f}s); "
        f"table -> {table_path}, json -> {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
