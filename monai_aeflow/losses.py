"""AE-FLOW training loss: ``alpha * L_flow + (1 - alpha) * L_recon``."""

from __future__ import annotations

import math

import torch
from torch import nn

from monai_aeflow.networks.aeflow import AEFlowOutput
from monai_aeflow.scores import ssim

__all__ = ["flow_nll_per_dim", "AEFlowLoss"]

_LOG_2PI = math.log(2.0 * math.pi)


def flow_nll_per_dim(z_prime: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of features under the flow, divided by the number of dimensions.

    ``-(log N(z'; 0, I) + log|det J|) / D`` with ``D = C * h * w``. Dividing by D keeps the term on the
    scale of a mean squared error (a raw NLL is ~1e5 and swamps the reconstruction term).

    Args:
        z_prime: flow output (B, C, h, w).
        log_det: log-determinant of the flow's Jacobian per sample (B,).

    Returns:
        The per-dimension NLL of each sample, shape (B,), in nats.
    """
    z_prime = z_prime.float()
    dims = z_prime[0].numel()
    log_prior = -0.5 * z_prime.pow(2).flatten(1).sum(1) - 0.5 * dims * _LOG_2PI
    return -(log_prior + log_det.float()) / dims


class AEFlowLoss(nn.Module):
    """The AE-FLOW loss ``L = alpha * L_flow + (1 - alpha) * L_recon``.

    Args:
        alpha: weight of the flow term (0.5 in the paper; 1.0 gives a flow-only model).
        recon: ``"mse"`` (paper) or ``"ssim"`` (``1 - SSIM``, window 11, data range 1).

    Returns (from ``forward``):
        A dict with ``"loss"`` (scalar to minimise), ``"loss_flow"`` and ``"loss_recon"`` (batch means).

    Example::

        loss_fn = AEFlowLoss(alpha=0.5)
        losses = loss_fn(net(x), x)
        losses["loss"].backward()
    """

    def __init__(self, alpha: float = 0.5, recon: str = "mse") -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if recon not in ("mse", "ssim"):
            raise ValueError(f"recon must be 'mse' or 'ssim', got {recon!r}")
        self.alpha = alpha
        self.recon = recon

    def forward(self, output: AEFlowOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        loss_flow = flow_nll_per_dim(output.z_prime, output.log_det).mean()
        x_rec = output.x_rec.float()
        if self.recon == "mse":
            loss_recon = torch.mean((x_rec - x.float()) ** 2)
        else:
            loss_recon = 1.0 - ssim(x_rec, x.float()).mean()
        loss = self.alpha * loss_flow + (1.0 - self.alpha) * loss_recon
        return {"loss": loss, "loss_flow": loss_flow.detach(), "loss_recon": loss_recon.detach()}
