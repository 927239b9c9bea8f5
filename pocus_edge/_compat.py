"""Standard-library features newer than the oldest supported Python (3.10, JetPack 6's)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

if hasattr(contextlib, "chdir"):  # Python >= 3.11
    chdir = contextlib.chdir
else:

    @contextlib.contextmanager
    def chdir(path: str | os.PathLike) -> Iterator[None]:
        """Run the block with ``path`` as the working directory (contextlib.chdir of 3.11)."""
        previous = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(previous)
