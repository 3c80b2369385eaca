"""What scoring one input returns: :class:`ScoreResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["VOLUME_SCORE_METHOD", "ScoreResult", "finite_list"]

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
