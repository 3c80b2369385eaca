"""Batched slice-by-slice AE-FLOW inference over 3D volumes (and single 2D images)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from monai_aeflow.networks.aeflow import AEFlow
from monai_aeflow.scores import anomaly_map, flow_score, recon_score

__all__ = ["VolumeResult", "pad_to_multiple", "score_slices", "score_volume"]


@dataclass
class VolumeResult:
    """Outputs of :func:`score_volume`, all on the input's voxel grid.

    Attributes:
        anomaly_map: (X, Y, Z) float32 pixel anomaly map (zero on slices that were not scored).
        reconstruction: (X, Y, Z) float32 reconstruction.
        slice_scores: (Z,) image-level score per axial slice (NaN where not scored).
        score_flow: (Z,) flow term per slice.
        score_recon: (Z,) reconstruction term per slice.
    """

    anomaly_map: np.ndarray
    reconstruction: np.ndarray
    slice_scores: np.ndarray
    score_flow: np.ndarray
    score_recon: np.ndarray


def pad_to_multiple(x: torch.Tensor, k: int = 16) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Symmetric zero padding of the last two axes up to multiples of ``k``.

    Args:
        x: (..., H, W) tensor.
        k: the multiple.

    Returns:
        The padded tensor and the ``(left, right, top, bottom)`` padding to undo it.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % k, (-w) % k
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pad) if any(pad) else x), pad


@torch.inference_mode()
def score_slices(
    network: AEFlow,
    images: torch.Tensor,
    batch_size: int = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    calibration: Mapping[str, float] | None = None,
    amp: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Run AE-FLOW on a stack of 2D images in batches.

    Args:
        network: the model (put in ``eval()`` mode here).
        images: (N, C, H, W) in [0, 1]; H and W need not be multiples of 16 (zero padding is added and
            removed again).
        batch_size: images per forward pass.
        beta: weight of the flow score.
        map_kind: pixel map kind (``residual``, ``flow``, ``ssim``).
        calibration: optional score calibration (see :func:`monai_aeflow.scores.image_score`).
        amp: autocast to float16 (default: on for CUDA).

    Returns:
        ``{"anomaly_map": (N, 1, H, W), "reconstruction": (N, C, H, W), "score": (N,), "score_flow",
        "score_recon"}`` as CPU float32 tensors.
    """
    network.eval()
    device = next(network.parameters()).device
    use_amp = device.type == "cuda" if amp is None else (amp and device.type == "cuda")
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    padded, (left, right, top, bottom) = pad_to_multiple(images.float(), 16)
    hp, wp = padded.shape[-2:]
    maps, recs, flows, recons = [], [], [], []
    for start in range(0, padded.shape[0], batch_size):
        x = padded[start : start + batch_size].to(device, non_blocking=True).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            out = network(x)
        x_rec = out.x_rec.float()
        x_c = x[..., top : hp - bottom, left : wp - right]
        rec_c = x_rec[..., top : hp - bottom, left : wp - right]
        z_prime = out.z_prime.float()
        amap = anomaly_map(z_prime, x, x_rec, map_kind)[..., top : hp - bottom, left : wp - right]
        maps.append(amap.cpu())
        recs.append(rec_c.cpu())
        flows.append(flow_score(z_prime).cpu())
        recons.append(recon_score(x_c, rec_c).cpu())
    s_flow, s_recon = torch.cat(flows), torch.cat(recons)
    if calibration is not None:
        f = (s_flow - calibration["flow_mean"]) / max(calibration["flow_std"], 1e-12)
        r = (s_recon - calibration["recon_mean"]) / max(calibration["recon_std"], 1e-12)
        score = beta * f + (1 - beta) * r
    else:
        score = beta * s_flow + (1 - beta) * s_recon
    return {
        "anomaly_map": torch.cat(maps),
        "reconstruction": torch.cat(recs),
        "score": score,
        "score_flow": s_flow,
        "score_recon": s_recon,
    }


def score_volume(
    network: AEFlow,
    volume: np.ndarray | torch.Tensor,
    slices: np.ndarray | None = None,
    batch_size: int = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    calibration: Mapping[str, float] | None = None,
    amp: bool | None = None,
) -> VolumeResult:
    """Score every (or the selected) axial slice of a preprocessed volume with a 2D AE-FLOW model.

    Args:
        network: the model.
        volume: (X, Y, Z) or (C, X, Y, Z) in [0, 1], RAS, axial slices along the last axis.
        slices: indices of the slices to score (default: all).
        batch_size: slices per forward pass.
        beta: weight of the flow score.
        map_kind: pixel map kind.
        calibration: optional score calibration.
        amp: autocast on CUDA.

    Returns:
        A :class:`VolumeResult` on the volume's grid.
    """
    vol = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume).float()
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise ValueError(f"expected a (X, Y, Z) or (C, X, Y, Z) volume, got shape {tuple(vol.shape)}")
    c, x, y, z = vol.shape
    idx = np.arange(z) if slices is None else np.asarray(slices, dtype=int)
    stack = vol[..., idx].permute(3, 0, 1, 2)  # (N, C, X, Y)
    out: dict[str, Any] = score_slices(network, stack, batch_size, beta, map_kind, calibration, amp)
    amap = np.zeros((x, y, z), np.float32)
    rec = np.zeros((x, y, z), np.float32)
    scores = np.full(z, np.nan, np.float32)
    s_flow = np.full(z, np.nan, np.float32)
    s_recon = np.full(z, np.nan, np.float32)
    amap[..., idx] = out["anomaly_map"][:, 0].permute(1, 2, 0).numpy()
    rec[..., idx] = out["reconstruction"].mean(1).permute(1, 2, 0).numpy()
    scores[idx] = out["score"].numpy()
    s_flow[idx] = out["score_flow"].numpy()
    s_recon[idx] = out["score_recon"].numpy()
    return VolumeResult(amap, rec, scores, s_flow, s_recon)
