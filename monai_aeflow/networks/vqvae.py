"""VQ-VAE (van den Oord et al.) and the VQ-GAN generator (Esser et al.), both built on MONAI's ``VQVAE``.

The VQ-GAN's patch discriminator (MONAI ``PatchDiscriminator``) belongs to its loss,
:class:`monai_aeflow.models.vqvae.VQGANLoss`, so it is not a network of this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from monai.networks.nets import VQVAE
from torch import nn

from monai_aeflow.networks.blocks import check_image

__all__ = ["VQOutput", "VQVAENet", "VQGANNet"]


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
        """Encode, quantise and decode; in training mode with ``codebook_restart``, restart unused codes.

        Args:
            x: (B, in_channels, H, W) images in [0, 1], H and W multiples of ``2 ** len(channels)``.

        Returns:
            A :class:`VQOutput`.
        """
        check_image(x, self.in_channels, self.size_multiple, type(self).__name__)
        encodings = self.vqvae.encode(x)
        quantized, q_loss = self.vqvae.quantize(encodings)
        x_raw = self.vqvae.decode(quantized)
        if self.training and self.codebook_restart:
            self.restart_dead_codes(encodings)
        return VQOutput(x_raw.clamp(0.0, 1.0), x_raw, q_loss)


class VQGANNet(VQVAENet):
    """The generator of a VQ-GAN (Esser et al.): a :class:`VQVAENet` trained with an adversarial loss.

    The architecture is MONAI's ``VQVAE``; the patch discriminator (MONAI ``PatchDiscriminator``) and its
    optimiser live in the loss (:class:`monai_aeflow.models.vqvae.VQGANLoss`), so the saved model is the
    generator alone. A distinct class so that the model registry tells the two apart. Same arguments as
    :class:`VQVAENet`.
    """
