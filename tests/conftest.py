"""Shared pytest fixtures.

``tiny_sites``: the simulator's ``tiny`` preset (Lumify-like source, TeleMED-like target,
splits assigned), written once per test session into a temporary folder. Tests must treat
it as read-only; copy it (``shutil.copytree``) before changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(source_dir, target_dir)`` of ``simulate(tmp, preset="tiny", seed=0)``."""
    from pocus_edge.data.phantom import simulate

    root = tmp_path_factory.mktemp("tiny_sites")
    source, target = simulate(root, preset="tiny", seed=0, progress=False)
    return source.root, target.root
