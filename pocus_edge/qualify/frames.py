"""The frames ``qualify`` reads: the TARGET's unlabeled frames (images only; no mask file of the
target is ever opened) and the SOURCE validation frames that calibrate the estimate (images and
masks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.layout import FrameRecord, Site, read_gray_png
from ..errors import DataError

DEFAULT_FRAMES = 240
DEFAULT_CALIB_FRAMES = 96
MIN_WINDOW = 16


@dataclass
class FrameSet:
    """Preprocessed frames of one site: gray float32 (N, S, S) in [0, 1] and their records."""

    site: Site
    records: list[FrameRecord]
    gray: np.ndarray
    masks: np.ndarray | None = None  # bool (N, S, S): source calibration frames only

    def groups(self, by: str) -> np.ndarray:
        return np.array([getattr(r, by) for r in self.records])


def open_site(path: Path, what: str) -> Site:
    from ..train.common import open_one_site

    return open_one_site(path, what=what, check_images=False)


def target_records(site: Site, frames: int, seed: int) -> list[FrameRecord]:
    """Up to ``frames`` unlabeled target frames, as contiguous windows of recordings (so the drift
    band sees frames in stream order): recordings in a seeded random order, from each a window of
    ``max(16, frames / recordings)`` consecutive frames at a seeded offset, until ``frames``."""
    unlabeled = [r for r in site.records if not r.labeled]
    if not unlabeled:
        raise DataError(f"{site.manifest_path}: the target site has no unlabeled frames (labeled = 0) to qualify on")
    by_video: dict[str, list[FrameRecord]] = {}
    for r in unlabeled:
        by_video.setdefault(r.videoname, []).append(r)
    if frames <= 0 or frames >= len(unlabeled):
        return [r for v in by_video.values() for r in sorted(v, key=lambda r: r.framenum)]
    rng = np.random.default_rng(seed)
    videos = list(by_video)
    order = rng.permutation(len(videos))
    window = max(MIN_WINDOW, -(-frames // len(videos)))
    chosen: list[FrameRecord] = []
    for k in order:
        recs = sorted(by_video[videos[k]], key=lambda r: r.framenum)
        take = min(window, len(recs), frames - len(chosen))
        start = int(rng.integers(0, len(recs) - take + 1))
        chosen += recs[start : start + take]
        if len(chosen) >= frames:
            break
    return chosen


def source_records(site: Site, frames: int) -> list[FrameRecord]:
    """The source validation frames with labels, every k-th to at most ``frames``."""
    records = site.select("val", labeled=True)
    if not records:
        raise DataError(f"{site.manifest_path}: the source site has no labeled val frames to calibrate on")
    if frames and len(records) > frames:
        records = records[:: -(-len(records) // frames)]
    return records


def load_frames(site: Site, records: list[FrameRecord], size: int, *, masks: bool = False) -> FrameSet:
    from ..data.transforms import preprocess_gray, preprocess_mask

    gray = np.stack([preprocess_gray(read_gray_png(site.image_path(r)), size) for r in records]).astype(np.float32) / 255.0
    mask = np.stack([preprocess_mask(site.read_mask(r), size)[0] > 0.5 for r in records]) if masks else None
    return FrameSet(site, records, gray, mask)
