"""Patient-level splits: no patient in two splits, the paper's proportions, determinism, refusals."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import pytest

from pocus_edge.data.layout import FrameRecord, SiteWriter, load_site, read_manifest
from pocus_edge.data.splits import assign_splits, split_site, split_summary
from pocus_edge.errors import ConfigError, DataError


def make_records(n_patients: int, *, labeled_every: int = 1, seed: int = 0, unlabeled_patients: int = 0) -> list[FrameRecord]:
    """Patients with 1-3 videos of 3-8 frames; every ``labeled_every``-th frame labeled, except
    the last ``unlabeled_patients`` patients, which have no labels at all."""
    rng = random.Random(seed)
    records = []
    for p in range(n_patients):
        for v in range(rng.randint(1, 3)):
            for f in range(rng.randint(3, 8)):
                labeled = (f % labeled_every == 0) and p < n_patients - unlabeled_patients
                name = f"P{p:03d}_v{v}_{f:03d}.png"
                records.append(FrameRecord(name, f"P{p:03d}_v{v}", f, patient=f"P{p:03d}", labeled=labeled))
    return records


def patients_by_split(records, field="split"):
    out = defaultdict(set)
    for r in records:
        out[getattr(r, field)].add(r.patient)
    return out


def assert_no_shared_patient(records, field="split"):
    groups = patients_by_split(records, field)
    names = [k for k in groups if k]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not (groups[a] & groups[b]), f"patients in both {a} and {b}: {groups[a] & groups[b]}"


@pytest.mark.parametrize("n_patients", [3, 10, 109])
def test_source_split_by_patient_with_paper_proportions(n_patients):
    records = make_records(n_patients)
    out = assign_splits(records, domain="source", seed=3)
    assert len(out) == len(records)
    assert_no_shared_patient(out)
    groups = patients_by_split(out)
    assert set(groups) == {"train", "val", "test"}
    # Counts are the nearest integer to the share of patients, at least one each.
    expected_val = max(1, math.floor(n_patients * 0.16 + 0.5))
    assert len(groups["val"]) == expected_val
    assert len(groups["test"]) == expected_val
    assert len(groups["train"]) == n_patients - 2 * expected_val
    assert all(r.ub_split == "" for r in out)


def test_paper_patient_counts():
    # Paper: 109 source patients -> val 17, test 18 (we round 0.16*109 = 17.4 to 17 for both);
    # 136 target patients -> 17 test, 119 SSL; 119 SSL -> upper-bound val 17.
    src = patients_by_split(assign_splits(make_records(109), domain="source"))
    assert (len(src["train"]), len(src["val"]), len(src["test"])) == (75, 17, 17)
    tgt = assign_splits(make_records(136, labeled_every=8), domain="target")
    assert len(patients_by_split(tgt)["test"]) == 17
    assert len({r.patient for r in tgt if r.split == "train"}) == 119
    ub = patients_by_split([r for r in tgt if r.ub_split], "ub_split")
    assert (len(ub["train"]), len(ub["val"])) == (102, 17)


def test_deterministic_in_seed_and_independent_of_order():
    records = make_records(40)
    a = assign_splits(records, domain="source", seed=7)
    b = assign_splits(list(reversed(records)), domain="source", seed=7)
    split_a = {r.filename: r.split for r in a}
    assert split_a == {r.filename: r.split for r in b}
    c = assign_splits(records, domain="source", seed=8)
    assert split_a != {r.filename: r.split for r in c}, "another seed should give another split"
    # The input records are not modified; order of the output follows the input.
    assert all(r.split == "" for r in records)
    assert [r.filename for r in a] == [r.filename for r in records]


def test_target_protocol():
    records = make_records(48, labeled_every=4, unlabeled_patients=6)
    out = assign_splits(records, domain="target", seed=1)
    assert_no_shared_patient(out)
    by_patient = defaultdict(list)
    for r in out:
        by_patient[r.patient].append(r)
    test_patients = {p for p, rs in by_patient.items() if any(r.split == "test" for r in rs)}
    assert len(test_patients) == round(48 * 0.125)
    for p, rs in by_patient.items():
        if p in test_patients:
            # Test patients: labeled frames are test, unlabeled ones unused, none in SSL train.
            assert all((r.split == "test") == r.labeled for r in rs)
            assert all(r.split in ("test", "") for r in rs)
            assert all(r.ub_split == "" for r in rs)
        else:
            assert all(r.split == "train" for r in rs), "every frame of an SSL patient is SSL train"
            assert all((r.ub_split != "") == r.labeled for r in rs), "ub_split exactly on labeled frames"
            assert len({r.ub_split for r in rs if r.labeled}) <= 1, "upper-bound split is by patient"
    # Test patients are drawn among patients with labels (an unlabeled test patient tests nothing).
    assert all(any(r.labeled for r in by_patient[p]) for p in test_patients)
    ssl_labeled = {r.patient for r in out if r.ub_split}
    assert len({r.patient for r in out if r.ub_split == "val"}) == max(1, round(len(ssl_labeled) * 17 / 119))
    no_ub = assign_splits(records, domain="target", seed=1, ub_val_fraction=0)
    assert all(r.ub_split == "" for r in no_ub)
    assert [r.split for r in no_ub] == [r.split for r in out]


@pytest.mark.parametrize(
    "records, domain, kwargs",
    [
        (make_records(2), "source", {}),
        (make_records(1), "target", {}),
        (make_records(8, unlabeled_patients=8), "target", {}),  # nobody labeled: no target test
        (make_records(3, unlabeled_patients=1), "target", {}),  # 1 labeled SSL patient: no ub train+val
        ([], "source", {}),
    ],
)
def test_too_few_patients_refused(records, domain, kwargs):
    with pytest.raises(DataError):
        assign_splits(records, domain=domain, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"domain": "both"},
        {"domain": "source", "source_fractions": (0.5, 0.2, 0.2)},
        {"domain": "source", "source_fractions": (0.8, 0.2)},
        {"domain": "target", "target_test_fraction": 0.0},
        {"domain": "target", "ub_val_fraction": 1.0},
    ],
)
def test_bad_options_refused(kwargs):
    with pytest.raises(ConfigError):
        assign_splits(make_records(20), **kwargs)


def test_split_site_rewrites_manifest(tmp_path):
    writer = SiteWriter(tmp_path / "site")
    img = np.zeros((4, 6), np.uint8)
    for r in make_records(10, labeled_every=2, seed=2):
        writer.add(r, img, img if r.labeled else None)
    writer.close()
    site = split_site(tmp_path / "site", domain="target", seed=0)
    on_disk = read_manifest(tmp_path / "site" / "manifest.csv")
    assert [(r.filename, r.split, r.ub_split) for r in on_disk] == [(r.filename, r.split, r.ub_split) for r in site.records]
    assert {r.split for r in on_disk} == {"train", "test", ""}
    assert load_site(tmp_path / "site").records == site.records
    rows = {row.name: row for row in split_summary(site.records)}
    assert rows["test"].frames == rows["test"].labeled == sum(r.split == "test" for r in on_disk)
    assert sum(rows[k].frames for k in ("train", "test", "unused") if k in rows) == len(on_disk)
    assert rows["ub-train"].labeled + rows["ub-val"].labeled == sum(bool(r.ub_split) for r in on_disk)


def test_split_site_on_released_code_csv(tmp_path):
    # A 3-column released-code manifest: patients come from video names, labels from Masks/;
    # after splitting, the manifest carries every column, so the inferred values are kept.
    from pocus_edge.data.layout import COLUMNS, write_gray_png

    root = tmp_path / "released"
    rows = ["filename,videoname,framenum"]
    img = np.zeros((3, 4), np.uint8)
    for p in range(9):
        for f in range(2):
            name = f"S{p}_volar_{f}.png"
            write_gray_png(root / "Images" / name, img)
            write_gray_png(root / "Masks" / name, img)
            rows.append(f"{name},S{p}_volar,{f}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    site = split_site(root, domain="source", seed=5)
    assert (root / "manifest.csv").read_text().splitlines()[0].split(",") == list(COLUMNS)
    assert_no_shared_patient(site.records)
    assert {r.patient for r in site.records} == {f"S{p}" for p in range(9)}
    assert all(r.labeled for r in site.records)
    assert [len(patients_by_split(site.records)[s]) for s in ("train", "val", "test")] == [7, 1, 1]  # 0.16 * 9 = 1.44 -> 1
