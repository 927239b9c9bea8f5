"""The figure a user picks a model from: target Dice against frames per second for every model
and format (`pocus-edge benchmark frontier`).

Speed comes from benchmark reports (one point per ``ok`` row at one batch size: the teacher's
formats, each student's, an exported branch's); accuracy from study results (target Dice per
model, with its confidence interval) or, for a model the study does not cover, from the row's
own Dice when the benchmark ran with ``--data TARGET_SITE``. The Pareto frontier joins the
points that no other point beats on both axes: everything off it is slower *and* no more
accurate than something on it.

Accuracy files (JSON), any of:

* ``{"models": {"fused": 0.81, "mobilenetv3": {"dice": 0.80, "ci": [0.78, 0.82]}}}``
* a study report: ``{"arms": {ARM: {...}}}`` or ``{"arms": [{"arm": ARM, ...}]}``, each arm with
  a ``dice`` (or ``target_dice``) that is a number or ``{"mean": x, "ci": [lo, hi]}``, and
  optionally ``ci`` / ``ci_low`` + ``ci_high``. Arm names map to benchmark model names with
  ``--as ARM=MODEL`` (the teacher's model name is ``fused``, a student's is its name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import DataError
from ..io import atomic_path, read_json
from .schema import row_label, row_model


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: Dice must be a number, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise DataError(f"{where}: Dice {value} is outside [0, 1]")
    return float(value)


def _entry(value: Any, where: str) -> dict[str, Any]:
    """``{"dice": x, "ci": (lo, hi) or None}`` from one model's or arm's accuracy record."""
    if not isinstance(value, Mapping):
        return {"dice": _number(value, where), "ci": None}
    dice = value.get("dice", value.get("target_dice", value.get("dice_mean")))
    ci = value.get("ci", value.get("dice_ci", value.get("ci95")))
    if isinstance(dice, Mapping):  # {"mean": x, "ci": [lo, hi]}
        ci = dice.get("ci", dice.get("ci95", ci))
        dice = dice.get("mean")
    if dice is None:
        raise DataError(f"{where}: no 'dice' (or 'target_dice') value")
    if ci is None and "ci_low" in value and "ci_high" in value:
        ci = (value["ci_low"], value["ci_high"])
    if ci is not None:
        if not isinstance(ci, Sequence) or len(ci) != 2:
            raise DataError(f"{where}: ci must be [low, high], got {ci!r}")
        ci = (_number(ci[0], where), _number(ci[1], where))
        if not ci[0] <= float(dice) <= ci[1]:
            raise DataError(f"{where}: Dice {dice} lies outside its ci {list(ci)}")
    return {"dice": _number(dice, where), "ci": ci}


def parse_accuracy(data: Any, source: str = "accuracy") -> dict[str, dict[str, Any]]:
    """Target Dice per model name from an accuracy document (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise DataError(f"{source}: expected a JSON object with 'models' or 'arms'")
    if "models" in data:
        items = data["models"]
        if not isinstance(items, Mapping):
            raise DataError(f"{source}: 'models' must map model names to Dice")
        return {str(k): _entry(v, f"{source}: models.{k}") for k, v in items.items()}
    arms = data.get("arms")
    if isinstance(arms, Mapping):
        return {str(k): _entry(v, f"{source}: arms.{k}") for k, v in arms.items()}
    if isinstance(arms, list):
        out = {}
        for i, arm in enumerate(arms):
            name = arm.get("arm", arm.get("name")) if isinstance(arm, Mapping) else None
            if name is None:
                raise DataError(f"{source}: arms[{i}] has no 'arm' or 'name'")
            out[str(name)] = _entry(arm, f"{source}: arms[{i}] ({name})")
        return out
    raise DataError(f"{source}: expected a JSON object with 'models' or 'arms'")


def load_accuracy(path: str | Path, rename: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`parse_accuracy` of a JSON file; ``rename`` maps study arm names to model names."""
    accuracy = parse_accuracy(read_json(path, what="accuracy file"), str(path))
    return {(rename or {}).get(name, name): value for name, value in accuracy.items()}


def pareto_frontier(points: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the points no other point dominates (at least as fast and as accurate, and
    strictly better on one axis), sorted by FPS."""
    keep = []
    for i, p in enumerate(points):
        dominated = any(
            q["fps"] >= p["fps"] and q["dice"] >= p["dice"] and (q["fps"] > p["fps"] or q["dice"] > p["dice"])
            for j, q in enumerate(points) if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i]["fps"], points[i]["dice"]))


def frontier_data(reports: Sequence[dict[str, Any]], labels: Sequence[str], accuracy: Mapping[str, Mapping[str, Any]],
                  *, batch: int = 1) -> dict[str, Any]:
    """What the figure shows: one point per (report, ok row at ``batch``) whose model has a target
    Dice (``accuracy`` first, else the row's own Dice), the frontier of each report, and the rows
    left out with the reason. DataError when no point remains."""
    series, left_out = [], []
    for report, label in zip(reports, labels):
        points = []
        for row in report["rows"]:
            name = f"{row_label(row)}" + (f" [{label}]" if len(reports) > 1 else "")
            if row["status"] != "ok":
                left_out.append((name, f"{row['status']}: {row.get('reason', '')}".rstrip(": ")))
                continue
            cell = next((c for c in row["latency"] if c["batch"] == batch), None)
            if cell is None or not cell.get("fps"):
                left_out.append((name, f"no timing at batch {batch}"))
                continue
            model = row_model(row)
            if model in accuracy:
                dice, ci, source = float(accuracy[model]["dice"]), accuracy[model].get("ci"), "study"
            elif row.get("dice") is not None:
                dice, ci, source = float(row["dice"]), None, "benchmark"
            else:
                left_out.append((name, f"no target Dice for model {model!r}"))
                continue
            points.append({"label": row_label(row), "model": model, "format": row["format"], "precision": row["precision"],
                           "fps": float(cell["fps"]), "dice": dice, "ci": tuple(ci) if ci else None, "dice_source": source})
        frontier = pareto_frontier(points)
        for i, p in enumerate(points):
            p["frontier"] = i in frontier
        series.append({"label": label, "device": report["machine"].get("device_name", "?"), "points": points,
                       "frontier": frontier})
    if not any(s["points"] for s in series):
        raise DataError(f"no row has both a timing at batch {batch} and a target Dice for its model "
                        f"(accuracy given for: {', '.join(sorted(accuracy)) or 'none'})")
    return {"batch": batch, "series": series, "left_out": left_out}


def plot_frontier(reports: Sequence[dict[str, Any]], labels: Sequence[str], accuracy: Mapping[str, Mapping[str, Any]],
                  out: str | Path, *, batch: int = 1, fps_goal: float | None = None):
    """Draw :func:`frontier_data` to ``out`` (PNG, SVG or PDF by suffix, written atomically):
    FPS on a log axis, target Dice with its CI, one label per point, the frontier as a step
    line and, with ``fps_goal``, a vertical line at the goal. Returns (Figure (closed), data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = frontier_data(reports, labels, accuracy, batch=batch)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {}
    for k, s in enumerate(data["series"]):
        color = colors[k % len(colors)]
        pts = s["points"]
        if not pts:
            continue
        for model in dict.fromkeys(p["model"] for p in pts):
            markers.setdefault(model, "osD^vP*Xh<>"[len(markers) % 11])
            mine = [p for p in pts if p["model"] == model]
            ax.scatter([p["fps"] for p in mine], [p["dice"] for p in mine], marker=markers[model], color=color, zorder=3,
                       label=f"{model}" + (f" ({s['label']}, {s['device']})" if len(data["series"]) > 1 else ""))
        # One model's formats share its Dice, so their labels sit on one line: stagger them by FPS.
        tier = {id(p): k % 3 for model in markers for k, p in
                enumerate(sorted((q for q in pts if q["model"] == model), key=lambda q: q["fps"]))}
        for p in pts:
            if p["ci"]:
                ax.plot([p["fps"], p["fps"]], list(p["ci"]), color=color, lw=1, alpha=0.6, zorder=2)
            ax.annotate(p["label"], (p["fps"], p["dice"]), xytext=(4, 3 + 9 * tier[id(p)]), textcoords="offset points",
                        fontsize=7, fontweight="bold" if p["frontier"] else "normal")
        front = [pts[i] for i in s["frontier"]]
        # Step line: from each frontier point, accuracy holds until the next (faster, less accurate) one.
        xs, ys = [], []
        for a, b in zip(front, front[1:] + [None]):
            xs.append(a["fps"])
            ys.append(a["dice"])
            if b is not None:
                xs.append(a["fps"])
                ys.append(b["dice"])
        ax.plot(xs, ys, color=color, lw=1.5, ls="--", zorder=1, label=f"frontier ({s['label']})" if len(data["series"]) > 1 else "frontier")
    if fps_goal:
        ax.axvline(fps_goal, color="grey", lw=1, ls=":", label=f"{fps_goal:g} FPS")
    ax.set_xscale("log")
    ax.set_xlabel(f"frames per second at batch {batch} (log scale)")
    ax.set_ylabel("target Dice (study mean and 95 % CI where given)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    device = ", ".join(dict.fromkeys(s["device"] for s in data["series"]))
    ax.set_title(f"Accuracy against speed: every model and format ({device})")
    if data["left_out"]:
        text = "; ".join(f"{n}: {why}" for n, why in data["left_out"][:12])
        more = len(data["left_out"]) - 12
        fig.text(0.01, 0.005, "not plotted: " + text + (f"; ... (+{more} more)" if more > 0 else ""), fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if data["left_out"] else 0, 1, 1))
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return fig, data
