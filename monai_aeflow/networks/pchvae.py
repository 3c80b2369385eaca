"""Primary-components conditional hierarchical VAE (pcHVAE; Zimmerer, Petersen and Maier-Hein, 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from monai_aeflow.networks.blocks import check_image, down_block, reparameterize, up_block

__all__ = ["PCHVAEOutput", "PCHVAE"]


class PCHVAEOutput(NamedTuple):
    """What :class:`PCHVAE` returns.

    Attributes:
        x_rec: the full reconstruction ``x_high + x_low`` clipped to [0, 1].
        x_high: high-level component ``g1(z1)`` (B, C, H, W).
        x_low: low-level component ``g2(z1, z2)`` (B, C, H, W).
        x_zero: the low-level component passed through the high-level branch, ``g1(f1(x_low))``; the third
            term of the loss drives it to zero. None in ``eval()`` mode unless requested.
        mu1: posterior mean of the high-level latent (B, c1, H/16, W/16).
        logvar1: its log-variance.
        mu2: posterior mean of the low-level latent (B, c2, H/4, W/4).
        logvar2: its log-variance.
    """

    x_rec: torch.Tensor
    x_high: torch.Tensor
    x_low: torch.Tensor
    x_zero: torch.Tensor | None
    mu1: torch.Tensor
    logvar1: torch.Tensor
    mu2: torch.Tensor
    logvar2: torch.Tensor


class PCHVAE(nn.Module):
    """Primary-components conditional hierarchical VAE (Zimmerer, Petersen and Maier-Hein, 2019).

    Two Gaussian latents with standard normal priors: a high-level latent ``z1`` at 1/16 of the input size
    and a low-level latent ``z2`` at 1/4, conditioned on ``z1`` (as in VQ-VAE-2). The encoders share their
    first layers (two stride-2 blocks to 1/4 size); ``f1`` continues with two more blocks to ``z1``;
    ``f2(x, z1)`` combines the shared features with ``z1`` upsampled to 1/4 size. The high-level decoder
    ``g1(z1)`` upsamples four times to the high-level component ``x_high``; the low-level decoder
    ``g2(z1, z2)`` upsamples twice to the low-level component ``x_low``; ``x_high + x_low`` reconstructs the
    image. Both decoders have linear outputs (the low-level component is a signed correction). In training
    mode the network also returns ``x_zero = g1(f1(x_low))``, the low-level component seen by the high-level
    branch, which the third term of the loss (Eq. 9 of the paper) drives to zero. There is no batch
    normalisation: that second pass through the high-level branch would mix the statistics of images and of
    low-level components in its running averages.

    Args:
        in_channels: image channels.
        channels: widths of the four downsampling blocks (the first two are shared).
        high_latent_channels: channels of ``z1`` (at 1/16 size).
        low_latent_channels: channels of ``z2`` (at 1/4 size).

    Example::

        net = PCHVAE(in_channels=1)
        out = net(torch.rand(2, 1, 64, 64))  # out.x_high + out.x_low ~ x
    """

    size_multiple = 16

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        high_latent_channels: int = 16,
        low_latent_channels: int = 2,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must give four widths, got {list(channels)}")
        c1, c2, c3, c4 = channels
        self.in_channels = in_channels
        self.shared = nn.Sequential(down_block(in_channels, c1, False), down_block(c1, c2, False))
        self.high_encoder = nn.Sequential(
            down_block(c2, c3, False), down_block(c3, c4, False), nn.Conv2d(c4, 2 * high_latent_channels, 1)
        )
        self.high_decoder = nn.Sequential(
            nn.Conv2d(high_latent_channels, c4, 1),
            nn.LeakyReLU(0.2, True),
            up_block(c4, c3, False),
            up_block(c3, c2, False),
            up_block(c2, c1, False),
            nn.ConvTranspose2d(c1, in_channels, 4, stride=2, padding=1),
        )
        # z1 at 1/16 -> features at 1/4 that condition the low-level encoder and decoder
        self.condition = nn.Sequential(
            nn.Conv2d(high_latent_channels, c4, 1),
            nn.LeakyReLU(0.2, True),
            up_block(c4, c3, False),
            up_block(c3, c2, False),
        )
        self.low_encoder = nn.Sequential(
            nn.Conv2d(2 * c2, c2, 3, padding=1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(c2, 2 * low_latent_channels, 1),
        )
        self.low_decoder = nn.Sequential(
            nn.Conv2d(low_latent_channels + c2, c2, 3, padding=1),
            nn.LeakyReLU(0.2, True),
            up_block(c2, c1, False),
            nn.ConvTranspose2d(c1, in_channels, 4, stride=2, padding=1),
        )
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "channels": list(channels),
            "high_latent_channels": high_latent_channels,
            "low_latent_channels": low_latent_channels,
        }

    def encode_high(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``f1``: shared features and the posterior of the high-level latent.

        Args:
            x: (B, in_channels, H, W) images (or low-level components), H and W multiples of 16.

        Returns:
            ``(h, mu, logvar)``: shared features (1/4 size) and the mean and log-variance of ``z1`` (1/16 size).
        """
        h = self.shared(x)
        mu, logvar = self.high_encoder(h).chunk(2, dim=1)
        return h, mu, logvar

    def forward(self, x: torch.Tensor, with_zero: bool | None = None) -> PCHVAEOutput:
        """Run both branches.

        Args:
            x: (B, C, H, W) images, H and W multiples of 16.
            with_zero: also compute ``x_zero = g1(f1(x_low))`` (default: in training mode only).

        Returns:
            A :class:`PCHVAEOutput`.
        """
        check_image(x, self.in_channels, self.size_multiple, "PCHVAE")
        sample = self.training
        h, mu1, logvar1 = self.encode_high(x)
        z1 = reparameterize(mu1, logvar1, sample)
        x_high = self.high_decoder(z1)
        cond = self.condition(z1)
        mu2, logvar2 = self.low_encoder(torch.cat([h, cond], dim=1)).chunk(2, dim=1)
        z2 = reparameterize(mu2, logvar2, sample)
        x_low = self.low_decoder(torch.cat([z2, cond], dim=1))
        x_zero = None
        if self.training if with_zero is None else with_zero:
            _, mu_low, logvar_low = self.encode_high(x_low)
            x_zero = self.high_decoder(reparameterize(mu_low, logvar_low, sample))
        x_rec = (x_high + x_low).clamp(0.0, 1.0)
        return PCHVAEOutput(x_rec, x_high, x_low, x_zero, mu1, logvar1, mu2, logvar2)
