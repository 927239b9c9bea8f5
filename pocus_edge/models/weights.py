"""Checkpoint I/O: safetensors only, with the model card (JSON) in the file's metadata.

Loading is all-or-nothing: every missing key, unexpected key and shape mismatch is named in one
:class:`CheckpointError` before any tensor is copied, so a ``small`` checkpoint can never be
half-loaded into a ``paper`` model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from ..config import ModelConfig, from_dict
from ..errors import CheckpointError, PocusError
from ..io import write_bytes_atomic

__all__ = [
    "CARD_KEY",
    "save_checkpoint",
    "read_checkpoint",
    "check_checkpoint_path",
    "load_strict",
    "load_encoder",
    "build_segmenter",
    "save_student",
    "describe_mismatch",
]

CARD_KEY = "pocus_edge_card"
ENCODER_PREFIX = "encoder."
_SHOW = 4  # keys named per category in an error message (the count is always given)


def _tensors_of(state_dict_or_module: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    state = state_dict_or_module.state_dict() if isinstance(state_dict_or_module, nn.Module) else state_dict_or_module
    # safetensors refuses shared/non-contiguous storage; clone so every tensor owns its memory.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    path: str | os.PathLike,
    state_dict_or_module: Mapping[str, torch.Tensor] | nn.Module,
    card: dict[str, Any] | None,
) -> Path:
    """Write ``state_dict_or_module`` to ``path`` (safetensors, atomic) with ``card`` as JSON metadata."""
    metadata = {CARD_KEY: json.dumps(card if card is not None else {}, default=str)}
    data = safetensors_save(_tensors_of(state_dict_or_module), metadata=metadata)
    return write_bytes_atomic(path, data)


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """The one check of a checkpoint path every command shares, before anything is loaded:
    pickled weights refused, a folder is "is a directory", a missing file "no such checkpoint"."""
    p = Path(path)
    if p.suffix in {".pt", ".pth", ".ckpt", ".bin"}:
        raise CheckpointError(
            f"{p}: only .safetensors checkpoints are read (pickled weights are unsafe); "
            "convert the released code's .pth files with `pocus-edge convert`"
        )
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, expected a .safetensors file")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    return p


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(state_dict, card)`` of a checkpoint; the card is ``{}`` when the file has none.

    The file is opened with ``safetensors.safe_open`` (memory-mapped: the header is validated
    against the file size before any tensor is read, and each tensor is copied out once)."""
    p = check_checkpoint_path(path)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such checkpoint") from None
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{p}: not a readable safetensors file (truncated or corrupt: {reason})") from None
    card_text = metadata.get(CARD_KEY)
    if card_text is None:
        return state, {}
    try:
        card = json.loads(card_text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{p}: model card metadata is not valid JSON") from None
    return state, card if isinstance(card, dict) else {}


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def describe_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> str | None:
    """One-line description of how ``found`` differs from ``expected`` (keys and shapes), or None."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape)
    )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if shapes:
        details = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes]
        parts.append(f"{len(shapes)} shape mismatches ({_names(details)})")
    return "; ".join(parts) if parts else None


def _model_label(model: nn.Module) -> str:
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "net", None), "cfg", None)
    name = getattr(cfg, "name", None)
    if name and getattr(cfg, "encoder", None):  # a student: its name and the preset it was built at
        return f"{type(model).__name__}({name!r} at preset {getattr(cfg, 'preset', None)!r})"
    return f"{type(model).__name__}(preset {name!r})" if name else type(model).__name__


def _card_label(card: Mapping[str, Any]) -> str:
    preset = card.get("preset") or (card.get("model") or {}).get("name")
    return f" (checkpoint card: preset {preset!r}, stage {card.get('stage')!r})" if preset else ""


def load_strict(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load every tensor of ``path`` into ``model`` or nothing at all; return the model card."""
    state, card = read_checkpoint(path)
    _load_all(model, state, card, path)
    return card


def _load_all(model: nn.Module, state: dict[str, torch.Tensor], card: dict[str, Any], path: Any) -> None:
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"{path}: does not fit {_model_label(model)}{_card_label(card)}: {problem}")
    model.load_state_dict(state, strict=True)


def _encoder_module(model: nn.Module) -> nn.Module:
    if hasattr(model, "encoder"):
        return model.encoder
    if hasattr(model, "net") and hasattr(model.net, "encoder"):
        return model.net.encoder
    raise CheckpointError(f"{type(model).__name__} has no encoder to load weights into")


def load_encoder(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load only the ``encoder.*`` tensors of ``path`` (embeddings + ResNet + transformer), strictly.

    Other keys in the file (a decoder, a projection head) are ignored; the model's decoder keeps
    its current (random) weights. Returns the checkpoint's card.
    """
    state, card = read_checkpoint(path)
    encoder_state = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder_state:
        raise CheckpointError(f"{path}: holds no '{ENCODER_PREFIX}*' tensors, not an encoder checkpoint")
    encoder = _encoder_module(model)
    problem = describe_mismatch(encoder.state_dict(), encoder_state)
    if problem:
        raise CheckpointError(
            f"{path}: encoder does not fit {_model_label(model)}{_card_label(card)}: {problem}"
        )
    encoder.load_state_dict(encoder_state, strict=True)
    return card


def save_student(
    path: str | os.PathLike,
    student: nn.Module,
    *,
    stage: str = "init",
    **card_fields: Any,
) -> Path:
    """Save a :class:`~pocus_edge.models.students.StudentNet` with its student card
    (:func:`pocus_edge.card.student_card`): its config, the form its weights are in (training or
    reparameterized) and the GFLOPs per frame of its deployed form. ``card_fields``:
    ``hyperparameters``, ``data``, ``teachers``."""
    from ..card import student_card
    from .flops import student_size

    cfg = getattr(student, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not hasattr(cfg, "encoder"):
        raise CheckpointError(f"{path}: save_student takes a StudentNet, got {type(student).__name__}")
    form = "deployed" if getattr(student, "reparameterized", False) else "training"
    card = student_card(cfg, stage=stage, form=form, gflops=float(f"{student_size(cfg)['gflops']:.6g}"), **card_fields)
    return save_checkpoint(path, student, card)


def _build_student(path: Any, card: dict[str, Any]) -> nn.Module:
    """The StudentNet a student card describes, in the form its weights were saved in."""
    from .students import StudentNet, student_from_dict

    try:
        network = StudentNet(student_from_dict(card["model"]))
    except PocusError as exc:
        raise CheckpointError(f"{path}: student card describes an invalid network ({exc})") from None
    if card.get("form", "training") == "deployed":
        network = network.reparameterize()  # the fused structure the saved tensors belong to
    return network


def build_segmenter(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Build the network described by a checkpoint's card (a TransUNet branch, or a compact
    student when the card says ``kind: student``), load it strictly, and return
    ``(model in eval mode, card)``. A student comes back in the form it was saved in."""
    from ..card import is_student_card
    from .transunet import TransUNet

    state, card = read_checkpoint(path)
    if is_student_card(card):
        if not isinstance(card.get("model"), dict):
            raise CheckpointError(f"{path}: student card lacks 'model' (its StudentConfig); cannot rebuild the network")
        model = _build_student(path, card)
        _load_all(model, state, card, path)
        return model.to(device).eval(), card
    if not isinstance(card.get("model"), dict) or "out_channels" not in card:
        raise CheckpointError(f"{path}: model card lacks 'model' and 'out_channels'; cannot rebuild the network")
    try:
        cfg = from_dict(ModelConfig, card["model"])
        model = TransUNet(cfg, out_channels=int(card["out_channels"]))
    except PocusError as exc:
        raise CheckpointError(f"{path}: model card describes an invalid network ({exc})") from None
    _load_all(model, state, card, path)
    return model.to(device).eval(), card
