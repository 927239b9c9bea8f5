"""The model card: the JSON provenance record every checkpoint carries.

It proves which data a model saw (each site's name, role, manifest SHA-256 and the splits
read), how it was trained (preset, model shape, stage, hyperparameters), what it started
from (the init checkpoint's own card, nested) and which code made it.
"""

from __future__ import annotations

import functools
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .config import ModelConfig, to_dict

CARD_FORMAT = "pocus-edge/1"
STAGES = ("pretrain-mim", "pretrain-contrastive", "finetune", "baseline")
# What a stage did with a site: SSL read images only; supervised read images + masks.
ROLES = ("ssl-images-only", "supervised", "evaluation")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the checkout it runs from, when there is one
    (``0.1.0+g1a2b3c4d5e6f``, with ``.dirty`` if the package's files differ from that commit)."""
    pkg_dir = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=pkg_dir, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "--short=12", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return __version__
    version = f"{__version__}+g{head.stdout.strip()}"
    diff = git("diff", "--quiet", "HEAD", "--", str(pkg_dir))
    if diff is not None and diff.returncode == 1:
        version += ".dirty"
    return version


def site_entry(site, *, role: str, splits: Sequence[str]) -> dict[str, Any]:
    """One ``data`` item: which site (folder name and path), what was done with it, the SHA-256 of
    its manifest (so a changed manifest changes the card) and the split names read."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return {
        "site": site.name,
        "path": str(Path(site.root).resolve()),
        "role": role,
        "manifest_sha256": site.manifest_sha256(),
        "splits": list(splits),
    }


def build_card(
    *,
    preset: str,
    model: ModelConfig,
    out_channels: int,
    stage: str,
    hyperparameters: dict[str, Any],
    data: list[dict[str, Any]],
    init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card dict stored in every checkpoint's safetensors metadata (see the contracts)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return {
        "format": CARD_FORMAT,
        "preset": preset,
        "model": to_dict(model),
        "out_channels": int(out_channels),
        "stage": stage,
        "hyperparameters": dict(hyperparameters),
        "data": list(data),
        "init": init,
        "code_version": code_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# A student's checkpoint: "init" = random weights (benchmarks, export checks), "distill" = trained
# from the fused teacher's soft masks.
STUDENT_STAGES = ("init", "distill")
# Which network a student checkpoint holds: the training form (multi-branch blocks of a
# reparameterizable encoder, what training resumes from) or the fused inference form.
STUDENT_FORMS = ("training", "deployed")


def student_card(
    student_cfg,
    *,
    stage: str = "init",
    form: str = "training",
    gflops: float | None = None,
    hyperparameters: dict[str, Any] | None = None,
    data: list[dict[str, Any]] | None = None,
    teachers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card of a student checkpoint (``kind: student``): its ``StudentConfig`` (everything
    needed to rebuild it), the preset it was built at, which form the weights are in, GFLOPs per
    frame of its deployed form, and what it learned from (``teachers``: each teacher's own card)."""
    if stage not in STUDENT_STAGES:
        raise ValueError(f"student stage must be one of {STUDENT_STAGES}, got {stage!r}")
    if form not in STUDENT_FORMS:
        raise ValueError(f"student form must be one of {STUDENT_FORMS}, got {form!r}")
    return {
        "format": CARD_FORMAT,
        "kind": "student",
        "student": student_cfg.name,
        "preset": student_cfg.preset,
        "model": student_cfg.to_dict(),
        "out_channels": 1,
        "form": form,
        "stage": stage,
        "gflops_per_frame": gflops,
        "hyperparameters": dict(hyperparameters or {}),
        "data": list(data or []),
        "teachers": dict(teachers or {}),
        "init": None,
        "code_version": code_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def is_student_card(card: dict[str, Any] | None) -> bool:
    """Whether a checkpoint or export card describes a compact student."""
    if not isinstance(card, dict):
        return False
    model = card.get("model")
    return card.get("kind") == "student" or (isinstance(model, dict) and model.get("kind") == "student")


def sites_seen(card: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every ``data`` entry of a card and of the cards it was initialized from, oldest first."""
    if not card:
        return []
    return sites_seen(card.get("init")) + list(card.get("data", []))


# ---------------------------------------------------------------------------------------------
# The export card: what every exported artifact carries (ONNX metadata, OpenVINO rt_info, Core
# ML user metadata, or a JSON sidecar next to a TensorRT engine). Readers here need neither
# torch nor the exporter, so the runtime on a lean install reads and checks cards too.

CARD_KEY = "pocus_edge_card"
EXPORT_CARD_FORMAT = "pocus-edge-export/1"
EXPORT_INPUT_NAME = "frames"
# The optional per-frame risk output of an exported graph, (N, 1) float32, always the last output;
# its card entry ``risk`` holds the formula, the alarm threshold and the drift band
# (``{"formula": str, "threshold": float | None, "drift": DriftBand.to_dict() | None}``).
RISK_OUTPUT_NAME = "risk"


def export_card(
    model,
    *,
    precision: str = "fp32",
    batch: int | None = None,
    max_batch: int = 64,
    opset: int = 18,
    gflops: float | None = None,
    extra: dict[str, Any] | None = None,
    risk: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of an exported :class:`~pocus_edge.models.fused.ExportableSegmenter`
    (the fused pair or a single network): input spec, outputs, preprocessing, threshold, fusion
    settings, GFLOPs, precision, batch and the provenance of every network in it.

    A model with the risk output gets ``risk``: the given entry (formula, threshold and drift
    band from ``pocus-edge qualify``), else its formula with ``threshold`` and ``drift`` null."""
    import torch

    from .data.transforms import INTERPOLATION
    from .metrics import THRESHOLD

    cfg = model.cfg
    student = getattr(model, "kind", None) == "student"
    in_graph = ["uint8 -> float32 / 255", "repeat to 3 channels"] if model.uint8_input else []
    hashes = dict(getattr(model, "checkpoint_sha256", {}) or {})
    card: dict[str, Any] = {
        "format": EXPORT_CARD_FORMAT,
        "kind": model.kind,
        # A student's config names the network and the preset it was built at separately.
        "preset": getattr(cfg, "preset", None) if student else getattr(cfg, "name", None),
        "model": (cfg.to_dict() if student else to_dict(cfg)) if cfg is not None else None,
        "img_size": int(model.img_size),
        "input": {
            "name": EXPORT_INPUT_NAME,
            "dtype": "uint8" if model.uint8_input else "float32",
            "shape": ["batch" if batch is None else int(batch), *model.input_shape(1)[1:]],
            "layout": "NCHW",
            "range": "0..255" if model.uint8_input else "0..1",
        },
        "outputs": model.output_names(),
        "preprocessing": {
            "function": "pocus_edge.data.transforms.preprocess_gray" if model.uint8_input else "pocus_edge.data.transforms.preprocess_frame",
            "steps": [
                "grayscale uint8 frame",
                "zero-pad bottom/right to a square",
                f"resize to {model.img_size}x{model.img_size}",
                "scale to [0,1] (x/255)",
                "repeat to 3 channels",
                "no mean/std normalization",
            ],
            "interpolation": INTERPOLATION,
            "in_graph": in_graph,
        },
        "threshold": THRESHOLD,
        "fusion": model.fusion_settings,
        "gflops_per_frame": gflops,
        "precision": precision,
        "batch": {"dynamic": batch is None, "size": batch, "max": int(max_batch) if batch is None else int(batch)},
        "opset": int(opset),
        "branches": dict(getattr(model, "cards", {}) or {}),
        "provenance": {
            **{f"{name}_sha256": digest for name, digest in hashes.items()},
            "code_version": code_version(),
            "torch": torch.__version__.split("+")[0],
            "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        },
    }
    if getattr(model, "risk", False):
        card["risk"] = dict(risk) if risk is not None else {"formula": model.risk_formula, "threshold": None, "drift": None}
    if student:
        # What the app shows ("student mobilenetv3") and the form that was traced.
        card["student"] = cfg.name
        card["form"] = "deployed" if getattr(model.network, "reparameterized", False) else "training"
    if extra:
        card.update(extra)
    return card


def parse_card(text: str | None, source) -> dict[str, Any] | None:
    """A card from its JSON text (None when absent); ExportError naming ``source`` when invalid."""
    import json

    from .errors import ExportError

    if text is None:
        return None
    try:
        card = json.loads(text)
    except json.JSONDecodeError:
        raise ExportError(f"{source}: metadata {CARD_KEY!r} is not valid JSON") from None
    if not isinstance(card, dict):
        raise ExportError(f"{source}: metadata {CARD_KEY!r} is not a JSON object")
    return card


def sidecar_path(artifact: str | Path) -> Path:
    """``<artifact>.json``: where an artifact without a metadata field (a TensorRT engine) keeps
    its card."""
    p = Path(artifact)
    return p.with_name(p.name + ".json")


def write_sidecar(artifact: str | Path, card: dict[str, Any]) -> Path:
    """Write ``card`` next to ``artifact``, atomically."""
    from .io import write_json_atomic

    return write_json_atomic(sidecar_path(artifact), card)


def read_sidecar(artifact: str | Path) -> dict[str, Any] | None:
    """The card next to ``artifact``; None when there is none; ExportError when unreadable."""
    path = sidecar_path(artifact)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        from .errors import ExportError

        raise ExportError(f"{path}: cannot read the model card ({type(exc).__name__})") from None
    return parse_card(text, path)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (the one helper, :func:`pocus_edge.io.sha256_file`)."""
    from .io import sha256_file

    return sha256_file(path)


def check_artifact_card(card: dict[str, Any], io_spec: dict[str, Any], artifact: str | Path) -> None:
    """Refuse (ExportError, one line) a card that does not describe the artifact it sits next to.

    ``io_spec``: what the artifact itself declares, ``{"inputs": [{"name", "dtype", "shape"}],
    "outputs": [{"name", ...}], "sha256": optional}`` with -1 (or a name) for dynamic axes.
    Checked: the file hash when the card records one, the input name, dtype and (C, H, W), and
    the output names in order.
    """
    from .errors import ExportError

    where = sidecar_path(artifact).name
    recorded = (card.get("artifact") or {}).get("sha256")
    if recorded and io_spec.get("sha256") and recorded != io_spec["sha256"]:
        raise ExportError(f"{artifact}: the model card {where} was written for another file (SHA-256 differs); rebuild or re-export")
    inputs = io_spec.get("inputs") or []
    if len(inputs) != 1:
        raise ExportError(f"{artifact}: has {len(inputs)} inputs; a pocus-edge model has one ({where})")
    got, want = inputs[0], card.get("input") or {}
    if want.get("name") and got["name"] != want["name"]:
        raise ExportError(f"{artifact}: input is named {got['name']!r}, its card {where} says {want['name']!r}")
    if want.get("dtype") and got["dtype"] != want["dtype"]:
        raise ExportError(f"{artifact}: input dtype {got['dtype']}, its card {where} says {want['dtype']}")
    want_shape = [int(d) for d in (want.get("shape") or [])[1:]]
    got_shape = [int(d) if isinstance(d, int) else -1 for d in got["shape"][1:]]
    if want_shape and got_shape != want_shape:
        raise ExportError(f"{artifact}: input shape (C,H,W) {tuple(got_shape)}, its card {where} says {tuple(want_shape)}")
    out_names = [o["name"] for o in io_spec.get("outputs") or []]
    if card.get("outputs") and out_names != list(card["outputs"]):
        raise ExportError(f"{artifact}: outputs {out_names}, its card {where} says {list(card['outputs'])}")
