"""Benchmarking the fused segmenter across formats, precisions and machines.

* :func:`run_benchmark` (runner) measures every available format on this machine and returns a
  report dict (schema.REPORT_SCHEMA); :func:`render_report` prints it.
* :func:`compare_reports` (compare) sets reports from several machines side by side with speed
  ratios and each device's compute floor from devices.yaml; :func:`render_comparison` prints it.
"""

from .compare import compare_reports, load_devices, load_report, match_device, peak_for, render_comparison
from .formats import AGREEMENT_BARS, BASELINE, FORMATS, FormatSpec, Prepared
from .machine import describe_machine, probe_matmul
from .runner import BenchmarkOptions, render_report, run_benchmark, run_format
from .schema import REPORT_SCHEMA, SCHEMA_VERSION, validate_report

__all__ = [
    "AGREEMENT_BARS",
    "BASELINE",
    "FORMATS",
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "BenchmarkOptions",
    "FormatSpec",
    "Prepared",
    "compare_reports",
    "describe_machine",
    "load_devices",
    "load_report",
    "match_device",
    "peak_for",
    "probe_matmul",
    "render_comparison",
    "render_report",
    "run_benchmark",
    "run_format",
    "validate_report",
]
