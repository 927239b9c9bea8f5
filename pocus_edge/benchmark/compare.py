"""Side-by-side comparison of benchmark reports from several machines (`benchmark compare`).

For every format and batch size present in any report: frames per second on each machine, the
speed ratio against the first report, and each machine's compute floor, i.e. the time a frame
would take if the device ran its datasheet peak rate (devices.yaml) for the model's GFLOPs,
and the fraction of that peak the measured speed reaches (achieved GFLOP/s / peak GFLOP/s).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import ConfigError, DataError
from ..io import read_json
from .schema import row_label, validate_report

# A row's precision -> the devices.yaml rate that bounds it. fp32 on a GPU whose cuDNN/cuBLAS
# may use TF32 tensor cores is bounded by the TF32 rate (see ``peak_for``).
_PRECISION_KEY = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "int8"}


@lru_cache(maxsize=1)
def load_devices() -> tuple[dict[str, Any], ...]:
    """The known devices' peak dense rates (pocus_edge/benchmark/devices.yaml)."""
    text = resources.files("pocus_edge.benchmark").joinpath("devices.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, list):
        raise ConfigError("pocus_edge/benchmark/devices.yaml: expected a 'devices' list")
    for entry in devices:
        for key in ("name", "match", "peak", "source"):
            if key not in entry:
                raise ConfigError(f"pocus_edge/benchmark/devices.yaml: device {entry.get('name', '?')!r} lacks {key!r}")
    return tuple(devices)


def match_device(name: str, devices: Sequence[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The first devices.yaml entry one of whose ``match`` substrings occurs in ``name``."""
    lowered = (name or "").lower()
    for entry in devices if devices is not None else load_devices():
        if any(str(m).lower() in lowered for m in entry["match"]):
            return entry
    return None


def peak_for(report: dict[str, Any], precision: str) -> tuple[float | None, str]:
    """Peak rate in GFLOP/s (GOPS for int8) bounding ``precision`` on the report's device, and
    where it comes from. Unknown devices fall back to the report's own measured matmul rate."""
    machine = report["machine"]
    entry = match_device(machine["device_name"])
    if entry is not None:
        key = _PRECISION_KEY.get(precision, precision)
        gpu = machine.get("gpu") or {}
        # PyTorch lets cuDNN run fp32 convolutions on TF32 tensor cores by default: then TF32
        # is the honest ceiling of an "fp32" row, not the much lower CUDA-core rate.
        if key == "fp32" and "tf32" in entry["peak"] and (gpu.get("tf32_cudnn") or gpu.get("tf32_matmul")):
            key = "tf32"
        rate = entry["peak"].get(key)
        if rate is None:
            return None, f"{entry['name']}: no {key} rate"
        return float(rate) * 1e3, f"{entry['name']} {key} {rate:g} T (datasheet)"
    measured = (machine.get("matmul_gflops") or {}).get(precision)
    if measured:
        return float(measured), f"measured {precision} matmul {measured:,.0f} G"
    return None, "device not in devices.yaml"


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate one report (DataError naming the file on any problem)."""
    p = Path(path)
    report = read_json(p, what="benchmark report")
    validate_report(report, source=p)
    return report


def _latency(row: dict[str, Any], batch: int) -> dict[str, Any] | None:
    for lat in row.get("latency", []):
        if lat["batch"] == batch:
            return lat
    return None


def compare_reports(reports: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the comparison: one entry per (format, batch) with, for each report, its FPS, the
    ratio to the first report's FPS, the compute floor (ms/frame) and the fraction of peak.

    Returns ``{"machines": [...], "rows": [...]}``; values are None where a report lacks an
    ``ok`` measurement (or the device has no known peak for that precision).
    """
    if not reports:
        raise DataError("compare needs at least one benchmark report")
    labels = list(labels) if labels is not None else [f"#{i + 1}" for i in range(len(reports))]
    machines = []
    for label, report in zip(labels, reports):
        entry = match_device(report["machine"]["device_name"])
        machines.append(
            {
                "label": label,
                "device_name": report["machine"]["device_name"],
                "device": report["machine"]["device"],
                "known_device": entry["name"] if entry else None,
                "source": entry["source"] if entry else None,
                "gflops_per_frame": report["model"]["gflops_per_frame"],
                "preset": report["model"]["preset"],
            }
        )
    keys: list[tuple[str, str, int]] = []
    for report in reports:
        for row in report["rows"]:
            for lat in row.get("latency", []):
                key = (row_label(row), row["precision"], lat["batch"])
                if key not in keys:
                    keys.append(key)
    rows = []
    for fmt, precision, batch in keys:
        cells = []
        reference_fps = None
        for i, report in enumerate(reports):
            row = next((r for r in report["rows"] if row_label(r) == fmt and r["status"] == "ok"), None)
            lat = _latency(row, batch) if row else None
            cell: dict[str, Any] = {"fps": None, "p50_ms": None, "ratio": None, "floor_ms": None, "fraction_of_peak": None, "peak": None}
            if lat is not None:
                gflops = row.get("gflops_per_frame") or report["model"]["gflops_per_frame"]
                cell["fps"] = lat["fps"]
                cell["p50_ms"] = lat["p50_ms"]
                peak_gflops, peak_source = peak_for(report, precision)
                cell["peak"] = peak_source
                if peak_gflops:
                    cell["floor_ms"] = 1e3 * gflops / peak_gflops
                    # achieved rate / peak rate = (fps * GFLOPs per frame) / peak GFLOP/s
                    cell["fraction_of_peak"] = lat["fps"] * gflops / peak_gflops
            if i == 0:
                reference_fps = cell["fps"]
            if cell["fps"] is not None and reference_fps:
                cell["ratio"] = cell["fps"] / reference_fps
            cells.append(cell)
        rows.append({"format": fmt, "precision": precision, "batch": batch, "cells": cells})
    return {"machines": machines, "rows": rows}


def render_comparison(comparison: dict[str, Any], console=None) -> None:
    """Print the comparison as two rich tables (machines, then formats side by side)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .runner import fmt_fps

    console = console or Console()
    machines = Table(title="Machines", title_justify="left")
    for col in ("", "device", "matched peak table entry", "preset", "GFLOPs/frame"):
        machines.add_column(col)
    for m in comparison["machines"]:
        machines.add_row(
            escape(m["label"]),
            escape(f"{m['device_name']} ({m['device']})"),
            m["known_device"] or "(none: measured matmul rate)",
            m["preset"],
            f"{m['gflops_per_frame']:.4g}",
        )
    console.print(machines)
    table = Table(title=f"FPS, ratio to {comparison['machines'][0]['label']}, compute floor and fraction of peak", title_justify="left")
    table.add_column("format")
    table.add_column("batch", justify="right")
    for m in comparison["machines"]:
        table.add_column(f"{m['label']}\nFPS (x)", justify="right")
        table.add_column(f"{m['label']}\nfloor ms | % peak", justify="right")
    for row in comparison["rows"]:
        cells = []
        for cell in row["cells"]:
            if cell["fps"] is None:
                cells += ["-", "-"]
                continue
            ratio = f" ({cell['ratio']:.2f}x)" if cell["ratio"] is not None else ""
            cells.append(f"{fmt_fps(cell['fps'])}{ratio}")
            if cell["floor_ms"] is None:
                cells.append("n/a")
            else:
                cells.append(f"{cell['floor_ms']:.3g} | {100 * cell['fraction_of_peak']:.1f}%")
        table.add_row(f"{row['format']}", str(row["batch"]), *cells)
    console.print(table)
