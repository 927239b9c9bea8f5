#!/usr/bin/env python
"""The paper's Table 3 rows on a simulated two-probe data set, through `pocus-edge study`.

    python benchmarks/table3.py --data study_data --out table3_runs --budget cpu --seeds 5

Rows: lower bound, SimMIM branch, SimCLR (gap 0), MT-NXent (gap 15, uniform batches), fused (entropy),
upper bound,
each fine-tuned with paired seeds and scored per target test patient; the report (study.md,
study.json, study.png in --out) gives each row's difference to the lower bound with its
hierarchical-bootstrap CI and verdict (docs/study.md). ``--data`` holds ``source/`` and
``target/``; missing, it is simulated with the ``study`` preset (12 fully labeled target test
patients). A rerun with the same ``--out`` resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# MT-NXent on uniform batches, as the released code draws them (and SimCLR the same way).
TABLE3_ARMS = ("lower", "mim", "simclr", "contrastive_uniform", "fused_uniform", "upper")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("study_data"), help="folder with source/ and target/ (simulated if missing)")
    ap.add_argument("--out", type=Path, default=Path("table3_runs"), help="study folder")
    ap.add_argument("--preset", default="small", choices=["small", "paper", "tiny"])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--budget", default="cpu", help="cpu | gpu | smoke (fixed step counts, docs/study.md)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--recipe", default="default", help="fine-tuning recipe: default | paper")
    ap.add_argument("--sim-preset", default="study", help="simulator preset when --data is missing")
    args = ap.parse_args(argv)

    from pocus_edge.data.phantom import simulate
    from pocus_edge.errors import PocusError
    from pocus_edge.study import StudyOptions, run_study

    try:
        if not all((args.data / site / "manifest.csv").exists() for site in ("source", "target")):
            simulate(args.data, preset=args.sim_preset, seed=0, progress=False, workers=os.cpu_count() or 1,
                     overwrite=True)
        run_study(StudyOptions(source=args.data / "source", target=args.data / "target", out=args.out,
                               arms=TABLE3_ARMS, seeds=args.seeds, budget=args.budget, recipe=args.recipe,
                               preset=args.preset, device=args.device))
    except PocusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
