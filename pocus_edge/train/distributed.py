"""Multi-process training helpers: torchrun / DistributedDataParallel with NCCL on CUDA and gloo
on CPU, global-batch collectives that keep gradients, and a batch norm that sees the global batch.

Gradient bookkeeping used throughout: every rank r backpropagates a local objective O_r with
sum_r O_r = world_size * L, where L is the loss of the global batch (either each rank's mean
over its equal share of the batch, or the global loss itself computed on gathered tensors).
DDP averages gradients over ranks, so the parameters receive exactly dL/dtheta, as a single
process holding the whole global batch would.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import ToolchainUnavailable

        raise ToolchainUnavailable("--device cuda: no CUDA GPU is visible here (use --device cpu)")
    return dev


def setup(device: str | torch.device | None = "auto") -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) or when the caller has
    already initialized one (tests spawn processes themselves); otherwise a single process."""
    dev = resolve_device(device)
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local_rank, dev, dist.get_backend())
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return DistContext(device=dev)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the autograd graph (the backward
    pass sums each rank's gradient for this rank's slice). Identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of private functional collectives; still the public autograd-aware op.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (ids, labels) from every rank along dim 0, no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a detached tensor over ranks (for logging and agreeing on stop conditions)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def world_size() -> int:
    """Processes in the group (1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a detached tensor over ranks (e.g. a global count of masked pixels)."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _GlobalBatchNorm:
    """BatchNorm whose training statistics cover the global batch on any backend.

    ``torch.nn.SyncBatchNorm`` only runs on accelerators; this one all-reduces per-channel sums
    with the autograd-aware ``torch.distributed.nn.functional.all_reduce`` so gloo/CPU runs
    normalize (and backpropagate) exactly as one process with the whole batch would. Channels
    are dimension 1; every other dimension is reduced ((N, C) and (N, C, H, W) alike).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, *range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        local = torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), count])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(local)
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach() * momentum)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """:class:`_GlobalBatchNorm` for (N, C, H, W) maps (the decoder)."""


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """:class:`_GlobalBatchNorm` for (N, C) features (the contrastive projection head)."""


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm see the global batch: SyncBatchNorm on CUDA, GlobalBatchNorm1d/2d
    elsewhere. Call only when running with several processes."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _swap_bn(module)


def _swap_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, _GlobalBatchNorm):
        cls = GlobalBatchNorm1d if isinstance(module, nn.BatchNorm1d) else GlobalBatchNorm2d
        new = cls(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _swap_bn(child))
    return module


__all__ = [
    "DistContext",
    "GlobalBatchNorm1d",
    "GlobalBatchNorm2d",
    "all_ranks_true",
    "all_reduce_mean",
    "all_reduce_sum",
    "world_size",
    "barrier",
    "convert_batchnorm",
    "gather_no_grad",
    "gather_with_grad",
    "resolve_device",
    "setup",
]
