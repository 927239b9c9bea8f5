"""Typed configs and presets.

A *preset* fixes the model shape (``paper`` = TransUNet R50-ViT-B/16 at 224x224, exactly the
published network; ``small`` = CPU-trainable; ``tiny`` = unit tests) and the image size the
data pipeline resizes to. Stage hyperparameters default to docs/method.md (the paper / released
code) and every field can be overridden from the CLI (``--set key=value``) or a YAML file.

Values are validated and typed by pydantic against each field's annotation (one error contract:
:class:`ConfigError`, one line naming the field); fields with a fixed set of values are
``Literal`` types.
"""

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from .errors import ConfigError

# Fixed choices of config fields (the engine's OPTIMIZERS and SCHEDULES, the transforms'
# AUGMENTATIONS; tests/test_train.py checks that they agree).
Optimizer = Literal["adamw", "adam", "sgd"]
Schedule = Literal["cosine", "constant"]
Augmentation = Literal["none", "intensity", "standard"]


@dataclass
class ModelConfig:
    """Shape of one TransUNet branch (hybrid ResNetV2 + ViT encoder, cascaded upsampler)."""

    name: str = "paper"
    img_size: int = 224
    in_chans: int = 3
    # ResNetV2 (weight-standardized convs, GroupNorm): root conv to `resnet_width` channels,
    # stages of `resnet_layers` bottleneck units with 4*width, 8*width, 16*width output channels.
    resnet_width: int = 64
    resnet_layers: tuple[int, ...] = (3, 4, 9)
    # GroupNorm groups in the ResNetV2 (32 in timm/TransUNet; must divide resnet_width).
    gn_groups: int = 32
    # ViT on the 1/16 feature map (1x1 patch embedding -> hidden_size), learned position embeddings.
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    # Dropout on the embeddings and the MLP/projection outputs (released code: 0.1).
    dropout: float = 0.1
    # Decoder "cup": conv to decoder_head_channels, then upsample blocks with these outputs.
    decoder_head_channels: int = 512
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    # ReLU after the last decoder block, right before the 3x3 head (the released decoder). False:
    # the head reads the last block's BatchNorm output directly, so a gradient always reaches it.
    # With few channels there, a ReLU lets a random init encode bone as "every channel off", where
    # no gradient passes and the background pixels push the head's bias until the mask is empty
    # (docs/method.md, "Why the CPU presets have no ReLU before the head").
    decoder_final_relu: bool = True
    # Contrastive projection head: hidden_size -> proj_hidden -> proj_dim.
    proj_hidden: int = 768
    proj_dim: int = 128

    @property
    def grid_size(self) -> int:
        """Tokens per side: total encoder stride is 16 (root /2, pool /2, two strided stages)."""
        return self.img_size // 16


def _paper() -> ModelConfig:
    return ModelConfig()


def _small() -> ModelConfig:
    return ModelConfig(
        name="small",
        img_size=128,
        resnet_width=16,
        resnet_layers=(1, 2, 2),
        gn_groups=8,
        hidden_size=192,
        num_layers=4,
        num_heads=3,
        mlp_dim=384,
        # Thin decoder: on CPU the full-resolution convs cost per pixel, not per FLOP (16 channels in
        # the last block make a fine-tuning step 1.5x slower). No ReLU before the head: with 4
        # BN-ReLU channels some random inits encode bone as "all four off" and train to empty masks.
        decoder_head_channels=64,
        decoder_channels=(32, 16, 8, 4),
        decoder_final_relu=False,
        proj_hidden=192,
        proj_dim=64,
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        img_size=64,
        resnet_width=8,
        resnet_layers=(1, 1, 1),
        gn_groups=4,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        decoder_head_channels=32,
        decoder_channels=(16, 8, 8, 4),
        decoder_final_relu=False,  # see `small`
        proj_hidden=32,
        proj_dim=16,
    )


PRESETS = {"paper": _paper, "small": _small, "tiny": _tiny}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the named preset with ``overrides`` applied (unknown names/fields raise ConfigError)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return apply_overrides(cfg, overrides) if overrides else cfg


TOKEN_PIXELS = 16  # the encoder's total stride: one ViT token covers 16 x 16 input pixels


@dataclass
class MIMConfig:
    """SimMIM-style pretraining (docs/method.md, generative branch)."""

    # The paper masks a 7x7 grid of 32-px cells at 224 px, and the released code asserts that a
    # cell is a whole number of 16-px tokens. Cells are ceil(img_size / mask_grid) pixels rounded
    # to the nearest multiple of the token size (32 px at 224, 16 px at 128 and 64), so a masked
    # cell always covers whole tokens; ``mask_cell`` set to a number fixes the cell size instead
    # (it must be a multiple of 16 too).
    mask_grid: int = 7
    mask_cell: int | None = None
    mask_ratio: float = 0.6
    speckle_fraction: float = 0.2  # share of masked cells that get x + x*N(0,1) instead of 0
    # What reconstructs the image: ``decoder`` = the whole TransUNet (the released code, the
    # decoder is then thrown away); ``linear`` = SimMIM's light head, a 1x1 convolution from the
    # encoder's tokens to the 16x16 pixels of each token (pixel shuffle), so the pretext task
    # is solved by the encoder that fine-tuning keeps.
    head: Literal["decoder", "linear"] = "decoder"
    recipe: str = "default"  # the pretraining recipe (train/recipes.py): default | paper
    optimizer: Optimizer = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.05
    # False: no decay on norms, biases, position embeddings and tokens (the one optimizer rule);
    # True: decay on every parameter (the released code).
    decay_all_parameters: bool = False
    batch_size: int = 128
    epochs: int = 1200

    def cell_pixels(self, img_size: int) -> int:
        """Mask cell side in pixels at ``img_size``: ``mask_cell`` when set, else
        ceil(img_size / mask_grid) rounded to the nearest multiple of the 16-px token (at least
        one token): 32 px at 224, 16 px at 128 and at 64."""
        if self.mask_cell is not None:
            cell = int(self.mask_cell)
            if cell < TOKEN_PIXELS or cell % TOKEN_PIXELS:
                raise ConfigError(f"mask_cell={cell} must be a multiple of the {TOKEN_PIXELS}-px token")
            return cell
        if not 1 <= self.mask_grid <= img_size:
            raise ConfigError(f"mask_grid={self.mask_grid} must be in 1..img_size={img_size}")
        natural = -(-int(img_size) // int(self.mask_grid))
        return max(TOKEN_PIXELS, TOKEN_PIXELS * int(natural / TOKEN_PIXELS + 0.5))


@dataclass
class ContrastiveConfig:
    """Contrastive pretraining with MT-NXent (docs/method.md, contrastive branch)."""

    temperature: float = 0.5
    min_frame_gap: int = 15  # delta_t; 0 = plain NT-Xent (SimCLR)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: float = 0.4
    jitter_p: float = 0.8
    # Probe-nuisance augmentation of each view (pocus_edge.data.datasets.ProbeNuisance: PSF-like
    # blur, multiplicative speckle, gain, gamma), each step with this probability; 0 = the
    # released code's views (crop, flip, jitter only). What differs between two probes is what
    # the encoder should learn to ignore.
    nuisance_p: float = 0.5
    # BatchNorm in the projection head (Linear-BN-ReLU-Linear, as SimCLR's); False = the released
    # code's Linear-ReLU-Linear.
    projection_bn: bool = True
    recipe: str = "default"  # the pretraining recipe (train/recipes.py): default | paper
    optimizer: Optimizer = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.05
    decay_all_parameters: bool = False  # True: the released code's L2 on every parameter
    batch_size: int = 512  # pairs per global batch (1024 views)
    epochs: int = 400
    # 0: batches drawn uniformly from the whole split (the released code). k > 0: each batch
    # holds k frames of each of batch/k sampled videos, so MT-NXent's temporal mask has
    # same-video neighbours to remove (with uniform batches it removes almost none).
    frames_per_video: int = 0


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning with DiceBCE; also the lower/upper-bound baselines.

    The defaults are the ``default`` recipe at the ``paper`` preset; a recipe
    (:mod:`pocus_edge.train.recipes`) sets these fields by name, ``--set`` still wins.
    """

    recipe: str = "default"
    optimizer: Optimizer = "adamw"
    lr: float = 1e-4  # decoder and head; the encoder gets lr * encoder_lr_scale
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05
    # Encoder (embeddings + ResNet + ViT) learning rate as a fraction of the decoder's: one rule
    # for a random and a pretrained encoder alike.
    encoder_lr_scale: float = 0.1
    # False: no weight decay on norms, biases, position embeddings and tokens (decoupled decay
    # on the weights only); True: decay on every parameter (the released code).
    decay_all_parameters: bool = False
    # Linear-probe-then-fine-tune: the encoder's lr is held at 0 for this many first steps.
    decoder_only_steps: int = 0
    # Training-time augmentation of the labeled frames: none | standard (nnU-Net's scale and
    # intensity ranges, the default recipe's, the same for every arm) | intensity (probe-agnostic gain,
    # gamma, blur, noise and black level; pocus_edge.data.transforms.IntensityAugment).
    augment: Augmentation = "none"
    batch_size: int = 512
    epochs: int = 200


@dataclass
class DistillConfig:
    """Distillation of a compact student from the fused two-branch teacher
    (:mod:`pocus_edge.train.distill`).

    Per step: ``soft_weight`` x soft-label BCE between the student and the teacher's fused
    probabilities on ``batch_size`` unlabeled target frames, plus ``source_weight`` x DiceBCE on
    ``source_batch_size`` labeled source frames. ``epochs`` count passes over the target frames.
    The optimizer and schedule follow the ``default`` fine-tuning recipe (AdamW, decoupled decay
    off norms and biases, warm-up then cosine, no clipping), except that the student's encoder
    learns at the decoder's rate: it starts from random weights, so there is nothing to keep.
    """

    student: str = "mobilenetv3"  # a name of pocus_edge.models.students.STUDENTS
    optimizer: Optimizer = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05
    encoder_lr_scale: float = 1.0
    decay_all_parameters: bool = False
    soft_weight: float = 1.0
    source_weight: float = 1.0  # 0: the teacher's soft masks only (source frames still validate)
    # Weight each target pixel by the teacher's fusion confidence (the mean of the two branches'
    # normalized entropy confidences): pixels both branches are unsure of count less.
    confidence_weighting: bool = False
    source_batch_size: int | None = None  # None: the same as batch_size
    # Compute the teacher's soft masks of every target frame once, before training (the frames
    # are not augmented, so they do not change); False runs the teacher on every batch.
    teacher_cache: bool = True
    # Augmentation of the labeled source frames: none | intensity (as fine-tuning's).
    augment: Augmentation = "none"
    batch_size: int = 512
    epochs: int = 200


@dataclass
class TrainConfig:
    """Engine settings shared by every stage."""

    seed: int = 0
    schedule: Schedule = "cosine"
    warmup_epochs: int = 0
    # Warm-up as a share of the run's planned steps (the longer of this and warmup_epochs wins).
    warmup_fraction: float = 0.0
    grad_clip: float | None = 1.0
    amp: bool = True  # bf16 autocast on CUDA only
    grad_checkpointing: bool = False
    num_workers: int = 0
    log_every: int = 10
    max_steps: int | None = None  # stop early (tests, smoke runs)


# ---------------------------------------------------------------------------------------------
# Overrides and YAML round trip


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> type of a dataclass. Annotations written as strings (modules with
    ``from __future__ import annotations``) are resolved by ``typing.get_type_hints`` in the
    class's own module, never by evaluating text here."""
    return typing.get_type_hints(cls)


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


@functools.lru_cache(maxsize=None)
def _adapter(cls: type, name: str) -> pydantic.TypeAdapter:
    """The pydantic validator of field ``name`` of dataclass ``cls``."""
    return pydantic.TypeAdapter(_field_types(cls)[name])


def _type_name(annotation: Any) -> str:
    """A field's type in words: ``float``, ``int or none``, ``one of cosine, constant``, ``tuple of int``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if _is_union(origin):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "tuple of " + (_type_name(args[0]) if args else "values")
    return getattr(annotation, "__name__", str(annotation))


def _prepare(value: Any, annotation: Any, name: str) -> Any:
    """What pydantic cannot read on its own from a ``--set`` string or a YAML value: ``none`` /
    ``null`` for an optional field, ``32,16,8`` or ``(0.5, 1.0)`` for a tuple; and a YAML boolean
    given to a number field, which pydantic would take as 0 or 1, is refused."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    inner = [a for a in args if a is not type(None)] if _is_union(origin) else [annotation]
    if isinstance(value, str):
        if type(None) in args and value.strip().lower() in {"none", "null"}:
            return None
        if any(typing.get_origin(a) is tuple for a in inner):
            return [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
    if isinstance(value, bool) and bool not in inner and any(a in (int, float) for a in inner):
        raise ConfigError(f"{name}: cannot read {value!r} as {_type_name(annotation)} (a boolean is not a number)")
    return value


def _coerce(value: Any, cls: type, name: str) -> Any:
    """Validate and type one value of field ``name`` of ``cls`` with pydantic; ConfigError (one
    line naming the field) when it does not fit the field's annotation."""
    annotation = _field_types(cls)[name]
    prepared = _prepare(value, annotation, name)
    try:
        return _adapter(cls, name).validate_python(prepared)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = "".join(f"[{i}]" for i in error["loc"] if isinstance(i, int))
        raise ConfigError(f"{name}{where}: cannot read {value!r} as {_type_name(annotation)} ({error['msg']})") from None


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of dataclass ``cfg`` with ``overrides`` (field -> value) applied and typed."""
    known = {f.name for f in fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(
                f"unknown field {key!r} for {type(cfg).__name__}; known: {', '.join(sorted(known))}"
            )
        changes[key] = _coerce(value, type(cfg), key)
    return dataclasses.replace(cfg, **changes)


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """Parse CLI ``--set key=value`` items."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data dict (tuples become lists) suitable for YAML/JSON."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build ``cls`` from a dict, typing every value and refusing unknown keys."""
    return apply_overrides(cls(), data)


def save_yaml(cfg: Any, path: str | Path) -> None:
    from .io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump({"kind": type(cfg).__name__, **to_dict(cfg)}, sort_keys=False))


CONFIG_CLASSES = {c.__name__: c for c in (ModelConfig, MIMConfig, ContrastiveConfig, FinetuneConfig, DistillConfig,
                                           TrainConfig)}


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("kind") not in CONFIG_CLASSES:
        raise ConfigError(f"{p}: expected a mapping with 'kind' in {sorted(CONFIG_CLASSES)}")
    kind = data.pop("kind")
    try:
        return from_dict(CONFIG_CLASSES[kind], data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
