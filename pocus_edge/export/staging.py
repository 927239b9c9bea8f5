"""Staging folders for exports: every artifact is built in a hidden folder next to its final
name and moved into place only after its parity check passed, so a failed or interrupted
export never leaves a half-written or failing artifact under the final name, nor replaces a
good one.

Staging folders are :func:`pocus_edge.io.staging_dir` folders: removed on every exit the
process survives (return, exception, Ctrl-C, SIGTERM through the command line) and swept on
the next start when a ``kill -9`` left them behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .. import io

# Files that travel with an artifact: external weights of a big ONNX, an OpenVINO IR's weights,
# the model card sidecar of an engine.
COMPANION_SUFFIXES = (".data", ".bin", ".json")


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside ``final`` (same filesystem, so promotion is a rename), removed on
    exit. ``final`` may be a file or a folder artifact (a Core ML package): the caller checks it."""
    with io.staging_dir(final, check=False) as path:
        yield path.resolve()


def companions(path: Path) -> list[Path]:
    """The files that belong to ``path``: ``<name>.data`` / ``<name>.json`` and, for an
    OpenVINO IR ``x.xml``, ``x.bin``."""
    found = [path.with_name(path.name + s) for s in (".data", ".json")]
    if path.suffix == ".xml":
        found.append(path.with_suffix(".bin"))
    return [p for p in found if p.exists()]


def promote(staged: Path, final: Path) -> Path:
    """Move a staged artifact (and its companions, first) to ``final`` by rename. A directory
    artifact (a Core ML package) replaces an older package of the same name (moved aside first,
    so a crash in between leaves the old one for the next start's sweep to restore); a plain
    folder that is not an artifact of this kind is never replaced (the caller checks up front)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for part in companions(staged):
        target = final.with_suffix(".bin") if part.suffix == ".bin" and staged.suffix == ".xml" else final.with_name(final.name + part.name[len(staged.name):])
        os.replace(part, target)
    if staged.is_dir():
        old = None
        if final.exists():
            old = io.new_temp_name(final.parent, final.name, "old")
            os.replace(final, old)
        os.replace(staged, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    return final
