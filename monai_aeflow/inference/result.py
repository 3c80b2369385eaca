"""What scoring one input returns: :class:`ScoreResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["VOLUME_SCORE_METHOD", "ScoreResult", "finite_list", "map_sums"]

VOLUME_SCORE_METHOD = "mean anomaly map over brain voxels (input grid)"


@dataclass
class ScoreResult:
    """What :meth:`AnomalyScorer.score` returns for one input.

    Attributes:
        source: the input file or folder.
        name: output name (see :func:`output_name`).
        kind: ``"volume"`` or ``"image2d"``.
        anomaly_map: float32 map on the input's grid (the file's array shape, and for 2D images the
            ``(width, height)`` order of MONAI's image reader), zero outside the brain mask.
        lesion_mask: uint8 post-processed binary mask at the threshold, or None when no threshold is known.
        brain_mask: uint8 brain mask on the input's grid.
        affine: 4x4 voxel-to-world (RAS) matrix of the input.
        scores: volume score, per-slice scores, threshold, lesion size, model identity (JSON-ready).
        preview: preprocessed ``image``, ``reconstruction`` and ``anomaly_map`` (model grid) for the preview.
        header: the NIfTI header of a NIfTI input (kept on the outputs), else None.
    """

    source: str
    name: str
    kind: str
    anomaly_map: np.ndarray
    lesion_mask: np.ndarray | None
    brain_mask: np.ndarray
    affine: np.ndarray
    scores: dict[str, Any]
    preview: dict[str, np.ndarray] = field(default_factory=dict)
    header: Any = None


def finite_list(values: np.ndarray) -> list[float | None]:
    """The values as a JSON-ready list, None where not finite."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=float)]


def map_sums(
    map_in: np.ndarray | torch.Tensor, brain_in: np.ndarray | torch.Tensor, lesion: np.ndarray | torch.Tensor | None
) -> np.ndarray | torch.Tensor:
    """The sums behind a result's volume score (:data:`VOLUME_SCORE_METHOD`) and voxel counts.

    One reduction each, on the arrays' device (numpy's ``map[brain].mean()`` gathers the brain voxels first, which
    holds the interpreter for about 35 ms per 240 x 240 x 155 volume).

    Args:
        map_in: the anomaly map.
        brain_in: the brain mask, same shape.
        lesion: the lesion mask, same shape, or None.

    Returns:
        ``[sum of the map over the brain, brain voxels, lesion voxels]`` in float64 (NaN without a lesion mask),
        a tensor for tensor inputs, else a numpy array.
    """
    if isinstance(map_in, torch.Tensor):
        zero = torch.zeros((), dtype=map_in.dtype, device=map_in.device)
        inside = torch.where(brain_in.bool(), map_in, zero).sum(dtype=torch.float64)
        brain_n = brain_in.sum(dtype=torch.float64)
        lesion_n = lesion.sum(dtype=torch.float64) if lesion is not None else torch.full_like(brain_n, float("nan"))
        return torch.stack([inside, brain_n, lesion_n])
    brain_b = np.asarray(brain_in, dtype=bool)
    return np.array(
        [
            np.sum(np.asarray(map_in) * brain_b, dtype=np.float64),
            np.count_nonzero(brain_b),
            np.nan if lesion is None else np.count_nonzero(lesion),
        ],
        dtype=np.float64,
    )
