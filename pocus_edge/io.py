"""Safe file output.

* Every file is written to a temporary name next to it and renamed into place, so a killed
  process (or a full disk) never leaves a half-written checkpoint, model or report and never
  destroys the previous good copy.
* Nothing that the writer did not create is ever deleted: an existing *folder* where a file is
  expected (or a file where a folder is expected) is refused with one line, before any work
  starts when the command calls :func:`check_output_file` / :func:`check_output_dir` up front,
  and at the latest when :func:`atomic_path` opens its temporary.
* Temporaries carry the writer's process id and host in their name
  (``.NAME.p<pid>h<host>.<random>.tmp...``). They are removed on any exit the process
  survives (an exception, Ctrl-C, SIGTERM via the CLI, normal interpreter exit) and swept by
  name on the next start (:func:`sweep_stale_temps`) when a ``kill -9`` left them behind.
  :func:`staging_dir` gives commands a scratch folder with the same guarantees.
* Write errors (read-only file system, permission denied, disk full) raise
  :class:`~pocus_edge.errors.OutputError`: one line naming the output, exit code 2.
* :func:`read_json`: the one JSON reader whose errors name the file; :func:`sha256_file`: the
  one file hash (data provenance in the model cards, checkpoint and artifact checks).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputError

# errno values that mean "this output cannot be written here", with the words users see.
WRITE_ERRORS = {
    errno.ENOSPC: "disk full",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "a parent is a file, not a folder",
    errno.EIO: "input/output error",
}
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600  # temporaries of another host are swept only when this old

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.p(?P<pid>\d+)h(?P<host>[0-9a-f]{8})\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)(?P<rest>.*)$")
_live: set[Path] = set()  # temporaries this process created and has not renamed or removed yet
_live_lock = threading.Lock()
_swept: set[Path] = set()


def _host_id() -> str:
    return f"{zlib.crc32(socket.gethostname().encode('utf-8', 'replace')):08x}"


def _tag() -> str:
    return f"p{os.getpid()}h{_host_id()}"


def _register(path: Path) -> None:
    with _live_lock:
        _live.add(path)


def _unregister(path: Path) -> None:
    with _live_lock:
        _live.discard(path)


def _remove(path: Path) -> None:
    """Remove a temporary file or folder this process created (missing is fine)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
    _unregister(path)


@atexit.register
def remove_live_temps() -> None:
    """Remove every temporary this process still holds (called at interpreter exit)."""
    with _live_lock:
        paths = list(_live)
    for p in paths:
        _remove(p)


# ---------------------------------------------------------------------------------------------
# Errors


def describe_os_error(exc: OSError) -> str:
    """The short reason of an OSError in the words users see ("disk full", ...)."""
    return WRITE_ERRORS.get(exc.errno or 0) or exc.strerror or str(exc) or type(exc).__name__


def output_error(path: str | os.PathLike, exc: OSError, *, note: str = "") -> OutputError:
    """An OutputError naming ``path`` for a failed write."""
    reason = describe_os_error(exc)
    # strerror keeps the system's words, for code that reports OSErrors itself.
    return OutputError(f"{path}: cannot write ({reason}){'; ' + note if note else ''}", errno=exc.errno, strerror=exc.strerror or reason)


def _is_write_error(exc: BaseException, tmp: Path) -> bool:
    """An OSError raised while writing ``tmp`` or a file inside it (a staging folder), not, e.g.,
    one raised reading an input. An OutputError counts when it names a path inside ``tmp``: the
    user is then told about the final name, never about a temporary one."""
    if not isinstance(exc, OSError):
        return False
    if isinstance(exc, OutputError):
        return exc.errno in WRITE_ERRORS and str(exc).startswith(str(tmp) + os.sep)
    if exc.errno not in WRITE_ERRORS:
        return False
    name = exc.filename
    return name is None or str(name).startswith(str(tmp))


def find_write_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or its cause or context, as libraries wrap them) when
    it is a write failure users can act on (disk full, read-only, permission denied); else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# ---------------------------------------------------------------------------------------------
# Pre-flight checks


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    return p


def _check_ancestors(path: Path, what: str) -> None:
    """Every existing ancestor of ``path`` is a writable folder."""
    anc = _first_existing(path.parent if path.parent != path else path)
    if anc.exists() and not anc.is_dir():
        raise OutputError(f"{path}: cannot write {what} ({anc} is a file, not a folder)")
    if anc.exists() and not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write {what} ({anc} is not writable: {_why_not_writable(anc)})", errno=errno.EACCES)


def _why_not_writable(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):
        pass
    return "permission denied"


def check_output_file(path: str | os.PathLike, *, what: str = "the output file") -> Path:
    """Refuse, with one line, an output FILE path that cannot be written without destroying
    something: an existing folder there, a parent that is a file, a folder that is not writable
    (read-only file system, permission denied). Call it before any work starts."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: is a folder; {what} needs a file name (refusing to replace a folder)")
    _check_ancestors(p, what)
    return p


def check_output_dir(path: str | os.PathLike, *, what: str = "the output folder") -> Path:
    """Refuse, with one line, an output FOLDER path that is an existing file, lies under a file,
    or cannot be written to. Call it before any work starts."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: is a file; {what} must be a folder")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputError(f"{p}: cannot write {what} ({_why_not_writable(p)})", errno=errno.EACCES)
    else:
        _check_ancestors(p, what)
    return p


# ---------------------------------------------------------------------------------------------
# Temporaries


def sweep_stale_temps(folder: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Remove temporaries that a dead process left in ``folder`` (a ``kill -9``, a power cut).

    Only names this module creates are touched, and only when their process is gone (same
    host) or, for another host's, when older than a day. A folder moved aside for replacement
    (``.NAME....old``) whose replacement never arrived is moved back to ``NAME``. Each folder is
    swept once per process unless ``force``. Returns what was removed or restored.
    """
    d = Path(folder)
    key = Path(os.path.abspath(d))
    if not force and key in _swept:
        return []
    _swept.add(key)
    try:
        names = os.listdir(d)
    except OSError:
        return []
    done = []
    host = _host_id()
    for name in names:
        m = _TEMP_RE.match(name)
        if m is None:
            continue
        p = d / name
        if not _is_stale(p, int(m["pid"]), m["host"], host):
            continue
        target = d / m["name"]
        if m["kind"] == "old" and not target.exists() and not target.is_symlink():
            try:
                os.replace(p, target)  # the replacement never arrived: restore the previous copy
                done.append(target)
            except OSError:
                pass
            continue
        _remove(p)
        done.append(p)
    return done


def _is_stale(p: Path, pid: int, its_host: str, host: str) -> bool:
    if its_host != host:
        try:
            return time.time() - p.lstat().st_mtime > FOREIGN_TEMP_MAX_AGE_S
        except OSError:
            return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # alive (another user's) or unknowable: leave it
    return False


def new_temp_name(folder: Path, name: str, kind: str, suffix: str = "") -> Path:
    """A fresh, unused temporary name in ``folder``; nothing is created."""
    for _ in range(100):
        rand = secrets.token_hex(4)
        p = folder / f".{name}.{_tag()}.{rand}.{kind}{suffix}"
        if not p.exists() and not p.is_symlink():
            return p
    raise OutputError(f"{folder / name}: cannot find a free temporary name")  # pragma: no cover


@contextlib.contextmanager
def staging_dir(near: str | os.PathLike, *, check: bool = True) -> Iterator[Path]:
    """A scratch folder next to ``near`` (same file system, so results can be renamed into place),
    removed when the block exits however it exits; one left by a killed process is swept on the
    next start. Use it for multi-file work before the final rename. ``check``: refuse up front
    a folder where the file ``near`` goes (False when ``near`` may be a folder artifact)."""
    final = Path(near)
    if check:
        check_output_file(final)
    created = _make_parent(final)
    sweep_stale_temps(final.parent)
    tmp = new_temp_name(final.parent, final.name, "tmp", ".staging")
    try:
        tmp.mkdir()
    except OSError as exc:
        _remove_created(final.parent, created)
        raise output_error(final, exc) from None
    _register(tmp)
    try:
        yield tmp
    except BaseException as exc:
        _remove(tmp)
        _remove_created(final.parent, created)
        if _is_write_error(exc, tmp):
            raise output_error(final, exc) from None
        raise
    finally:
        _remove(tmp)


def _make_parent(final: Path) -> Path | None:
    """Create ``final``'s missing parent folders; return the topmost one created (None if none),
    so a failed write can remove them again (:func:`_remove_created`)."""
    top = None
    for folder in [final.parent, *final.parent.parents]:
        if folder.exists() or folder.is_symlink():
            break
        top = folder
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_created(final.parent, top)
        raise output_error(final, exc) from None
    return top


def _remove_created(folder: Path, top: Path | None) -> None:
    """Remove the folders from ``folder`` up to ``top`` that a writer created, if still empty: a
    failed output leaves no trace, not even an empty folder (another writer's files stop it)."""
    if top is None:
        return
    for current in [folder, *folder.parents]:
        try:
            current.rmdir()
        except OSError:
            return
        if current == top:
            return


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike,
    *,
    suffix: str | None = None,
    kind: str = "file",
    replaces: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path in the same folder as ``path``; on success rename it to ``path``.

    ``kind="file"`` (default): an existing folder at ``path`` is refused (OutputError), never
    replaced. ``kind="dir"`` (e.g. a Core ML ``.mlpackage``, a site folder): an existing FILE is
    refused; an existing empty folder is replaced; a non-empty one only when ``replaces(path)``
    says it is the kind of folder this writer makes (otherwise refused). On any exception the
    temporary is removed and ``path`` is left untouched; write errors (disk full, read-only,
    permission denied) become an OutputError naming ``path``.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    final = Path(path)
    if kind == "file":
        check_output_file(final)
    else:
        check_output_dir(final)
        _check_replaceable_dir(final, replaces)
    created = _make_parent(final)
    sweep_stale_temps(final.parent)
    sfx = suffix if suffix is not None else "".join(final.suffixes)
    tmp = new_temp_name(final.parent, final.name, "tmp", sfx)
    _register(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written")
        if tmp.is_dir() != (kind == "dir"):
            raise OutputError(f"{final}: the writer made a {'folder' if tmp.is_dir() else 'file'} but a {kind} was declared")
        _move_into_place(tmp, final, kind, replaces)
    except BaseException as exc:
        _remove(tmp)
        _remove_created(final.parent, created)
        if _is_write_error(exc, tmp):
            kept = "the previous copy is intact" if final.exists() else "nothing was written"
            raise output_error(final, exc, note=kept) from None
        raise
    _unregister(tmp)


def _check_replaceable_dir(final: Path, replaces: Callable[[Path], bool] | None) -> None:
    if final.is_dir() and any(final.iterdir()) and not (replaces is not None and replaces(final)):
        raise OutputError(f"{final}: folder exists and is not one this command writes; refusing to replace it")


def _move_into_place(tmp: Path, final: Path, kind: str, replaces: Callable[[Path], bool] | None) -> None:
    if kind == "file":
        if final.is_dir():  # appeared while we were writing
            raise OutputError(f"{final}: is a folder; refusing to replace a folder with a file")
        os.replace(tmp, final)
        return
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final}: is a file; refusing to replace it with a folder")
    if not final.is_dir():
        os.replace(tmp, final)
        return
    _check_replaceable_dir(final, replaces)
    # os.replace cannot replace a non-empty folder: move the old one aside (a name the sweep
    # restores if we are killed before the new one is in place), then remove it.
    old = new_temp_name(final.parent, final.name, "old")
    os.replace(final, old)
    _register(old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        _unregister(old)
        raise
    _remove(old)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """``fsync=False`` skips the flush to disk (still atomic against a killed process; only an
    OS crash can lose the file): for bulk data that can be regenerated, e.g. simulated frames."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Parse a JSON file; :class:`~pocus_edge.errors.DataError` naming the file (one line) when it
    is missing, a folder, or not valid UTF-8 JSON. ``what`` names the file in the message."""
    from .errors import DataError

    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: {what} not found") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a folder, expected a {what}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: {what} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{p}: {what} is not UTF-8 text") from None


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
