"""The README and docs/ cite only files that exist, `--help` cites only files that exist, and the
README's Python examples name functions and keyword arguments the package really has."""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# Documents that other parts of the documentation link to; each is written with its feature
# (streaming protocol, TensorRT, the method, the study). Until it is in the checkout it is
# reported as skipped, never silently accepted.
LINKED_DOCS_OF_OTHER_FEATURES = {"docs/streaming.md", "docs/tensorrt.md", "docs/method.md", "docs/study.md"}
REPO_PREFIXES = ("docs/", "benchmarks/", "android_demo/", "pocus_edge/", "tests/", ".ci/")
ROOT_FILES = ("LICENSE", "constraints.txt", "constraints-lean.txt", "pyproject.toml", "Makefile", "CHANGELOG.md", "CITATION.cff")


def cited_paths(doc: Path) -> set[str]:
    """Repository paths a Markdown file cites: relative link targets, and backticked paths that
    start in a repository folder or name a root file."""
    text = doc.read_text()
    cited = set()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        cited.add(str(path.relative_to(ROOT)))
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,;:")
        if token.startswith(REPO_PREFIXES) and "*" not in token and "<" not in token or token in ROOT_FILES:
            cited.add(token.rstrip("/"))
    return cited


def help_texts() -> dict[str, str]:
    from pocus_edge.cli import main
    from pocus_edge.commands import COMMANDS

    texts = {}
    for argv in [[]] + [[c] for c in COMMANDS] + [["pretrain", "mim"], ["pretrain", "contrastive"], ["benchmark", "compare"]]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*argv, "--help"]) == 0
        texts[" ".join(argv) or "pocus-edge"] = out.getvalue()
    return texts


def test_every_cited_file_exists():
    missing, pending = [], []
    for doc in DOCS:
        for path in sorted(cited_paths(doc)):
            if not (ROOT / path).exists():
                (pending if path in LINKED_DOCS_OF_OTHER_FEATURES else missing).append(f"{doc.name}: {path}")
    assert not missing, missing
    if pending:
        pytest.skip(f"linked documents not in this checkout: {pending}")


def test_help_cites_only_files_that_exist(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    cited = {}
    for command, text in help_texts().items():
        flat = " ".join(text.replace("│", " ").split())
        for path in re.findall(r"(?:docs|benchmarks|pocus_edge)/[\w./-]+\.(?:md|yaml|py|sh)|\b[A-Z]+\.md\b", flat):
            cited.setdefault(path, command)
    assert "METHOD.md" not in cited and "README.md" not in cited, cited
    missing = [f"{command}: {path}" for path, command in cited.items()
               if not (ROOT / path).exists() and path not in LINKED_DOCS_OF_OTHER_FEATURES]
    assert not missing, missing


def python_blocks(doc: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)], ids=lambda d: d.name)
def test_python_examples_name_real_functions_and_arguments(doc):
    for block in python_blocks(doc):
        tree = ast.parse(block)
        names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("pocus_edge"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
                func = names[node.func.id]
                args = [None] * len(node.args)
                kwargs = {kw.arg: None for kw in node.keywords if kw.arg}
                try:
                    inspect.signature(func).bind(*args, **kwargs)
                except TypeError as exc:
                    raise AssertionError(f"{doc.name}: {ast.unparse(node)}: {exc}") from None


def extras_table() -> dict[str, str]:
    """README's extras table: extra name ('(core)' for the core install) -> its 'adds' cell."""
    text = (ROOT / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and (re.fullmatch(r"`[a-z]+`", cells[0]) or cells[0] == "(core)"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]


def test_readme_extras_table_matches_pyproject():
    """Every extra of pyproject.toml has a row that names every package (or extra) it adds, and
    the core row names every core dependency: the table is what `pip install` really does."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    rows = extras_table()
    extras = project["optional-dependencies"]
    assert set(rows) == set(extras) | {"(core)"}, sorted(set(rows) ^ (set(extras) | {"(core)"}))

    def named(cell: str, word: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", cell, re.I) is not None

    missing = []
    for extra, requirements in [("(core)", project["dependencies"]), *extras.items()]:
        for requirement in requirements:
            name = requirement_name(requirement)
            if name == "pocus-edge":  # another extra: named as `extra`
                wanted = [f"`{sub.strip()}`" for sub in re.search(r"\[(.*)\]", requirement)[1].split(",")]
                missing += [f"{extra}: {w}" for w in wanted if w not in rows[extra]]
            elif not named(rows[extra], name):
                missing.append(f"{extra}: {name}")
    assert not missing, missing


def test_android_readme_names_the_sources_that_exist():
    readme = ROOT / "android_demo" / "README.md"
    named = set(re.findall(r"\b(\w+\.kt)\b", readme.read_text()))
    sources = {p.name for p in (ROOT / "android_demo").glob("*/src/main/kotlin/**/*.kt")}
    assert sources, "no Kotlin sources found"
    assert named - sources == set(), f"named but absent: {sorted(named - sources)}"
    assert sources - named == set(), f"not described: {sorted(sources - named)}"


def test_citation_and_changelog_carry_the_package_version():
    tomllib = pytest.importorskip("tomllib")
    import yaml

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["title"] == project["name"]
    assert str(citation["version"]) == project["version"] and citation["license"] == project["license"]
    assert "Zhou" in str(citation["preferred-citation"]["authors"])
    assert f"## [{project['version']}]" in (ROOT / "CHANGELOG.md").read_text()
