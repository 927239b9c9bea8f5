"""Pilot of the contrastive pretraining recipe: how fast does the MT-NXent loss leave chance?

Runs the training engine itself (``pretrain_contrastive``, uniform batches, frame gap 15) for
``--steps`` steps of ``--batch`` pairs on one site's unlabeled frames, once per variant:

* ``released``: the released code's recipe (Adam with L2 on every parameter, no BatchNorm in the
  projection head, crop/flip/jitter views), tau 0.5;
* ``default tau=T``: the project's default recipe (AdamW, decoupled decay off norms, biases and
  embeddings; BatchNorm projection head; probe-nuisance views) at each ``--temperatures`` value.

For each it prints the loss's distance below chance (ln #candidates, reported by the stage) as the
mean over the logged steps in (steps - 25, steps] and (75, 100], and the positive-retrieval
accuracy at the end (chance 1 / (2B - 1)). The temperature of the study is the one that leaves
chance fastest at step 100 (ties: the larger one, the paper's side), chosen here before the study.

    python benchmarks/contrastive_pilot.py --data demo_out/data/target --steps 150 --json pilot.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _window(history: list[dict], low: int, high: int, key: str) -> float:
    rows = [r for r in history if r.get("phase") == "train" and low < int(r["step"]) <= high and key in r]
    return sum(float(r[key]) for r in rows) / max(1, len(rows)) if rows else float("nan")


def run_variant(data: Path, out: Path, *, recipe: str, temperature: float, steps: int, batch: int, lr: float,
                preset: str, seed: int) -> dict:
    from pocus_edge.train import pretrain_contrastive

    t0 = time.perf_counter()
    res = pretrain_contrastive(data, out, preset=preset, max_steps=steps, batch_size=batch, lr=lr, seed=seed,
                               temperature=temperature, min_frame_gap=15, frames_per_video=0, device="cpu",
                               progress=False, tensorboard=False, preload=True,
                               overrides={"recipe": recipe, "log_every": 5})
    hist = res.history
    gap = {}
    for name, (low, high) in {"steps 76-100": (75, 100), f"steps {steps - 24}-{steps}": (steps - 25, steps)}.items():
        gap[name] = _window(hist, low, high, "chance") - _window(hist, low, high, "loss")
    return {"recipe": recipe, "temperature": temperature, "lr": lr, "steps": res.global_step,
            "nats_below_chance": gap, "retrieval_end": _window(hist, steps - 25, steps, "retrieval"),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="one site folder (its unlabeled train frames are used)")
    ap.add_argument("--preset", default="small", choices=["small", "tiny"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32, help="pairs per batch")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--temperatures", default="0.1,0.2,0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    variants = [("paper", 0.5)] + [("default", float(t)) for t in args.temperatures.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (recipe, tau) in enumerate(variants):
            row = run_variant(args.data, Path(tmp) / f"v{i}", recipe=recipe, temperature=tau, steps=args.steps,
                              batch=args.batch, lr=args.lr, preset=args.preset, seed=args.seed)
            rows.append(row)
            gaps = ", ".join(f"{k}: {v:.3f}" for k, v in row["nats_below_chance"].items())
            print(f"{recipe:8s} tau {tau:<4} nats below chance ({gaps}); retrieval {row['retrieval_end']:.3f}; "
                  f"{row['seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
