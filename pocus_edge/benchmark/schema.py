"""JSON schema of a benchmark report (what `pocus-edge benchmark --report` writes and `compare`
reads). Kept in the package so that the writer, the reader and the tests share one definition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError

SCHEMA_VERSION = "pocus-edge-benchmark/1"
STATUSES = ("ok", "skipped", "failed")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "unknown")

_number_or_null = {"type": ["number", "null"]}

LATENCY_SCHEMA = {
    "type": "object",
    "required": ["batch", "p50_ms", "p95_ms", "fps", "runs"],
    "properties": {
        "batch": {"type": "integer", "minimum": 1},
        "p50_ms": {"type": "number", "exclusiveMinimum": 0},
        "p95_ms": {"type": "number", "exclusiveMinimum": 0},
        "fps": {"type": "number", "exclusiveMinimum": 0},
        "runs": {"type": "integer", "minimum": 1},
        "warmup_s": {"type": "number", "minimum": 0},
        "cpu_p50_ms": {"type": "number", "minimum": 0},
        # achieved GFLOP/s over the machine's measured matmul rate for the row's precision
        "fraction_of_peak": {"type": "number", "minimum": 0},
    },
    "additionalProperties": False,
}

ROW_SCHEMA = {
    "type": "object",
    "required": ["format", "precision", "engine", "device", "status", "reason", "latency"],
    "properties": {
        "format": {"type": "string", "minLength": 1},
        # Which model the row measures: "fused" (the teacher), a student's name, or an
        # exported artifact's label. Absent in reports written before students had rows.
        "model": {"type": "string", "minLength": 1},
        "precision": {"enum": list(PRECISIONS)},
        "engine": {"type": "string"},
        "device": {"type": "string"},
        "status": {"enum": list(STATUSES)},
        "reason": {"type": "string"},
        "artifact_bytes": {"type": ["integer", "null"], "minimum": 0},
        "dice": _number_or_null,
        "iou": _number_or_null,
        "agreement_dice": _number_or_null,
        "agreement_bar": _number_or_null,
        "max_abs_diff": _number_or_null,
        "gflops_per_frame": _number_or_null,
        "peak_memory_bytes": {"type": ["integer", "null"]},
        "memory_kind": {"enum": ["cuda_max_allocated", "rss_delta", None]},
        "setup_s": _number_or_null,
        "latency": {"type": "array", "items": LATENCY_SCHEMA},
        "load_average": {"type": ["array", "null"], "items": {"type": "number"}},
    },
    "additionalProperties": False,
    # An ok row must carry timings; a skipped or failed one must say why.
    "allOf": [
        {
            "if": {"properties": {"status": {"const": "ok"}}},
            "then": {"properties": {"latency": {"minItems": 1}}},
        },
        {
            "if": {"properties": {"status": {"enum": ["skipped", "failed"]}}},
            "then": {"properties": {"reason": {"minLength": 1}}},
        },
    ],
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "pocus-edge benchmark report",
    "type": "object",
    "required": ["schema", "created", "command", "machine", "model", "data", "settings", "rows"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "created": {"type": "string"},
        "command": {"type": "string"},
        "machine": {
            "type": "object",
            "required": ["cpu", "gpu", "versions", "device", "device_name"],
            "properties": {
                "cpu": {
                    "type": "object",
                    "required": ["model", "cores", "flags"],
                    "properties": {
                        "model": {"type": "string"},
                        "cores": {"type": "integer", "minimum": 1},
                        "flags": {"type": "array", "items": {"type": "string"}},
                        "native_bf16": {"type": "boolean"},
                    },
                },
                "gpu": {
                    "type": ["object", "null"],
                    "properties": {"name": {"type": "string"}, "driver": {"type": "string"}},
                },
                "versions": {"type": "object", "additionalProperties": {"type": "string"}},
                "device": {"type": "string"},
                "device_name": {"type": "string", "minLength": 1},
                "matmul_gflops": {"type": "object", "additionalProperties": {"type": "number"}},
                "load_average": {"type": "array", "items": {"type": "number"}},
            },
        },
        "model": {
            "type": "object",
            "required": ["preset", "img_size", "gflops_per_frame", "params", "fusion"],
            "properties": {
                "preset": {"type": "string"},
                "img_size": {"type": "integer", "minimum": 16},
                "gflops_per_frame": {"type": "number", "minimum": 0},
                "params": {"type": ["integer", "null"], "minimum": 1},
                "fusion": {"type": "object"},
                "weights": {"type": "string"},
            },
        },
        "data": {
            "type": "object",
            "required": ["source", "frames"],
            "properties": {
                "source": {"type": "string"},
                "frames": {"type": "integer", "minimum": 1},
                "labeled": {"type": "boolean"},
            },
        },
        "settings": {
            "type": "object",
            "required": ["batches", "runs", "warmup"],
            "properties": {
                "batches": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
                "runs": {"type": "integer", "minimum": 1},
                "warmup": {"type": "integer", "minimum": 0},
            },
        },
        "students": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "preset", "img_size", "gflops_per_frame", "params"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "preset": {"type": "string"},
                    "img_size": {"type": "integer", "minimum": 16},
                    "gflops_per_frame": {"type": "number", "minimum": 0},
                    "params": {"type": "integer", "minimum": 1},
                    "encoder": {"type": "string"},
                    "weights": {"type": "string"},
                },
            },
        },
        "rows": {"type": "array", "items": ROW_SCHEMA},
    },
}

TEACHER = "fused"


def row_model(row: dict[str, Any]) -> str:
    """The model a row measures ("fused" for the teacher and for rows of older reports)."""
    return str(row.get("model") or TEACHER)


def row_label(row: dict[str, Any]) -> str:
    """How tables and figures name a row: the format for the teacher ("onnx-int8"), the model
    and the format for anything else ("mobilenetv3 onnx-int8")."""
    model = row_model(row)
    return row["format"] if model == TEACHER else f"{model} {row['format']}"


def validate_report(report: Any, *, source: str | Path = "benchmark report") -> None:
    """Raise DataError (one line, naming ``source``) when ``report`` breaks REPORT_SCHEMA.

    jsonschema is a dev dependency: without it only the top-level keys and the version are
    checked, so that a bare deployment image can still read reports.
    """
    try:
        import jsonschema
    except ImportError:
        if not isinstance(report, dict) or report.get("schema") != SCHEMA_VERSION:
            raise DataError(f"{source}: not a {SCHEMA_VERSION} report") from None
        missing = [k for k in REPORT_SCHEMA["required"] if k not in report]
        if missing:
            raise DataError(f"{source}: missing key(s) {', '.join(missing)}")
        return
    validator = jsonschema.Draft202012Validator(REPORT_SCHEMA)
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DataError(f"{source}: invalid benchmark report at {where}: {first.message}{more}")
