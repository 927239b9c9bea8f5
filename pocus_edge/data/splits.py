"""Patient-level, seeded splits with the paper's proportions (docs/method.md, Tables 1-2).

Splits are drawn over *patients*, never frames, so no patient's frames appear in two splits.
Counts are patient counts (the paper reports 74/17/18 source patients and 119/17 target
patients), each rounded to the nearest integer and at least one per split.

Source domain (labeled probe): ``split`` = train / val / test by patient (68/16/16).

Target domain (unlabeled deployment probe, a few labeled frames):

* ~12.5% of patients are *test* patients, drawn among patients that have labeled frames;
  their labeled frames get ``split = "test"`` and their unlabeled frames ``""`` (unused:
  the paper's target test holds only labeled frames, and those patients are kept out of
  pretraining so the test stays unseen).
* every frame of every other patient gets ``split = "train"``: the SSL pretraining pool,
  read as images only.
* the labeled frames of those SSL patients get ``ub_split = "train"/"val"`` by patient
  (17 of 119 patients to val in the paper): the upper-bound baseline's own split. Pass
  ``ub_val_fraction=0`` to skip it (``ub_split`` then stays empty).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ConfigError, DataError
from .layout import MANIFEST, FrameRecord, Site, _patient_from_video, load_site, write_manifest

DOMAINS = ("source", "target")
SOURCE_FRACTIONS = (0.68, 0.16, 0.16)
TARGET_TEST_FRACTION = 0.125
UB_VAL_FRACTION = 17 / 119


def _count(n: int, fraction: float) -> int:
    """Patients for a split of ``fraction``: nearest integer (halves round up), at least one."""
    return max(1, math.floor(n * fraction + 0.5))


def _shuffled(patients: Iterable[str], rng: random.Random) -> list[str]:
    # Sort first so the result depends only on the patient set and the seed, not on manifest order.
    order = sorted(set(patients))
    rng.shuffle(order)
    return order


def _check_fraction(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        bound = "[0, 1)" if allow_zero else "(0, 1)"
        raise ConfigError(f"{name} must be in {bound}, got {value}")
    return value


def _patient_of(rec: FrameRecord) -> str:
    return rec.patient or _patient_from_video(rec.videoname)


def assign_splits(
    records: Sequence[FrameRecord],
    *,
    domain: str,
    seed: int = 0,
    source_fractions: Sequence[float] = SOURCE_FRACTIONS,
    target_test_fraction: float = TARGET_TEST_FRACTION,
    ub_val_fraction: float = UB_VAL_FRACTION,
) -> list[FrameRecord]:
    """Return NEW records (same order) with ``split`` and ``ub_split`` set; the input is untouched.

    Deterministic in ``seed`` and independent of record order. Raises DataError when there are
    too few patients (or labeled patients) to give every split at least one patient, and
    ConfigError on a bad domain or fraction.
    """
    if domain not in DOMAINS:
        raise ConfigError(f"unknown domain {domain!r}; choose source or target")
    if not records:
        raise DataError("no frames to split")
    rng = random.Random(f"pocus-edge-split:{domain}:{int(seed)}")
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_patient[_patient_of(rec)].append(i)
    split_of_patient: dict[str, str] = {}
    ub_of_patient: dict[str, str] = {}

    if domain == "source":
        if len(source_fractions) != 3:
            raise ConfigError(f"source fractions must be three numbers (train, val, test), got {list(source_fractions)}")
        train_f, val_f, test_f = (_check_fraction(n, f) for n, f in zip(("train", "val", "test"), source_fractions))
        if abs(train_f + val_f + test_f - 1.0) > 1e-6:
            raise ConfigError(f"source fractions must sum to 1, got {train_f} + {val_f} + {test_f}")
        patients = _shuffled(by_patient, rng)
        n = len(patients)
        n_val, n_test = _count(n, val_f), _count(n, test_f)
        if n - n_val - n_test < 1:
            raise DataError(
                f"only {n} patient(s): a source split needs at least 3 (one each for train, val and test)"
            )
        for j, p in enumerate(patients):
            split_of_patient[p] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    else:
        test_f = _check_fraction("target test fraction", target_test_fraction)
        ub_f = _check_fraction("upper-bound val fraction", ub_val_fraction, allow_zero=True)
        labeled_patients = {_patient_of(r) for r in records if r.labeled}
        n = len(by_patient)
        n_test = _count(n, test_f)
        if len(labeled_patients) < n_test:
            raise DataError(
                f"{len(labeled_patients)} of {n} target patient(s) have labeled frames; "
                f"the target test needs {n_test} labeled patient(s)"
            )
        if n - n_test < 1:
            raise DataError(f"only {n} target patient(s): need at least 2 (test and SSL train)")
        test_patients = set(_shuffled(labeled_patients, rng)[:n_test])
        ssl_patients = sorted(set(by_patient) - test_patients)
        for p in by_patient:
            split_of_patient[p] = "test" if p in test_patients else "train"
        if ub_f > 0:
            ub_patients = _shuffled((p for p in ssl_patients if p in labeled_patients), rng)
            n_ub_val = _count(len(ub_patients), ub_f)
            if len(ub_patients) - n_ub_val < 1:
                raise DataError(
                    f"only {len(ub_patients)} SSL patient(s) with labeled frames: the upper-bound split "
                    "needs at least 2 (train and val); pass ub_val_fraction=0 to skip it"
                )
            for j, p in enumerate(ub_patients):
                ub_of_patient[p] = "val" if j < n_ub_val else "train"

    out: list[FrameRecord] = []
    for rec in records:
        patient = _patient_of(rec)
        split = split_of_patient[patient]
        ub_split = ""
        if domain == "target":
            if split == "test" and not rec.labeled:
                split = ""  # unlabeled frames of test patients: kept out of pretraining and test
            if split == "train" and rec.labeled:
                ub_split = ub_of_patient.get(patient, "")
        out.append(dataclasses.replace(rec, patient=patient, split=split, ub_split=ub_split))
    return out


def split_site(
    site_dir: str | Path,
    *,
    domain: str,
    seed: int = 0,
    **fractions,
) -> Site:
    """Assign splits to a site folder and rewrite its manifest atomically; returns the reloaded Site.

    ``fractions``: any of ``source_fractions``, ``target_test_fraction``, ``ub_val_fraction``.
    """
    unknown = set(fractions) - {"source_fractions", "target_test_fraction", "ub_val_fraction"}
    if unknown:
        raise ConfigError(f"unknown split option(s): {', '.join(sorted(unknown))}")
    site = load_site(site_dir)
    records = assign_splits(site.records, domain=domain, seed=seed, **fractions)
    write_manifest(Path(site_dir) / MANIFEST, records)
    return load_site(site_dir)


@dataclasses.dataclass
class SplitRow:
    """One line of a split summary table."""

    name: str
    patients: int
    frames: int
    labeled: int


def split_summary(records: Sequence[FrameRecord]) -> list[SplitRow]:
    """Patients / frames / labeled frames per ``split`` (train, val, test, unused) and per
    upper-bound ``ub_split`` (rows ``ub-train``, ``ub-val``) where present."""
    groups: dict[str, list[FrameRecord]] = defaultdict(list)
    for r in records:
        groups[r.split or "unused"].append(r)
        if r.ub_split:
            groups[f"ub-{r.ub_split}"].append(r)
    order = ["train", "val", "test", "unused", "ub-train", "ub-val"]
    return [
        SplitRow(
            name=k,
            patients=len({r.patient for r in groups[k]}),
            frames=len(groups[k]),
            labeled=sum(r.labeled for r in groups[k]),
        )
        for k in order
        if k in groups
    ]
