"""AE-FLOW without its decoder: the FastFlow-style likelihood baseline (alpha = beta = 1)."""

from __future__ import annotations

import os

import torch

from monai_aeflow.networks.aeflow import AEFlow, AEFlowOutput

__all__ = ["FlowOnlyAEFlow"]


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
        """Encode and run the flow.

        Args:
            x: (B, in_channels, H, W) images in [0, 1], H and W multiples of 16.

        Returns:
            An :class:`~monai_aeflow.networks.aeflow.AEFlowOutput` whose ``x_rec`` is ``x`` itself.
        """
        self.check_input(x)
        z = self.encoder(x)
        z_prime, log_det = self.flow(z)
        return AEFlowOutput(z, z_prime, log_det, x)
