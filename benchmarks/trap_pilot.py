"""Pilot: does a random-init `small` TransUNet still fall into the all-background trap?

For each seed, fine-tunes the lower bound (source only, random init, the `default` recipe) for
one pass over the source's training frames (``--steps``, the study's first validation) with and
without the ReLU before the head (``decoder_final_relu`` true = the released decoder, false = the
CPU presets), and records the source-validation Dice at that first validation and the
pre-declared "did not train" flag (Dice < 0.1). The schedule is fitted to the pilot's steps (a
shorter warm-up than the study's), which reaches the early steps where the trap forms at least as
hard.

    python benchmarks/trap_pilot.py --source runs/study_data/source --seeds 0-9 --json trap_pilot.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _seeds(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="the labeled source site")
    ap.add_argument("--seeds", default="0-9", help="a range A-B")
    ap.add_argument("--steps", type=int, default=170, help="steps up to the first validation")
    ap.add_argument("--val-frames", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from pocus_edge.train import finetune

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in _seeds(args.seeds):
            for relu in (True, False):
                t0 = time.perf_counter()
                res = finetune(args.source, Path(tmp) / f"s{seed}_{int(relu)}", preset="small", seed=seed,
                               max_steps=args.steps, epochs=1, batch_size=16, device="cpu", progress=False,
                               tensorboard=False, preload=True, max_val_frames=args.val_frames,
                               overrides={"decoder_final_relu": relu})
                rows.append({"seed": seed, "final_relu": relu, "first_val_dice": res.first_val_dice,
                             "did_not_train": res.did_not_train, "seconds": round(time.perf_counter() - t0, 1)})
                print(json.dumps(rows[-1]), flush=True)
    for relu in (True, False):
        mine = [r for r in rows if r["final_relu"] is relu]
        print(f"final ReLU {relu}: did not train in {sum(r['did_not_train'] for r in mine)} of {len(mine)} seeds; "
              f"first source-val Dice {min(r['first_val_dice'] for r in mine):.3f}-{max(r['first_val_dice'] for r in mine):.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
