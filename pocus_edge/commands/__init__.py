"""CLI command modules. Each module defines ``register(app)``; ``register_all`` adds them in
the order users meet them. Commands import heavy libraries inside their bodies."""

from __future__ import annotations

import typer

from ..errors import NotBuiltYet


def not_built(command: str, issue: str) -> None:
    """Uniform message for a command whose implementation has not landed yet (exit 2)."""
    raise NotBuiltYet(f"`pocus-edge {command}` is not built yet ({issue})")


def register_all(app: typer.Typer) -> None:
    from . import bench, data, demo, export, flops, golden, runtime, simulate, study, train

    simulate.register(app)  # simulate
    data.register(app)  # import, split
    train.register(app)  # pretrain, finetune, evaluate
    study.register(app)  # study
    export.register(app)  # export
    golden.register(app)  # golden (parity vectors for the Android demo)
    runtime.register(app)  # stream
    bench.register(app)  # benchmark
    flops.register(app)  # flops
    demo.register(app)  # demo
