"""The `pocus-edge` command line. Thin by design: each command module under
``pocus_edge.commands`` parses its options, calls one library function and prints.

Heavy imports (torch, onnx, cv2) happen inside the commands, so ``--help`` stays fast.
User mistakes raise :class:`pocus_edge.errors.PocusError`; ``main`` turns them into one
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from .commands import register_all
from .errors import PocusError

app = typer.Typer(
    name="pocus-edge",
    help=(
        "Cross-domain bone segmentation for pediatric wrist POCUS, from training to the edge.\n\n"
        "Pipeline: simulate/import -> split -> pretrain (mim, contrastive; unlabeled target) -> "
        "finetune (labeled source) -> evaluate -> export (one fused graph) -> stream / benchmark.\n\n"
        "Start with `pocus-edge demo` (the whole pipeline on the bundled simulator)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
register_all(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        app(args=argv, standalone_mode=False)
    except PocusError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as exc:  # typer/click exits (e.g. --help, typer.Exit)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # usage errors ("No such option", a bad value) and aborts
        if isinstance(exc, _click_errors()) and hasattr(exc, "show"):
            exc.show()  # click's own "Usage: ... / Error: ..." lines, no traceback
            return int(getattr(exc, "exit_code", 2))
        if isinstance(exc, _click_aborts()):
            typer.echo("aborted", err=True)
            return 1
        raise
    return 0


def _click_errors() -> tuple[type[BaseException], ...]:
    """Usage-error classes of whichever click this typer uses: typer >= 0.22 vendors its own
    (``typer._click``, based on the public ``typer.TyperException``), older ones use ``click``."""
    classes: list[type[BaseException]] = []
    if hasattr(typer, "TyperException"):
        classes.append(typer.TyperException)
    try:
        import click

        classes.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover - typer without the click package
        pass
    return tuple(classes)


def _click_aborts() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = [typer.Abort]
    try:
        import click

        classes.append(click.exceptions.Abort)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
