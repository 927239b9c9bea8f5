"""Pretraining wrappers around the TransUNet branch.

* Generative (SimMIM-style): :class:`MaskGenerator` draws a grid of cells (7x7, or ``mim.mask_cell`` pixels each),
  masks ``ceil(cells * mask_ratio)`` of them per image; ``speckle_fraction`` of the masked cells get
  multiplicative speckle ``x + x * N(0, 1)`` (clipped to [0, 1]) instead of zeros (released code).
  :class:`MIMModel` reconstructs the 3-channel image with a whole TransUNet (``mim.head =
  "decoder"``, the released code) or with SimMIM's light head on the encoder's tokens
  (``"linear"``: a 1x1 convolution to the 16x16 pixels of each token, pixel-shuffled), and scores
  it with :func:`pocus_edge.losses.masked_l1` on the masked pixels. :func:`inpainting_baseline`
  is the trivial answer (each image's mean visible pixel in every masked pixel): a
  reconstruction loss means something only below it.
* Contrastive: :class:`ContrastiveModel` = the TransUNet encoder (same module names, so its
  weights load into a segmenter), tokens mean-pooled, projection MLP (with BatchNorm unless
  ``projection_bn`` is False), L2 normalization.
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

__all__ = ["MaskGenerator", "apply_mim_mask", "inpainting_baseline", "MIMModel", "ContrastiveModel", "encoder_state"]

MIM_HEADS = ("decoder", "linear")


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


def inpainting_baseline(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The trivial inpainting of ``x`` (N, C, S, S): every masked pixel (``mask`` (N, 1, S, S) of
    {0, 1}) gets its image's mean visible pixel. A MIM loss below this baseline's is a model that
    uses the context; a loss at it has learned nothing but the mean."""
    keep = (1.0 - mask).expand_as(x)
    mean = (x * keep).sum(dim=(1, 2, 3), keepdim=True) / keep.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    return x * keep + mean * (1.0 - keep)


class MIMModel(nn.Module):
    """Masked image modeling: the TransUNet (3 output channels, ``head="decoder"``) or the encoder
    with SimMIM's linear pixel head (``head="linear"``) reconstructs the original frame."""

    def __init__(self, cfg: ModelConfig, mim: MIMConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.mim = mim or MIMConfig()
        if self.mim.head not in MIM_HEADS:
            raise ConfigError(f"mim head {self.mim.head!r}: choose one of {', '.join(MIM_HEADS)}")
        if self.mim.head == "decoder":
            self.net = TransUNet(cfg, out_channels=cfg.in_chans)
        else:
            self.pixel_encoder = HybridEncoder(cfg)
            stride = cfg.img_size // cfg.grid_size
            self.pixel_head = nn.Sequential(nn.Conv2d(cfg.hidden_size, stride * stride * cfg.in_chans, kernel_size=1),
                                            nn.PixelShuffle(stride))
        self.mask_generator = MaskGenerator(cfg.img_size, self.mim)

    @property
    def encoder(self) -> HybridEncoder:
        return self.net.encoder if self.mim.head == "decoder" else self.pixel_encoder

    def reconstruct(self, masked: torch.Tensor) -> torch.Tensor:
        """The reconstruction (N, C, S, S) of a masked input: the network's linear output (SimMIM
        predicts pixel values directly)."""
        if self.mim.head == "decoder":
            return self.net(masked)
        tokens, _ = self.pixel_encoder(masked)
        grid = tokens.transpose(1, 2).reshape(-1, self.cfg.hidden_size, self.cfg.grid_size, self.cfg.grid_size)
        return self.pixel_head(grid)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, speckle: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(masked L1 loss, reconstruction (N, C, S, S))``."""
        reconstruction = self.reconstruct(apply_mim_mask(x, mask, speckle, noise))
        return masked_l1(reconstruction, x, mask), reconstruction

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


class ContrastiveModel(nn.Module):
    """Encoder + mean pooling + projection head (hidden -> proj_hidden -> proj_dim), L2-normalized.
    ``projection_bn``: BatchNorm after the hidden layer (SimCLR's head; it keeps the embeddings
    from collapsing early and shortens the loss's plateau at chance); False = the released code."""

    def __init__(self, cfg: ModelConfig, projection_bn: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = HybridEncoder(cfg)
        hidden = [nn.Linear(cfg.hidden_size, cfg.proj_hidden, bias=not projection_bn)]
        if projection_bn:
            hidden.append(nn.BatchNorm1d(cfg.proj_hidden))
        self.projector = nn.Sequential(*hidden, nn.ReLU(inplace=True), nn.Linear(cfg.proj_hidden, cfg.proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(x)
        return F.normalize(self.projector(tokens.mean(dim=1)), dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors keyed ``encoder.*`` (what ``load_encoder`` reads), for a TransUNet,
    MIMModel or ContrastiveModel."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, HybridEncoder):
        raise TypeError(f"{type(model).__name__} has no TransUNet encoder")
    return {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
