"""Batched slice-by-slice AE-FLOW inference over 3D volumes (and single 2D images)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import DivisiblePad

from monai_aeflow.device import autocast, resolve_amp_dtype
from monai_aeflow.models import spec_of
from monai_aeflow.scores import combined_score, recon_score

__all__ = [
    "FittingBatch",
    "VolumeResult",
    "default_batch_size",
    "pad_to_multiple",
    "score_slices",
    "score_volume",
    "score_volume_on",
    "to_host",
]

CPU_BATCH_PIXELS = 262_144
"""Pixels per batch on CPU (e.g. 16 slices of 128 x 128, 4 of 240 x 240): larger batches stop fitting the caches
and get slower (measured with ``benchmarks/bench_score.py``)."""
CUDA_BATCH_SIZE = 32

T = TypeVar("T")


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


class FittingBatch:
    """A batch size that halves when the device runs out of memory, and stays halved.

    Another process may hold part of a shared GPU, or a wider model may not fit the default batch: rather than
    failing every input, the input is scored again with half the slices per forward pass (down to 1), and the
    inputs that follow keep the smaller batch. Several threads that fail at once halve it once.

    Args:
        size: slices per forward pass (None: :func:`default_batch_size` of the device and slice size).
        device: where the network runs.
    """

    def __init__(self, size: int | None, device: torch.device | str) -> None:
        self.size = size
        self.device = torch.device(device)
        self._lock = threading.Lock()

    def run(self, fn: Callable[[int | None], T], height: int, width: int) -> T:
        """``fn(batch_size)``, run again with half the batch for as long as the device runs out of memory.

        Args:
            fn: the work, given the batch size (None: the device's default).
            height: slice height (for the default batch size).
            width: slice width.

        Returns:
            What ``fn`` returns.

        Raises:
            torch.OutOfMemoryError: even one slice per forward pass does not fit.
        """
        while True:
            tried = self.size
            try:
                return fn(tried)
            except torch.OutOfMemoryError:
                current = tried or default_batch_size(self.device, height, width)
                if current <= 1:
                    raise
            # outside the except block, so that the failed batch's tensors (held by the traceback) are released
            with self._lock:
                if self.size == tried:
                    self.size = current // 2
                    warnings.warn(
                        f"{self.device} ran out of memory at {current} slices per forward pass: scoring with "
                        f"{self.size} from now on (--batch-size)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def to_host(*tensors: torch.Tensor | None) -> list[np.ndarray | None]:
    """Copy device tensors to the host with one synchronisation (through pinned memory on CUDA).

    Args:
        tensors: tensors on any device, or None.

    Returns:
        numpy arrays (None stays None); on CUDA only this thread's stream is waited for, so other scoring
        threads go on.
    """
    staged: list[torch.Tensor | None] = []
    for t in tensors:
        if t is None or t.device.type == "cpu":
            staged.append(t)
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        staged.append(host)
    for device in {t.device for t in tensors if t is not None and t.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()  # this thread's stream: other scoring threads go on
    return [None if t is None else t.numpy() for t in staged]


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
    output_device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Run a registered 2D model (AE-FLOW by default) on a stack of images in batches, without a per-image loop.

    On CUDA the stack is staged in pinned memory and copied batch by batch without blocking, each batch's
    outputs are copied into preallocated outputs without blocking either, and the host waits once, at the
    end: no per-batch synchronisation.

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
        output_device: where the outputs are returned (default: the CPU); the network's device keeps them there
            for further work on the device.

    Returns:
        ``{"anomaly_map": (N, 1, H, W), "reconstruction": (N, C, H, W), "score": (N,)}`` plus the model's
        extra terms (``score_flow`` and ``score_recon`` for AE-FLOW) as float32 tensors on ``output_device``.
    """
    network.eval()
    spec = spec_of(network)
    device = next(network.parameters()).device
    out_device = torch.device("cpu") if output_device is None else torch.device(output_device)
    dtype = resolve_amp_dtype(amp_dtype, device, amp)
    # channels-last is faster on CUDA and on CPU (oneDNN) once the weights are channels-last too
    # (AnomalyScorer converts the network; a contiguous network still gives the same numbers)
    fmt = torch.channels_last
    padded, (left, right, top, bottom) = pad_to_multiple(images.float(), spec.size_multiple_of(network))
    cuda = device.type == "cuda"
    if cuda and padded.device.type == "cpu":
        padded = padded.pin_memory()  # so that the per-batch copies below do not block
    hp, wp = padded.shape[-2:]
    if batch_size is None:
        batch_size = default_batch_size(device, hp, wp)
    crop = (..., slice(top, hp - bottom), slice(left, wp - right))
    n = padded.shape[0]
    outputs: dict[str, torch.Tensor] = {}
    for start in range(0, n, batch_size):
        x = padded[start : start + batch_size].to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, dtype):
            out = spec.score(network, x, beta=beta, map_kind=map_kind)
        if any(pad for pad in (left, right, top, bottom)) and "score_recon" in out:
            # the reconstruction term is computed on the unpadded image, as in training
            out["score_recon"] = recon_score(x[crop].float(), out["recon"][crop].float())
            out["score"] = combined_score(out["score_flow"], out["score_recon"], beta)
        for key, value in out.items():
            value = value[crop] if value.ndim == 4 else value
            if key not in outputs:  # preallocated once the shapes are known (pinned when copied from CUDA)
                shape, pin = (n, *value.shape[1:]), cuda and out_device.type == "cpu"
                outputs[key] = torch.empty(shape, dtype=torch.float32, device=out_device, pin_memory=pin)
            outputs[key][start : start + value.shape[0]].copy_(value, non_blocking=True)
    if cuda and out_device.type == "cpu":
        torch.cuda.current_stream(device).synchronize()  # the one wait: the non-blocking copies have landed
    outputs["reconstruction"] = outputs.pop("recon")
    return outputs


def score_volume_on(
    network: torch.nn.Module,
    volume: torch.Tensor,
    slices: np.ndarray | None = None,
    batch_size: int | None = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    amp: bool | None = None,
    amp_dtype: str | torch.dtype | None = None,
    output_device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`score_volume` returning tensors on ``output_device`` (the network's device keeps the maps there).

    Args:
        network: the model.
        volume: (X, Y, Z) or (C, X, Y, Z) in [0, 1], RAS, axial slices along the last axis.
        slices: indices of the slices to score (default: all).
        batch_size: slices per forward pass (``None``: :func:`default_batch_size`).
        beta: weight of the flow score.
        map_kind: pixel map kind.
        amp: autocast on CUDA.
        amp_dtype: autocast dtype (see :func:`score_slices`).
        output_device: where the outputs are returned (default: the CPU).

    Returns:
        ``anomaly_map`` and ``reconstruction`` (X, Y, Z) float32 on ``output_device`` (zero on slices that were
        not scored, the reconstruction averaged over channels), and the per-slice terms (``score``, and
        ``score_flow`` / ``score_recon`` for models with them) as (Z,) CPU float32 tensors, NaN where not scored.
    """
    vol = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume).float()
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise ValueError(f"expected a (X, Y, Z) or (C, X, Y, Z) volume, got shape {tuple(vol.shape)}")
    c, x, y, z = vol.shape
    idx = np.arange(z) if slices is None else np.asarray(slices, dtype=int)
    device = next(network.parameters()).device
    if device.type != "cpu":  # one copy of the volume; the slice selection, layout and padding on the device
        vol = vol.to(device)
    stack = vol[..., torch.as_tensor(idx, device=vol.device)].permute(3, 0, 1, 2)  # (N, C, X, Y)
    out = score_slices(network, stack, batch_size, beta, map_kind, amp, amp_dtype, output_device=output_device)
    dev = out["anomaly_map"].device
    where = torch.as_tensor(idx, device=dev)
    result: dict[str, torch.Tensor] = {}
    for key, value in (("anomaly_map", out["anomaly_map"][:, 0]), ("reconstruction", out["reconstruction"].mean(1))):
        full = torch.zeros((x, y, z), dtype=torch.float32, device=dev)
        full[..., where] = value.permute(1, 2, 0)
        result[key] = full
    for key in ("score", "score_flow", "score_recon"):
        if key in out:
            per = torch.full((z,), float("nan"), dtype=torch.float32)
            per[torch.as_tensor(idx)] = out[key].cpu()
            result[key] = per
    return result


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
    out = score_volume_on(network, volume, slices, batch_size, beta, map_kind, amp, amp_dtype)
    terms = {k: out[k].numpy() if k in out else None for k in ("score", "score_flow", "score_recon")}
    maps = out["anomaly_map"].numpy(), out["reconstruction"].numpy()
    return VolumeResult(*maps, terms["score"], terms["score_flow"], terms["score_recon"])
