"""The AE-FLOW decoder: transposed-convolution upsampling from stride-16 features to the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["AEFlowDecoder"]


class AEFlowDecoder(nn.Module):
    """Four ``ConvTranspose2d(2x2, stride 2)`` blocks from (C, H/16, W/16) to (out, H, W).

    Channels go C -> C/2 -> C/4 -> 64 -> out by default (1024 -> 512 -> 256 -> 64 -> out for the
    Wide-ResNet encoder). Each of the first three upsampling layers is followed by a 3x3 convolution
    with the same channels; ReLU between layers; a sigmoid gives an output in [0, 1].

    Args:
        in_channels: channels of the bottleneck features.
        out_channels: image channels to reconstruct.
        channels: the three intermediate widths; default ``(C // 2, C // 4, 64)``.

    Example::

        dec = AEFlowDecoder(256, 1)
        x_rec = dec(torch.randn(2, 256, 8, 8))  # (2, 1, 128, 128)
    """

    def __init__(self, in_channels: int, out_channels: int = 1, channels: Sequence[int] | None = None) -> None:
        super().__init__()
        widths = list(channels) if channels is not None else [in_channels // 2, in_channels // 4, 64]
        if len(widths) != 3:
            raise ValueError(f"channels must give three widths, got {widths}")
        layers: list[nn.Module] = []
        prev = in_channels
        for w in widths:
            layers += [
                nn.ConvTranspose2d(prev, w, 2, stride=2),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1),
                nn.ReLU(inplace=True),
            ]
            prev = w
        layers += [nn.ConvTranspose2d(prev, out_channels, 2, stride=2), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)
