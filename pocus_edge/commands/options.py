"""The option vocabulary every command follows (docs/cli.md lists each name and its meaning once).

- Choices are ``Literal`` types: typer checks them, lists them in ``--help`` and completes them in
  the shell. Each mirrors a library registry (tests/test_cli.py checks that they agree); the
  library stays the authority and refuses anything else on its own.
- ``--device`` defaults to ``auto`` everywhere, resolved by :func:`resolve_device`.
- Renamed options keep their old spelling as a hidden, deprecated alias
  (:data:`DEPRECATED_OPTIONS`, applied by :func:`rewrite_deprecated` before parsing).

This module imports nothing heavy: ``--help`` works on the core install.
"""

from __future__ import annotations

import enum
from typing import Literal, get_args

# Model presets (pocus_edge.config.PRESETS) and simulator presets (pocus_edge.data.phantom.PRESETS).
Preset = Literal["paper", "small", "tiny"]
DataPreset = Literal["tiny", "demo", "bench", "study"]
# Export: the deployment target and the precision in the graph (pocus_edge.export.formats).
ExportTarget = Literal["onnx", "openvino", "tensorrt", "coreml", "ort"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]
# The fusion of the two branches (pocus_edge.models.fusion METHODS, NORMS, FORMULAS).
FusionMethod = Literal["entropy", "margin", "average"]
FusionNorm = Literal["image", "batch"]
FusionFormula = Literal["weighted", "paper"]
# Runtime backends (pocus_edge.inference.BACKENDS).
Backend = Literal["auto", "ort", "tensorrt", "openvino", "coreml", "torch"]
# Training (pocus_edge.train.recipes.RECIPES, data.transforms.AUGMENTATIONS, train.finetune.SPLIT_COLUMNS).
Recipe = Literal["default", "paper"]
Augment = Literal["none", "intensity", "standard"]
SplitColumn = Literal["auto", "split", "ub_split"]
# Compact students (pocus_edge.models.students.STUDENTS) and study budgets (the study's BUDGETS).
Student = Literal["mobilenetv3", "efficientvit", "fastvit"]
Budget = Literal["cpu", "gpu", "smoke"]
# Data commands.
Domain = Literal["source", "target"]
EmptySlices = Literal["unlabeled", "background"]
TargetTestLabels = Literal["all", "sparse"]
# `convert --stage` (pocus_edge.models.released SEGMENTER_STAGES + ENCODER_STAGES).
ConvertStage = Literal["finetune", "baseline", "pretrain-mim", "pretrain-contrastive"]
# torch.compile modes.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def choice_enum(name: str, choices: object) -> type[enum.Enum]:
    """An Enum of a Literal's values, for repeatable options (typer takes ``List[Enum]``, not
    ``List[Literal]``); commands pass ``member.value`` on."""
    return enum.Enum(name, {value: value for value in get_args(choices)}, type=str)


FusionMethodChoice = choice_enum("FusionMethodChoice", FusionMethod)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1")
DEVICE_HELP = (
    "auto (default: the CUDA GPU when the engine that runs the model sees one, else the CPU) | cpu | cuda | "
    "cuda:N (OpenVINO models: cpu, gpu, npu). See docs/cli.md, 'Devices'."
)


def complete_device(incomplete: str) -> list[str]:
    """Shell completion of ``--device``."""
    return [d for d in (*DEVICE_CHOICES, "gpu", "npu") if d.startswith(incomplete)]


def resolve_device(device: str, engine: str = "torch") -> str:
    """The one rule for ``--device auto`` (docs/cli.md, "Devices"): the CUDA GPU when the engine
    that runs the model can use one here, else the CPU. ``engine``: ``torch`` (training,
    evaluation, the PyTorch backend, the benchmark's PyTorch rows) -> ``torch.cuda.is_available()``
    (CPU when torch is not installed); ``ort`` (onnxruntime) -> its CUDA execution provider is
    installed (onnxruntime-gpu; onnxruntime falls back to the CPU when no GPU answers);
    ``tensorrt`` -> cuda (an engine runs on its GPU); ``openvino`` and ``coreml`` -> cpu (their
    default device). Any other value is returned as given, for the library to check."""
    if device != "auto":
        return device
    if engine == "tensorrt":
        return "cuda"
    if engine in ("openvino", "coreml"):
        return "cpu"
    if engine == "ort":
        try:
            import onnxruntime as ort
        except ImportError:
            return "cpu"
        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


# Old spellings of renamed options: top-level command -> {old: new}. They still work (a note on
# stderr says what to write instead) and are hidden from --help and from docs/cli.md's table.
DEPRECATED_OPTIONS: dict[str, dict[str, str]] = {
    "benchmark": {"--json": "--report", "--method": "--fusion", "--norm": "--fusion-norm",
                  "--formula": "--fusion-formula", "-p": "--preset"},
    "stream": {"--quiet": "--no-progress", "-q": "--no-progress"},
    "evaluate": {"--batch-size": "--batch"},
    "simulate": {"--preset": "--data-preset"},
    "golden": {"--n": "--frames"},
}


def rewrite_deprecated(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` with the deprecated spellings of its command replaced by the current ones, and one
    note per replacement. Only option tokens before a ``--`` are touched (``--json=FILE`` too)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    table = DEPRECATED_OPTIONS.get(command or "", {})
    if not table:
        return list(argv), []
    out, notes = [], []
    for i, arg in enumerate(argv):
        if arg == "--":
            out.extend(argv[i:])
            break
        name, sep, value = arg.partition("=")
        new = table.get(name)
        if new is None:
            out.append(arg)
            continue
        notes.append(f"note: `{command} {name}` is deprecated; use {new}")
        out.append(f"{new}{sep}{value}" if sep else new)
    return out, notes


def engine_of(backend: str, model: str) -> str:
    """Which engine runs ``model`` (for ``--device auto``): the backend, or the one its suffix picks."""
    if backend != "auto":
        return backend
    from ..errors import PocusError
    from ..inference import backend_for

    try:
        return backend_for(model)
    except PocusError:  # an unknown suffix: the library says so when it opens the model
        return "ort"
