"""Convolutional autoencoder baseline: its reconstruction loss, its score (reconstruction error) and its spec.

The network is :class:`monai_aeflow.networks.autoencoder.ConvAutoEncoder`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models.common import loss_options, reconstruction_score
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.autoencoder import ConvAutoEncoder
from monai_aeflow.scores import ssim

__all__ = ["SPEC", "ReconstructionLoss", "make_loss", "reconstruction_score"]


class ReconstructionLoss(nn.Module):
    """Reconstruction loss of an autoencoder: ``"mse"``, ``"l1"`` or ``"ssim"`` (``1 - SSIM``).

    Args:
        kind: the loss.

    Returns (from ``forward``):
        ``{"loss", "loss_recon"}``.
    """

    def __init__(self, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "l1", "ssim"):
            raise AEFlowInputError(f"reconstruction loss must be 'mse', 'l1' or 'ssim', got {kind!r}")
        self.kind = kind

    def forward(self, output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of one batch.

        Args:
            output: the network's output (with ``x_rec``).
            x: the input images.

        Returns:
            ``{"loss", "loss_recon"}``.
        """
        x_rec, x = output.x_rec.float(), x.float()
        if self.kind == "mse":
            loss = F.mse_loss(x_rec, x)
        elif self.kind == "l1":
            loss = F.l1_loss(x_rec, x)
        else:
            loss = 1.0 - ssim(x_rec, x).mean()
        return {"loss": loss, "loss_recon": loss.detach()}


def make_loss(training: Mapping[str, Any]) -> nn.Module:
    """The autoencoder's loss from the training settings.

    Args:
        training: ``recon_loss`` (default ``mse``), or ``loss_options={"recon_loss": ...}``.

    Returns:
        A :class:`ReconstructionLoss`.
    """
    opts = loss_options(training, {"recon_loss": str(training.get("recon_loss", "mse"))}, "ae")
    return ReconstructionLoss(opts["recon_loss"])


SPEC = ModelSpec(
    name="ae",
    network_cls=ConvAutoEncoder,
    make_loss=make_loss,
    score=reconstruction_score,
    description="convolutional autoencoder with AE-FLOW's decoder; reconstruction error",
    defaults={"in_channels": 1},
)
"""The autoencoder in the registry."""
