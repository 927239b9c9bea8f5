"""Writing ``qualify``'s outputs, each atomically: ``qualify.json``, ``ranking.csv``,
``frames.csv`` and ``qualify.png``."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..io import write_bytes_atomic, write_json_atomic, write_text_atomic

RANKING_COLUMNS = ("rank", "model", "arm", "seed", "kind", "estimated_dice", "low95", "high95", "agreement",
                   "mean_maxprob", "mean_entropy", "consistency", "empty_rate", "risk_threshold")


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6f}"
    return "" if v is None else v


def ranking_csv(payload: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RANKING_COLUMNS)
    for name in payload["ranking"]:
        m = payload["models"][name]
        s = m["scores"]
        w.writerow([_fmt(v) for v in (m["rank"], name, m["arm"], m["seed"], m["kind"], m["estimated_dice"],
                                      m["interval95"][0], m["interval95"][1], s["agreement"], s["mean_maxprob"],
                                      s["mean_entropy"], s["consistency"], s["empty_rate"], m["risk"]["threshold"])])
    return buf.getvalue()


def frames_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})
    return buf.getvalue()


def plot_png(payload: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = payload["ranking"]
    est = [payload["models"][n]["estimated_dice"] for n in names]
    low = [payload["models"][n]["interval95"][0] for n in names]
    high = [payload["models"][n]["interval95"][1] for n in names]
    err = [[max(0.0, e - lo) if math.isfinite(lo) else 0.0 for e, lo in zip(est, low)],
           [max(0.0, hi - e) if math.isfinite(hi) else 0.0 for e, hi in zip(est, high)]]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.28 * len(names) + 1.2)))
    y = list(range(len(names)))[::-1]
    ax.errorbar(est, y, xerr=err, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("estimated target Dice (label-free) with 95 % bootstrap interval")
    ax.set_title("qualify: models ranked on the target's unlabeled frames", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(out: Path, payload: dict[str, Any], frame_rows: list[dict[str, Any]]) -> dict[str, Path]:
    out = Path(out)
    return {
        "json": write_json_atomic(out / "qualify.json", payload),
        "ranking": write_text_atomic(out / "ranking.csv", ranking_csv(payload)),
        "frames": write_text_atomic(out / "frames.csv", frames_csv(frame_rows)),
        "plot": write_bytes_atomic(out / "qualify.png", plot_png(payload)),
    }
