"""`pocus-edge study`: does target-only SSL pretraining help on MY probe pair? The paper's
Table 3 protocol as a library function, with paired seeds and confidence intervals.

    run_study(StudyOptions(source="data/source", target="data/target", out="study"))

What it does (each step reads ONE site; only weights move between steps):

1. **Pretrains** each SSL method the selected arms need (MIM, contrastive MT-NXent, optionally
   SimCLR) on the target's unlabeled ``train`` frames, ``pretrain_seeds`` times; fine-tuning seed
   s starts from pretraining run s mod ``pretrain_seeds``.
2. **Fine-tunes every arm with K paired seeds**: seed s gives every arm the same decoder init
   and the same data order, so arm differences are paired within a seed.
3. **Evaluates every (arm, seed) per target test patient**: Dice, IoU, HD95 and average surface
   distance per image, averaged per patient; plus Dice on the source validation frames (a
   convergence check).
4. **Reports** (:mod:`.stats`, :mod:`.report`) at the level of training seeds: one primary
   comparison (fused vs lower by default) by an exact sign-flip test with a t-interval and its
   minimal detectable effect; secondary comparisons (each SSL branch, the fusion against the
   ensemble of two lower-bound models, students against teachers) Holm-corrected when they have
   10 seeds or more, else labelled underpowered; a figure of the per-seed differences.

Arms come from a registry (:data:`ARMS`): a new arm plugs in with :func:`register_arm` without
touching the loop. The ``student`` arms distil a compact student from the same seed's fused
teacher (:mod:`pocus_edge.train.distill`) and are compared with that teacher, so their paired
difference is student minus teacher. ``NAME@RECIPE`` runs an arm with another recipe
(compared with ``lower@RECIPE``), ``NAME:K`` on the first K seeds only.

Everything is resumable: a finished unit (pretraining, training or evaluation of one arm and
seed) leaves ``done.json`` and is skipped on a rerun; a killed training resumes from its
checkpoint. Processes started on the same folder share its units (each is claimed with a lock
on its folder and starts once its inputs are done). Steps are FIXED counts, never wall-clock
budgets, so a busy machine changes the duration, not the result.

One module per job: :mod:`.budgets` (step budgets, options, the recorded protocol),
:mod:`.arms` (pretraining and arm registries, arm selection), :mod:`.folder` (the study folder),
:mod:`.markers` (done and failed units), :mod:`.plan` (units), :mod:`.pace` (the time estimate),
:mod:`.scheduler` (running units, shared by processes), :mod:`.scoring` (per-image scores),
:mod:`.stats` (seed-level statistics), :mod:`.report` (the report), :mod:`.run` (:func:`run_study`). The study sits on
top of :mod:`pocus_edge.train`; nothing below it imports it.
"""

from __future__ import annotations

from .arms import ARMS, PRETRAININGS, ArmKind, ArmRun, Pretraining, parse_arms, register_arm
from .budgets import BUDGETS, Budget, StudyOptions, study_options
from .folder import Study
from .markers import UnitFailed
from .report import write_report
from .run import StudyResult, run_study
from .stats import analyse

__all__ = [
    "ARMS",
    "ArmKind",
    "ArmRun",
    "BUDGETS",
    "Budget",
    "PRETRAININGS",
    "Pretraining",
    "Study",
    "StudyOptions",
    "StudyResult",
    "UnitFailed",
    "analyse",
    "parse_arms",
    "register_arm",
    "run_study",
    "study_options",
    "write_report",
]
