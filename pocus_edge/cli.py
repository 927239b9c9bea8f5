"""The `pocus-edge` command line. Thin by design: each command module under
``pocus_edge.commands`` parses its options, calls one library function and prints.

Command modules are imported only when one of their commands runs (or ``--help`` lists them),
and heavy imports (torch, onnx, cv2) happen inside the commands, so ``--help`` is fast and
works on the core install; a command that needs a missing extra names it in one line (exit 3).
User mistakes raise :class:`pocus_edge.errors.PocusError`; ``main`` turns them into one
line on stderr and the exit code of :class:`pocus_edge.errors.ExitCode`, never a traceback.
The option names every command uses, and the exit codes, are listed in docs/cli.md.
"""

from __future__ import annotations

import sys

import typer

from . import __version__
from .commands import LazyCommandGroup
from .commands.options import rewrite_deprecated
from .errors import ExitCode, PocusError, Terminated

app = typer.Typer(
    name="pocus-edge",
    help=(
        "Cross-domain bone segmentation for pediatric wrist POCUS, from training to the edge.\n\n"
        "Pipeline: simulate/import -> split -> pretrain (mim, contrastive; unlabeled target) -> "
        "finetune (labeled source) -> evaluate -> export (one fused graph) -> stream / benchmark.\n\n"
        "Start with `pocus-edge demo` (the whole pipeline on the bundled simulator)."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=LazyCommandGroup,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pocus-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    # Commands are registered lazily by LazyCommandGroup (pocus_edge.commands.COMMANDS); this
    # callback makes typer build a group for them.
    pass


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point. The error contract (docs/cli.md, "Exit codes"): anything a
    user can cause ends with one line on stderr and the exit code of its kind
    (:class:`ExitCode`: 2 bad input or usage, also OSError such as a full disk or a read-only
    output, named by its file; 1 a measured check failed; 3 a toolchain or extra missing here;
    130/143 interrupted), never a traceback; temporaries are removed on every exit."""
    previous = _terminate_cleanly()
    argv, notes = rewrite_deprecated(list(sys.argv[1:] if argv is None else argv))
    for note in notes:
        typer.echo(note, err=True)
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool):
            # typer returns the code of typer.Exit, and 130 for Ctrl-C, instead of raising.
            if code == ExitCode.INTERRUPTED:
                typer.echo("interrupted", err=True)
            return code
    except PocusError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return int(exc.exit_code)
    except Terminated:
        typer.echo("terminated", err=True)
        return ExitCode.TERMINATED
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return ExitCode.INTERRUPTED
    except OSError as exc:
        typer.secho(f"error: {_os_error_line(exc)}", fg=typer.colors.RED, err=True)
        return ExitCode.USAGE
    except SystemExit as exc:  # typer/click exits (e.g. --help, typer.Exit)
        return int(exc.code or 0) if not isinstance(exc.code, str) else ExitCode.CHECK_FAILED
    except Exception as exc:  # usage errors ("No such option", a bad value) and aborts
        if isinstance(exc, _click_exceptions("ClickException")) and hasattr(exc, "show"):
            exc.show()  # click's own "Usage: ... / Error: ..." lines, no traceback
            return ExitCode.USAGE
        if isinstance(exc, _click_exceptions("Abort")):
            typer.echo("aborted", err=True)
            return ExitCode.INTERRUPTED
        raise
    finally:
        _restore_sigterm(previous)
    return ExitCode.OK


def _os_error_line(exc: OSError) -> str:
    """``FILE: reason`` for an OSError that escaped the commands (the file it names, if any)."""
    from .io import describe_os_error

    name = exc.filename2 or exc.filename
    reason = describe_os_error(exc)
    return f"{name}: {reason}" if name is not None else reason


def _terminate_cleanly():
    """Turn SIGTERM into an exception in the main thread (restored when main returns)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, _raise)
    except (ValueError, OSError):  # pragma: no cover - no signals here
        return None


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):  # pragma: no cover
            pass


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """``ClickException`` or ``Abort`` classes of whichever click this typer uses: typer >= 0.22
    vendors its own (based on the public ``typer.TyperException`` / ``typer.Abort``), older ones
    use the ``click`` package."""
    public = {"ClickException": getattr(typer, "TyperException", None), "Abort": typer.Abort}[name]
    classes: list[type[BaseException]] = [public] if public is not None else []
    try:
        import click

        classes.append(getattr(click.exceptions, name))
    except ImportError:  # pragma: no cover - typer without the click package
        pass
    return tuple(classes)


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
