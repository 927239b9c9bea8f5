"""Datasets: shared preprocessing, masks never opened for unlabeled reads, seeded augmentations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pocus_edge.config import ContrastiveConfig
from pocus_edge.data import datasets as ds
from pocus_edge.data.layout import FrameRecord, SiteWriter
from pocus_edge.data.transforms import preprocess_frame, preprocess_mask
from pocus_edge.errors import DataError

SIZE = 32


@pytest.fixture()
def site(tmp_path):
    rng = np.random.default_rng(0)
    writer = SiteWriter(tmp_path / "siteA")
    for v in range(2):
        for f in range(5):
            img = rng.integers(0, 256, size=(30, 44), dtype=np.uint8)
            mask = (rng.random((30, 44)) > 0.7).astype(np.uint8) * 2 if f % 2 == 0 else None
            rec = FrameRecord(f"v{v}_f{f}.png", f"vid{v}", 10 * f, patient=f"p{v}", split="train")
            writer.add(rec, img, mask)
    return writer.close()


def test_unlabeled_dataset_never_opens_masks(site, monkeypatch):
    opened = []
    real = ds.read_gray_png

    def spy(path):
        opened.append(str(path))
        return real(path)

    monkeypatch.setattr(ds, "read_gray_png", spy)
    monkeypatch.setattr(type(site), "read_mask", lambda *a, **k: pytest.fail("read_mask called"))
    data = ds.UnlabeledImageDataset(site, site.records, SIZE)
    for i in range(len(data)):
        x = data[i]
        expected = preprocess_frame(real(site.image_path(site.records[i])), SIZE)
        assert torch.equal(x, torch.from_numpy(expected))
    assert opened and all("/Images/" in p for p in opened)
    assert not any("/Masks/" in p for p in opened)


def test_preloaded_frames_are_bit_identical(site):
    lazy = ds.UnlabeledImageDataset(site, site.records, SIZE)
    cached = ds.UnlabeledImageDataset(site, site.records, SIZE, preload=True, preload_threads=2)
    for i in range(len(lazy)):
        assert torch.equal(lazy[i], cached[i])
    labeled = site.select(labeled=True)
    seg_lazy = ds.SegmentationDataset(site, labeled, SIZE)
    seg_cached = ds.SegmentationDataset(site, labeled, SIZE, preload=True)
    for i in range(len(labeled)):
        (a, m), (b, n) = seg_lazy[i], seg_cached[i]
        assert torch.equal(a, b) and torch.equal(m, n)


def test_segmentation_dataset_uses_preprocess_mask_and_refuses_unlabeled(site):
    labeled = site.select(labeled=True)
    data = ds.SegmentationDataset(site, labeled, SIZE)
    image, mask = data[1]
    assert image.shape == (3, SIZE, SIZE) and mask.shape == (1, SIZE, SIZE)
    assert torch.equal(mask, torch.from_numpy(preprocess_mask(site.read_mask(labeled[1]), SIZE)))
    assert mask.sum() > 0
    with pytest.raises(DataError, match="no mask"):
        ds.SegmentationDataset(site, site.records, SIZE)
    with pytest.raises(DataError, match="empty split"):
        ds.UnlabeledImageDataset(site, [], SIZE)


def test_contrastive_pairs_seeded_and_carry_ids(site):
    cfg = ContrastiveConfig()
    data = ds.ContrastivePairDataset(site, site.records, SIZE, cfg, seed=3)
    rng_before = torch.get_rng_state()
    v1, v2, vid, frame = data[7]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert v1.shape == v2.shape == (3, SIZE, SIZE)
    assert not torch.equal(v1, v2)
    assert 0.0 <= float(v1.min()) and float(v1.max()) <= 1.0
    assert (vid, frame) == (data.video_names.index(site.records[7].videoname), site.records[7].framenum)
    assert isinstance(vid, int) and isinstance(frame, int)
    again = data[7]
    assert torch.equal(again[0], v1) and torch.equal(again[1], v2)
    data.set_epoch(1)
    assert not torch.equal(data[7][0], v1)
    other_seed = ds.ContrastivePairDataset(site, site.records, SIZE, cfg, seed=4)
    assert not torch.equal(other_seed[7][0], v1)


def test_contrastive_transform_follows_config(site):
    # No crop change, no flip, no jitter: the views are the preprocessed frame itself.
    cfg = dataclasses.replace(ContrastiveConfig(), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                              nuisance_p=0.0)
    data = ds.ContrastivePairDataset(site, site.records, SIZE, cfg)
    v1, v2, _, _ = data[2]
    ref = torch.from_numpy(preprocess_frame(site.read_image(site.records[2]), SIZE))
    assert torch.allclose(v1, ref, atol=1e-6) and torch.allclose(v2, ref, atol=1e-6)
    # Always flip: view = mirrored frame.
    cfg_flip = dataclasses.replace(cfg, flip_p=1.0)
    v1f, _, _, _ = ds.ContrastivePairDataset(site, site.records, SIZE, cfg_flip)[2]
    assert torch.allclose(v1f, ref.flip(-1), atol=1e-6)


def test_probe_nuisance_views_blur_speckle_and_rescale_the_frame(site):
    # Every nuisance step on: the view is no longer the frame, stays in [0, 1], is reproducible
    # from the sample's seed, and each step alone does what it says.
    cfg = dataclasses.replace(ContrastiveConfig(), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                              nuisance_p=1.0)
    data = ds.ContrastivePairDataset(site, site.records, SIZE, cfg)
    v1, v2, _, _ = data[2]
    ref = torch.from_numpy(preprocess_frame(site.read_image(site.records[2]), SIZE))
    assert not torch.allclose(v1, ref, atol=1e-3) and not torch.allclose(v1, v2, atol=1e-3)
    assert float(v1.min()) >= 0.0 and float(v1.max()) <= 1.0
    again = ds.ContrastivePairDataset(site, site.records, SIZE, cfg)[2]
    assert torch.equal(again[0], v1) and torch.equal(again[1], v2)
    nuisance = ds.ProbeNuisance(1.0)
    step = torch.zeros(1, 9, 9)
    step[:, :, 4:] = 0.8
    ramp = torch.linspace(0.05, 0.95, 81).reshape(1, 9, 9).expand(3, -1, -1).clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = nuisance(step.expand(3, -1, -1).clone())
        torch.manual_seed(1)
        out_ramp = nuisance(ramp)
    # Blur spreads the edge into the dark half; every channel gets the same (gray) result.
    assert float(out[0, 4, 3]) > 0.0
    assert torch.allclose(out[0], out[1], atol=1e-6) and torch.allclose(out[1], out[2], atol=1e-6)
    assert not torch.allclose(out_ramp, ramp, atol=1e-3)


def test_standard_augmentation_moves_the_mask_with_the_frame():
    from pocus_edge.data.transforms import StandardAugment

    aug = StandardAugment()
    aug.P = {**aug.P, "scale": 1.0, "noise": 0.0, "blur": 0.0, "brightness": 0.0, "contrast": 0.0, "gamma": 0.0}
    mask = np.zeros((64, 64), np.float32)
    mask[20:28, 10:50] = 1.0
    frame = mask * 0.9
    changed = 0
    for seed in range(12):
        gray, moved = aug(frame, mask, np.random.default_rng(seed))
        assert set(np.unique(moved)) <= {0.0, 1.0}
        # A frame that IS its mask stays its mask after the shared geometric step (bilinear edges aside).
        assert np.mean((gray > 0.45) == (moved > 0.5)) > 0.98
        changed += int(moved.sum() != mask.sum())
    assert changed >= 10  # the scale really changes the geometry
    a = aug(frame, mask, np.random.default_rng(3))
    b = aug(frame, mask, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_intensity_augmentation_changes_intensities_only_and_is_seeded(site):
    from pocus_edge.data.transforms import IntensityAugment, make_augmentation

    labeled = site.select(labeled=True)
    plain = ds.SegmentationDataset(site, labeled, SIZE, seed=5)
    aug = ds.SegmentationDataset(site, labeled, SIZE, seed=5, augment=make_augmentation("intensity"))
    changed = 0
    for i in range(len(labeled)):
        (a, m), (b, n) = plain[i], aug[i]
        assert torch.equal(m, n)  # the mask is never touched
        assert b.shape == a.shape and 0.0 <= float(b.min()) and float(b.max()) <= 1.0
        assert torch.equal(b[0], b[1]) and torch.equal(b[0], b[2])  # still a gray frame
        changed += not torch.equal(a, b)
        assert torch.equal(aug[i][0], b)  # same (seed, epoch, index): same draw
    assert changed >= len(labeled) - 1  # each step has p 0.5: all five skipped is 1/32
    first = [aug[i][0] for i in range(len(labeled))]
    aug.set_epoch(1)
    assert any(not torch.equal(aug[i][0], first[i]) for i in range(len(labeled)))  # redrawn each epoch
    # Each step does what it says, on a constant image with p = 1 and a fixed draw.
    rng = np.random.default_rng(0)
    x = np.full((16, 16), 0.5, np.float32)
    out = IntensityAugment(p=1.0)(x, rng)
    assert out.dtype == np.float32 and out.shape == x.shape and not np.allclose(out, x)
    assert np.array_equal(IntensityAugment(p=0.0)(x, rng), x)
    with pytest.raises(DataError, match="unknown augmentation"):
        make_augmentation("elastic")


def test_video_clustered_sampler_builds_batches_of_video_chunks():
    from pocus_edge.train.sampler import VideoClusteredSampler

    video_ids = [v for v in range(12) for _ in range(8)]  # 12 videos x 8 frames
    k, batch = 4, 16
    full = VideoClusteredSampler(video_ids, k, batch, seed=1)
    full.set_epoch(0)
    order = list(full)
    assert len(order) == len(full) == 96 and sorted(order) == list(range(96))  # each frame once
    for start in range(0, 96, batch):
        counts = {}
        for i in order[start : start + batch]:
            counts[video_ids[i]] = counts.get(video_ids[i], 0) + 1
        assert all(c % k == 0 for c in counts.values()), counts  # whole chunks of one video
    # Two processes: the union of the ranks' i-th local batches is the i-th global batch.
    ranks = []
    for r in range(2):
        s = VideoClusteredSampler(video_ids, k, batch, num_replicas=2, rank=r, seed=1)
        s.set_epoch(0)
        ranks.append(list(s))
    for b in range(96 // batch):
        local = batch // 2
        union = sorted(ranks[0][b * local : (b + 1) * local] + ranks[1][b * local : (b + 1) * local])
        assert union == sorted(order[b * batch : (b + 1) * batch])
    full.set_epoch(1)
    assert list(full) != order  # a new order every epoch
    full.set_epoch(0)
    assert list(full) == order  # and the same order for the same epoch
