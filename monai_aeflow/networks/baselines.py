"""Baseline networks from the anomaly-detection literature, with the same interface as :class:`AEFlow`.

Every network is built from keyword arguments only, keeps them in ``self.hparams`` (what a model file stores
to rebuild it) and returns a ``NamedTuple`` with an ``x_rec`` field (B, C, H, W) from ``forward``. Inputs are
(B, C, H, W) images in [0, 1]. Losses and scores live in :mod:`monai_aeflow.baselines`.

- :class:`ConvAutoEncoder`: convolutional autoencoder with AE-FLOW's decoder (reconstruction only).
- :class:`DenseVAE`: VAE with a dense latent (the seed thesis: three 5x5 stride-2 blocks, latent 128).
- :class:`PCHVAE`: primary-components conditional hierarchical VAE (Zimmerer et al.): high- and low-level
  branches whose sum reconstructs the image.
- :class:`VQVAENet` and :class:`VQGANNet`: MONAI's ``VQVAE`` (the VQ-GAN's discriminator belongs to its loss).
- :class:`FlowOnlyAEFlow`: AE-FLOW without decoder (alpha = beta = 1), a FastFlow-style likelihood model.
- :class:`IntensityBaseline`: the median-filtered image itself as the anomaly map (no parameters to train).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE
from torch import nn

from monai_aeflow.networks.aeflow import AEFlow, AEFlowOutput
from monai_aeflow.networks.decoder import AEFlowDecoder

__all__ = [
    "ReconstructionOutput",
    "VAEOutput",
    "PCHVAEOutput",
    "VQOutput",
    "IntensityOutput",
    "ConvAutoEncoder",
    "DenseVAE",
    "PCHVAE",
    "VQVAENet",
    "VQGANNet",
    "FlowOnlyAEFlow",
    "IntensityBaseline",
    "median_filter_2d",
    "reparameterize",
]


class ReconstructionOutput(NamedTuple):
    """What :class:`ConvAutoEncoder` returns.

    Attributes:
        x_rec: reconstruction (B, C, H, W) in [0, 1].
        z: bottleneck features (B, latent_channels, H/16, W/16).
    """

    x_rec: torch.Tensor
    z: torch.Tensor


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


class VQOutput(NamedTuple):
    """What :class:`VQVAENet` and :class:`VQGANNet` return.

    Attributes:
        x_rec: reconstruction (B, C, H, W) clipped to [0, 1].
        x_raw: the decoder's (linear) output before clipping, used by the losses.
        quantization_loss: MONAI's commitment loss of the codebook (scalar; the codebook itself is an EMA).
    """

    x_rec: torch.Tensor
    x_raw: torch.Tensor
    quantization_loss: torch.Tensor


class IntensityOutput(NamedTuple):
    """What :class:`IntensityBaseline` returns.

    Attributes:
        x_rec: the input (there is no reconstruction), so that tools that show reconstructions still work.
        anomaly_map: the median-filtered image averaged over channels (B, 1, H, W).
    """

    x_rec: torch.Tensor
    anomaly_map: torch.Tensor


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


def _down(c_in: int, c_out: int, norm: bool = True) -> nn.Sequential:
    """``Conv2d(4x4, stride 2)`` (exact halving of even sizes), batch norm (optional), leaky ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers, nn.LeakyReLU(0.2, True))


def _up(c_in: int, c_out: int, norm: bool = True) -> nn.Sequential:
    """``ConvTranspose2d(4x4, stride 2)`` (exact doubling), batch norm (optional), leaky ReLU."""
    layers: list[nn.Module] = [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers, nn.LeakyReLU(0.2, True))


def _check_image(x: torch.Tensor, channels: int, multiple: int, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} was built for {channels} channel(s), got {x.shape[1]}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(f"{name}: spatial size must be divisible by {multiple}, got {h}x{w}; crop or pad the image")


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
        self.encoder = nn.Sequential(*[_down(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
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
        _check_image(x, self.in_channels, self.size_multiple, type(self).__name__)
        z = self.to_latent(self.encoder(x))
        return ReconstructionOutput(self.decoder(self.from_latent(z)), z)


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
        """Posterior mean and log-variance, each (B, latent_dim)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"DenseVAE was built for (B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}) "
                f"inputs (its dense layers fix the size), got {tuple(x.shape)}; resize or rebuild with image_size"
            )
        mu, logvar = self.fc_posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) in [0, 1] from latents (B, latent_dim)."""
        h = self.fc_decode(z).view(z.shape[0], *self._dec_shape)
        return self.decoder(self.decoder_in(h))

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, self.training)
        return VAEOutput(self.decode(z), mu, logvar, z)


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
        self.shared = nn.Sequential(_down(in_channels, c1, False), _down(c1, c2, False))
        self.high_encoder = nn.Sequential(
            _down(c2, c3, False), _down(c3, c4, False), nn.Conv2d(c4, 2 * high_latent_channels, 1)
        )
        self.high_decoder = nn.Sequential(
            nn.Conv2d(high_latent_channels, c4, 1),
            nn.LeakyReLU(0.2, True),
            _up(c4, c3, False),
            _up(c3, c2, False),
            _up(c2, c1, False),
            nn.ConvTranspose2d(c1, in_channels, 4, stride=2, padding=1),
        )
        # z1 at 1/16 -> features at 1/4 that condition the low-level encoder and decoder
        self.condition = nn.Sequential(
            nn.Conv2d(high_latent_channels, c4, 1), nn.LeakyReLU(0.2, True), _up(c4, c3, False), _up(c3, c2, False)
        )
        self.low_encoder = nn.Sequential(
            nn.Conv2d(2 * c2, c2, 3, padding=1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(c2, 2 * low_latent_channels, 1),
        )
        self.low_decoder = nn.Sequential(
            nn.Conv2d(low_latent_channels + c2, c2, 3, padding=1),
            nn.LeakyReLU(0.2, True),
            _up(c2, c1, False),
            nn.ConvTranspose2d(c1, in_channels, 4, stride=2, padding=1),
        )
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "channels": list(channels),
            "high_latent_channels": high_latent_channels,
            "low_latent_channels": low_latent_channels,
        }

    def encode_high(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``f1``: shared features (1/4 size) and the mean and log-variance of ``z1`` (1/16 size)."""
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
        _check_image(x, self.in_channels, self.size_multiple, "PCHVAE")
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


class VQVAENet(nn.Module):
    """Vector-quantised VAE (van den Oord et al.) built on MONAI's ``VQVAE``.

    Three stride-2 downsampling layers (``Conv2d(4x4)``) with residual stacks, a codebook of
    ``num_embeddings`` vectors of size ``embedding_dim`` at 1/8 of the input size (learned by exponential
    moving averages, MONAI's quantiser), and a mirrored decoder with a linear output (a sigmoid output
    saturates on the black background and stalls training); ``x_rec`` is that output clipped to [0, 1].

    A codebook whose vectors start far from the encoder's outputs collapses to one or two codes (the decoder
    then sees a constant). With ``codebook_restart`` (the "dead code" restart of Jukebox, Dhariwal et al. 2020)
    every training step replaces the codes whose EMA usage (encoder vectors per step) is below
    ``restart_threshold`` by encoder outputs of the current batch.

    Args:
        in_channels: image channels.
        channels: widths of the three levels (the seed thesis: 32, 64, 128).
        num_res_layers: residual blocks per level.
        num_res_channels: hidden widths of the residual blocks (default: ``channels``).
        num_embeddings: codebook size.
        embedding_dim: codebook vector size.
        commitment_cost: weight of the commitment loss (0.25 in the thesis).
        decay: EMA decay of the codebook.
        embedding_init: ``"normal"`` or ``"kaiming_uniform"`` initial codebook.
        codebook_restart: restart unused codes during training.
        restart_threshold: EMA usage (encoder vectors per step) under which a code counts as unused.

    Example::

        net = VQVAENet(in_channels=1)
        out = net(torch.rand(2, 1, 64, 64))  # out.x_rec, out.quantization_loss
    """

    size_multiple = 8

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        num_res_layers: int = 1,
        num_res_channels: Sequence[int] | None = None,
        num_embeddings: int = 128,
        embedding_dim: int = 128,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        embedding_init: str = "normal",
        codebook_restart: bool = True,
        restart_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        res_channels = list(channels) if num_res_channels is None else [int(c) for c in num_res_channels]
        self.in_channels = in_channels
        self.size_multiple = 2 ** len(channels)
        self.codebook_restart = bool(codebook_restart)
        self.restart_threshold = float(restart_threshold)
        self.vqvae = VQVAE(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=channels,
            num_res_layers=num_res_layers,
            num_res_channels=res_channels,
            downsample_parameters=[(2, 4, 1, 1)] * len(channels),
            upsample_parameters=[(2, 4, 1, 1, 0)] * len(channels),
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            commitment_cost=commitment_cost,
            decay=decay,
            embedding_init=embedding_init,
            output_act=None,
            ddp_sync=False,
        )
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "channels": channels,
            "num_res_layers": num_res_layers,
            "num_res_channels": None if num_res_channels is None else res_channels,
            "num_embeddings": num_embeddings,
            "embedding_dim": embedding_dim,
            "commitment_cost": commitment_cost,
            "decay": decay,
            "embedding_init": embedding_init,
            "codebook_restart": self.codebook_restart,
            "restart_threshold": self.restart_threshold,
        }

    @property
    def codebook(self) -> nn.Module:
        """MONAI's EMA quantiser (``embedding``, ``ema_cluster_size``, ``ema_w``)."""
        return self.vqvae.quantizer.quantizer

    @torch.no_grad()
    def restart_dead_codes(self, encodings: torch.Tensor) -> int:
        """Replace the codes whose EMA usage is below ``restart_threshold`` by random encoder outputs.

        Args:
            encodings: encoder outputs of the current batch (B, embedding_dim, h, w).

        Returns:
            The number of codes restarted.
        """
        q = self.codebook
        dead = torch.nonzero(q.ema_cluster_size < self.restart_threshold).flatten()
        if dead.numel() == 0:
            return 0
        flat = encodings.detach().float().movedim(1, -1).reshape(-1, encodings.shape[1])
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        vectors = flat[pick].to(q.embedding.weight.dtype)
        q.embedding.weight.data[dead] = vectors
        q.ema_cluster_size.data[dead] = self.restart_threshold
        q.ema_w.data[dead] = vectors * self.restart_threshold
        return int(dead.numel())

    def forward(self, x: torch.Tensor) -> VQOutput:
        _check_image(x, self.in_channels, self.size_multiple, type(self).__name__)
        encodings = self.vqvae.encode(x)
        quantized, q_loss = self.vqvae.quantize(encodings)
        x_raw = self.vqvae.decode(quantized)
        if self.training and self.codebook_restart:
            self.restart_dead_codes(encodings)
        return VQOutput(x_raw.clamp(0.0, 1.0), x_raw, q_loss)


class VQGANNet(VQVAENet):
    """The generator of a VQ-GAN (Esser et al.): a :class:`VQVAENet` trained with an adversarial loss.

    The architecture is MONAI's ``VQVAE``; the patch discriminator (MONAI ``PatchDiscriminator``) and its
    optimiser live in the loss (:class:`monai_aeflow.baselines.VQGANLoss`), so the saved model is the
    generator alone. A distinct class so that the model registry tells the two apart. Same arguments as
    :class:`VQVAENet`.
    """


class FlowOnlyAEFlow(AEFlow):
    """AE-FLOW without the decoder: the FastFlow-style likelihood model (alpha = beta = 1).

    A frozen ResNet encoder and the normalizing flow, trained with the per-dimension negative log-likelihood
    only; images are scored by the flow's density and the pixel map is the upsampled per-location density.
    There is no reconstruction: ``x_rec`` is the input itself.

    Args:
        in_channels: 1 or 3.
        backbone: ``"wide_resnet50_2"`` or ``"resnet18"``.
        backbone_weights: ``"imagenet"``, a local state-dict path, or None (random).
        flow_blocks: number of coupling blocks.
        subnet: ``"conv"`` or ``"resnet"``.
        hidden_ratio: hidden width of the ``conv`` subnet.
        affine_clamping: clamp of the coupling log-scale.
        train_encoder: fine-tune the encoder as well.
        actnorm: data-initialised ActNorm before the coupling blocks.

    Example::

        net = FlowOnlyAEFlow(backbone="resnet18", backbone_weights=None)
        out = net(torch.rand(2, 1, 64, 64))  # out.z_prime (2, 256, 4, 4)
    """

    reconstructs = False

    def __init__(
        self,
        in_channels: int = 1,
        backbone: str = "wide_resnet50_2",
        backbone_weights: str | os.PathLike | None = "imagenet",
        flow_blocks: int = 8,
        subnet: str = "conv",
        hidden_ratio: float = 1.0,
        affine_clamping: float = 2.0,
        train_encoder: bool = False,
        actnorm: bool = True,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            backbone=backbone,
            backbone_weights=backbone_weights,
            flow_blocks=flow_blocks,
            subnet=subnet,
            hidden_ratio=hidden_ratio,
            affine_clamping=affine_clamping,
            train_encoder=train_encoder,
            actnorm=actnorm,
        )
        self.decoder = None
        self.hparams.pop("decoder_channels", None)

    def forward(self, x: torch.Tensor) -> AEFlowOutput:
        self.check_input(x)
        z = self.encoder(x)
        z_prime, log_det = self.flow(z)
        return AEFlowOutput(z, z_prime, log_det, x)


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on each side with ``scipy.ndimage``'s ``"reflect"``.

    The axis is extended as ``d c b a | a b c d | d c b a`` (period ``2 n``), also when ``pad > n``.
    """
    idx = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def _pad_symmetric(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Mirror padding of the last two axes that repeats the edge sample (``scipy.ndimage`` mode ``"reflect"``)."""
    if pad == 0:
        return x
    x = x.index_select(-2, _reflect_index(x.shape[-2], pad, x.device))
    return x.index_select(-1, _reflect_index(x.shape[-1], pad, x.device))


def median_filter_2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size x size`` median filter of each image and channel, with symmetric ("reflect") borders.

    Equals ``scipy.ndimage.median_filter(x, size=(1, 1, size, size), mode="reflect")``.

    Args:
        x: (B, C, H, W) images.
        size: odd window side (1: no filtering).

    Returns:
        The filtered images, same shape and dtype.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"median filter size must be a positive odd number, got {size}")
    if size == 1:
        return x
    b, c, h, w = x.shape
    r = size // 2
    padded = _pad_symmetric(x, r)
    patches = F.unfold(padded.reshape(b * c, 1, h + 2 * r, w + 2 * r), size)  # (B*C, size*size, H*W)
    return patches.median(dim=1).values.reshape(b, c, h, w)


class IntensityBaseline(nn.Module):
    """The intensity-threshold baseline: the median-filtered image itself is the anomaly map.

    Hyper-intense lesions on FLAIR are the brightest tissue of a skull-stripped, [0, 1]-normalised slice, so
    thresholding the (denoised) intensity is a strong reference that a learned model has to beat. The map is
    the ``median_size x median_size`` median of the image, averaged over channels; the image score is its
    maximum (see :func:`monai_aeflow.baselines.intensity_score`). Nothing is trained.

    Args:
        in_channels: image channels.
        median_size: odd side of the median filter (1: raw intensities).

    Example::

        net = IntensityBaseline(median_size=5)
        net(torch.rand(2, 1, 64, 64)).anomaly_map.shape  # (2, 1, 64, 64)
    """

    size_multiple = 1
    reconstructs = False

    def __init__(self, in_channels: int = 1, median_size: int = 5) -> None:
        super().__init__()
        if median_size < 1 or median_size % 2 == 0:
            raise ValueError(f"median_size must be a positive odd number, got {median_size}")
        self.in_channels = in_channels
        self.median_size = median_size
        # not trained; gives the network a device and a dtype (``next(net.parameters())``)
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.hparams: dict[str, Any] = {"in_channels": in_channels, "median_size": median_size}

    def forward(self, x: torch.Tensor) -> IntensityOutput:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"IntensityBaseline expects (B, {self.in_channels}, H, W) inputs, got {tuple(x.shape)}")
        amap = median_filter_2d(x.float(), self.median_size).mean(1, keepdim=True)
        return IntensityOutput(x, amap)
