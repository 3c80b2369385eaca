"""Small building blocks shared by the baseline networks: strided (transposed) convolution blocks, input checks
and the VAE reparameterisation."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["down_block", "up_block", "check_image", "reparameterize"]


def down_block(in_channels: int, out_channels: int, norm: bool = True) -> nn.Sequential:
    """``Conv2d(4x4, stride 2, padding 1)`` (exact halving of even sizes), batch norm (optional), leaky ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm: add a ``BatchNorm2d`` after the convolution.

    Returns:
        An ``nn.Sequential`` (state-dict keys ``0.*`` for the convolution, ``1.*`` for the batch norm).

    Example::

        block = down_block(1, 32)
        block(torch.rand(2, 1, 64, 64)).shape  # (2, 32, 32, 32)
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers, nn.LeakyReLU(0.2, True))


def up_block(in_channels: int, out_channels: int, norm: bool = True) -> nn.Sequential:
    """``ConvTranspose2d(4x4, stride 2, padding 1)`` (exact doubling), batch norm (optional), leaky ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm: add a ``BatchNorm2d`` after the transposed convolution.

    Returns:
        An ``nn.Sequential`` (state-dict keys ``0.*`` for the convolution, ``1.*`` for the batch norm).

    Example::

        block = up_block(32, 16)
        block(torch.rand(2, 32, 8, 8)).shape  # (2, 16, 16, 16)
    """
    layers: list[nn.Module] = [nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers, nn.LeakyReLU(0.2, True))


def check_image(x: torch.Tensor, channels: int, multiple: int, name: str) -> None:
    """Check that ``x`` is a (B, ``channels``, H, W) tensor with H and W non-zero multiples of ``multiple``.

    Args:
        x: the network input.
        channels: the channels the network was built for.
        multiple: the spatial size divisor (the network's total stride).
        name: the network's name, for the error message.

    Raises:
        ValueError: when the rank, the channels or the spatial size do not fit.
    """
    if x.ndim != 4:
        raise ValueError(f"{name} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} was built for {channels} channel(s), got {x.shape[1]}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(f"{name}: spatial size must be divisible by {multiple}, got {h}x{w}; crop or pad the image")


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, sample: bool) -> torch.Tensor:
    """``mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` when ``sample``, else ``mu``.

    Args:
        mu: posterior mean.
        logvar: posterior log-variance of the same shape.
        sample: draw a sample (training) or return the mean (deterministic scoring).

    Returns:
        The latent, same shape as ``mu``.
    """
    if not sample:
        return mu
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
