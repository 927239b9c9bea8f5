"""The core install: every `--help` works without the extras (torch, onnx, pydicom, ...), commands
are imported only when used, and a command that needs a missing extra names it in one line."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pocus_edge.commands import COMMANDS
from pocus_edge.extras import EXTRA_OF_MODULE

ROOT = Path(__file__).resolve().parents[1]

# Run inside a fresh interpreter in which every module an extra provides is unimportable, as on
# the core install (a meta-path finder refuses them before the real ones look).
BLOCKER = """
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))
ATTEMPTED = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            ATTEMPTED.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def run_blocked(body: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + body, json.dumps(sorted(EXTRA_OF_MODULE)), *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )


def test_every_help_works_without_any_extra():
    body = """
import contextlib, io
from pocus_edge.cli import main
from pocus_edge.commands import COMMANDS
results = {}
for argv in [[]] + [[c] for c in COMMANDS] + [["pretrain", "mim"], ["pretrain", "contrastive"], ["benchmark", "compare"], ["benchmark", "plot"]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--help"])
    results[" ".join(argv)] = [code, out.getvalue()]
print(json.dumps({"results": results, "attempted": sorted(set(ATTEMPTED))}))
"""
    proc = run_blocked(body)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["attempted"] == []  # no --help even tries to import an extra's module
    for argv, (code, text) in data["results"].items():
        assert code == 0, (argv, text)
        assert "Usage" in text, argv
        # A stand-in ("not installed") would mean the command module itself imports an extra.
        assert "not installed" not in text, (argv, text)
    listed = data["results"][""][1]
    for command in COMMANDS:
        assert re.search(rf"^\W*{command}\b", listed, re.M), f"{command} missing from --help"


def test_one_command_imports_only_its_own_module():
    body = """
from pocus_edge.cli import main
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    main(["stream", "--help"])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("pocus_edge.commands."))))
"""
    proc = run_blocked(body)
    assert proc.returncode == 0, proc.stderr
    # The command's own module, and the option vocabulary every command shares (light: no extras).
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["pocus_edge.commands.options", "pocus_edge.commands.runtime"]


@pytest.mark.parametrize(
    "argv, extra, module",
    [
        (["flops", "--preset", "tiny"], "train", "torch"),
        (["convert", "x.pth", "--out", "y.safetensors"], "train", "torch"),
    ],
)
def test_a_command_that_needs_a_missing_extra_says_which_in_one_line(argv, extra, module):
    proc = run_blocked("from pocus_edge.cli import main\nsys.exit(main(sys.argv[2:]))\n", *argv)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"`pocus-edge {argv[0]}` needs the '{extra}' extra ({module} is not installed)" in lines[0]
    assert f"pip install 'pocus-edge[{extra}]'" in lines[0]


def test_a_command_module_that_imports_an_extra_at_the_top_is_listed_and_names_the_extra(tmp_path):
    # A stand-in keeps --help whole when a command module cannot even be imported on this install.
    (tmp_path / "needs_torch.py").write_text("import torch\n\ndef register(app):\n    pass\n")
    body = """
import contextlib, io
import pocus_edge.commands as commands
commands.__path__.append(sys.argv[2])
commands.COMMANDS["needs-torch"] = "needs_torch"
from pocus_edge.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["--help"])
with contextlib.redirect_stderr(err):
    run = main(["needs-torch", "--anything"])
print(json.dumps([code, out.getvalue(), run, err.getvalue()]))
"""
    proc = run_blocked(body, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    code, listing, run, err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert code == 0 and re.search(r"needs-torch +\(not installed here: needs the 'train' extra\)", listing), listing
    assert "stream" in listing  # the other commands are still there
    assert run == 3 and "needs the 'train' extra (torch is not installed)" in err


def test_extras_map_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(extra: str, seen=()) -> set[str]:
        out = set()
        for req in extras[extra]:
            name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()
            if name == "pocus-edge":
                for sub in re.search(r"\[(.*)\]", req)[1].split(","):
                    if sub not in seen:
                        out |= names(sub.strip(), seen + (extra,))
            else:
                out.add(name)
        return out

    core = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert not any(n in core for n in ("torch", "timm", "onnx", "pydicom", "simpleitk", "pyigtl"))
    assert project["requires-python"] == ">=3.10"
    dists = importlib.metadata.packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        assert extra in extras, (module, extra)
        for dist in dists.get(module, []):  # installed here: its distribution must be in that extra
            assert dist.lower() in names(extra), (module, dist, extra)
    for extra in ("train", "export", "dicom", "coreml", "igtl"):
        assert names(extra) <= names("all") | core, extra


# Windows has no `resource`, `fcntl` or `termios`: no module may need them to import.
UNIX_ONLY = ("resource", "fcntl", "termios")


def test_every_module_imports_without_unix_only_modules():
    body = """
import importlib, pkgutil
for name in json.loads(sys.argv[2]):
    sys.modules[name] = None  # `import resource` now raises ImportError, as on Windows
import pocus_edge
failed = {}
names = sorted(m.name for m in pkgutil.walk_packages(pocus_edge.__path__, "pocus_edge.") if m.name != "pocus_edge.__main__")
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = [type(exc).__name__, getattr(exc, "name", None), str(exc)]
print(json.dumps({"modules": names, "failed": failed}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import json, sys\n" + body, "[]", json.dumps(UNIX_ONLY)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "pocus_edge.demo" in result["modules"] and "pocus_edge.benchmark.runner" in result["modules"]
    # A module an absent extra provides (TensorRT, Core ML, ...) may be missing here; nothing else may fail.
    failed = {name: why for name, why in result["failed"].items()
              if not (why[0] == "ModuleNotFoundError" and (why[1] or "").split(".")[0] in EXTRA_OF_MODULE)}
    assert not failed, failed


def test_the_demo_and_the_benchmark_measure_without_resource(monkeypatch):
    import time

    from pocus_edge import demo
    from pocus_edge.benchmark import runner

    monkeypatch.setitem(sys.modules, "resource", None)
    before = time.process_time()
    assert before <= demo._cpu_seconds() <= time.process_time()  # this process's CPU time, children unknown

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/statm")

    monkeypatch.setattr(runner, "open", no_proc, raising=False)
    with runner._RssSampler(interval=0.001) as sampler:
        pass
    assert runner._RssSampler.read() is None and sampler.delta is None  # unmeasured, not "0 bytes"
