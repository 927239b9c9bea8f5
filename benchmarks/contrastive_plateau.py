"""Why contrastive pretraining's loss can sit at chance (ln(2B - 1)) for hundreds of steps.

Three measurements on the unlabeled frames of one site, with the project's own dataset
(two augmented views per frame), model (ContrastiveModel) and loss (mt_nxent, gap 0 = SimCLR):

1. view gap: mean |view1 - view2| of one frame's two augmented views against mean |a - b| of
   two different frames: when they are alike, crop/jitter invariance has to be learned before
   frames separate;
2. one fixed batch: the loss must fall towards its floor log(1 + (2B - 2) e^(-1/tau)) (positive
   at cosine 1, negatives at 0) if the loss, masking and gradients are right;
3. fresh random batches, constant Adam learning rate, for each --lrs value: the loss every
   steps/10 and the mean cosine between different frames' projections at the start and end
   (1.0 = collapse);
4. the training engine itself (pretrain_contrastive, gap 0, lr 1e-4) with gradient clipping at
   1.0 or none, and a cosine or constant schedule (--engine-steps, 0 to skip): what made the
   contrastive stage's default "no clipping".

    python benchmarks/contrastive_plateau.py --data bench_data/target --preset small --lrs 1e-4,1e-3 --steps 400 \
        --engine-preset tiny --engine-steps 500

Results and their reading: benchmarks/RESULTS.md, section 3.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="one site folder (its unlabeled train frames are used)")
    ap.add_argument("--preset", default="small", choices=["small", "tiny", "paper"])
    ap.add_argument("--lrs", default="1e-4,1e-3", help="comma-separated constant Adam learning rates")
    ap.add_argument("--steps", type=int, default=400, help="random-batch steps per learning rate")
    ap.add_argument("--fixed-steps", type=int, default=150, help="steps on the one fixed batch (0: skip)")
    ap.add_argument("--batch", type=int, default=32, help="pairs per batch")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-preset", default="tiny", choices=["small", "tiny", "paper"])
    ap.add_argument("--engine-steps", type=int, default=0, help="steps per engine variant (0: skip part 4)")
    ap.add_argument("--workdir", type=Path, default=None, help="engine runs go here (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    from pocus_edge.config import ContrastiveConfig, model_preset
    from pocus_edge.data.datasets import ContrastivePairDataset
    from pocus_edge.data.layout import load_site
    from pocus_edge.losses import mt_nxent
    from pocus_edge.models.heads import ContrastiveModel
    from pocus_edge.train.mim import pretrain_records

    torch.set_num_threads(args.threads)
    cfg = model_preset(args.preset)
    site = load_site(args.data)
    dataset = ContrastivePairDataset(site, pretrain_records(site, "train"), cfg.img_size, ContrastiveConfig(), seed=0)
    B = args.batch
    g = torch.Generator().manual_seed(0)

    def draw():
        items = [dataset[i] for i in torch.randint(len(dataset), (B,), generator=g).tolist()]
        return (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
                torch.tensor([it[2] for it in items]), torch.tensor([it[3] for it in items]))

    def step_loss(model, batch):
        v1, v2, videos, frames = batch
        z1, z2 = model(torch.cat([v1, v2])).chunk(2)
        return mt_nxent(z1, z2, videos, frames, min_frame_gap=0, temperature=args.temperature)

    off_diagonal = ~torch.eye(B, dtype=torch.bool)

    def mean_cosine(model, views):
        with torch.no_grad():
            z = model(views)
        return float((z @ z.T)[off_diagonal].mean())

    batches = [draw() for _ in range(args.steps)]
    v1, v2 = batches[0][0], batches[0][1]
    print(f"{args.preset} preset, {len(dataset)} frames of {args.data}, batch {B} pairs, tau {args.temperature}")
    print(f"view gap: |view1 - view2| {float((v1 - v2).abs().mean()):.4f} vs |frame a - frame b| "
          f"{float((v1 - v1.roll(1, 0)).abs().mean()):.4f} (mean over pixels)")
    chance = math.log(2 * B - 1)
    floor = math.log(1 + (2 * B - 2) * math.exp(-1 / args.temperature))
    print(f"chance ln({2 * B - 1}) = {chance:.3f}; floor (positive cos 1, negatives cos 0) = {floor:.3f}")

    if args.fixed_steps:
        torch.manual_seed(0)
        model = ContrastiveModel(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(args.fixed_steps):
            loss = step_loss(model, batches[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"fixed batch, Adam 1e-3: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.fixed_steps} steps")

    every = max(1, args.steps // 10)
    for lr in (float(x) for x in args.lrs.split(",")):
        torch.manual_seed(0)
        model = ContrastiveModel(cfg)
        start = mean_cosine(model, v1)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.05)
        t0 = time.perf_counter()
        losses = []
        for batch in batches:
            loss = step_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trace = " ".join(f"{k}:{losses[k]:.3f}" for k in range(0, args.steps, every))
        print(f"lr {lr:g}: loss at step {trace} last:{losses[-1]:.3f}; mean cosine between frames "
              f"{start:.3f} -> {mean_cosine(model, v1):.3f}; {time.perf_counter() - t0:.0f} s", flush=True)

    if args.engine_steps:
        import csv
        import tempfile

        from pocus_edge.train import pretrain_contrastive

        work = args.workdir or Path(tempfile.mkdtemp(prefix="plateau_"))
        # Warm-up off in every variant: the measurements predate the stage's 5 % warm-up.
        variants = {"clip 1.0, cosine": {"train.grad_clip": 1.0, "schedule": "cosine"},
                    "no clip, cosine": {"train.grad_clip": None, "schedule": "cosine"},
                    "clip 1.0, constant": {"train.grad_clip": 1.0, "schedule": "constant"},
                    "no clip, constant": {"train.grad_clip": None, "schedule": "constant"}}
        for name, overrides in variants.items():
            out = work / name.replace(" ", "").replace(",", "_").replace(".", "")
            t0 = time.perf_counter()
            pretrain_contrastive(args.data, out, preset=args.engine_preset, min_frame_gap=0, max_steps=args.engine_steps,
                                 batch_size=B, epochs=10_000, lr=1e-4, device="cpu", num_workers=0, progress=False,
                                 tensorboard=False, overrides={**overrides, "warmup_fraction": 0,
                                                                 "log_every": max(1, args.engine_steps // 10)})
            rows = list(csv.DictReader(open(out / "log.csv")))
            trace = " ".join(f"{r['step']}:{float(r['loss']):.3f}" for r in rows if r["phase"] == "train")
            print(f"engine, {args.engine_preset} preset, {name}: {trace}; {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
