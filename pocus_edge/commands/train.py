"""`pretrain`, `finetune`, `evaluate`."""

from __future__ import annotations

import typer

from . import not_built


def register(app: typer.Typer) -> None:
    pretrain_app = typer.Typer(help="Self-supervised pretraining on ONE unlabeled target site.", no_args_is_help=True)

    @pretrain_app.command("mim")
    def mim() -> None:
        """Masked image modeling (SimMIM-style) pretraining."""
        not_built("pretrain mim", "training issue")

    @pretrain_app.command("contrastive")
    def contrastive() -> None:
        """Contrastive pretraining with the MT-NXent loss."""
        not_built("pretrain contrastive", "training issue")

    app.add_typer(pretrain_app, name="pretrain")

    @app.command("finetune")
    def finetune() -> None:
        """Supervised fine-tuning on ONE labeled site (DiceBCE)."""
        not_built("finetune", "training issue")

    @app.command("evaluate")
    def evaluate() -> None:
        """Per-image Dice/IoU, Wilcoxon tests and overlays on a site's split."""
        not_built("evaluate", "training issue")
