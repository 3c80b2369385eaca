"""Denoising autoencoder (Kascenas et al. 2022): coarse-noise corruption, reconstruction loss, score and spec.

The network is :class:`monai_aeflow.networks.dae.DenoisingAutoEncoder`. Training corrupts each healthy image
with coarse noise (Gaussian noise drawn on a ``noise_resolution x noise_resolution`` grid, bilinearly upsampled
to the image and kept inside the brain) and teaches the UNet to give back the clean image; the engine asks the
loss for the corrupted input through :meth:`DenoisingLoss.corrupt`. An anomaly is what the network "denoises"
away: the map is ``|x - x'|`` of the clean input and the image score its mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models.common import loss_options, recon_map
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.dae import DenoisingAutoEncoder

__all__ = ["LOSS_OPTIONS", "SPEC", "DenoisingLoss", "coarse_noise", "dae_score", "make_loss"]

LOSS_OPTIONS: dict[str, Any] = {"noise_std": 0.2, "noise_resolution": 16, "recon_loss": "mse"}
"""Options of the DAE's training loss and their defaults (the paper's: standard deviation 0.2 at 16 x 16)."""


def coarse_noise(
    shape: tuple[int, ...],
    std: float = 0.2,
    resolution: int = 16,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coarse Gaussian noise: drawn on a ``resolution x resolution`` grid and bilinearly upsampled.

    Args:
        shape: (B, C, H, W) of the noise.
        std: standard deviation of the grid values.
        resolution: side of the grid (smaller: coarser noise).
        generator: random generator (default: torch's global one on ``device``).
        device: where to draw the noise.

    Returns:
        (B, C, H, W) float32 noise.
    """
    b, c, h, w = shape
    grid = torch.randn(b, c, resolution, resolution, generator=generator, device=device) * float(std)
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)


class DenoisingLoss(nn.Module):
    """The DAE's training objective: reconstruct the clean image from its coarse-noise corruption.

    Args:
        noise_std: standard deviation of the coarse noise.
        noise_resolution: side of the grid the noise is drawn on.
        recon_loss: ``"mse"`` or ``"l1"``.

    Returns (from ``forward``):
        ``{"loss", "loss_recon"}``.
    """

    def __init__(self, noise_std: float = 0.2, noise_resolution: int = 16, recon_loss: str = "mse") -> None:
        super().__init__()
        if recon_loss not in ("mse", "l1"):
            raise AEFlowInputError(f"recon_loss must be 'mse' or 'l1', got {recon_loss!r}")
        if not float(noise_std) >= 0.0:
            raise AEFlowInputError(f"noise_std must be >= 0, got {noise_std!r}")
        if int(noise_resolution) < 1:
            raise AEFlowInputError(f"noise_resolution must be >= 1, got {noise_resolution!r}")
        self.noise_std = float(noise_std)
        self.noise_resolution = int(noise_resolution)
        self.recon_loss = recon_loss

    def corrupt(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The noisy input: ``x`` plus coarse noise inside the foreground.

        Args:
            x: (B, C, H, W) clean images.
            mask: (B, 1, H, W) foreground (brain) mask; default ``x > 0`` in any channel (skull-stripped images).
            generator: random generator (default: torch's global one).

        Returns:
            The corrupted images (same shape; zero noise outside the foreground).
        """
        x = x.float()
        fg = (x > 0).any(1, keepdim=True) if mask is None else mask.to(x.device) > 0
        noise = coarse_noise(tuple(x.shape), self.noise_std, self.noise_resolution, generator, x.device)
        return x + noise * fg.to(x.dtype)

    def forward(self, output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of one batch: the reconstruction of the corrupted input against the clean ``x``.

        Args:
            output: the network's output on the corrupted input (with ``x_rec``).
            x: the clean images.

        Returns:
            ``{"loss", "loss_recon"}``.
        """
        x_rec, x = output.x_rec.float(), x.float()
        loss = F.mse_loss(x_rec, x) if self.recon_loss == "mse" else F.l1_loss(x_rec, x)
        return {"loss": loss, "loss_recon": loss.detach()}


def make_loss(training: Mapping[str, Any]) -> nn.Module:
    """The DAE's loss from the training settings.

    Args:
        training: ``loss_options`` may set :data:`LOSS_OPTIONS` (unknown keys are refused).

    Returns:
        A :class:`DenoisingLoss`.
    """
    return DenoisingLoss(**loss_options(training, LOSS_OPTIONS, "dae"))


def dae_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """DAE score of clean images: the map ``|x - x'|`` (or 1 - SSIM) and its mean per image.

    Args:
        network: a :class:`DenoisingAutoEncoder`.
        x: (B, C, H, W) images in [0, 1].
        beta: unused.
        map_kind: ``"residual"`` or ``"ssim"``.

    Returns:
        ``{"score", "anomaly_map", "recon"}``.
    """
    x = x.float()
    x_rec = network(x).x_rec.float()
    amap = recon_map(x, x_rec, map_kind)
    return {"score": amap.flatten(1).mean(1), "anomaly_map": amap, "recon": x_rec}


SPEC = ModelSpec(
    name="dae",
    network_cls=DenoisingAutoEncoder,
    make_loss=make_loss,
    score=dae_score,
    description="denoising autoencoder (UNet trained to remove coarse noise); mean residual",
    defaults={"in_channels": 1},
)
"""The denoising autoencoder in the registry."""
