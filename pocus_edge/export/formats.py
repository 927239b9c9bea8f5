"""The artifact formats: one table that ``export_model`` (export) and ``pocus-edge benchmark``
(its exported-format rows, built from this table) both read, so a format is added once and both
see it.

Each entry is a (target, precision) pair: which ONNX graph it starts from (precision lives in
the graph), which inference backend runs the result (a name in
:data:`pocus_edge.inference.REGISTRY`), the file it is written to and the Python packages it
needs. Adding a format is one row here and, when no backend runs its kind of file yet, one row in
the inference registry; a new target also names its build steps in ``export.api.STEPS``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..errors import ExportError


@dataclass(frozen=True)
class ArtifactFormat:
    target: str  # onnx | tensorrt | openvino | coreml | ort
    precision: str  # fp32 | fp16 | bf16 | int8
    backend: str  # the inference backend that runs the artifact (pocus_edge.inference.REGISTRY)
    suffix: str  # of the artifact's file name
    graph: str | None  # the ONNX graph it is built from: fp32 | fp16 | int8-cpu | int8-tensorrt (None: traced directly)
    summary: str
    requires: tuple[str, ...] = ()  # importable modules needed to build it
    benchmarked: bool = True  # a row of `pocus-edge benchmark` (False: export only)

    @property
    def name(self) -> str:
        return f"{self.target}-{self.precision}"

    def missing(self) -> str | None:
        """Why this format cannot be built here (a missing package), or None."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"{', '.join(absent)} not installed" if absent else None


# In the order the benchmark prints its rows. The TensorRT fp32 engine is built by export only:
# the benchmark times the fp16 and int8 engines a deployment ships (each engine build takes minutes).
ARTIFACTS: dict[tuple[str, str], ArtifactFormat] = {
    (f.target, f.precision): f
    for f in (
        ArtifactFormat("onnx", "fp32", "ort", ".onnx", "fp32", "ONNX, fp32"),
        ArtifactFormat("onnx", "fp16", "ort", ".onnx", "fp16", "ONNX, mixed fp16: branches fp16; sigmoids, confidences and fusion fp32"),
        ArtifactFormat("onnx", "int8", "ort", ".onnx", "int8-cpu", "ONNX, static int8 Q/DQ (uint8 activations for CPU kernels); fusion fp32"),
        ArtifactFormat("openvino", "fp32", "openvino", ".xml", "fp32", "OpenVINO IR, fp32", ("openvino",)),
        ArtifactFormat("openvino", "bf16", "openvino", ".xml", "fp32", "OpenVINO IR, bf16 inference precision (CPUs with native bf16)", ("openvino",)),
        ArtifactFormat("openvino", "int8", "openvino", ".xml", "fp32", "OpenVINO IR, NNCF int8 calibrated on target frames; fusion fp32", ("openvino", "nncf")),
        ArtifactFormat("tensorrt", "fp32", "tensorrt", ".engine", "fp32", "TensorRT engine from the fp32 ONNX", ("tensorrt",),
                       benchmarked=False),
        ArtifactFormat("tensorrt", "fp16", "tensorrt", ".engine", "fp16", "TensorRT engine from the mixed fp16 ONNX", ("tensorrt",)),
        ArtifactFormat("tensorrt", "int8", "tensorrt", ".engine", "int8-tensorrt", "TensorRT engine from the symmetric int8 Q/DQ ONNX", ("tensorrt",)),
        ArtifactFormat("coreml", "fp16", "coreml", ".mlpackage", None, "Core ML ML Program, fp16 compute, grayscale image input", ("coremltools",)),
        ArtifactFormat("ort", "fp32", "ort", ".ort", "fp32", "ORT format (onnxruntime minimal builds) from the fp32 ONNX, + required-operators config"),
        ArtifactFormat("ort", "fp16", "ort", ".ort", "fp16", "ORT format from the mixed fp16 ONNX, + required-operators config"),
        ArtifactFormat("ort", "int8", "ort", ".ort", "int8-cpu", "ORT format from the int8 Q/DQ ONNX, + required-operators config"),
    )
}
TARGETS = tuple(dict.fromkeys(t for t, _ in ARTIFACTS))
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def artifact_format(target: str, precision: str) -> ArtifactFormat:
    """The table entry for (target, precision); ExportError listing what exists otherwise."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    spec = ARTIFACTS.get((target, precision))
    if spec is None:
        offered = ", ".join(p for t, p in ARTIFACTS if t == target)
        raise ExportError(f"{target} export offers precision {offered}, not {precision!r}")
    return spec
