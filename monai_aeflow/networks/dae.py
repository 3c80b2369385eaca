"""The denoising autoencoder of Kascenas et al. (*Denoising autoencoders for unsupervised anomaly detection in
brain MRI*, MIDL 2022): a UNet (MONAI's :class:`~monai.networks.nets.UNet`) that maps an image to itself.

The network only reconstructs; the coarse noise it learns to remove is drawn by the training loss
(:class:`monai_aeflow.models.dae.DenoisingLoss`), never by the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from monai.networks.nets import UNet
from torch import nn

from monai_aeflow.networks.blocks import check_image

__all__ = ["DenoisingAutoEncoder", "DAEOutput"]


class DAEOutput(NamedTuple):
    """What :class:`DenoisingAutoEncoder` returns.

    Attributes:
        x_rec: reconstruction (B, C, H, W).
    """

    x_rec: torch.Tensor


class DenoisingAutoEncoder(nn.Module):
    """A 2D UNet with skip connections trained to remove coarse noise from healthy images.

    Built from MONAI's ``UNet`` (residual units, batch norm, PReLU) with ``len(channels) - 1`` stride-2
    levels, so input height and width must be multiples of ``2 ** (len(channels) - 1)``. The output has no
    activation (a residual of the clean image can be negative during training; the scorer compares it with the
    image).

    Args:
        in_channels: image channels.
        channels: widths of the UNet levels (the paper's UNet: 64, 128, 256, 512).
        num_res_units: residual units per level.
        norm: MONAI normalisation name (``"batch"``, ``"instance"``...; batch norm reached a 6x lower
            reconstruction error than instance norm in the same short training on synthetic slices).

    Example::

        net = DenoisingAutoEncoder(in_channels=1)
        net(torch.rand(2, 1, 64, 64)).x_rec.shape  # (2, 1, 64, 64)
    """

    size_multiple = 8  # of the default channels

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        num_res_units: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels must give at least two widths, got {list(channels)}")
        self.in_channels = in_channels
        self.size_multiple = 2 ** (len(channels) - 1)
        self.unet = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(int(c) for c in channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
            norm=norm,
        )
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "channels": [int(c) for c in channels],
            "num_res_units": int(num_res_units),
            "norm": str(norm),
        }

    def forward(self, x: torch.Tensor) -> DAEOutput:
        """Reconstruct the images.

        Args:
            x: (B, in_channels, H, W) images (noisy during training, clean when scoring).

        Returns:
            A :class:`DAEOutput`.
        """
        check_image(x, self.in_channels, self.size_multiple, type(self).__name__)
        return DAEOutput(self.unet(x))
