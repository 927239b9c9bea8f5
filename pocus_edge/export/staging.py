"""Staging folders for exports: every artifact is built in a hidden folder next to its final
name and moved into place only after its parity check passed, so a failed or interrupted
export never leaves a half-written or failing artifact under the final name, nor replaces a
good one.

Staging folders are named ``.pocus-staging-<final name>.<random>`` (a pattern a sweep on the
next start can recognise) and are removed on every exit the process survives: normal return,
an exception, Ctrl-C, and SIGTERM (turned into SystemExit while an export runs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

STAGING_PREFIX = ".pocus-staging-"
# Files that travel with an artifact: external weights of a big ONNX, an OpenVINO IR's weights,
# the model card sidecar of an engine.
COMPANION_SUFFIXES = (".data", ".bin", ".json")


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside ``final`` (same filesystem, so promotion is a rename), removed on exit."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{final.name}.", dir=final.parent)).resolve()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def companions(path: Path) -> list[Path]:
    """The files that belong to ``path``: ``<name>.data`` / ``<name>.json`` and, for an
    OpenVINO IR ``x.xml``, ``x.bin``."""
    found = [path.with_name(path.name + s) for s in (".data", ".json")]
    if path.suffix == ".xml":
        found.append(path.with_suffix(".bin"))
    return [p for p in found if p.exists()]


def promote(staged: Path, final: Path) -> Path:
    """Move a staged artifact (and its companions, first) to ``final`` by rename. A directory
    artifact (a Core ML package) replaces an older package of the same name; a plain folder
    that is not an artifact of this kind is never replaced (the caller checks up front)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for part in companions(staged):
        target = final.with_suffix(".bin") if part.suffix == ".bin" and staged.suffix == ".xml" else final.with_name(final.name + part.name[len(staged.name):])
        os.replace(part, target)
    if staged.is_dir():
        old = None
        if final.exists():
            old = final.with_name(f"{STAGING_PREFIX}{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staged, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    return final


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM raises SystemExit(143), so ``finally``
    blocks (staging cleanup) run as they do for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
