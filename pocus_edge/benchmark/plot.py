"""One picture of one or more benchmark reports (`pocus-edge benchmark plot`).

Left panel: frames per second of every ``ok`` format (a student's rows carry its name: "mobilenetv3
onnx-int8") at one batch size, one bar per report
(machine), with the speed-up over that report's eager two-model baseline written on the bar.
Right panel: each format's mask agreement with the fp32 reference (mean per-image Dice) and its
bar from the report, so a fast format that fails its accuracy bar stands out. Skipped and failed
formats are listed under the figure with their reasons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError
from ..io import atomic_path
from .schema import row_label

BASELINE = "eager-2model"


def plot_data(reports: Sequence[dict[str, Any]], labels: Sequence[str], batch: int) -> dict[str, Any]:
    """What the figure shows, as plain data: ``formats`` in first-seen order, and per report
    ``fps`` / ``speedup`` / ``agreement`` / ``bar`` dicts keyed by format (ok rows at ``batch``
    only), plus ``not_ok`` (format, status, reason) tuples. DataError if nothing is plottable."""
    formats: list[str] = []
    series = []
    for report, label in zip(reports, labels):
        fps: dict[str, float] = {}
        agreement: dict[str, float] = {}
        bar: dict[str, float] = {}
        not_ok = []
        for row in report["rows"]:
            name = row_label(row)  # "onnx-int8" for the teacher, "mobilenetv3 onnx-int8" for a student
            if row["status"] != "ok":
                not_ok.append((name, row["status"], row.get("reason", "")))
                continue
            cell = next((c for c in row["latency"] if c["batch"] == batch), None)
            if cell is None or not cell.get("fps"):
                continue
            fps[name] = float(cell["fps"])
            if row.get("agreement_dice") is not None:
                agreement[name] = float(row["agreement_dice"])
            if row.get("agreement_bar") is not None:
                bar[name] = float(row["agreement_bar"])
            if name not in formats:
                formats.append(name)
        base = fps.get(BASELINE)
        speedup = {f: v / base for f, v in fps.items()} if base else {}
        series.append({"label": label, "device": report["machine"].get("device_name", "?"), "fps": fps,
                       "speedup": speedup, "agreement": agreement, "bar": bar, "not_ok": not_ok})
    if not formats:
        raise DataError(f"no format has an ok measurement at batch {batch} in these reports")
    model = reports[0]["model"]
    return {"batch": batch, "formats": formats, "series": series,
            "title": f"{model.get('preset', '?')} preset, {model.get('gflops_per_frame', 0):.4g} GFLOPs/frame, batch {batch}"}


def plot_reports(reports: Sequence[dict[str, Any]], labels: Sequence[str], out: str | Path, *, batch: int = 1):
    """Draw :func:`plot_data` to ``out`` (PNG, SVG or PDF by suffix, written atomically); returns
    the matplotlib Figure (closed) and the plotted data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = plot_data(reports, labels, batch)
    formats = data["formats"]
    n = len(data["series"])
    height = 0.8 / n
    fig, (ax_fps, ax_agree) = plt.subplots(
        1, 2, figsize=(12, 1.2 + 0.45 * len(formats) * max(1, n * 0.7)), gridspec_kw={"width_ratios": [2, 1]}
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, s in enumerate(data["series"]):
        ys = [i + (k - (n - 1) / 2) * height for i in range(len(formats))]
        color = colors[k % len(colors)]
        present = [(y, f) for y, f in zip(ys, formats) if f in s["fps"]]
        ax_fps.barh([y for y, _ in present], [s["fps"][f] for _, f in present], height=height * 0.9,
                    color=color, label=f"{s['label']} ({s['device']})")
        for y, f in present:
            if f in s["speedup"]:
                ax_fps.text(s["fps"][f], y, f" {s['speedup'][f]:.2f}x", va="center", fontsize=8)
        agreed = [(y, f) for y, f in present if f in s["agreement"]]
        ax_agree.scatter([s["agreement"][f] for _, f in agreed], [y for y, _ in agreed], color=color, zorder=3)
        for y, f in agreed:
            if f in s["bar"]:
                ax_agree.plot([s["bar"][f]] * 2, [y - height / 2, y + height / 2], color="black", lw=1.5)
    for ax in (ax_fps, ax_agree):
        ax.set_yticks(range(len(formats)))
        ax.set_yticklabels(formats)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    ax_agree.set_yticklabels([])
    ax_fps.set_xlabel(f"frames per second at batch {batch} (label: x the eager two-model baseline)")
    ax_fps.margins(x=0.15)
    ax_fps.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=min(n, 3), fontsize=8, frameon=False)
    ax_agree.set_xlabel("agreement with fp32 (mask Dice); | = bar")
    lowest = min([min(s["agreement"].values(), default=1.0) for s in data["series"]] +
                 [min(s["bar"].values(), default=1.0) for s in data["series"]])
    ax_agree.set_xlim(max(0.0, lowest - 0.02), 1.005)
    fig.suptitle(data["title"])
    notes = sorted({f"{f}: {status}" + (f" ({reason})" if reason else "")
                    for s in data["series"] for f, status, reason in s["not_ok"]})
    if notes:
        fig.text(0.01, 0.005, "not measured: " + "; ".join(notes), fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if notes else 0, 1, 1))
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return fig, data
