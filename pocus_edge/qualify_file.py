"""The qualify file (``qualify.json``, written by ``pocus-edge qualify``) as its readers see it:
``export --qualify`` puts a model's risk threshold and drift band into the exported card, and
``stream --qualify`` uses them instead of the card's. One reader for both, so the writer and its
readers cannot drift apart. Standard library only: the lean runtime install imports it.

The part the readers use::

    {"schema": "pocus-edge-qualify/1",
     "models": {"NAME": {"risk": {"formula": "...", "threshold": 0.31, "drift": {...} or null}, ...}, ...}}

``models`` is keyed by model name, in ranking order; a list of ``{"name": ..., "risk": ...}``
objects is read the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DataError, PocusError

__all__ = ["SCHEMA", "read_qualify_risk"]

SCHEMA = "pocus-edge-qualify/1"


def read_qualify_risk(path: str | Path, model: str | None = None, *,
                      error: type[PocusError] = DataError) -> tuple[str, dict[str, Any]]:
    """``(model name, its risk object)`` from a qualify file: the single model, or the one named
    ``model``. ``error`` (one line naming the file; exit 2) for a missing or unreadable file, another
    schema, an ambiguous or unknown name, or a risk object without formula, threshold and drift."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: qualify file not found" + (" (a folder: give its qualify.json)" if path.is_dir() else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not a readable qualify file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise error(f"{path}: qualify schema {found!r}; this pocus-edge reads {SCHEMA!r} (rerun pocus-edge qualify)")
    models = data.get("models")
    if isinstance(models, dict):
        models = [{"name": k, **v} if isinstance(v, dict) else v for k, v in models.items()]
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise error(f"{path}: 'models' holds no model")
    names = [str(m.get("name")) for m in models]
    if model is None:
        if len(models) != 1:
            raise error(f"{path}: holds {len(models)} models ({', '.join(names)}); name one with --qualify-model")
        name, entry = names[0], models[0]
    else:
        matches = [m for n, m in zip(names, models) if n == model]
        if len(matches) != 1:
            raise error(f"{path}: {'no model' if not matches else f'{len(matches)} models'} named {model!r} "
                        f"(models: {', '.join(names)})")
        name, entry = model, matches[0]
    risk = entry.get("risk")
    if not isinstance(risk, dict):
        raise error(f"{path}: model {name!r} has no 'risk' object")
    missing = [k for k in ("formula", "threshold", "drift") if k not in risk]
    if missing:
        raise error(f"{path}: model {name!r}: the risk object has no {', '.join(repr(k) for k in missing)} field")
    return name, risk
