"""Checkpoints of the paper's released research code -> this project's safetensors.

The released code trains the TransUNet of its reference implementation (``VisionTransformer``
with a ``transformer`` = hybrid ResNetV2 embeddings + ViT encoder, a ``decoder`` "cup" and a
``segmentation_head``) and saves ``.pth`` pickles: either a bare ``state_dict`` (keys prefixed
``module.`` when the model was wrapped in DistributedDataParallel) or a training checkpoint
dict with the weights under ``model_state_dict``. Pretraining saves the ``transformer`` part
alone (keys ``embeddings.*`` / ``encoder.*``), with heads that fine-tuning does not use.

:func:`convert_released` reads such a file with ``torch.load(weights_only=True)`` (tensors and
plain containers only: no code in the pickle can run), renames every tensor to this project's
:class:`~pocus_edge.models.transunet.TransUNet` (the query/key/value projections are stacked
into the one ``qkv`` projection timm's attention uses), checks the result strictly against the
network its shapes describe, and writes a safetensors checkpoint whose model card records
where the weights came from.

The two implementations differ in a few fixed operations (see ``ARCHITECTURE_NOTES``), so a
converted model's probabilities are close to, not bit-identical with, the released code's:
evaluate it on your own labeled frames (``pocus-edge evaluate``) before relying on it.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig, model_preset, to_dict
from ..errors import CheckpointError

RELEASED_CODE = "CrossDomainPOCUS (the paper's released code), TransUNet R50-ViT-B/16 of its reference implementation"

# Fixed operations in which this project's TransUNet differs from the reference implementation
# the released code trains; recorded in every converted card.
ARCHITECTURE_NOTES = (
    "projection shortcut GroupNorm: reference normalizes each channel on its own, this project uses the stage's groups",
    "stem max-pool: reference pools 3x3/2 without padding (and zero-pads the skip maps), this project pads by 1",
    "decoder upsampling: reference bilinear with align_corners=True, this project align_corners=False",
    "weight standardization epsilon: reference 1e-5, this project 1e-6 (absorbed by the GroupNorm that follows)",
)

PREFIXES_TO_STRIP = ("module.", "_orig_mod.")
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")


@dataclass
class Converted:
    """What :func:`convert_released` made."""

    state: dict[str, torch.Tensor]
    kind: str  # "segmenter" (encoder + decoder + head) or "encoder"
    model: ModelConfig
    out_channels: int
    dropped: list[str] = field(default_factory=list)  # released keys with no counterpart (heads of pretraining)


# --- reading ----------------------------------------------------------------------------------


def load_released_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a released ``.pth``/``.pt`` file, unwrapped from a training checkpoint dict
    and stripped of DistributedDataParallel / torch.compile prefixes."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint" if not p.exists() else f"{p}: is a directory, expected a .pth file")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{p}: refused: the pickle holds more than tensors and plain containers ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint (truncated or corrupt: {first})") from None
    state = _find_state_dict(obj, p)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        for prefix in PREFIXES_TO_STRIP:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    if not out:
        raise CheckpointError(f"{p}: holds no tensors")
    return out


def _find_state_dict(obj: Any, path: Path) -> dict:
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(
        f"{path}: no state_dict found (expected tensors at the top level or under one of {', '.join(STATE_DICT_KEYS)})"
    )


# --- renaming ---------------------------------------------------------------------------------

_HYBRID = "transformer.embeddings.hybrid_model."
_RENAMES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"transformer\.embeddings\.hybrid_model\.root\.conv\.weight"), lambda m: "encoder.resnet.stem.conv.weight"),
    (re.compile(r"transformer\.embeddings\.hybrid_model\.root\.gn\.(weight|bias)"), lambda m: f"encoder.resnet.stem.norm.{m[1]}"),
    (
        re.compile(r"transformer\.embeddings\.hybrid_model\.body\.block(\d+)\.unit(\d+)\.conv([123])\.weight"),
        lambda m: f"encoder.resnet.stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.conv{m[3]}.weight",
    ),
    (
        re.compile(r"transformer\.embeddings\.hybrid_model\.body\.block(\d+)\.unit(\d+)\.gn([123])\.(weight|bias)"),
        lambda m: f"encoder.resnet.stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.norm{m[3]}.{m[4]}",
    ),
    (
        re.compile(r"transformer\.embeddings\.hybrid_model\.body\.block(\d+)\.unit(\d+)\.downsample\.weight"),
        lambda m: f"encoder.resnet.stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.downsample.conv.weight",
    ),
    (
        re.compile(r"transformer\.embeddings\.hybrid_model\.body\.block(\d+)\.unit(\d+)\.gn_proj\.(weight|bias)"),
        lambda m: f"encoder.resnet.stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.downsample.norm.{m[3]}",
    ),
    (re.compile(r"transformer\.embeddings\.patch_embeddings\.(weight|bias)"), lambda m: f"encoder.patch_embed.{m[1]}"),
    (re.compile(r"transformer\.embeddings\.position_embeddings"), lambda m: "encoder.pos_embed"),
    (re.compile(r"transformer\.encoder\.layer\.(\d+)\.attention_norm\.(weight|bias)"), lambda m: f"encoder.blocks.{m[1]}.norm1.{m[2]}"),
    (re.compile(r"transformer\.encoder\.layer\.(\d+)\.ffn_norm\.(weight|bias)"), lambda m: f"encoder.blocks.{m[1]}.norm2.{m[2]}"),
    (re.compile(r"transformer\.encoder\.layer\.(\d+)\.ffn\.(fc[12])\.(weight|bias)"), lambda m: f"encoder.blocks.{m[1]}.mlp.{m[2]}.{m[3]}"),
    (re.compile(r"transformer\.encoder\.layer\.(\d+)\.attn\.out\.(weight|bias)"), lambda m: f"encoder.blocks.{m[1]}.attn.proj.{m[2]}"),
    (re.compile(r"transformer\.encoder\.encoder_norm\.(weight|bias)"), lambda m: f"encoder.norm.{m[1]}"),
    # The decoder's module names are the same in both implementations.
    (re.compile(r"(decoder\.conv_more\.[01]\.\w+)"), lambda m: m[1]),
    (re.compile(r"(decoder\.blocks\.\d+\.conv[12]\.[01]\.\w+)"), lambda m: m[1]),
    (re.compile(r"segmentation_head\.0\.(weight|bias)"), lambda m: f"decoder.head.{m[1]}"),
]
_QKV = re.compile(r"transformer\.encoder\.layer\.(\d+)\.attn\.(query|key|value)\.(weight|bias)")


def rename_released(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Released key names -> this project's. Returns ``(renamed, kind, dropped keys)``; a
    pretraining checkpoint (``embeddings.*`` / ``encoder.*`` at the top) is read as the
    ``transformer`` part and gives ``kind == "encoder"``."""
    dropped: list[str] = []
    if not any(k.startswith("transformer.") for k in state) and any(k.startswith("embeddings.") for k in state):
        # Pretraining: the transformer at the top level; its heads (projection, reconstruction) are not kept.
        dropped = [k for k in state if not k.startswith(("embeddings.", "encoder."))]
        state = {f"transformer.{k}": v for k, v in state.items() if k.startswith(("embeddings.", "encoder."))}
    renamed: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _QKV.fullmatch(key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        for pattern, target in _RENAMES:
            match = pattern.fullmatch(key)
            if match:
                renamed[target(match)] = value
                break
        else:
            dropped.append(key)
    for (layer, kind), parts in sorted(qkv.items()):
        missing = [name for name in ("query", "key", "value") if name not in parts]
        if missing:
            raise CheckpointError(f"attention layer {layer}: {kind} of {', '.join(missing)} missing")
        # timm's fused projection: rows [q; k; v], each hidden_size wide.
        renamed[f"encoder.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if not any(k.startswith("encoder.") for k in renamed):
        raise CheckpointError("no tensor of the TransUNet encoder found (not a checkpoint of the released code?)")
    kind = "segmenter" if "decoder.head.weight" in renamed else "encoder"
    if kind == "encoder":
        dropped += [k for k in renamed if not k.startswith("encoder.")]
        renamed = {k: v for k, v in renamed.items() if k.startswith("encoder.")}
    return renamed, kind, sorted(dropped)


# --- shapes -> network ------------------------------------------------------------------------


def infer_model_config(state: dict[str, torch.Tensor]) -> tuple[ModelConfig, int]:
    """The network the renamed tensors describe, and its output channels (0 for an encoder).
    Numbers of attention heads are not in the weights: ViT's 64-wide heads are assumed, as in
    R50-ViT-B/16 (768 / 12)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"tensor {key!r} missing: cannot tell the network's shape")
        return tuple(state[key].shape)

    width = shape("encoder.resnet.stem.conv.weight")[0]
    layers = tuple(
        len({k.split(".")[5] for k in state if k.startswith(f"encoder.resnet.stages.{s}.blocks.")}) for s in range(3)
    )
    hidden = shape("encoder.patch_embed.weight")[0]
    n_tokens = shape("encoder.pos_embed")[1]
    grid = int(round(n_tokens ** 0.5))
    if grid * grid != n_tokens:
        raise CheckpointError(f"position embeddings for {n_tokens} tokens: not a square grid")
    num_layers = len({k.split(".")[2] for k in state if k.startswith("encoder.blocks.")})
    cfg = model_preset("paper")
    overrides: dict[str, Any] = dict(
        # The reference GroupNorms have 32 groups; narrower test networks get as many as divide.
        img_size=grid * 16, in_chans=shape("encoder.resnet.stem.conv.weight")[1], resnet_width=width,
        gn_groups=math.gcd(32, width),
        resnet_layers=layers, hidden_size=hidden, num_layers=num_layers, num_heads=max(1, hidden // 64),
        mlp_dim=shape("encoder.blocks.0.mlp.fc1.weight")[0],
    )
    out_channels = 0
    if "decoder.head.weight" in state:
        overrides["decoder_head_channels"] = shape("decoder.conv_more.0.weight")[0]
        overrides["decoder_channels"] = tuple(shape(f"decoder.blocks.{i}.conv1.0.weight")[0] for i in range(4))
        out_channels = shape("decoder.head.weight")[0]
    for name, value in overrides.items():
        setattr(cfg, name, value)
    if to_dict(cfg) != to_dict(model_preset("paper")):
        cfg.name = "released"
    return cfg, out_channels


def convert_released(path: str | os.PathLike) -> Converted:
    """Read, rename and check a released checkpoint (nothing is written)."""
    from .transunet import HybridEncoder, TransUNet
    from .weights import describe_mismatch

    p = Path(path)
    renamed, kind, dropped = rename_released(load_released_state(p))
    try:
        cfg, out_channels = infer_model_config(renamed)
        target = TransUNet(cfg, out_channels=out_channels) if kind == "segmenter" else None
        expected = target.state_dict() if target is not None else {f"encoder.{k}": v for k, v in HybridEncoder(cfg).state_dict().items()}
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None
    except Exception as exc:  # a network that cannot be built from these shapes (ConfigError, ...)
        raise CheckpointError(f"{p}: its tensors describe no TransUNet this project can build ({str(exc).splitlines()[0]})") from None
    problem = describe_mismatch(expected, renamed)
    if problem:
        raise CheckpointError(f"{p}: does not map onto the TransUNet its shapes describe: {problem}")
    # Buffers the released code does not store keep the fresh network's values.
    state = {k: renamed[k].detach().contiguous() for k in expected}
    return Converted(state=state, kind=kind, model=cfg, out_channels=out_channels, dropped=dropped)


def origin_card(path: str | os.PathLike, converted: Converted) -> dict[str, Any]:
    """The ``origin`` entry of a converted checkpoint's card."""
    p = Path(path)
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "converted_from": RELEASED_CODE,
        "file": p.name,
        "sha256": digest.hexdigest(),
        "kind": converted.kind,
        "dropped_keys": converted.dropped,
        "architecture_notes": list(ARCHITECTURE_NOTES),
        "data_note": "trained outside this project: the sites it saw are not recorded in this card",
    }


SEGMENTER_STAGES = ("finetune", "baseline")
ENCODER_STAGES = ("pretrain-mim", "pretrain-contrastive")


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, stage: str | None = None, overwrite: bool = False
) -> tuple[Converted, dict[str, Any]]:
    """Convert the released checkpoint ``src`` into the safetensors checkpoint ``dst`` (written
    atomically; an existing ``dst`` is kept unless ``overwrite``). ``stage`` labels the card:
    ``finetune`` (default) or ``baseline`` for a segmenter, ``pretrain-mim`` or
    ``pretrain-contrastive`` for an encoder (required there: the file does not say which).
    Returns the conversion and the card written."""
    from ..card import build_card
    from .weights import save_checkpoint

    dst = Path(dst)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: is a directory; --out names the .safetensors file to write")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists; pass --overwrite to replace it")
    converted = convert_released(src)
    allowed = SEGMENTER_STAGES if converted.kind == "segmenter" else ENCODER_STAGES
    if stage is None:
        if converted.kind == "encoder":
            raise CheckpointError(
                f"{src}: holds a pretrained encoder only; pass --stage pretrain-mim (generative branch) "
                "or --stage pretrain-contrastive"
            )
        stage = "finetune"
    if stage not in allowed:
        raise CheckpointError(f"{src}: a {converted.kind} checkpoint takes --stage {' or '.join(allowed)}, not {stage!r}")
    card = build_card(
        preset=converted.model.name, model=converted.model, out_channels=converted.out_channels, stage=stage,
        hyperparameters={}, data=[],
    )
    card["origin"] = origin_card(src, converted)
    save_checkpoint(dst, converted.state, card)
    return converted, card
