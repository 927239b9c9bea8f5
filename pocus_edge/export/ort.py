"""ORT format: the ONNX graph converted by onnxruntime's own tool, for onnxruntime's minimal
(mobile) builds, with the required-operators config such a build is compiled from.

``onnxruntime.tools.convert_onnx_models_to_ort`` loads the graph in onnxruntime, applies its
graph optimizations (fixed style, level "all", without the x86-only NCHWc layout, so the result
runs on ARM phones too) and saves the optimized graph as ``NAME.ort``; it also writes
``NAME.required_operators.config``: the operators (and opsets) the model uses, which a minimal
build takes as ``--include_ops_by_config`` (android_demo/README.md). The .ort file keeps the model
card in its metadata and loads in any full onnxruntime too, which is how its parity is checked.

The card records the onnxruntime that converted it (``ort_format.onnxruntime``). An ORT format
file must also load in the Android app's older onnxruntime (android_demo/onnxruntime.version):
``make app-runtime-test`` loads .ort files written here in exactly that version.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ExportError

CONFIG_SUFFIX = ".required_operators.config"


def config_path(ort_path: str | os.PathLike) -> Path:
    """Where the required-operators config of ``NAME.ort`` is written: ``NAME.required_operators.config``."""
    p = Path(ort_path)
    return p.with_name(p.stem + CONFIG_SUFFIX)


def convert_to_ort(onnx_path: str | os.PathLike, ort_path: str | os.PathLike) -> tuple[Path, Path]:
    """Convert ``onnx_path`` to ``ort_path`` (and its config beside it) with onnxruntime's tool.
    Returns (ort file, config file). ExportError (one line) when onnxruntime cannot convert it."""
    import onnxruntime
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    source, target = Path(onnx_path), Path(ort_path)
    if target.suffix != ".ort":
        raise ExportError(f"{target}: an ORT format model is written to a *.ort file")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ort-convert-") as tmp:
        # The tool names its outputs after the input; convert a copy named like the target.
        staged = Path(tmp) / (target.stem + ".onnx")
        shutil.copyfile(source, staged)
        log = io.StringIO()
        quiet = logging.getLogger("ort_format_model.utils")  # the tool logs its config path at INFO
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(log):
                convert_onnx_models_to_ort(staged, output_dir=Path(tmp) / "out", optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{source}: onnxruntime {onnxruntime.__version__} cannot convert it to ORT format ({first[:200]})") from None
        finally:
            quiet.setLevel(level)
        converted = Path(tmp) / "out" / (target.stem + ".ort")
        config = Path(tmp) / "out" / (target.stem + CONFIG_SUFFIX)
        if not converted.is_file() or not config.is_file():
            raise ExportError(f"{source}: onnxruntime's converter wrote no {converted.name} / {config.name}")
        # The config names the models it came from: the final file, not the temporary copy.
        lines = [f"# - {target.name}" if line.startswith("# - ") else line for line in config.read_text().splitlines()]
        config.write_text("\n".join(lines) + "\n")
        os.replace(converted, target)
        os.replace(config, config_path(target))
    return target, config_path(target)


def required_operators(config: str | os.PathLike) -> dict[str, dict[int, list[str]]]:
    """The config's operators: {domain: {opset: [op, ...]}} (lines ``domain;opset;op,op``)."""
    ops: dict[str, dict[int, list[str]]] = {}
    for line in Path(config).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = line.split(";", 2)
        ops.setdefault(domain, {})[int(opset)] = sorted(n.split("{")[0] for n in names.split(",") if n)
    return ops
