"""Helpers shared by the model files: KL divergence, squared error, pixel maps, loss options, recon score.

Each model file (:mod:`.ae`, :mod:`.vae`, ...) holds its own loss and score; what two or more of them use lives
here. Nothing in this module imports :mod:`monai_aeflow.models` (the registry).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.scores import residual_map, ssim_anomaly_map

__all__ = [
    "RECON_MAPS",
    "NothingToTrain",
    "gaussian_kl",
    "likelihood_map",
    "loss_options",
    "recon_map",
    "reconstruction_score",
    "sse",
]

RECON_MAPS: tuple[str, ...] = ("residual", "ssim")
"""Pixel map kinds of a reconstruction model."""


class NothingToTrain(nn.Module):
    """The "loss" of a model that is not trained with gradients: calling it raises a clear error.

    Args:
        message: the error's text (what the model is instead: nothing to train, or fitted in one pass).
    """

    def __init__(self, message: str = "this model has nothing to train with a loss") -> None:
        super().__init__()
        self.message = message

    def forward(self, output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Refuse to train.

        Args:
            output: ignored.
            x: ignored.

        Returns:
            Never returns.

        Raises:
            AEFlowInputError: always.
        """
        raise AEFlowInputError(self.message)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over all but the batch axis.

    Args:
        mu: posterior means (B, ...).
        logvar: posterior log-variances, same shape.

    Returns:
        The divergence per sample (B,), in nats.
    """
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def sse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences per sample.

    Args:
        x: (B, ...) tensor.
        y: tensor of the same shape.

    Returns:
        (B,) float32 sums.
    """
    return (x.float() - y.float()).pow(2).flatten(1).sum(1)


def loss_options(training: Mapping[str, Any], allowed: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The loss options of ``training["loss_options"]`` over ``allowed`` defaults; unknown keys are refused.

    Args:
        training: the training settings (``loss_options`` is a dict or missing).
        allowed: the loss's options and their defaults.
        model: registry name, for the error message.

    Returns:
        ``allowed`` updated with the given options.

    Raises:
        AEFlowInputError: an option that ``allowed`` does not name.
    """
    given = dict(training.get("loss_options") or {})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise AEFlowInputError(
            f"unknown loss option(s) {', '.join(unknown)} for model {model!r}; "
            f"choose from {', '.join(sorted(allowed)) or 'none'}"
        )
    return {**allowed, **given}


def recon_map(x: torch.Tensor, x_rec: torch.Tensor, map_kind: str) -> torch.Tensor:
    """Pixel anomaly map of a reconstruction model.

    Args:
        x: (B, C, H, W) images.
        x_rec: their reconstructions.
        map_kind: ``"residual"`` (``|x - x'|``) or ``"ssim"`` (1 - SSIM).

    Returns:
        The map (B, 1, H, W).

    Raises:
        ValueError: another ``map_kind``.
    """
    if map_kind == "residual":
        return residual_map(x, x_rec)
    if map_kind == "ssim":
        return ssim_anomaly_map(x, x_rec)
    raise ValueError(f"unknown anomaly map kind {map_kind!r} for a reconstruction model; choose one of {RECON_MAPS}")


def likelihood_map(z_prime: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-location anomaly map of a flow: ``1 - exp(-mean_c z'^2 / 2)``, bilinearly upsampled.

    This is FastFlow's map ``-exp(mean_c log N(z'_c))`` up to a positive factor and shift, made non-negative
    (0 where ``z' = 0``, towards 1 for unlikely features) so that it goes through the evaluation protocol
    like a residual.

    Args:
        z_prime: flow output (B, C, h, w).
        size: output (H, W).

    Returns:
        The map (B, 1, H, W) in [0, 1).
    """
    local = 1.0 - torch.exp(-0.5 * z_prime.float().pow(2).mean(1, keepdim=True))
    return F.interpolate(local, size=size, mode="bilinear", align_corners=False)


def reconstruction_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Reconstruction-error scorer (autoencoder, VQ-VAE, VQ-GAN): mean squared error per image.

    Args:
        network: the model.
        x: (B, C, H, W) images in [0, 1].
        beta: unused (no flow).
        map_kind: ``"residual"`` (``|x - x'|``) or ``"ssim"`` (1 - SSIM).

    Returns:
        ``{"score", "anomaly_map", "recon"}``.
    """
    x_rec = network(x).x_rec.float()
    x = x.float()
    return {
        "score": (x - x_rec).pow(2).flatten(1).mean(1),
        "anomaly_map": recon_map(x, x_rec, map_kind),
        "recon": x_rec,
    }
