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


def sites_seen(card: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every ``data`` entry of a card and of the cards it was initialized from, oldest first."""
    if not card:
        return []
    return sites_seen(card.get("init")) + list(card.get("data", []))
