"""File systems that fail on purpose: a read-only folder and a tiny full-able tmpfs.

A tmpfs needs root (``id -u`` 0) and a working ``mount``; without them the test is skipped
with the reason printed. A read-only folder falls back to ``chmod 555`` for other users
(root ignores permission bits, so root gets a read-only tmpfs instead).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest


def _mount(point: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root (id -u is {os.geteuid()})")
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip()}")


@contextlib.contextmanager
def small_tmpfs(parent: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` bytes: writing more fails with ENOSPC (disk full)."""
    point = parent / f"tmpfs_{size}"
    point.mkdir()
    _mount(point, f"size={size},nr_inodes=1000,mode=0777")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@contextlib.contextmanager
def readonly_folder(parent: Path, fill: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A folder that cannot be written: a read-only tmpfs as root, ``chmod 555`` otherwise.
    ``fill(folder)`` writes its initial content before it turns read-only."""
    point = parent / "readonly"
    point.mkdir()
    if os.geteuid() == 0:
        _mount(point, "size=1m")
        try:
            if fill is not None:
                fill(point)
            r = subprocess.run(["mount", "-o", "remount,ro", str(point)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
            yield point
        finally:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        return
    if fill is not None:
        fill(point)
    point.chmod(0o555)
    try:
        yield point
    finally:
        point.chmod(0o755)
