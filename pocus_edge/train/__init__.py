"""Training: target-only SSL pretraining (MIM, contrastive MT-NXent), source-only fine-tuning and
baselines, evaluation; one engine (``engine.Trainer``) with DDP, AMP and exact resume.

Python API (each reads exactly ONE site folder)::

    pretrain_mim(target_site, "runs/mim", preset="small")            -> PretrainResult (.encoder_path)
    pretrain_contrastive(target_site, "runs/con", min_frame_gap=15)  -> PretrainResult
    finetune(source_site, "runs/mim_ft", init="runs/mim/encoder.safetensors") -> FinetuneResult (.model_path)
    finetune(source_site, "runs/lower", recipe="paper")              -> lower-bound baseline, released recipe
    distill(mim_model, con_model, target_site, source_site, "runs/student") -> DistillResult (.model_path)
    evaluate(target_site, [a, b], "reports", fusion=["entropy"])     -> EvaluationResult

The Table 3 protocol with seeds (``run_study``) sits on top of these stages in
:mod:`pocus_edge.study`.

Every stage takes the shared options as keywords (``preset=``, ``max_steps=``, ``seed=``,
``device=``, ``resume=``, ``config_file=``...) or as one :class:`RunOptions`.
"""

from __future__ import annotations

# Eager imports: the functions share names with their modules (``finetune``, ``evaluate``), and a
# lazy lookup would hand out the submodule once it has been imported.
from .common import RunOptions
from .contrastive import pretrain_contrastive
from .distill import distill
from .evaluate import evaluate
from .finetune import finetune
from .mim import pretrain_mim

__all__ = ["RunOptions", "pretrain_mim", "pretrain_contrastive", "finetune", "distill", "evaluate"]
