"""Outputs never destroy what they did not create, never half-write, never litter, and every
write failure (a folder in the way, read-only, full disk) is one line naming the file, exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _fs import readonly_folder, small_tmpfs

from pocus_edge import io
from pocus_edge.cli import main
from pocus_edge.errors import OutputError


def _precious_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "log.csv").write_text("step,loss\n")
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _litter(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith(".old")]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- a folder where a file is expected: refused, kept -----------------------------------------------


@pytest.mark.parametrize("writer", ["json", "bytes", "atomic_path"])
def test_a_file_write_onto_an_existing_folder_is_refused_and_the_folder_kept(tmp_path, writer):
    # The data-loss bug: the folder at the output path was moved aside, replaced and deleted.
    run = _precious_folder(tmp_path / "runs" / "ft_mim")
    before = _snapshot(run)
    with pytest.raises(OutputError, match="is a folder"):
        if writer == "json":
            io.write_json_atomic(run, {"frames": 1})
        elif writer == "bytes":
            io.write_bytes_atomic(run, b"x")
        else:
            with io.atomic_path(run) as tmp:
                tmp.write_bytes(b"x")
    assert run.is_dir() and _snapshot(run) == before
    assert _litter(run.parent) == []


def test_preflight_checks_name_the_problem(tmp_path):
    folder = _precious_folder(tmp_path / "masks.npz")
    afile = tmp_path / "masks"
    afile.write_text("not a folder")
    with pytest.raises(OutputError, match=r"masks\.npz: is a folder"):
        io.check_output_file(folder)
    with pytest.raises(OutputError, match=r"masks: is a file; the output folder must be a folder"):
        io.check_output_dir(afile)
    with pytest.raises(OutputError, match=r"is a file, not a folder"):
        io.check_output_file(afile / "sub" / "report.json")
    with pytest.raises(OutputError, match=r"is a file, not a folder"):
        io.check_output_dir(afile / "run")
    assert io.check_output_file(tmp_path / "new" / "report.json") == tmp_path / "new" / "report.json"
    assert io.check_output_dir(folder) == folder


def test_folder_outputs_replace_only_their_own_kind(tmp_path):
    def make(tmp: Path, name: str) -> None:
        tmp.mkdir()
        (tmp / "Manifest.json").write_text(name)

    is_package = lambda p: (p / "Manifest.json").is_file()  # noqa: E731
    pkg = tmp_path / "model.mlpackage"
    with io.atomic_path(pkg, kind="dir", replaces=is_package) as tmp:
        make(tmp, "v1")
    with io.atomic_path(pkg, kind="dir", replaces=is_package) as tmp:
        make(tmp, "v2")
    assert (pkg / "Manifest.json").read_text() == "v2" and _litter(tmp_path) == []
    foreign = _precious_folder(tmp_path / "other.mlpackage")
    with pytest.raises(OutputError, match="not one this command writes"):
        with io.atomic_path(foreign, kind="dir", replaces=is_package) as tmp:
            make(tmp, "v1")
    assert _snapshot(foreign) == {"log.csv": b"step,loss\n", "model.safetensors": b"weights"}
    afile = tmp_path / "file.mlpackage"
    afile.write_text("keep")
    with pytest.raises(OutputError, match="is a file"):
        with io.atomic_path(afile, kind="dir", replaces=is_package) as tmp:
            make(tmp, "v1")
    assert afile.read_text() == "keep" and _litter(tmp_path) == []


def test_stream_report_onto_a_run_folder_exits_2_before_any_work(tmp_path, capsys):
    run = _precious_folder(tmp_path / "runs" / "ft_mim")
    before = _snapshot(run)
    # The model does not even exist: the outputs are checked before anything is opened.
    rc = main(["stream", str(tmp_path / "frames"), "--model", str(tmp_path / "no.onnx"), "--report", str(run), "--no-progress"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert str(run) in line and "is a folder" in line
    assert _snapshot(run) == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["stream", "{src}", "--model", "{model}", "--masks", "{file}"], "is a file"),
        (["stream", "{src}", "--model", "{model}", "--masks", "{folder}.npz"], "is a folder"),
        (["stream", "{src}", "--model", "{model}", "--overlay", "{model}"], "would overwrite an input"),
        (["finetune", "--data", "{src}", "--out", "{file}", "--preset", "tiny"], "is a file"),
        (["pretrain", "mim", "--data", "{src}", "--out", "{file}/run", "--preset", "tiny"], "is a file, not a folder"),
        (["export", "-g", "{model}", "-c", "{model}", "--out", "{folder}.onnx"], "is a folder"),
        (["simulate", "{file}", "--data-preset", "tiny"], "is a file"),
    ],
)
def test_a_file_where_a_folder_goes_and_the_reverse_exit_2_with_one_line(tmp_path, capsys, args, fragment):
    (tmp_path / "src").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "afile").write_text("user data")
    folder = _precious_folder(tmp_path / "folder.npz") if "{folder}.npz" in args else None
    folder = _precious_folder(tmp_path / "folder.onnx") if "{folder}.onnx" in args else folder
    fmt = dict(src=tmp_path / "src", model=tmp_path / "model.onnx", file=tmp_path / "afile", folder=tmp_path / "folder")
    rc = main([a.format(**fmt) for a in args])
    assert rc == 2
    line = _one_error_line(capsys)
    assert fragment in line, line
    assert (tmp_path / "afile").read_text() == "user data"
    if folder is not None:
        assert _snapshot(folder) == {"log.csv": b"step,loss\n", "model.safetensors": b"weights"}


# -- temporaries: removed on every exit the process survives, swept after kill -9 -------------------


def test_a_failed_write_leaves_no_temporary_and_keeps_the_previous_copy(tmp_path):
    target = tmp_path / "report.json"
    io.write_json_atomic(target, {"v": 1})
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with io.atomic_path(target) as tmp:
                tmp.write_text("half")
                raise exc
    assert json.loads(target.read_text()) == {"v": 1}
    assert _litter(tmp_path) == []
    with pytest.raises(RuntimeError):
        with io.staging_dir(tmp_path / "model.onnx") as stage:
            (stage / "raw.onnx").write_bytes(b"x")
            raise RuntimeError("export failed")
    assert _litter(tmp_path) == []


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True, env=env, **kw)


def _wait_for_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, "child printed nothing"
    return line


def test_temporaries_of_a_killed_writer_are_swept_on_the_next_start(tmp_path):
    child = _python(
        """
        import sys, time
        from pocus_edge import io
        ctx = io.atomic_path(sys.argv[1] + "/model.onnx")
        tmp = ctx.__enter__()
        open(tmp, "w").write("half")
        stage_ctx = io.staging_dir(sys.argv[1] + "/engine")
        stage = stage_ctx.__enter__()
        print(tmp, flush=True)
        time.sleep(60)
        """,
        str(tmp_path),
    )
    tmp = Path(_wait_for_line(child))
    alive = _python("import time; print('up', flush=True); time.sleep(60)")
    _wait_for_line(alive)
    # A temporary of a process that is still alive must survive the sweep.
    alive_tmp = tmp_path / f".other.json.p{alive.pid}h{io._host_id()}.abcd1234.tmp.json"
    alive_tmp.write_text("in progress")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("user file")
    child.send_signal(signal.SIGKILL)
    child.wait()
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".engine.") and p.is_dir()]
    assert tmp.exists() and len(staged) == 1  # kill -9 leaves them behind
    try:
        io.write_json_atomic(tmp_path / "report.json", {"ok": True})  # the next start in this folder
        remaining = sorted(_litter(tmp_path))
        assert remaining == sorted([alive_tmp.name, unrelated.name])
    finally:
        alive.kill()
        alive.wait()


def test_a_folder_moved_aside_is_restored_when_its_replacement_never_arrived(tmp_path):
    dead = _python("print('x')")
    dead.communicate()
    old = tmp_path / f".model.mlpackage.p{dead.pid}h{io._host_id()}.0badc0de.old"
    old.mkdir()
    (old / "Manifest.json").write_text("v1")
    restored = io.sweep_stale_temps(tmp_path, force=True)
    assert restored == [tmp_path / "model.mlpackage"]
    assert (tmp_path / "model.mlpackage" / "Manifest.json").read_text() == "v1"


def test_temporaries_are_removed_at_exit_and_on_sigterm_through_the_cli(tmp_path):
    # Normal interpreter exit with a temporary still open (a writer that never closed it).
    child = _python(
        """
        import sys
        from pocus_edge import io
        ctx = io.atomic_path(sys.argv[1] + "/video.mp4")  # like a video sink: entered, never exited
        tmp = ctx.__enter__()
        open(tmp, "w").write("frames")
        print(tmp, flush=True)
        """,
        str(tmp_path),
    )
    tmp = Path(_wait_for_line(child))
    assert child.wait() == 0 and not tmp.exists()
    # SIGTERM while a command writes: the CLI turns it into a clean exit (143), nothing left.
    child = _python(
        """
        import sys, time, typer
        from pocus_edge import cli, io

        @cli.app.command("slow-write")
        def slow_write(out: str) -> None:
            with io.atomic_path(out) as tmp:
                open(tmp, "w").write("half")
                print(tmp, flush=True)
                time.sleep(60)

        sys.exit(cli.main(["slow-write", sys.argv[1] + "/masks.npz"]))
        """,
        str(tmp_path),
        stderr=subprocess.PIPE,
    )
    tmp = Path(_wait_for_line(child))
    assert tmp.exists()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 143
    assert "terminated" in child.stderr.read()
    assert _litter(tmp_path) == [] and not (tmp_path / "masks.npz").exists()


# -- read-only and full disk: one line naming the file, exit 2, nothing half-written --------------


def test_read_only_output_is_refused_with_one_line(tmp_path, capsys):
    with readonly_folder(tmp_path, fill=lambda d: (d / "report.json").write_text('{"v": 1}')) as ro:
        with pytest.raises(OutputError, match=r"report\.json: cannot write .*(read-only file system|permission denied)"):
            io.check_output_file(ro / "report.json")
        with pytest.raises(OutputError, match="(read-only file system|permission denied)") as err:
            io.write_json_atomic(ro / "report.json", {"v": 2})
        assert err.value.exit_code == 2 and isinstance(err.value, OSError)
        assert (ro / "report.json").read_text() == '{"v": 1}'
        for args in (
            ["stream", str(tmp_path), "--model", str(tmp_path / "m.onnx"), "--report", str(ro / "report.json")],
            ["stream", str(tmp_path), "--model", str(tmp_path / "m.onnx"), "--masks", str(ro / "masks")],
            ["finetune", "--data", str(tmp_path), "--out", str(ro / "run"), "--preset", "tiny"],
            ["simulate", str(ro / "sim"), "--data-preset", "tiny"],
            ["export", "-g", "g", "-c", "c", "--out", str(ro / "model.onnx")],
        ):
            assert main(args) == 2, args
            line = _one_error_line(capsys)
            assert str(ro) in line and ("read-only" in line or "permission denied" in line), line
        assert sorted(p.name for p in ro.iterdir()) == ["report.json"]


def test_full_disk_is_one_line_and_keeps_the_previous_copy(tmp_path):
    with small_tmpfs(tmp_path, "64k") as disk:
        target = disk / "checkpoint.bin"
        io.write_bytes_atomic(target, b"good" * 100)
        with pytest.raises(OutputError, match=r"checkpoint\.bin: cannot write \(disk full\); the previous copy is intact") as err:
            io.write_bytes_atomic(target, os.urandom(200_000))
        assert err.value.exit_code == 2
        assert target.read_bytes() == b"good" * 100
        assert _litter(disk) == []
        with pytest.raises(OutputError, match=r"new\.json: cannot write \(disk full\); nothing was written"):
            with io.atomic_path(disk / "new.json") as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(os.urandom(200_000))
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint.bin"]


def test_an_oserror_that_escapes_a_command_is_one_line_naming_the_file(capsys):
    from pocus_edge import cli

    @cli.app.command("fail-write")
    def fail_write() -> None:
        raise PermissionError(13, "Permission denied", "/data/out/report.json")

    try:
        assert main(["fail-write"]) == 2
    finally:
        cli.app.registered_commands.pop()
    assert _one_error_line(capsys) == "error: /data/out/report.json: permission denied"


def test_each_folder_is_swept_once_per_process(tmp_path, monkeypatch):
    # Writing many files into one folder (the simulator's frames) lists it once, not once per file.
    calls, real = [], os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: calls.append(Path(path)) or real(path))
    for k in range(50):
        io.write_bytes_atomic(tmp_path / f"{k}.png", b"x", fsync=False)
    assert calls.count(tmp_path) == 1
