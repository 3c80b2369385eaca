"""pchVAE baseline (Zimmerer et al.): its Eq. 9 loss, its negative-ELBO score and its spec.

The network is :class:`monai_aeflow.networks.pchvae.PCHVAE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models.common import gaussian_kl, loss_options, recon_map, sse
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.pchvae import PCHVAE, PCHVAEOutput

__all__ = ["SPEC", "PCHVAELoss", "make_loss", "pchvae_score"]


class PCHVAELoss(nn.Module):
    """The pchVAE loss, Eq. 9 of Zimmerer et al., per pixel.

    ``L = [l1 ||x - x_high||^2 + l2 ||x - (x_high + x_low)||^2 + l3 ||g1(f1(x_low))||^2 + l4 KL(z1) + l5 KL(z2)] / N``
    with squared L2 norms (Gaussian decoders of constant variance), batch means and N = C * H * W. The paper
    chooses ``l2 = l3``; all weights default to 1.

    Args:
        weights: ``(l1, l2, l3, l4, l5)``.

    Returns (from ``forward``):
        ``{"loss", "loss_high", "loss_recon", "loss_zero", "loss_kl_high", "loss_kl_low"}``.
    """

    def __init__(self, weights: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__()
        weights = tuple(float(w) for w in weights)
        if len(weights) != 5 or any(w < 0 for w in weights):
            raise AEFlowInputError(f"pchVAE loss weights must be five numbers >= 0, got {weights}")
        self.weights = weights

    def forward(self, output: PCHVAEOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of one batch.

        Args:
            output: the pchVAE's output in training mode (with ``x_zero``).
            x: the input images.

        Returns:
            The total ``loss`` and its five (detached) terms.

        Raises:
            ValueError: ``output.x_zero`` is missing.
        """
        if output.x_zero is None:
            raise ValueError("the pchVAE loss needs x_zero: run the network in training mode (or with_zero=True)")
        n = x[0].numel()
        terms = {
            "loss_high": sse(output.x_high, x).mean() / n,
            "loss_recon": sse(output.x_high.float() + output.x_low.float(), x).mean() / n,
            "loss_zero": output.x_zero.float().pow(2).flatten(1).sum(1).mean() / n,
            "loss_kl_high": gaussian_kl(output.mu1, output.logvar1).mean() / n,
            "loss_kl_low": gaussian_kl(output.mu2, output.logvar2).mean() / n,
        }
        loss = sum(w * t for w, t in zip(self.weights, terms.values(), strict=True))
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


def pchvae_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Negative ELBO per pixel of a :class:`PCHVAE`: ``(SSE(x, x_high + x_low) + KL(z1) + KL(z2)) / N``.

    Args:
        network: the pchVAE.
        x: (B, C, H, W) images.
        beta: unused.
        map_kind: ``"residual"`` or ``"ssim"``.

    Returns:
        ``{"score", "score_nll", "score_kl", "anomaly_map", "recon"}``.
    """
    out: PCHVAEOutput = network(x)
    n = x[0].numel()
    nll = sse(out.x_high.float() + out.x_low.float(), x) / n
    kl = (gaussian_kl(out.mu1, out.logvar1) + gaussian_kl(out.mu2, out.logvar2)) / n
    x_rec = out.x_rec.float()
    return {
        "score": nll + kl,
        "score_nll": nll,
        "score_kl": kl,
        "anomaly_map": recon_map(x.float(), x_rec, map_kind),
        "recon": x_rec,
    }


def make_loss(training: Mapping[str, Any]) -> nn.Module:
    """The pchVAE's loss from the training settings.

    Args:
        training: ``loss_options={"weights": [l1, l2, l3, l4, l5]}`` (default all 1).

    Returns:
        A :class:`PCHVAELoss`.
    """
    opts = loss_options(training, {"weights": [1.0, 1.0, 1.0, 1.0, 1.0]}, "pchvae")
    return PCHVAELoss(tuple(opts["weights"]))


SPEC = ModelSpec(
    name="pchvae",
    network_cls=PCHVAE,
    make_loss=make_loss,
    score=pchvae_score,
    description="pchVAE (Zimmerer et al.): high- and low-level VAE branches, Eq. 9 loss; negative ELBO",
    defaults={"in_channels": 1},
)
"""The pchVAE in the registry."""
