"""The one registry of backends: name -> class, the file suffixes ``auto`` picks it for, and the
options it accepts. :func:`open_backend` looks every artifact up here (there is no other list).

Adding a format is one row in export's artifact table (:data:`pocus_edge.export.formats.ARTIFACTS`,
which names the backend that runs the artifact) and, for a new kind of artifact, one row in
:data:`REGISTRY` below; the streaming runtime, export's parity and golden checks, the benchmark
and the demo all open artifacts through :func:`open_backend`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import PocusError
from .base import Backend, split_paths
from .coreml import CoreMLBackend
from .openvino import OpenVINOBackend
from .ort import OrtBackend
from .pytorch import TorchBackend
from .tensorrt import TensorRTBackend

# Options every backend is offered and may ignore: where it runs and how many CPU threads it
# uses. Any other option (execution providers, an inference precision) is refused, in one
# line, by a backend that does not take it.
HINTS = ("device", "threads")


@dataclass(frozen=True)
class BackendSpec:
    name: str  # what --backend takes
    cls: type[Backend]  # called as cls(model_path, **accepted options)
    suffixes: tuple[str, ...]  # file suffixes ``auto`` opens with it (lower case)
    options: tuple[str, ...]  # the keyword options its class accepts
    engine: str  # the library that runs it, as benchmark rows name it


REGISTRY: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("ort", OrtBackend, (".onnx", ".ort"), ("device", "threads", "providers"), "onnxruntime"),
        BackendSpec("tensorrt", TensorRTBackend, (".engine", ".plan", ".trt"), ("device",), "tensorrt"),
        BackendSpec("openvino", OpenVINOBackend, (".xml",), ("device", "threads", "precision"), "openvino"),
        BackendSpec("coreml", CoreMLBackend, (".mlpackage",), (), "coreml"),
        BackendSpec("torch", TorchBackend, (".safetensors",), ("device",), "torch"),
    )
}
BACKENDS = ("auto", *REGISTRY)
# File suffix -> backend name (what backend="auto" picks; read from REGISTRY).
SUFFIX_BACKENDS = {suffix: spec.name for spec in REGISTRY.values() for suffix in spec.suffixes}


def backend_spec(name: str) -> BackendSpec:
    """The registry entry of a backend name; one line listing the choices otherwise."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise PocusError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return spec


def backend_for(model_path) -> str:
    """The backend ``auto`` picks for a path: by suffix (two comma-separated checkpoints: torch)."""
    paths = split_paths(model_path)
    if not paths:
        raise PocusError("no model path given")
    suffix = paths[0].suffix.lower()
    kind = next((spec.name for spec in REGISTRY.values() if suffix in spec.suffixes), None)
    if kind is None:
        raise PocusError(f"{paths[0]}: cannot tell the backend from the suffix {paths[0].suffix!r}; pass --backend "
                         f"({', '.join(REGISTRY)})")
    return kind


def accepts(backend: str, option: str) -> bool:
    """Whether ``backend`` takes ``option`` (``providers``, ``precision``, ``threads``, ``device``)."""
    return option in backend_spec(backend).options


def open_backend(
    model_path: str | os.PathLike | tuple,
    backend: str = "auto",
    *,
    device: str = "cpu",
    threads: int | None = None,
    providers: list[str] | None = None,
    precision: str | None = None,
) -> Backend:
    """Open ``model_path`` with the named backend. ``auto`` picks by suffix: ``.onnx`` ->
    onnxruntime (``providers``: cpu, cuda, tensorrt, openvino, coreml), ``.engine``/``.plan`` ->
    TensorRT, ``.xml`` -> OpenVINO (``precision`` overrides the card's inference precision),
    ``.mlpackage`` -> Core ML, ``.safetensors`` (one, or two as ``GEN,CON``) -> PyTorch."""
    spec = backend_spec(backend_for(model_path) if backend == "auto" else backend)
    given = {"device": device, "threads": threads, "providers": providers or None, "precision": precision}
    options = {}
    for key, value in given.items():
        if value is None:
            continue
        if key in spec.options:
            options[key] = value
        elif key not in HINTS:
            takers = [s for s in REGISTRY.values() if key in s.options]
            raise PocusError(f"--{key} applies to the {', '.join(s.name for s in takers)} backend "
                             f"({', '.join(s.engine for s in takers)}), not {spec.name}")
    return spec.cls(model_path, **options)
