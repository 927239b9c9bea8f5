"""Which optional install ("extra") provides which module.

The core install streams and benchmarks exported models; training, export, DICOM, TensorRT,
OpenVINO, Core ML and OpenIGTLink come with extras (``pip install 'pocus-edge[train]'``). Library code
simply imports what it needs where it needs it; when that import fails for a module an extra
provides, the CLI turns the ``ModuleNotFoundError`` into one line naming the extra (exit 3)
with :func:`missing_extra`.
"""

from __future__ import annotations

import importlib.util

from .errors import ExitCode, PocusError

# Top-level module -> the extra that installs it (pyproject.toml, [project.optional-dependencies]).
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "train",
    "torchvision": "train",
    "timm": "train",
    "safetensors": "train",
    "scipy": "train",
    "matplotlib": "train",
    "tensorboard": "train",
    "monai": "train",
    "onnx": "export",
    "onnxscript": "export",
    "onnxslim": "export",
    "onnxconverter_common": "export",
    "pydicom": "dicom",
    "SimpleITK": "dicom",
    "tensorrt": "tensorrt",
    "pynvml": "tensorrt",
    "openvino": "openvino",
    "nncf": "openvino",
    "coremltools": "coreml",
    "pyigtl": "igtl",
    "aiohttp": "serve",
}


class MissingExtra(PocusError):
    """A feature needs an optional dependency that is not installed (exit 3, like a missing
    toolchain: the command cannot run on this install, the input was fine)."""

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, module: str, extra: str, what: str | None = None):
        self.module, self.extra = module, extra
        needs = f"{what} needs" if what else "this needs"
        super().__init__(f"{needs} the '{extra}' extra ({module} is not installed): pip install 'pocus-edge[{extra}]'")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_extra(exc: BaseException, what: str | None = None) -> MissingExtra | None:
    """The :class:`MissingExtra` error for ``exc`` when it is a ModuleNotFoundError of a module an
    extra provides and that module is really absent (a broken install of a present package is
    left to its own traceback); else None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    root = exc.name.split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None or _installed(root):
        return None
    return MissingExtra(root, extra, what)
