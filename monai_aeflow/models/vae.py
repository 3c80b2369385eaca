"""VAE baseline with a dense latent (the seed thesis): its negative-ELBO loss and score, and its spec.

The network is :class:`monai_aeflow.networks.vae.DenseVAE`. The score uses the posterior mean (a
deterministic, single-pass estimate of the negative ELBO per pixel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models.common import gaussian_kl, loss_options, recon_map, sse
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.vae import DenseVAE, VAEOutput

__all__ = ["SPEC", "THESIS_VAE_CONFIG", "VAELoss", "make_loss", "vae_score"]

THESIS_VAE_CONFIG: dict[str, Any] = {"in_channels": 1, "image_size": [95, 79], "latent_dim": 128}
"""The VAE of the seed thesis (Table 4.3: 1,915,041 parameters for latent 128 at 95 x 79)."""


class VAELoss(nn.Module):
    """Negative ELBO of a VAE with a Gaussian decoder of variance 1/2, per pixel.

    ``L = mean_batch (SSE(x, x') + kl_weight * KL(q(z|x) || N(0, I))) / N`` with N the number of image
    values (C * H * W); ``kl_weight = 1`` is the ELBO.

    Args:
        kl_weight: weight of the KL term (beta of a beta-VAE).

    Returns (from ``forward``):
        ``{"loss", "loss_recon", "loss_kl"}`` (per pixel).
    """

    def __init__(self, kl_weight: float = 1.0) -> None:
        super().__init__()
        if kl_weight < 0:
            raise AEFlowInputError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = float(kl_weight)

    def forward(self, output: VAEOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of one batch.

        Args:
            output: the VAE's output.
            x: the input images.

        Returns:
            ``{"loss", "loss_recon", "loss_kl"}``.
        """
        n = x[0].numel()
        rec = sse(output.x_rec, x).mean() / n
        kl = gaussian_kl(output.mu, output.logvar).mean() / n
        loss = rec + self.kl_weight * kl
        return {"loss": loss, "loss_recon": rec.detach(), "loss_kl": kl.detach()}


def vae_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Negative ELBO per pixel of a :class:`DenseVAE` (posterior mean, decoder variance 1/2).

    Args:
        network: the VAE.
        x: (B, C, H, W) images.
        beta: unused.
        map_kind: ``"residual"`` or ``"ssim"``.

    Returns:
        ``{"score", "score_nll", "score_kl", "anomaly_map", "recon"}``; ``score = score_nll + score_kl``.
    """
    out: VAEOutput = network(x)
    n = x[0].numel()
    x_rec = out.x_rec.float()
    nll = sse(x_rec, x) / n
    kl = gaussian_kl(out.mu, out.logvar) / n
    return {
        "score": nll + kl,
        "score_nll": nll,
        "score_kl": kl,
        "anomaly_map": recon_map(x.float(), x_rec, map_kind),
        "recon": x_rec,
    }


def make_loss(training: Mapping[str, Any]) -> nn.Module:
    """The VAE's loss from the training settings.

    Args:
        training: ``loss_options={"kl_weight": ...}`` (default 1).

    Returns:
        A :class:`VAELoss`.
    """
    return VAELoss(**loss_options(training, {"kl_weight": 1.0}, "vae"))


SPEC = ModelSpec(
    name="vae",
    network_cls=DenseVAE,
    make_loss=make_loss,
    score=vae_score,
    description="VAE with a dense latent (seed thesis: 5x5 stride-2 blocks, latent 128); negative ELBO",
    defaults={"in_channels": 1, "image_size": [128, 128], "latent_dim": 128},
)
"""The VAE in the registry."""
