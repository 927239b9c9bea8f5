"""Training: target-only SSL pretraining (MIM, contrastive MT-NXent), source-only fine-tuning and
baselines, evaluation; one engine (``engine.Trainer``) with DDP, AMP and exact resume.

Python API (each reads exactly ONE site folder)::

    pretrain_mim(target_site, "runs/mim", preset="small")            -> PretrainResult (.encoder_path)
    pretrain_contrastive(target_site, "runs/con", min_frame_gap=15)  -> PretrainResult
    finetune(source_site, "runs/mim_ft", init="runs/mim/encoder.safetensors") -> FinetuneResult (.model_path)
    finetune(source_site, "runs/lower")                              -> lower-bound baseline
    evaluate(target_site, [a, b], "reports", fusion=["entropy"])     -> EvaluationResult
"""

from __future__ import annotations

# Eager imports: the functions share names with their modules (``finetune``, ``evaluate``), and a
# lazy lookup would hand out the submodule once it has been imported.
from .contrastive import pretrain_contrastive
from .evaluate import evaluate
from .finetune import finetune
from .mim import pretrain_mim

__all__ = ["pretrain_mim", "pretrain_contrastive", "finetune", "evaluate"]
