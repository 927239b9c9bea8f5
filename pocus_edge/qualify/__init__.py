"""Label-free target quality (``pocus-edge qualify``, docs/qualify.md): per-frame scores of a
model's outputs on the TARGET's unlabeled frames (branch agreement = the exported graph's risk,
confidence, stability under probe nuisances, mask shape), an estimated target Dice per model with
a bootstrap interval (calibrated on SOURCE validation frames), a ranking, and each model's risk
threshold and drift band. Target labels are never read.

One module per job: :mod:`.scores` (per-frame scores), :mod:`.models` (what is scored and how it
runs), :mod:`.frames` (which frames), :mod:`.estimate` (calibration, bootstrap, threshold, band),
:mod:`.failure` (AURC, AUROC, Spearman, for the benchmark), :mod:`.report` (outputs),
:mod:`.api` (:func:`qualify`).
"""

from __future__ import annotations

from .api import SCHEMA, QualifyOptions, QualifyResult, qualify
from .models import ModelSpec, resolve_models, study_models

__all__ = ["SCHEMA", "ModelSpec", "QualifyOptions", "QualifyResult", "qualify", "resolve_models", "study_models"]
