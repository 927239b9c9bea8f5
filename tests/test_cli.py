"""The command line: every command listed, user mistakes -> exit 2 with one line and no traceback,
and the data commands end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pocus_edge.cli import main
from pocus_edge.data.layout import FrameRecord, SiteWriter, load_site

COMMANDS = ["simulate", "import", "split", "pretrain", "finetune", "distill", "evaluate", "export", "stream", "benchmark", "flops", "demo"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "pocus_edge", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    listed = set()
    for line in result.stdout.splitlines():
        words = line.strip("│| ").split()
        if words:
            listed.add(words[0])
    missing = [c for c in COMMANDS if c not in listed]
    assert not missing, f"missing from --help: {missing}\n{result.stdout}"


@pytest.mark.parametrize(
    "args",
    [
        ("split", "{missing}", "--domain", "source"),
        ("import", "{missing}", "{tmp}/out"),
    ],
)
def test_missing_folder_exits_2_with_one_line(tmp_path, args):
    missing = tmp_path / "no_such_folder"
    result = run_cli(*(a.format(missing=missing, tmp=tmp_path) for a in args))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0] and "not found" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (("export", "--no-such-option"), "No such option: --no-such-option"),
        (("no-such-command",), "No such command 'no-such-command'"),
        (("benchmark", "--batch", "1", "--runs", "0"), "--runs"),
    ],
)
def test_usage_errors_exit_2_without_traceback(args, expected):
    # typer >= 0.22 raises its vendored click's exceptions, which are not click.ClickException:
    # main() must still turn them into click's short usage message.
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def _small_site(root, n_patients=8):
    writer = SiteWriter(root)
    img = np.zeros((6, 8), np.uint8)
    for p in range(n_patients):
        for f in range(3):
            writer.add(FrameRecord(f"P{p}_{f}.png", f"P{p}_v", f, patient=f"P{p}"), img, img if f != 1 else None)
    return writer.close()


def test_split_command(tmp_path, capsys):
    _small_site(tmp_path / "site")
    assert main(["split", str(tmp_path / "site"), "--domain", "source", "--seed", "4"]) == 0
    site = load_site(tmp_path / "site")
    patients = {s: {r.patient for r in site.records if r.split == s} for s in ("train", "val", "test")}
    assert [len(patients[s]) for s in ("train", "val", "test")] == [6, 1, 1]
    out = capsys.readouterr().out
    for name in ("train", "val", "test"):
        assert name in out
    # Target split on the same site: a labeled test patient, SSL train for the rest, ub_split set.
    assert main(["split", str(tmp_path / "site"), "--domain", "target"]) == 0
    site = load_site(tmp_path / "site")
    assert {r.split for r in site.records} == {"train", "test", ""}
    assert {r.ub_split for r in site.records if r.split == "train" and r.labeled} == {"train", "val"}


def test_split_command_refusals(tmp_path, capsys):
    _small_site(tmp_path / "site", n_patients=2)
    assert main(["split", str(tmp_path / "site"), "--domain", "source"]) == 2
    assert "only 2 patient(s)" in capsys.readouterr().err
    assert main(["split", str(tmp_path / "site"), "--domain", "sideways"]) == 2
    assert main(["split", str(tmp_path / "site"), "--domain", "source", "--source-fractions", "0.5,0.5"]) == 2
    assert load_site(tmp_path / "site").select(split="train") == [], "a refused split leaves the manifest alone"


def test_import_command(tmp_path, capsys):
    import cv2

    videos = tmp_path / "videos"
    videos.mkdir()
    writer = cv2.VideoWriter(str(videos / "P7_dorsal.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (16, 12), isColor=False)
    if not writer.isOpened():
        pytest.skip("OpenCV here cannot write MJPG video")
    for i in range(4):
        writer.write(np.full((12, 16), 40 * i, np.uint8))
    writer.release()
    assert main(["import", str(videos), str(tmp_path / "site"), "--patient-from", r"^(P\d+)_"]) == 0
    assert "4 frames" in capsys.readouterr().out
    site = load_site(tmp_path / "site")
    assert [r.patient for r in site.records] == ["P7"] * 4
    assert main(["import", str(videos), str(tmp_path / "other"), "--patient-from", "(unclosed"]) == 2
    assert "bad regular expression" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------
# One vocabulary (docs/cli.md): every option name listed once, choices, devices, exit codes

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"


def vocabulary() -> dict[str, int]:
    """docs/cli.md's option table: every name it lists (long names in the first column, short
    names and aliases in the second) -> its row. A name in two rows fails here."""
    text = CLI_DOC.read_text().split("## Every option", 1)[1]
    rows: dict[str, int] = {}
    for k, line in enumerate(l for l in text.splitlines() if l.startswith("| `-")):
        cells = line.split("|")
        names = re.findall(r"`(--?[a-z][a-z0-9-]*)`", cells[1]) + re.findall(r"`(--?[a-z][a-z0-9-]*)`", cells[2])
        for name in names:
            assert name not in rows, f"docs/cli.md lists {name} in two rows"
            rows[name] = k
    return rows


def all_options():
    """(command path, option) for every option of every command, the root's included."""
    import typer.main

    from pocus_edge.cli import app

    found = []

    def walk(command, path):
        ctx = type_context(command)
        for param in command.params:
            if param.param_type_name == "option":
                found.append((" ".join(path) or "pocus-edge", param))
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), path + [name])

    walk(typer.main.get_command(app), [])
    return found


def type_context(command):
    try:
        from typer._click import Context  # typer >= 0.22 vendors click
    except ImportError:  # pragma: no cover
        from click import Context
    return Context(command)


def test_every_option_name_is_in_the_vocabulary_once_and_means_one_thing():
    rows = vocabulary()
    used: set[str] = {"--help", "-h"}  # click adds the help option to every command
    problems = []
    for command, option in all_options():
        names = [*option.opts, *option.secondary_opts]
        used.update(names)
        missing = [n for n in names if n not in rows]
        if missing:
            problems.append(f"{command}: {missing} not in docs/cli.md")
        elif len({rows[n] for n in names}) != 1:
            problems.append(f"{command}: {names} are different options in docs/cli.md")
    assert not problems, problems
    stale = sorted(set(rows) - used)
    assert not stale, f"docs/cli.md lists names no command has: {stale}"


def test_the_vocabulary_rules_hold():
    options = all_options()
    by_name: dict[str, list] = {}
    for command, option in options:
        for name in [*option.opts, *option.secondary_opts]:
            by_name.setdefault(name, []).append((command, option))
    # --preset is never -p; -p is only --precision.
    assert all("-p" not in o.opts for _, o in by_name["--preset"])
    assert {tuple(o.opts) for _, o in by_name["-p"]} == {("--precision", "-p")}
    # --target is a site everywhere but export, whose --target is the format (alias --format).
    for command, option in by_name["--target"]:
        assert ("--format" in option.opts) == (command == "export"), command
    # One --device default rule, one progress switch, one way to pass the branch pair.
    assert {o.default for _, o in by_name["--device"]} == {"auto"}
    assert not {"--quiet", "-q", "--json-out", "--method", "--norm", "--formula"} & set(by_name)
    for command, option in by_name["--generative"]:
        assert option.opts == ["--generative", "-g"], command
    assert {c for c, _ in by_name["--generative"]} == {c for c, _ in by_name["--contrastive"]}
    # --batch-size trains, --batch infers.
    assert {c for c, _ in by_name["--batch-size"]} == {"pretrain mim", "pretrain contrastive", "finetune", "distill"}


def test_choices_are_the_library_registries():
    import importlib
    import typing

    from pocus_edge.commands import options as o
    from pocus_edge.config import PRESETS
    from pocus_edge.data.phantom import PRESETS as SIM_PRESETS
    from pocus_edge.data.transforms import AUGMENTATIONS
    from pocus_edge.export.formats import PRECISIONS, TARGETS
    from pocus_edge.models import fusion
    from pocus_edge.models.released import ENCODER_STAGES, SEGMENTER_STAGES
    from pocus_edge.models.students import student_names
    from pocus_edge.train.common import SPLIT_COLUMNS
    from pocus_edge.train.recipes import RECIPES

    def registry(attribute: str, *modules: str):
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AssertionError(f"no {attribute} in {modules}")

    args = typing.get_args
    assert args(o.Preset) == tuple(PRESETS) and set(args(o.DataPreset)) == set(SIM_PRESETS)
    assert args(o.ExportTarget) == TARGETS and args(o.Precision) == PRECISIONS
    assert (args(o.FusionMethod), args(o.FusionNorm), args(o.FusionFormula)) == (fusion.METHODS, fusion.NORMS, fusion.FORMULAS)
    assert [m.value for m in o.FusionMethodChoice] == list(fusion.METHODS)
    assert args(o.Backend) == registry("BACKENDS", "pocus_edge.inference", "pocus_edge.runtime.backends")
    assert set(args(o.Budget)) == set(registry("BUDGETS", "pocus_edge.study", "pocus_edge.study.plan", "pocus_edge.train.study"))
    assert args(o.Recipe) == tuple(RECIPES) and args(o.Augment) == AUGMENTATIONS
    assert args(o.SplitColumn) == SPLIT_COLUMNS and list(args(o.Student)) == student_names()
    assert args(o.ConvertStage) == SEGMENTER_STAGES + ENCODER_STAGES


def test_a_choice_outside_its_list_is_a_usage_error(capsys):
    assert main(["export", "-g", "a", "-c", "b", "-o", "x.onnx", "--format", "tflite"]) == 2
    err = capsys.readouterr().err
    assert "'tflite' is not one of 'onnx', 'openvino', 'tensorrt', 'coreml', 'ort'" in err and "Traceback" not in err


def test_device_auto_is_one_rule():
    from pocus_edge.commands.options import resolve_device

    torch = pytest.importorskip("torch")
    assert resolve_device("auto") == resolve_device("auto", "torch") == ("cuda" if torch.cuda.is_available() else "cpu")
    import onnxruntime

    expected_ort = "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    assert resolve_device("auto", "ort") == expected_ort
    assert (resolve_device("auto", "tensorrt"), resolve_device("auto", "openvino"), resolve_device("auto", "coreml")) == ("cuda", "cpu", "cpu")
    assert resolve_device("cuda:1", "ort") == "cuda:1" and resolve_device("npu", "openvino") == "npu"


def test_version_prints_the_package_version():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pocus-edge {version}"


def test_the_exit_code_table_is_the_documented_one():
    from pocus_edge.errors import CheckFailed, ExitCode, ExportError, ParityFailed, PocusError, ToolchainUnavailable
    from pocus_edge.extras import MissingExtra

    documented = {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", CLI_DOC.read_text(), re.M)}
    assert documented.keys() == {int(c) for c in ExitCode}
    assert PocusError("x").exit_code == ExitCode.USAGE == 2
    assert ParityFailed("x").exit_code == CheckFailed("x").exit_code == ExitCode.CHECK_FAILED == 1
    assert isinstance(ParityFailed("x"), ExportError)  # code that catches export errors still does
    assert ToolchainUnavailable("x").exit_code == MissingExtra("torch", "train").exit_code == ExitCode.UNAVAILABLE == 3


def test_a_failed_parity_check_exits_1():
    from pocus_edge.errors import ExitCode, ParityFailed
    from pocus_edge.export.parity import enforce

    report = {"passed": False, "artifact": "m.onnx", "precision": "fp32", "bar": {"metric": "max_abs_diff", "max": 1e-4},
              "max_abs_diff": 0.5, "frames": {"source": "random"}}
    with pytest.raises(ParityFailed, match="fp32 parity failed: max_abs_diff = 0.5") as info:
        enforce(report)
    assert info.value.exit_code == ExitCode.CHECK_FAILED
    enforce({**report, "passed": True})  # a passed report raises nothing


def test_a_benchmark_with_a_failed_row_exits_1(tmp_path):
    # A format time limit far below what the row needs: the row fails, the report still says why.
    report = tmp_path / "r.json"
    result = run_cli("benchmark", "--preset", "tiny", "--formats", "fused-fp32", "--batch", "1", "--runs", "3",
                     "--warmup", "0", "--max-frames", "1", "--threads", "1", "--format-timeout", "0.000001",
                     "--device", "cpu", "--report", str(report))
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    rows = json.loads(report.read_text())["rows"]
    assert [r["status"] for r in rows] == ["failed"]
    assert result.stderr.strip().splitlines()[-1] == "error: 1 of 1 benchmark rows failed: fused-fp32"


def test_renamed_options_keep_working_with_a_note(tmp_path):
    from pocus_edge.commands.options import rewrite_deprecated

    argv, notes = rewrite_deprecated(["benchmark", "--json=r.json", "--method", "margin", "-p", "tiny", "--", "--json"])
    assert argv == ["benchmark", "--report=r.json", "--fusion", "margin", "--preset", "tiny", "--", "--json"]
    assert len(notes) == 3 and "use --report" in notes[0]
    assert rewrite_deprecated(["flops", "--json"]) == (["flops", "--json"], [])  # flops --json is current
    result = run_cli("simulate", str(tmp_path / "sim"), "--preset", "nonsense")
    assert result.returncode == 2 and "`simulate --preset` is deprecated; use --data-preset" in result.stderr
    assert "'nonsense' is not one of" in result.stderr


def test_evaluate_fuses_the_branch_pair_only(capsys):
    assert main(["evaluate", "-d", "site", "-m", "a.safetensors", "-m", "b.safetensors", "--fusion", "entropy"]) == 2
    assert "--fusion fuses the branch pair: give exactly -g GEN -c CON" in capsys.readouterr().err
    assert main(["evaluate", "-d", "site"]) == 2
    assert "evaluate needs a model" in capsys.readouterr().err


def test_evaluate_labels_its_p_values_as_frames_of_one_run():
    from pocus_edge.metrics import summarize
    from pocus_edge.train.evaluate import WILCOXON_CAVEAT, EvaluationResult

    dice = {"a": np.array([0.5, 0.6, 0.7]), "b": np.array([0.4, 0.6, 0.9])}
    summaries = {n: summarize(d, d) for n, d in dice.items()}
    with_p = EvaluationResult("site", "test", ["a", "b"], [], dice, dice, summaries, {"a vs b": 0.5}).table()
    assert "frames of one run each" in with_p and WILCOXON_CAVEAT in with_p
    assert "training seeds" in WILCOXON_CAVEAT and "pocus-edge study" in WILCOXON_CAVEAT
    alone = EvaluationResult("site", "test", ["a"], [], dice, dice, {"a": summaries["a"]}, {}).table()
    assert WILCOXON_CAVEAT not in alone
