"""The layers below the study never import it: `pocus_edge.study` composes training, models and
data, so an import of it from there would be a cycle waiting to happen (and would pull the
orchestrator into the runtime's lean install)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pocus_edge

PACKAGE = Path(pocus_edge.__file__).parent
BELOW_THE_STUDY = ("train", "models", "data", "runtime")


def imported_modules(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names, as an absolute dotted name (relative
    imports resolved against the file's own package), with ``from X import Y`` giving X and X.Y."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def imports_the_study(path: Path) -> list[str]:
    return [m for m in imported_modules(path) if m == "pocus_edge.study" or m.startswith("pocus_edge.study.")]


@pytest.mark.parametrize("layer", BELOW_THE_STUDY)
def test_no_layer_below_the_study_imports_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"{PACKAGE / layer}: no modules found"
    offenders = {str(f.relative_to(PACKAGE.parent)): imports_the_study(f) for f in files}
    assert not {f: m for f, m in offenders.items() if m}


@pytest.mark.parametrize("source, where, expected", [
    ("from ..study import run_study\n", "train/x.py", ["pocus_edge.study", "pocus_edge.study.run_study"]),
    ("from ...study.arms import ARMS\n", "train/sub/x.py", ["pocus_edge.study.arms", "pocus_edge.study.arms.ARMS"]),
    ("from .. import study\n", "models/x.py", ["pocus_edge.study"]),
    ("from . import study\n", "__init__.py", ["pocus_edge.study"]),
    ("import pocus_edge.study.report as r\n", "data/x.py", ["pocus_edge.study.report"]),
    ("def f():\n    from pocus_edge.study import Study\n", "runtime/x.py", ["pocus_edge.study", "pocus_edge.study.Study"]),
    ("from ..train import study_helpers\nfrom .study import x\nimport pocus_edge.studying\n", "data/x.py", []),
])
def test_the_check_sees_every_spelling_of_the_import(tmp_path, monkeypatch, source, where, expected):
    """The checker itself, on planted files: absolute, relative (one or more levels), a nested
    import inside a function, and names that merely start like the study's are not it."""
    root = tmp_path / "pocus_edge"
    path = root / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", root)
    assert imports_the_study(path) == expected
