"""Batch composition for contrastive pretraining.

With batches drawn uniformly from a split of hundreds of videos, two frames of one video rarely
meet in a batch, so MT-NXent's temporal mask (same video, closer than ``min_frame_gap`` frames)
removes almost no negatives and MT-NXent is plain NT-Xent on such data. The
:class:`VideoClusteredSampler` builds every global batch from ``frames_per_video`` frames of each
of ``batch / frames_per_video`` videos, so each anchor meets its temporal neighbours and the mask
has work to do. The contrastive stage logs the share of negatives the mask removed
(``masked_negatives``) either way.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

from torch.utils.data import Sampler

from ..errors import ConfigError


class VideoClusteredSampler(Sampler[int]):
    """Per-rank frame indices of one epoch, in which every GLOBAL batch of ``global_batch`` frames
    is made of chunks of ``frames_per_video`` frames of one video each.

    Each epoch: every video's frames are shuffled and cut into chunks of ``frames_per_video``
    (a video's last chunk may be shorter), the chunks are shuffled, concatenated and cut into
    global batches (the last incomplete batch is dropped). Rank ``r`` of ``W`` takes every W-th
    index starting at ``r``, so the union of the ranks' i-th local batches is the i-th global
    batch, whatever W. Deterministic in (seed, epoch).
    """

    def __init__(self, video_ids: Sequence[int], frames_per_video: int, global_batch: int, *, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0):
        if frames_per_video < 1:
            raise ConfigError(f"frames_per_video must be >= 1, got {frames_per_video}")
        if global_batch < 1 or global_batch % num_replicas:
            raise ConfigError(f"global batch {global_batch} does not split evenly over {num_replicas} processes")
        self.video_ids = list(video_ids)
        self.k = int(frames_per_video)
        self.global_batch = int(global_batch)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.epoch = 0
        by_video: dict[int, list[int]] = {}
        for index, video in enumerate(self.video_ids):
            by_video.setdefault(int(video), []).append(index)
        self.videos = [by_video[v] for v in sorted(by_video)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_order(self) -> list[int]:
        """The epoch's frame order over all ranks (a whole number of global batches)."""
        rng = random.Random(f"pocus-edge-video-batches:{self.seed}:{self.epoch}")
        chunks: list[list[int]] = []
        for frames in self.videos:
            frames = list(frames)
            rng.shuffle(frames)
            chunks += [frames[i : i + self.k] for i in range(0, len(frames), self.k)]
        rng.shuffle(chunks)
        order = [i for chunk in chunks for i in chunk]
        return order[: (len(order) // self.global_batch) * self.global_batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return (len(self.video_ids) // self.global_batch) * self.global_batch // self.num_replicas


def video_clustered_factory(video_ids: Sequence[int], frames_per_video: int, global_batch: int):
    """A sampler factory for :class:`pocus_edge.train.engine.Trainer`."""

    def make(dataset, ctx, seed: int) -> VideoClusteredSampler:
        return VideoClusteredSampler(video_ids, frames_per_video, global_batch, num_replicas=ctx.world_size,
                                     rank=ctx.rank, seed=seed)

    return make


__all__ = ["VideoClusteredSampler", "video_clustered_factory"]
