"""CLI command modules, loaded on demand.

Each module defines ``register(app)``, which adds its commands to a typer app. ``COMMANDS``
says which module provides which top-level command, in the order users meet them: running one
command imports only its own module, and a module is imported at all only when one of its
commands is run or listed in ``--help``. Command modules import heavy libraries (torch, onnx,
pydicom, ...) inside their command bodies, so every ``--help`` works on the core install.

A new command: write ``register(app)`` in a module here and add ``"name": "module"`` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable

import typer
import typer.core
import typer.main

from ..extras import missing_extra

# top-level command -> module under pocus_edge.commands that registers it
COMMANDS: dict[str, str] = {
    "simulate": "simulate",
    "import": "data",
    "split": "data",
    "pretrain": "train",
    "finetune": "train",
    "distill": "train",
    "evaluate": "train",
    "convert": "convert",
    "export": "export",
    "golden": "golden",
    "stream": "runtime",
    "serve": "serve",
    "benchmark": "bench",
    "study": "study",
    "qualify": "qualify",
    "flops": "flops",
    "demo": "demo",
}


def module_commands(module_name: str) -> dict[str, Any]:
    """Import ``pocus_edge.commands.<module_name>`` and return its commands as click commands.
    A module that cannot be imported for lack of an extra yields stand-ins that say so (so that
    ``--help`` still lists every command) and fail with that one line when run."""
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        error = missing_extra(exc)
        if error is None:
            raise
        return _unavailable_commands(module_name, error)
    holder = typer.Typer()
    module.register(holder)
    return dict(typer.main.get_group(holder).commands)


def _unavailable_commands(module_name: str, error: Exception) -> dict[str, Any]:
    holder = typer.Typer()
    for name in (n for n, m in COMMANDS.items() if m == module_name):

        def unavailable(ctx: typer.Context) -> None:
            raise error

        holder.command(
            name,
            help=f"(not installed here: needs the '{getattr(error, 'extra', '?')}' extra)",
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
        )(unavailable)
    return dict(typer.main.get_group(holder).commands)


class LazyCommands(MutableMapping):
    """The command table of the root group: names come from ``table``; a command's module is
    imported the first time the command is looked up (all of that module's commands are kept)."""

    def __init__(self, table: dict[str, str], loader: Callable[[str], dict[str, Any]], loaded: dict | None = None):
        self._table = table
        self._loader = loader
        self._loaded: dict[str, Any] = dict(loaded or {})
        self._modules_done: set[str] = set()

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            module = self._table.get(name)
            if module is None or module in self._modules_done:
                raise KeyError(name)
            self._modules_done.add(module)
            for cmd_name, cmd in self._loader(module).items():
                self._loaded.setdefault(cmd_name, cmd)
            if name not in self._loaded:
                raise KeyError(name)
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._table, *self._loaded]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*self._table, *self._loaded]))

    def __contains__(self, name: object) -> bool:
        return name in self._table or name in self._loaded

    @property
    def loaded_modules(self) -> set[str]:
        return set(self._modules_done)


class LazyCommandGroup(typer.core.TyperGroup):
    """Root group of ``pocus-edge``: commands from :data:`COMMANDS`, imported on demand. A
    command that fails because an optional dependency is missing ends in one line naming the
    extra that provides it (:class:`pocus_edge.extras.MissingExtra`, exit 3)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(COMMANDS, module_commands, loaded=self.commands)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return self.commands.get(cmd_name)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:
            command = ctx.invoked_subcommand or (ctx.protected_args[0] if getattr(ctx, "protected_args", None) else None)
            error = missing_extra(exc, f"`pocus-edge {command}`" if command else None)
            if error is None:
                raise
            raise error from None
