"""Convolutional autoencoder with a spatial bottleneck and AE-FLOW's decoder (a reconstruction baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from monai_aeflow.networks.blocks import check_image, down_block
from monai_aeflow.networks.decoder import AEFlowDecoder

__all__ = ["ReconstructionOutput", "ConvAutoEncoder"]


class ReconstructionOutput(NamedTuple):
    """What :class:`ConvAutoEncoder` returns.

    Attributes:
        x_rec: reconstruction (B, C, H, W) in [0, 1].
        z: bottleneck features (B, latent_channels, H/16, W/16).
    """

    x_rec: torch.Tensor
    z: torch.Tensor


class ConvAutoEncoder(nn.Module):
    """Convolutional autoencoder with a spatial bottleneck and AE-FLOW's decoder family.

    Encoder: four ``Conv2d(4x4, stride 2)`` + batch norm + leaky ReLU blocks (``channels``), then a 1x1
    convolution to ``latent_channels`` at 1/16 of the input size. Decoder: a 1x1 convolution back to
    ``channels[-1]`` and :class:`~monai_aeflow.networks.decoder.AEFlowDecoder` (transposed 2x2 convolutions,
    sigmoid output). Trained with a reconstruction loss only; scored by the reconstruction error.

    Args:
        in_channels: image channels.
        channels: widths of the four encoder blocks.
        latent_channels: channels of the bottleneck (its size sets how much the model can copy).
        decoder_channels: the decoder's three intermediate widths (default ``C/2, C/4, 64``).

    Example::

        net = ConvAutoEncoder(in_channels=1)
        net(torch.rand(2, 1, 64, 64)).x_rec.shape  # (2, 1, 64, 64)
    """

    size_multiple = 16

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        latent_channels: int = 16,
        decoder_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must give four widths, got {list(channels)}")
        self.in_channels = in_channels
        widths = [in_channels, *channels]
        self.encoder = nn.Sequential(*[down_block(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.to_latent = nn.Conv2d(channels[-1], latent_channels, 1)
        self.from_latent = nn.Sequential(nn.Conv2d(latent_channels, channels[-1], 1), nn.ReLU(inplace=True))
        self.decoder = AEFlowDecoder(channels[-1], in_channels, decoder_channels)
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "channels": list(channels),
            "latent_channels": latent_channels,
            "decoder_channels": None if decoder_channels is None else list(decoder_channels),
        }

    def forward(self, x: torch.Tensor) -> ReconstructionOutput:
        """Encode to the bottleneck and decode.

        Args:
            x: (B, in_channels, H, W) images in [0, 1], H and W multiples of 16.

        Returns:
            A :class:`ReconstructionOutput` (reconstruction and bottleneck).
        """
        check_image(x, self.in_channels, self.size_multiple, type(self).__name__)
        z = self.to_latent(self.encoder(x))
        return ReconstructionOutput(self.decoder(self.from_latent(z)), z)
