"""AE-FLOW: encoder, normalizing-flow bottleneck and decoder (Zhao, Ding and Zhang, ICLR 2023)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from monai_aeflow.networks.backbone import FeatureEncoder
from monai_aeflow.networks.decoder import AEFlowDecoder
from monai_aeflow.networks.flow import NormalizingFlow

__all__ = ["AEFlowOutput", "AEFlow"]


class AEFlowOutput(NamedTuple):
    """What :class:`AEFlow` returns.

    Attributes:
        z: encoder features (B, C, H/16, W/16).
        z_prime: flow output, standard normal for healthy images.
        log_det: log-determinant of the flow's Jacobian per sample (B,).
        x_rec: reconstruction (B, in_channels, H, W) in [0, 1].
    """

    z: torch.Tensor
    z_prime: torch.Tensor
    log_det: torch.Tensor
    x_rec: torch.Tensor


class AEFlow(nn.Module):
    """AE-FLOW network: ``x -> encoder -> z -> flow -> z' -> decoder -> x'``.

    The encoder is a truncated, frozen ImageNet ResNet (always in ``eval()`` mode unless
    ``train_encoder`` is True); the flow and the decoder are trained. Inputs are in [0, 1] with 1 or 3
    channels and a spatial size divisible by 16.

    Args:
        in_channels: 1 or 3.
        backbone: ``"wide_resnet50_2"`` (paper) or ``"resnet18"`` (light, for CPU).
        backbone_weights: ``"imagenet"`` (download), a local torchvision state-dict path, or None (random).
        flow_blocks: number of ``AllInOneBlock`` s.
        subnet: ``"conv"`` or ``"resnet"`` coupling subnet.
        hidden_ratio: hidden width of the ``conv`` subnet relative to its input.
        affine_clamping: clamp of the coupling log-scale.
        decoder_channels: the decoder's three intermediate widths (default C/2, C/4, 64).
        train_encoder: fine-tune the encoder as well.
        actnorm: a data-initialised per-channel affine layer before the coupling blocks (see
            :class:`~monai_aeflow.networks.flow.ActNorm`).

    Example::

        net = AEFlow(in_channels=1, backbone="resnet18", backbone_weights=None)
        out = net(torch.rand(2, 1, 128, 128))
        out.x_rec.shape  # (2, 1, 128, 128)
    """

    def __init__(
        self,
        in_channels: int = 1,
        backbone: str = "wide_resnet50_2",
        backbone_weights: str | os.PathLike | None = "imagenet",
        flow_blocks: int = 8,
        subnet: str = "conv",
        hidden_ratio: float = 1.0,
        affine_clamping: float = 2.0,
        decoder_channels: Sequence[int] | None = None,
        train_encoder: bool = False,
        actnorm: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.encoder = FeatureEncoder(backbone, backbone_weights, in_channels, trainable=train_encoder)
        c = self.encoder.out_channels
        self.flow = NormalizingFlow(c, flow_blocks, subnet, hidden_ratio, affine_clamping, actnorm=actnorm)
        self.decoder = AEFlowDecoder(c, in_channels, decoder_channels)
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "backbone": backbone,
            "flow_blocks": flow_blocks,
            "subnet": subnet,
            "hidden_ratio": hidden_ratio,
            "affine_clamping": affine_clamping,
            "decoder_channels": None if decoder_channels is None else list(decoder_channels),
            "train_encoder": train_encoder,
            "actnorm": actnorm,
        }

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem when ``x`` is not (B, in_channels, H, W), H, W divisible by 16."""
        if x.ndim != 4:
            raise ValueError(f"AEFlow expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"AEFlow was built for {self.in_channels} channel(s), got {x.shape[1]}")
        h, w = x.shape[-2:]
        if h % 16 or w % 16 or h == 0 or w == 0:
            raise ValueError(
                f"spatial size must be divisible by 16 (the encoder's stride), got {h}x{w}; "
                "crop or pad the image (e.g. to 256x256)"
            )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (flow and decoder, plus the encoder when fine-tuned)."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def initialize_flow(self, x: torch.Tensor) -> None:
        """Initialise the flow's ActNorm layer from healthy images ``x`` (B, C, H, W) in [0, 1]."""
        self.check_input(x)
        self.flow.initialize(self.encoder(x))

    def forward(self, x: torch.Tensor) -> AEFlowOutput:
        self.check_input(x)
        z = self.encoder(x)
        z_prime, log_det = self.flow(z)
        x_rec = self.decoder(z_prime)
        return AEFlowOutput(z, z_prime, log_det, x_rec)
