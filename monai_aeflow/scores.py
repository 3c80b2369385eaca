"""AE-FLOW anomaly scores and pixel-level anomaly maps.

Image score: ``S = beta * S_flow + (1 - beta) * S_recon`` with ``S_flow = -exp(mean_d log N(z'_d; 0, 1))``
(the negative per-dimension density: bounded in [-(2 pi)^-1/2, 0] and never underflowing) and
``S_recon = -SSIM(x, x')`` (Gaussian window 11, sigma 1.5, data range fixed to 1). Higher is more anomalous.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.metrics.regression import KernelType, compute_ssim_and_cs

__all__ = [
    "DEFAULT_MAP_KIND",
    "MAP_KINDS",
    "ssim",
    "ssim_map",
    "flow_score",
    "recon_score",
    "combined_score",
    "image_score",
    "residual_map",
    "flow_map",
    "flow_nll_map",
    "product_map",
    "ssim_anomaly_map",
    "anomaly_map",
]

MAP_KINDS = ("product", "residual", "flow", "ssim")
DEFAULT_MAP_KIND = "residual"
"""AE-FLOW's default pixel map: the paper's residual ``|x - x'|``, the same default as the engine, the CLI and the
bundles. ``"product"`` (the residual times the flow's upsampled per-location NLL) is a named option: on the BraTS
dev protocol (``benchmarks/bench_maps.py``) it matched the residual's pixel AUROC and was slightly ahead in test Dice
and slice AUROC for most recipes, a gain within the fold-to-fold spread of four cases."""
_LOG_2PI = math.log(2.0 * math.pi)


def _float32(x: torch.Tensor) -> torch.autocast:
    """Autocast disabled on the tensor's device: SSIM's local (squared) means and the densities stay float32
    whatever the caller's autocast (bfloat16 variances ``E[x^2] - E[x]^2`` cancel to noise)."""
    return torch.autocast(x.device.type, enabled=False)


def _ssim_full(x: torch.Tensor, y: torch.Tensor, win_size: int, sigma: float, data_range: float) -> torch.Tensor:
    with _float32(x):
        return compute_ssim_and_cs(
            y_pred=x.float(),
            y=y.float(),
            spatial_dims=x.ndim - 2,
            kernel_size=[win_size] * (x.ndim - 2),
            kernel_sigma=[sigma] * (x.ndim - 2),
            data_range=data_range,
            kernel_type=KernelType.GAUSSIAN,
            k1=0.01,
            k2=0.03,
        )[0]


def ssim(
    x: torch.Tensor, y: torch.Tensor, win_size: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Mean structural similarity of each image pair (Gaussian window, no padding).

    The mean is over all valid window positions and channels, as in Wang et al. (2004) and
    ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.

    Args:
        x: images (B, C, H, W).
        y: images of the same shape.
        win_size: window size (11 in the AE-FLOW paper).
        sigma: Gaussian standard deviation of the window.
        data_range: dynamic range, fixed to 1 for images in [0, 1] (never estimated from the data).

    Returns:
        SSIM per image, shape (B,).
    """
    return _ssim_full(x, y, win_size, sigma, data_range).flatten(1).mean(1)


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, win_size: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Local SSIM at every pixel, averaged over channels.

    The border is padded symmetrically (edge sample repeated, as ``scipy.ndimage``'s ``"reflect"``), so the
    map equals ``skimage.metrics.structural_similarity(..., full=True)`` with Gaussian weights.

    Args:
        x: images (B, C, H, W).
        y: images of the same shape.
        win_size: window size.
        sigma: Gaussian standard deviation of the window.
        data_range: dynamic range of the images.

    Returns:
        The SSIM map, shape (B, 1, H, W).
    """
    pad = win_size // 2
    xp = _pad_symmetric(x.float(), pad)
    yp = _pad_symmetric(y.float(), pad)
    return _ssim_full(xp, yp, win_size, sigma, data_range).mean(1, keepdim=True)


def _pad_symmetric(x: torch.Tensor, pad: int) -> torch.Tensor:
    if pad > min(x.shape[-2:]):
        raise ValueError(f"image of size {tuple(x.shape[-2:])} is smaller than the SSIM window padding {pad}")
    x = torch.cat([x[..., :pad, :].flip(-2), x, x[..., -pad:, :].flip(-2)], dim=-2)
    return torch.cat([x[..., :pad].flip(-1), x, x[..., -pad:].flip(-1)], dim=-1)


def _mean_log_density(z_prime: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    with _float32(z_prime):
        return (-0.5 * z_prime.float().pow(2) - 0.5 * _LOG_2PI).mean(dim)


def flow_score(z_prime: torch.Tensor) -> torch.Tensor:
    """``S_flow = -exp(mean_d log N(z'_d; 0, 1))`` per image, shape (B,)."""
    with _float32(z_prime):
        return -torch.exp(_mean_log_density(z_prime, dim=tuple(range(1, z_prime.ndim))))


def recon_score(x: torch.Tensor, x_rec: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """``S_recon = -SSIM(x, x')`` per image with data range 1, shape (B,)."""
    return -ssim(x_rec, x, win_size=win_size)


def combined_score(s_flow: torch.Tensor, s_recon: torch.Tensor, beta: float = 0.9) -> torch.Tensor:
    """The AE-FLOW combination ``beta * S_flow + (1 - beta) * S_recon`` of the two score terms (the one place
    it is written; :func:`image_score`, the AE-FLOW model's scorer and slice scoring call it).

    Args:
        s_flow: flow score per image (see :func:`flow_score`).
        s_recon: reconstruction score per image (see :func:`recon_score`), same shape.
        beta: weight of the flow score (0.9 in the paper).

    Returns:
        The image score, same shape; higher is more anomalous.
    """
    return beta * s_flow + (1.0 - beta) * s_recon


def image_score(
    z_prime: torch.Tensor,
    x: torch.Tensor,
    x_rec: torch.Tensor,
    beta: float = 0.9,
    calibration: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """The AE-FLOW image-level anomaly score ``beta * S_flow + (1 - beta) * S_recon``.

    Args:
        z_prime: flow output (B, C, h, w).
        x: input images (B, C, H, W) in [0, 1].
        x_rec: reconstructions of the same shape.
        beta: weight of the flow score (0.9 in the paper).
        calibration: optional ``{"flow_mean", "flow_std", "recon_mean", "recon_std"}`` measured on healthy
            validation images; each term is then standardised before weighting. None (default) keeps the
            paper's raw combination.

    Returns:
        The score per image, shape (B,); higher is more anomalous.
    """
    s_flow = flow_score(z_prime)
    s_recon = recon_score(x, x_rec)
    if calibration is not None:
        s_flow = (s_flow - calibration["flow_mean"]) / max(calibration["flow_std"], 1e-12)
        s_recon = (s_recon - calibration["recon_mean"]) / max(calibration["recon_std"], 1e-12)
    return combined_score(s_flow, s_recon, beta)


def residual_map(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """``|x - x'|`` averaged over channels, shape (B, 1, H, W) (the paper's default pixel map)."""
    return (x.float() - x_rec.float()).abs().mean(1, keepdim=True)


def flow_map(z_prime: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-location negative density ``-exp(mean_c log N(z'_c))``, bilinearly upsampled to ``size``."""
    with _float32(z_prime):
        local = -torch.exp(_mean_log_density(z_prime, dim=1)).unsqueeze(1)
        return F.interpolate(local, size=size, mode="bilinear", align_corners=False)


def flow_nll_map(z_prime: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-location negative log-likelihood of the flow output, bilinearly upsampled to ``size``.

    ``mean_c (z'_c^2 / 2) + log(2 pi) / 2`` at every feature location (the prior's NLL per dimension; the
    log-determinant of the flow is a per-image term): non-negative, higher where the features are unlikely.

    Args:
        z_prime: flow output (B, C, h, w).
        size: output (H, W).

    Returns:
        The map, shape (B, 1, H, W).
    """
    local = -_mean_log_density(z_prime, dim=1).unsqueeze(1)
    return F.interpolate(local, size=size, mode="bilinear", align_corners=False)


def product_map(z_prime: torch.Tensor, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """``|x - x'|`` (channel mean) times the flow's per-location NLL (:func:`flow_nll_map`), shape (B, 1, H, W).

    The residual gives the resolution, the flow's likelihood of the features at that place weights it: a
    residual where the features are typical of healthy anatomy (edges, vessels) counts less.

    Args:
        z_prime: flow output (B, C, h, w).
        x: input images (B, C, H, W).
        x_rec: reconstructions of the same shape.

    Returns:
        The map, shape (B, 1, H, W); non-negative, higher is more anomalous.
    """
    return residual_map(x, x_rec) * flow_nll_map(z_prime.float(), tuple(x.shape[-2:]))


def ssim_anomaly_map(x: torch.Tensor, x_rec: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """``1 - SSIM`` at every pixel, shape (B, 1, H, W)."""
    return 1.0 - ssim_map(x_rec, x, win_size=win_size)


def anomaly_map(
    z_prime: torch.Tensor, x: torch.Tensor, x_rec: torch.Tensor, kind: str = DEFAULT_MAP_KIND
) -> torch.Tensor:
    """Pixel-level anomaly map of the chosen kind.

    Args:
        z_prime: flow output (B, C, h, w).
        x: input images (B, C, H, W).
        x_rec: reconstructions.
        kind: ``"residual"`` (|x - x'|, the paper's map, the default: see :data:`DEFAULT_MAP_KIND`),
            ``"product"`` (|x - x'| times the upsampled per-location flow NLL), ``"flow"`` (FastFlow's
            per-location density map made non-negative and bounded, ``1 - exp(-mean_c z'^2 / 2)`` upsampled,
            as the flow-only model's map, so that the evaluation protocol's positive / absolute residual modes
            leave it unchanged) or ``"ssim"`` (1 - SSIM map).

    Returns:
        The map, shape (B, 1, H, W); higher is more anomalous.
    """
    if kind == "product":
        return product_map(z_prime, x, x_rec)
    if kind == "residual":
        return residual_map(x, x_rec)
    if kind == "flow":  # 1 + sqrt(2 pi) * (-exp(mean_c log N)) = 1 - exp(-mean_c z'^2 / 2), in [0, 1)
        return 1.0 + math.sqrt(2.0 * math.pi) * flow_map(z_prime, tuple(x.shape[-2:]))
    if kind == "ssim":
        return ssim_anomaly_map(x, x_rec)
    raise ValueError(f"unknown anomaly map kind {kind!r}; choose one of {MAP_KINDS}")
