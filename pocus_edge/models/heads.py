"""Pretraining wrappers around the TransUNet branch.

* Generative (SimMIM-style): :class:`MaskGenerator` draws a grid of cells (7x7, or ``mim.mask_cell`` pixels each),
  masks ``ceil(cells * mask_ratio)`` of them per image; ``speckle_fraction`` of the masked cells get
  multiplicative speckle ``x + x * N(0, 1)`` (clipped to [0, 1]) instead of zeros (released code).
  :class:`MIMModel` reconstructs the 3-channel image with a whole TransUNet and scores it with
  :func:`pocus_edge.losses.masked_l1` on the masked pixels.
* Contrastive: :class:`ContrastiveModel` = the TransUNet encoder (same module names, so its
  weights load into a segmenter), tokens mean-pooled, projection MLP, L2 normalization.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MIMConfig, ModelConfig
from ..errors import ConfigError
from ..losses import masked_l1
from .transunet import HybridEncoder, TransUNet

__all__ = ["MaskGenerator", "apply_mim_mask", "MIMModel", "ContrastiveModel", "encoder_state"]


class MaskGenerator:
    """Random cell masks for masked image modeling.

    ``MaskGenerator(img_size, mim)(batch, generator=None) -> (mask, speckle)``, both float
    (batch, 1, img_size, img_size) of {0, 1}; ``speckle`` is a subset of ``mask``. Every image
    gets exactly ``num_masked`` masked cells of which exactly ``num_speckle`` are speckled.
    """

    def __init__(self, img_size: int, mim: MIMConfig | None = None):
        mim = mim or MIMConfig()
        cell = mim.cell_pixels(img_size)  # the paper's 7x7 grid at any size unless mask_cell is set
        if cell < 1 or img_size < cell:
            raise ConfigError(f"mask_cell={cell} must be in 1..img_size={img_size}")
        if not 0.0 < mim.mask_ratio <= 1.0:
            raise ConfigError(f"mask_ratio={mim.mask_ratio} must be in (0, 1]")
        if not 0.0 <= mim.speckle_fraction <= 1.0:
            raise ConfigError(f"speckle_fraction={mim.speckle_fraction} must be in [0, 1]")
        self.img_size = img_size
        self.cell = cell
        # A partial last cell (img_size not a multiple of the cell) still counts as a cell.
        self.cells_per_side = math.ceil(img_size / cell)
        self.num_cells = self.cells_per_side**2
        self.num_masked = math.ceil(self.num_cells * mim.mask_ratio - 1e-9)  # 49 * 0.6 -> 30
        self.num_speckle = math.floor(self.num_masked * mim.speckle_fraction + 0.5)  # 30 * 0.2 -> 6

    def __call__(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.rand(batch, self.num_cells, generator=generator)
        order = scores.argsort(dim=1)  # a random permutation of the cells per image
        rank = order.argsort(dim=1)  # rank of each cell within its image's permutation
        cell_mask = (rank < self.num_masked).float()
        cell_speckle = (rank < self.num_speckle).float()
        return self._to_pixels(cell_mask).to(device), self._to_pixels(cell_speckle).to(device)

    def _to_pixels(self, cells: torch.Tensor) -> torch.Tensor:
        grid = cells.view(-1, 1, self.cells_per_side, self.cells_per_side)
        pixels = grid.repeat_interleave(self.cell, dim=2).repeat_interleave(self.cell, dim=3)
        return pixels[:, :, : self.img_size, : self.img_size].contiguous()


def apply_mim_mask(
    x: torch.Tensor, mask: torch.Tensor, speckle: torch.Tensor, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Zero the masked cells of ``x`` (N, C, S, S in [0, 1]) and put speckle ``clip(x + x*noise)``
    on the speckle cells. ``noise`` defaults to N(0, 1) shared by the channels (a gray frame)."""
    if noise is None:
        noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
    speckled = (x + x * noise).clamp(0.0, 1.0)
    keep = 1.0 - mask
    return x * keep + speckled * speckle


class MIMModel(nn.Module):
    """Masked image modeling: the TransUNet (3 output channels) reconstructs the original frame."""

    def __init__(self, cfg: ModelConfig, mim: MIMConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.mim = mim or MIMConfig()
        self.net = TransUNet(cfg, out_channels=cfg.in_chans)
        self.mask_generator = MaskGenerator(cfg.img_size, self.mim)

    @property
    def encoder(self) -> HybridEncoder:
        return self.net.encoder

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, speckle: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(masked L1 loss, reconstruction (N, C, S, S))``; the reconstruction is the
        network's linear output (SimMIM predicts pixel values directly)."""
        reconstruction = self.net(apply_mim_mask(x, mask, speckle, noise))
        return masked_l1(reconstruction, x, mask), reconstruction

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)


class ContrastiveModel(nn.Module):
    """Encoder + mean pooling + projection head (hidden -> proj_hidden -> proj_dim), L2-normalized."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = HybridEncoder(cfg)
        self.projector = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden, cfg.proj_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(x)
        return F.normalize(self.projector(tokens.mean(dim=1)), dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors keyed ``encoder.*`` (what ``load_encoder`` reads), for a TransUNet,
    MIMModel or ContrastiveModel."""
    encoder = model.net.encoder if isinstance(model, MIMModel) else getattr(model, "encoder", None)
    if not isinstance(encoder, HybridEncoder):
        raise TypeError(f"{type(model).__name__} has no TransUNet encoder")
    return {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
