"""Batched slice-by-slice AE-FLOW inference over 3D volumes (and single 2D images)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import DivisiblePad

from monai_aeflow.device import autocast, resolve_amp_dtype
from monai_aeflow.models import spec_of
from monai_aeflow.scores import combined_score, recon_score

__all__ = ["VolumeResult", "default_batch_size", "pad_to_multiple", "score_slices", "score_volume"]

CPU_BATCH_PIXELS = 262_144
"""Pixels per batch on CPU (e.g. 16 slices of 128 x 128, 4 of 240 x 240): larger batches stop fitting the caches
and get slower (measured with ``benchmarks/bench_score.py``)."""
CUDA_BATCH_SIZE = 32


def default_batch_size(device: torch.device | str, height: int, width: int) -> int:
    """Slices per forward pass: 32 on CUDA; on CPU a power of two keeping about 262k pixels per batch.

    Args:
        device: where the model runs.
        height: slice height (after padding).
        width: slice width (after padding).

    Returns:
        The batch size (1 to 64).
    """
    if torch.device(device).type == "cuda":
        return CUDA_BATCH_SIZE
    n = max(1, CPU_BATCH_PIXELS // max(1, height * width))
    return int(min(64, 2 ** int(np.floor(np.log2(n)))))


@dataclass
class VolumeResult:
    """Outputs of :func:`score_volume`, all on the input's voxel grid.

    Attributes:
        anomaly_map: (X, Y, Z) float32 pixel anomaly map (zero on slices that were not scored).
        reconstruction: (X, Y, Z) float32 reconstruction.
        slice_scores: (Z,) image-level score per axial slice (NaN where not scored).
        score_flow: (Z,) flow term per slice (None for models without one).
        score_recon: (Z,) reconstruction term per slice (None for models without one).
    """

    anomaly_map: np.ndarray
    reconstruction: np.ndarray
    slice_scores: np.ndarray
    score_flow: np.ndarray | None = None
    score_recon: np.ndarray | None = None


def pad_to_multiple(x: torch.Tensor, k: int = 16) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Symmetric zero padding of the last two axes up to multiples of ``k``: MONAI
    ``DivisiblePad(k, method="symmetric")`` (left/top get ``total // 2``) on a plain tensor.

    Args:
        x: (..., H, W) tensor.
        k: the multiple.

    Returns:
        The padded tensor and the ``(left, right, top, bottom)`` padding to undo it.
    """
    h, w = x.shape[-2:]
    padder = DivisiblePad((k, k), method="symmetric")
    _, (top, bottom), (left, right) = padder.compute_pad_width((h, w))
    pad = (int(left), int(right), int(top), int(bottom))
    if not any(pad):
        return x, pad
    padded = padder(x.reshape(-1, h, w))  # the leading axes play MONAI's channel axis
    padded = padded.as_tensor() if isinstance(padded, MetaTensor) else padded
    return padded.reshape(*x.shape[:-2], *padded.shape[-2:]), pad


@torch.inference_mode()
def score_slices(
    network: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int | None = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    amp: bool | None = None,
    amp_dtype: str | torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Run a registered 2D model (AE-FLOW by default) on a stack of images in batches, without a per-image loop.

    Args:
        network: the model (put in ``eval()`` mode here).
        images: (N, C, H, W) in [0, 1]; H and W need not be multiples of 16 (zero padding is added and
            removed again).
        batch_size: images per forward pass (``None``: :func:`default_batch_size`).
        beta: weight of the flow score.
        map_kind: pixel map kind (``residual``, ``flow``, ``ssim``).
        amp: autocast on CUDA (default: on); ignored when ``amp_dtype`` is given.
        amp_dtype: ``"bfloat16"`` (the CUDA default), ``"float16"``, ``"none"`` or None (the device's default,
            see :func:`~monai_aeflow.device.resolve_amp_dtype`); an explicit dtype applies on CPU too. The flow's
            densities, log-determinants and the SSIM term are computed in float32 whatever the autocast.

    Returns:
        ``{"anomaly_map": (N, 1, H, W), "reconstruction": (N, C, H, W), "score": (N,)}`` plus the model's
        extra terms (``score_flow`` and ``score_recon`` for AE-FLOW) as CPU float32 tensors.
    """
    network.eval()
    spec = spec_of(network)
    device = next(network.parameters()).device
    dtype = resolve_amp_dtype(amp_dtype, device, amp)
    # channels-last is faster on CUDA and on CPU (oneDNN) once the weights are channels-last too
    # (AnomalyScorer converts the network; a contiguous network still gives the same numbers)
    fmt = torch.channels_last
    padded, (left, right, top, bottom) = pad_to_multiple(images.float(), spec.size_multiple_of(network))
    hp, wp = padded.shape[-2:]
    if batch_size is None:
        batch_size = default_batch_size(device, hp, wp)
    crop = (..., slice(top, hp - bottom), slice(left, wp - right))
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, padded.shape[0], batch_size):
        x = padded[start : start + batch_size].to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, dtype):
            out = spec.score(network, x, beta=beta, map_kind=map_kind)
        if any(pad for pad in (left, right, top, bottom)) and "score_recon" in out:
            # the reconstruction term is computed on the unpadded image, as in training
            out["score_recon"] = recon_score(x[crop].float(), out["recon"][crop].float())
            out["score"] = combined_score(out["score_flow"], out["score_recon"], beta)
        for key, value in out.items():
            value = value.float()
            chunks.setdefault(key, []).append((value[crop] if value.ndim == 4 else value).cpu())
    out = {key: torch.cat(values) for key, values in chunks.items()}
    out["reconstruction"] = out.pop("recon")
    return out


def score_volume(
    network: torch.nn.Module,
    volume: np.ndarray | torch.Tensor,
    slices: np.ndarray | None = None,
    batch_size: int | None = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    amp: bool | None = None,
    amp_dtype: str | torch.dtype | None = None,
) -> VolumeResult:
    """Score every (or the selected) axial slice of a preprocessed volume with a 2D AE-FLOW model.

    Args:
        network: the model.
        volume: (X, Y, Z) or (C, X, Y, Z) in [0, 1], RAS, axial slices along the last axis.
        slices: indices of the slices to score (default: all).
        batch_size: slices per forward pass (``None``: :func:`default_batch_size`).
        beta: weight of the flow score.
        map_kind: pixel map kind.
        amp: autocast on CUDA.
        amp_dtype: autocast dtype (see :func:`score_slices`).

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
    out: dict[str, Any] = score_slices(network, stack, batch_size, beta, map_kind, amp, amp_dtype)
    amap = np.zeros((x, y, z), np.float32)
    rec = np.zeros((x, y, z), np.float32)
    per_slice = {}
    for key in ("score", "score_flow", "score_recon"):
        if key in out:
            per_slice[key] = np.full(z, np.nan, np.float32)
            per_slice[key][idx] = out[key].numpy()
    amap[..., idx] = out["anomaly_map"][:, 0].permute(1, 2, 0).numpy()
    rec[..., idx] = out["reconstruction"].mean(1).permute(1, 2, 0).numpy()
    return VolumeResult(amap, rec, per_slice["score"], per_slice.get("score_flow"), per_slice.get("score_recon"))
