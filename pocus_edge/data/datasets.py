"""PyTorch datasets over ONE site folder, all built on the shared preprocessing
(:func:`pocus_edge.data.transforms.preprocess_frame` / ``preprocess_mask``).

* :class:`SegmentationDataset`: labeled frames -> (image, mask).
* :class:`UnlabeledImageDataset`: frames -> image. Reads ``Images/`` only and never opens a mask
  file, whatever the manifest says (pretraining's site-isolation guarantee).
* :class:`ContrastivePairDataset`: frames -> (view1, view2, video_id, frame_idx) with the
  method's augmentations (docs/method.md, contrastive branch).

Randomness (augmentations, MIM masks) is drawn from a generator seeded by (seed, epoch, sample
index), never from the process-global RNG: a sample looks the same whichever process, worker or
resumed run draws it, which is what makes DDP and ``--resume`` reproduce a single process exactly.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .layout import FrameRecord, Site, read_gray_png
from .transforms import preprocess_frame, preprocess_gray, preprocess_mask

# preload=True keeps decoded, resized frames for the life of the process, keyed by file and size,
# so several stages in one process (a benchmark running the whole protocol) decode each file once.
_PRELOAD_CACHE: dict[tuple[str, int, str], np.ndarray] = {}


def _cached(path, size: int, kind: str, load) -> np.ndarray:
    key = (str(path), int(size), kind)
    hit = _PRELOAD_CACHE.get(key)
    if hit is None:
        hit = _PRELOAD_CACHE[key] = load()
    return hit


def sample_seed(seed: int, epoch: int, index: int, stream: str = "") -> int:
    """A 63-bit seed for one sample's randomness in one epoch (stable across processes/runs)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, epoch: int, index: int, stream: str = "") -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(sample_seed(seed, epoch, index, stream))
    return g


def split_key(key, default_epoch: int) -> tuple[int, int]:
    """Dataset keys are an index, or ``(index, epoch)`` from the training engine's sampler (so
    persistent DataLoader workers, which hold their own copy of the dataset, see the epoch)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), default_epoch


def gray_to_tensor(gray: np.ndarray) -> torch.Tensor:
    """uint8 (S,S) from ``preprocess_gray`` -> float32 (3,S,S) in [0,1], bit-identical to
    ``preprocess_frame`` (same IEEE division by 255, channel repeat)."""
    g = torch.from_numpy(np.ascontiguousarray(gray)).to(torch.float32) / 255.0
    return g.unsqueeze(0).expand(3, -1, -1).contiguous()


class _SiteFrames(Dataset):
    """Shared plumbing: records of one site, the model's image size, an epoch counter for
    per-sample seeds, and an optional in-memory cache of decoded, resized frames (so a fast GPU is
    not starved by PNG decoding)."""

    def __init__(self, site: Site, records: Sequence[FrameRecord], size: int, *, seed: int = 0,
                 preload: bool = False, preload_threads: int = 4):
        if not records:
            raise DataError(f"{site.root}: no frames selected for this dataset (empty split?)")
        self.site = site
        self.records = list(records)
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = 0
        self._gray_cache: list[np.ndarray] | None = None
        if preload:
            self._gray_cache = self._parallel(
                lambda i: _cached(self.site.image_path(self.records[i]), self.size, "image", lambda: self._load_gray(i)),
                preload_threads,
            )

    def _parallel(self, fn, threads: int) -> list:
        # OpenCV decoding releases the GIL: threads give a real speed-up without pickling.
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            return list(pool.map(fn, range(len(self.records))))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def _load_gray(self, index: int) -> np.ndarray:
        rec = self.records[index]
        # Images/ only: read_gray_png on the image path, never Site.read_mask.
        return preprocess_gray(read_gray_png(self.site.image_path(rec)), self.size)

    def image(self, index: int) -> torch.Tensor:
        """(3,S,S) float32 in [0,1] of sample ``index``."""
        if self._gray_cache is not None:
            return gray_to_tensor(self._gray_cache[index])
        rec = self.records[index]
        return torch.from_numpy(preprocess_frame(read_gray_png(self.site.image_path(rec)), self.size))


class UnlabeledImageDataset(_SiteFrames):
    """Images of the given records; masks are never opened (pretraining reads images only)."""

    def __getitem__(self, key) -> torch.Tensor:
        index, _ = split_key(key, self.epoch)
        return self.image(index)


class SegmentationDataset(_SiteFrames):
    """Labeled frames -> (image (3,S,S) float32 in [0,1], mask (1,S,S) float32 in {0,1}).

    ``augment`` (:mod:`pocus_edge.data.transforms`: ``IntensityAugment`` changes the image's
    intensities only; ``StandardAugment`` also scales, and moves the mask with the image) draws
    from a generator seeded by (seed, epoch, index)."""

    def __init__(self, site: Site, records: Sequence[FrameRecord], size: int, *, seed: int = 0,
                 preload: bool = False, preload_threads: int = 4, augment=None):
        unlabeled = [r.filename for r in records if not r.labeled]
        if unlabeled:
            raise DataError(
                f"{site.root}: {len(unlabeled)} selected frame(s) have no mask (e.g. {unlabeled[0]!r})"
            )
        super().__init__(site, records, size, seed=seed, preload=preload, preload_threads=preload_threads)
        self.augment = augment
        self._mask_cache: list[np.ndarray] | None = None
        if preload:
            self._mask_cache = self._parallel(
                lambda i: _cached(self.site.mask_path(self.records[i]), self.size, "mask", lambda: self._load_mask(i)),
                preload_threads,
            )

    def _load_mask(self, index: int) -> np.ndarray:
        m = preprocess_mask(self.site.read_mask(self.records[index]), self.size)
        return m.astype(np.uint8)

    def mask(self, index: int) -> torch.Tensor:
        if self._mask_cache is not None:
            return torch.from_numpy(self._mask_cache[index]).to(torch.float32)
        return torch.from_numpy(preprocess_mask(self.site.read_mask(self.records[index]), self.size))

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = split_key(key, self.epoch)
        image, mask = self.image(index), self.mask(index)
        if self.augment is not None:
            rng = np.random.default_rng(sample_seed(self.seed, epoch, index, "intensity"))
            if getattr(self.augment, "joint", False):  # a geometric augmentation moves the mask too
                gray, moved = self.augment(image[0].numpy(), mask[0].numpy(), rng)
                mask = torch.from_numpy(moved).unsqueeze(0)
            else:
                gray = self.augment(image[0].numpy(), rng)
            image = torch.from_numpy(gray).unsqueeze(0).expand(3, -1, -1).contiguous()
        return image, mask


class ProbeNuisance:
    """What changes between two probes while the anatomy stays: applied to one contrastive view
    (a (3, S, S) gray tensor in [0, 1]), each step with probability ``p``, values drawn from
    torch's global generator (the dataset seeds it per sample):

    * PSF-like blur: Gaussian, sigma in [0.3, 1.5] px at the model's resolution;
    * multiplicative speckle: x * (1 + sd * N(0, 1)), sd in [0.05, 0.3], one field for the 3 channels;
    * gain: x * exp(u), u in [-0.3, 0.3];
    * gamma: x ** exp(u), u in [-0.4, 0.4];

    then clipped to [0, 1]. The ranges are generic for B-mode ultrasound, not read from any
    probe profile."""

    BLUR_SIGMA = (0.3, 1.5)
    SPECKLE_SD = (0.05, 0.3)
    GAIN_LOG = 0.3
    GAMMA_LOG = 0.4

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probe-nuisance probability must be in [0, 1], got {p}")
        self.p = p

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand(()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        if self.p == 0.0:
            return x
        if float(torch.rand(())) < self.p:
            sigma = self._uniform(*self.BLUR_SIGMA)
            radius = max(1, int(3.0 * sigma + 0.5))
            x = TF.gaussian_blur(x, kernel_size=[2 * radius + 1, 2 * radius + 1], sigma=[sigma, sigma])
        if float(torch.rand(())) < self.p:
            sd = self._uniform(*self.SPECKLE_SD)
            x = x * (1.0 + sd * torch.randn((1, *x.shape[1:]), dtype=x.dtype))
        if float(torch.rand(())) < self.p:
            x = x * float(np.exp(self._uniform(-self.GAIN_LOG, self.GAIN_LOG)))
        if float(torch.rand(())) < self.p:
            x = x.clamp(0.0, 1.0) ** float(np.exp(self._uniform(-self.GAMMA_LOG, self.GAMMA_LOG)))
        return x.clamp(0.0, 1.0)


def contrastive_transform(size: int, cfg):
    """The method's view augmentation on a (3,S,S) float tensor in [0,1]: RandomResizedCrop back to
    S (scale/ratio from ``cfg``), horizontal flip, colour jitter (brightness/contrast/saturation)
    applied with probability ``cfg.jitter_p``, then :class:`ProbeNuisance` with probability
    ``cfg.nuisance_p`` per step (0: the released code's views)."""
    from torchvision.transforms import v2

    steps = [
        v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), antialias=True),
        v2.RandomHorizontalFlip(p=cfg.flip_p),
        v2.RandomApply([v2.ColorJitter(brightness=cfg.jitter, contrast=cfg.jitter, saturation=cfg.jitter)],
                       p=cfg.jitter_p),
    ]
    nuisance_p = float(getattr(cfg, "nuisance_p", 0.0))
    if nuisance_p > 0:
        steps.append(ProbeNuisance(nuisance_p))
    return v2.Compose(steps)


class ContrastivePairDataset(_SiteFrames):
    """Frames -> (view1, view2, video_id, frame_idx): two independently augmented views of one
    frame plus the integers MT-NXent needs to mask temporal neighbours. ``video_id`` indexes the
    sorted video names of this dataset's records (``video_names``)."""

    def __init__(self, site: Site, records: Sequence[FrameRecord], size: int, cfg, *, seed: int = 0,
                 preload: bool = False, preload_threads: int = 4):
        super().__init__(site, records, size, seed=seed, preload=preload, preload_threads=preload_threads)
        self.video_names = sorted({r.videoname for r in self.records})
        index = {v: i for i, v in enumerate(self.video_names)}
        self.video_ids = [index[r.videoname] for r in self.records]
        self.transform = contrastive_transform(self.size, cfg)

    def __getitem__(self, key):
        index, epoch = split_key(key, self.epoch)
        image = self.image(index)
        # torchvision draws from the global RNG: fork it and seed per (seed, epoch, index) so the
        # views do not depend on which process or worker asks, and the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index, "views"))
            view1 = self.transform(image)
            view2 = self.transform(image)
        view1 = view1.clamp_(0.0, 1.0)
        view2 = view2.clamp_(0.0, 1.0)
        return view1, view2, self.video_ids[index], int(self.records[index].framenum)
