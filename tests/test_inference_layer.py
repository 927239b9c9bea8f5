"""The layers import downwards only, and the runtime's modules form no import cycle.

Every module of the checked packages is parsed with ``ast`` (never imported), so an import
inside a function counts as much as one at the top: a lazy import of a layer above still ties
the lower layer to it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "pocus_edge"

# Layer -> the pocus_edge subpackages (or top-level modules) it must never import.
ORCHESTRATORS = ("study", "qualify", "commands", "cli", "demo", "__main__")
FORBIDDEN = {
    "inference": ("export", "runtime", "train", "benchmark", *ORCHESTRATORS),
    "runtime": ("export", "train", "benchmark", *ORCHESTRATORS),
    "models": ("train", "export", "inference", "runtime", "benchmark", *ORCHESTRATORS),
    "export": ("runtime", "train", "benchmark", *ORCHESTRATORS),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every pocus_edge module ``path`` imports, anywhere in the file. For
    ``from X import name`` both X and X.name are listed (name may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return {name for name in found if name == "pocus_edge" or name.startswith("pocus_edge.")}


def modules_of(layer: str) -> list[Path]:
    return sorted((PACKAGE_ROOT / layer).rglob("*.py"))


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_import_parser_sees_relative_lazy_and_absolute_imports(tmp_path, monkeypatch):
    """The parser itself: a relative import two levels up, an import inside a function and an
    absolute import are all found and resolved (else the layer test below would prove nothing)."""
    fake_root = tmp_path / "pocus_edge"
    (fake_root / "runtime").mkdir(parents=True)
    module = fake_root / "runtime" / "mod.py"
    module.write_text("from ..export import api\nfrom . import base\n"
                      "def later():\n    from ..train.engine import fit\n    import pocus_edge.demo\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE_ROOT", fake_root)
    found = imported_modules(module)
    assert {"pocus_edge.export", "pocus_edge.export.api", "pocus_edge.runtime.base", "pocus_edge.train.engine",
            "pocus_edge.demo"} <= found
    assert {layer_of(m) for m in found} >= {"export", "train", "demo", "runtime"}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_a_layer_above_it(layer):
    files = modules_of(layer)
    assert files, f"no modules under pocus_edge/{layer}"
    offences = []
    for path in files:
        for module in sorted(imported_modules(path)):
            if layer_of(module) in FORBIDDEN[layer]:
                offences.append(f"{path.relative_to(PACKAGE_ROOT.parent)} imports {module}")
    assert not offences, "\n".join(offences)


def runtime_graph() -> dict[str, set[str]]:
    """Module -> the runtime modules it imports (a package's ``__init__`` left out: it only
    gathers names for users, and every submodule import passes through it)."""
    names = {module_name(p) for p in modules_of("runtime")} - {"pocus_edge.runtime"}
    graph = {}
    for path in modules_of("runtime"):
        this = module_name(path)
        if this in names:
            graph[this] = {m for m in imported_modules(path) if m in names and m != this}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None; depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_runtime_modules_import_each_other_without_a_cycle():
    graph = runtime_graph()
    assert {"pocus_edge.runtime.pipeline", "pocus_edge.runtime.sources", "pocus_edge.runtime.igtl"} <= set(graph)
    # The modules that share the base types reach them through runtime.base, not through each other.
    assert "pocus_edge.runtime.base" in graph["pocus_edge.runtime.igtl"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


# ---------------------------------------------------------------------------------------------
# The one registry


def test_every_artifact_format_opens_through_a_registered_backend():
    """Each row of export's artifact table names a registered backend, and ``auto`` picks that
    backend for the row's file suffix: export, the benchmark and the runtime agree on it."""
    from pocus_edge.export.formats import ARTIFACTS
    from pocus_edge.inference import REGISTRY, backend_for

    for spec in ARTIFACTS.values():
        assert spec.backend in REGISTRY, spec.name
        assert backend_for(f"model{spec.suffix}") == spec.backend, spec.name
        assert spec.suffix in REGISTRY[spec.backend].suffixes


def test_benchmark_rows_are_the_benchmarked_rows_of_the_artifact_table():
    from pocus_edge.benchmark.formats import FORMATS
    from pocus_edge.export.formats import ARTIFACTS
    from pocus_edge.inference import REGISTRY

    exported = [name for name, spec in FORMATS.items() if spec.engine not in ("torch", "torch.compile")]
    assert exported == [f.name for f in ARTIFACTS.values() if f.benchmarked]
    for name in exported:
        row = next(f for f in ARTIFACTS.values() if f.name == name)
        assert FORMATS[name].engine == REGISTRY[row.backend].engine
        assert FORMATS[name].summary == row.summary and FORMATS[name].precision == row.precision


class _Recorder:
    """A stand-in backend class that records what it was opened with."""

    def __init__(self, path, **options):
        self.path, self.options = path, options


def test_a_new_backend_is_one_registry_row(monkeypatch):
    """A row added to the registry is opened by suffix with exactly the options it accepts; a
    hint it does not take (threads) is left out, an option it does not take is refused."""
    from pocus_edge.errors import PocusError
    from pocus_edge.inference import registry

    row = registry.BackendSpec("fake", _Recorder, (".fake",), ("device",), "fake-engine")
    monkeypatch.setitem(registry.REGISTRY, "fake", row)
    opened = registry.open_backend("model.fake", device="gpu", threads=3)
    assert isinstance(opened, _Recorder) and opened.options == {"device": "gpu"}
    assert registry.open_backend("model.fake", "fake").options == {"device": "cpu"}
    with pytest.raises(PocusError, match="--providers applies to the ort backend .onnxruntime., not fake"):
        registry.open_backend("model.fake", providers=["cpu"])
    with pytest.raises(PocusError, match="--precision applies to the openvino backend"):
        registry.open_backend("model.fake", precision="bf16")
    with pytest.raises(PocusError, match="cannot tell the backend from the suffix '.nope'.*fake"):
        registry.open_backend("model.nope")
    with pytest.raises(PocusError, match="unknown backend 'nope'"):
        registry.open_backend("model.fake", "nope")
