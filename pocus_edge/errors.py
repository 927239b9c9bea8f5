"""User-facing errors.

Anything a user can cause (a bad folder, a wrong checkpoint, a truncated file) raises a
:class:`PocusError` subclass with a one-line message that names the file and the problem.
The CLI prints that line and exits non-zero without a traceback; library users catch it.

:class:`ExitCode` is the one table of the command line's exit statuses (docs/cli.md); every
error class carries its code, so every command ends the same way for the same kind of failure.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of every ``pocus-edge`` command (docs/cli.md, "Exit codes")."""

    OK = 0
    CHECK_FAILED = 1  # the command ran, and a measured check failed: parity, a failed benchmark row
    USAGE = 2  # bad input or usage: a missing file, a bad option value, an unknown option
    UNAVAILABLE = 3  # a toolchain or an optional extra is missing here (TensorRT, CUDA, macOS, an extra)
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM


class PocusError(Exception):
    """Base class of every error caused by user input. ``exit_code`` is used by the CLI."""

    exit_code: int = ExitCode.USAGE

    def __init__(self, message: str):
        # One line, always: join multi-line detail with '; ' so logs stay greppable.
        super().__init__(" ".join(str(message).split("\n")).strip())


class DataError(PocusError):
    """A dataset folder, manifest, image or stream is missing, malformed or inconsistent."""


class ConfigError(PocusError):
    """A preset name, override or YAML config is invalid."""


class CheckpointError(PocusError):
    """A weights file is missing, truncated, or of another architecture."""


class TrainingError(PocusError):
    """Training cannot go on (NaN loss, empty split, no labels, site isolation violated)."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite at ``step``; the weights were not updated with it, and the
    run's checkpoints from before that step stand."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class ExportError(PocusError):
    """An export failed or did not meet its parity bar."""


class CheckFailed(PocusError):
    """The command ran to the end and a measured check failed (a benchmark row, a bar): exit 1."""

    exit_code = ExitCode.CHECK_FAILED


class ParityFailed(ExportError, CheckFailed):
    """An exported artifact did not meet its parity bar against PyTorch (nothing was written
    under its name): a failed measurement, exit 1, not a usage error."""

    exit_code = ExitCode.CHECK_FAILED


class OutputError(PocusError, OSError):
    """An output cannot be written: a folder where a file is expected (or the reverse), a
    read-only or full file system, permission denied. Also an ``OSError``, so code that
    handles write failures as ``OSError`` keeps working."""

    def __init__(self, message: str, *, errno: int | None = None, strerror: str | None = None):
        PocusError.__init__(self, message)
        self.errno = errno
        self.strerror = strerror

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ToolchainUnavailable(PocusError):
    """A required toolchain (TensorRT, a CUDA GPU, macOS for Core ML prediction) is absent here.

    Distinct exit code so scripts can tell "cannot run here" from "failed".
    """

    exit_code = ExitCode.UNAVAILABLE


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every ``finally`` and temporary clean-up runs
    (a BaseException, like KeyboardInterrupt, so ``except Exception`` handlers let it pass).
    The command line exits 143 (:attr:`ExitCode.TERMINATED`) on it."""
