"""Variational autoencoder with a dense latent vector (the seed thesis' VAE, after Baur et al.)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from monai_aeflow.networks.blocks import reparameterize

__all__ = ["VAEOutput", "DenseVAE"]


class VAEOutput(NamedTuple):
    """What :class:`DenseVAE` returns.

    Attributes:
        x_rec: reconstruction (B, C, H, W) in [0, 1], decoded from ``z``.
        mu: posterior mean (B, latent_dim).
        logvar: posterior log-variance (B, latent_dim).
        z: the latent sample (the mean in ``eval()`` mode).
    """

    x_rec: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


class DenseVAE(nn.Module):
    """Variational autoencoder with a dense latent vector, as in the seed thesis (after Baur et al.).

    Encoder: three blocks of ``Conv2d(5x5, stride 2, padding 2)`` + batch norm + leaky ReLU (1 -> 32 -> 64 ->
    128 channels; 95 x 79 -> 12 x 10), a 1x1 convolution to ``bottleneck_channels`` (+ batch norm, leaky ReLU),
    flattening and one linear layer to the mean and log-variance of a ``latent_dim`` Gaussian. Decoder: a
    linear layer to ``decoder_bottleneck_channels`` maps of the bottleneck size, a 1x1 convolution, three
    ``ConvTranspose2d(5x5, stride 2)`` blocks (their output padding restores the encoder's sizes exactly) and
    a 1x1 convolution with a sigmoid. The input size is fixed by the dense layers: ``image_size``.

    With the defaults and ``image_size=(95, 79)`` the network has 1,917,489 parameters (the thesis reports
    1,915,041 for its latent-128 VAE).

    Args:
        in_channels: image channels.
        image_size: (H, W) of the inputs.
        latent_dim: size of the latent vector.
        channels: widths of the three encoder blocks.
        bottleneck_channels: channels before flattening.
        decoder_bottleneck_channels: channels of the decoder's first feature map (after the linear layer).
        decoder_channels: widths after the decoder's 1x1 convolution and after each of the three upsampling
            blocks.
        kernel_size: kernel of the strided (transposed) convolutions (odd).

    Example::

        net = DenseVAE(image_size=(95, 79))
        out = net(torch.rand(2, 1, 95, 79))  # out.x_rec (2, 1, 95, 79), out.mu (2, 128)
    """

    size_multiple = 1

    def __init__(
        self,
        in_channels: int = 1,
        image_size: Sequence[int] = (128, 128),
        latent_dim: int = 128,
        channels: Sequence[int] = (32, 64, 128),
        bottleneck_channels: int = 16,
        decoder_bottleneck_channels: int = 32,
        decoder_channels: Sequence[int] = (128, 128, 64, 32),
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if len(image_size) != 2 or min(int(s) for s in image_size) < 8:
            raise ValueError(f"image_size must be (H, W) of at least 8 pixels, got {image_size}")
        if len(channels) != 3 or len(decoder_channels) != 4:
            raise ValueError("channels needs three widths and decoder_channels four")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels = in_channels
        self.image_size = (int(image_size[0]), int(image_size[1]))
        pad = kernel_size // 2
        sizes = [self.image_size]
        for _ in range(3):  # a stride-2 convolution with padding k // 2 gives ceil(n / 2)
            sizes.append(tuple((n + 1) // 2 for n in sizes[-1]))
        self._sizes = sizes
        self.bottleneck_size = sizes[-1]
        h, w = self.bottleneck_size

        widths = [in_channels, *channels]
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Conv2d(a, b, kernel_size, 2, pad), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
        blocks += [nn.Conv2d(channels[-1], bottleneck_channels, 1), nn.BatchNorm2d(bottleneck_channels)]
        blocks += [nn.LeakyReLU(0.2, True), nn.Flatten()]
        self.encoder = nn.Sequential(*blocks)
        self.fc_posterior = nn.Linear(bottleneck_channels * h * w, 2 * latent_dim)
        self.fc_decode = nn.Linear(latent_dim, decoder_bottleneck_channels * h * w)
        self._dec_shape = (decoder_bottleneck_channels, h, w)

        c0, *ups = decoder_channels
        self.decoder_in = nn.Sequential(
            nn.Conv2d(decoder_bottleneck_channels, c0, 1), nn.BatchNorm2d(c0), nn.LeakyReLU(0.2, True)
        )
        layers: list[nn.Module] = []
        prev = c0
        for i, c in enumerate(ups):
            target = sizes[2 - i]
            src = sizes[3 - i]
            # (n - 1) * 2 - 2 * pad + k + op = 2n - 1 + op for k = 2 pad + 1
            out_pad = tuple(t - (2 * s - 1) for t, s in zip(target, src, strict=True))
            layers += [
                nn.ConvTranspose2d(prev, c, kernel_size, 2, pad, output_padding=out_pad),
                nn.BatchNorm2d(c),
                nn.LeakyReLU(0.2, True),
            ]
            prev = c
        layers += [nn.Conv2d(prev, in_channels, 1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*layers)
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "image_size": list(self.image_size),
            "latent_dim": latent_dim,
            "channels": list(channels),
            "bottleneck_channels": bottleneck_channels,
            "decoder_bottleneck_channels": decoder_bottleneck_channels,
            "decoder_channels": list(decoder_channels),
            "kernel_size": kernel_size,
        }

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance.

        Args:
            x: (B, in_channels, H, W) images with (H, W) equal to ``image_size``.

        Returns:
            ``(mu, logvar)``, each (B, latent_dim).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"DenseVAE was built for (B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}) "
                f"inputs (its dense layers fix the size), got {tuple(x.shape)}; resize or rebuild with image_size"
            )
        mu, logvar = self.fc_posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents to images.

        Args:
            z: latents (B, latent_dim).

        Returns:
            Images (B, in_channels, H, W) in [0, 1].
        """
        h = self.fc_decode(z).view(z.shape[0], *self._dec_shape)
        return self.decoder(self.decoder_in(h))

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """Encode, sample the latent (its mean in ``eval()`` mode) and decode.

        Args:
            x: (B, in_channels, H, W) images in [0, 1] with (H, W) equal to ``image_size``.

        Returns:
            A :class:`VAEOutput`.
        """
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, self.training)
        return VAEOutput(self.decode(z), mu, logvar, z)
