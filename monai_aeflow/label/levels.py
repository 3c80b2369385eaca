"""The anomaly map as a graded segmentation: named levels that 3D Slicer shows as a heat map.

3D Slicer's MONAI Label module lists only segmentation models and loads every result as a label map, so a float
map never reaches its user. :class:`AEFlowLevelsTask` returns the post-processed anomaly map (the map the lesion
mask is thresholded on) quantised into three nested levels inside the brain:

==================  =====  ========================================================================
label               value  voxels whose post-processed score is above
==================  =====  ========================================================================
``anomaly low``     1      ``low``: the 95th percentile of healthy validation voxels (or fallback)
``anomaly medium``  2      ``medium``: the 99th percentile of healthy validation voxels (or fallback)
``anomaly high``    3      the model's validated threshold (the lesion mask's, before small components
                           are removed)
==================  =====  ========================================================================

The healthy percentiles are read from the model file's ``threshold_protocol["healthy_percentiles"]``
(``{"95": value, "99": value}``: percentiles of the post-processed map over brain voxels of healthy validation
volumes). When they are absent, or not below the threshold, the **fallback** is ``low = threshold / 2`` and
``medium = 3 * threshold / 4``; the result JSON says which (``levels["source"]``). Without a threshold (or with a
threshold that is not positive) every voxel is 0 and the result says why.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from monai_aeflow.evaluation.postprocess import postprocess_map
from monai_aeflow.label.infer import _RESULT_KEY, AEFlowInferTask

__all__ = ["LEVEL_COLORS", "LEVEL_NAMES", "AEFlowLevelsTask", "LevelBounds", "level_bounds", "quantise_levels"]

LEVEL_NAMES = ("anomaly low", "anomaly medium", "anomaly high")
"""Label names of levels 1, 2, 3."""
LEVEL_COLORS = {"anomaly low": (255, 230, 0), "anomaly medium": (255, 128, 0), "anomaly high": (230, 0, 0)}
"""RGB colours (0-255) of the levels: yellow, orange, red."""
HEALTHY_KEY = "healthy_percentiles"
FALLBACK = "fallback: low = threshold / 2, medium = 3/4 threshold (the model stores no healthy percentiles)"
NO_LEVELS_MESSAGE = (
    "no positive threshold in the model or the app options: the levels are empty; set one with "
    "'aeflow-cli evaluate --checkpoint MODEL' or '--conf threshold VALUE'"
)


@dataclass(frozen=True)
class LevelBounds:
    """Lower bounds (exclusive) of the three levels on the post-processed map, in increasing order.

    Attributes:
        low: bound of ``anomaly low``.
        medium: bound of ``anomaly medium``.
        high: bound of ``anomaly high`` (the threshold).
        source: where ``low`` and ``medium`` come from.
    """

    low: float
    medium: float
    high: float
    source: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"labels": {name: {"value", "above"}}, "source"}``."""
        bounds = (self.low, self.medium, self.high)
        labels = {name: {"value": i + 1, "above": float(bounds[i])} for i, name in enumerate(LEVEL_NAMES)}
        return {"labels": labels, "source": self.source}


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def level_bounds(threshold: float | None, protocol: Mapping[str, Any] | None = None) -> LevelBounds | None:
    """The level bounds of a model: its threshold and its healthy-validation percentiles (or the fallback).

    Args:
        threshold: the binarisation threshold of the post-processed map (the model's, or the app's option).
        protocol: the model file's ``threshold_protocol`` (may hold ``healthy_percentiles``).

    Returns:
        The bounds, or None without a positive finite threshold.
    """
    high = _finite(threshold)
    if high is None or high <= 0:
        return None
    healthy = (protocol or {}).get(HEALTHY_KEY)
    if isinstance(healthy, Mapping):
        p95, p99 = _finite(healthy.get("95")), _finite(healthy.get("99"))
        if p95 is not None and p99 is not None and 0 <= p95 < p99 < high:
            return LevelBounds(p95, p99, high, "healthy validation percentiles 95 and 99 (model file)")
    return LevelBounds(high / 2.0, 0.75 * high, high, FALLBACK)


def quantise_levels(processed: np.ndarray, brain: np.ndarray, bounds: LevelBounds) -> np.ndarray:
    """Levels 0-3 of a post-processed map inside the brain.

    Args:
        processed: the post-processed anomaly map (see :func:`~monai_aeflow.evaluation.postprocess.postprocess_map`).
        brain: the brain mask (same shape); voxels outside are 0.
        bounds: the level bounds (a voxel is at level ``k`` when its score is above bound ``k`` and not above
            bound ``k + 1``).

    Returns:
        uint8 array of the same shape.
    """
    edges = np.asarray([bounds.low, bounds.medium, bounds.high], dtype=np.float64)
    levels = np.searchsorted(edges, np.asarray(processed, dtype=np.float64), side="left").astype(np.uint8)
    levels[~np.asarray(brain, dtype=bool)] = 0
    return levels


class AEFlowLevelsTask(AEFlowInferTask):
    """The anomaly map as three named levels (``anomaly low / medium / high``), a segmentation task.

    Runs the same scorer as the lesion-mask task (pass it with ``scorer`` and ``lock`` to share the loaded model)
    and returns, instead of the mask, the levels of :func:`quantise_levels` as a uint8 NIfTI on the input's grid.
    The result JSON holds the scores, ``levels`` (bounds, their source, and the voxels per level) and, like the
    mask task, ``anomaly_map_file``.

    Args:
        model: a trained model file or bundle folder (ignored when ``scorer`` is given).
        kwargs: the options of :class:`~monai_aeflow.label.AEFlowInferTask` (``scorer``, ``lock``, ``device``...).
    """

    def __init__(self, model: str | os.PathLike, **kwargs: Any) -> None:
        kwargs.setdefault(
            "description", "AE-FLOW anomaly heat map: the anomaly map in three levels (low, medium, high) in the brain"
        )
        kwargs.pop("label_name", None)
        super().__init__(model, label_name="anomaly levels", **kwargs)
        self.labels = {name: i + 1 for i, name in enumerate(LEVEL_NAMES)}
        protocol = dict(self.scorer.checkpoint.get("threshold_protocol") or {})
        self.bounds = level_bounds(self.scorer.threshold, protocol)

    def info(self) -> dict[str, Any]:
        """The task's ``/info/`` entry: the level names, their colours (RGB 0-255) and their bounds."""
        info = super().info()
        info["label_colors"] = {name: list(rgb) for name, rgb in LEVEL_COLORS.items()}
        info["levels"] = None if self.bounds is None else self.bounds.as_dict()
        return info

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        """Score the image (see :meth:`AEFlowInferTask.run_inferer`) and quantise its post-processed map."""
        data = super().run_inferer(data, convert_to_batch, device)
        result = data[_RESULT_KEY]
        brain = np.asarray(result.brain_mask) > 0
        if self.bounds is None:
            levels = np.zeros(result.anomaly_map.shape, np.uint8)
            result.scores["levels"] = {"labels": None, "source": None, "message": NO_LEVELS_MESSAGE}
        else:
            processed = postprocess_map(result.anomaly_map, brain, self.scorer.postprocess_config)
            levels = quantise_levels(processed, brain, self.bounds)
            counts = np.bincount(levels.ravel(), minlength=4)
            result.scores["levels"] = {
                **self.bounds.as_dict(),
                "voxels": {name: int(counts[i + 1]) for i, name in enumerate(LEVEL_NAMES)},
                "scale": "post-processed anomaly map (the scale of the threshold)",
            }
        data[_RESULT_KEY] = dataclasses.replace(result, lesion_mask=levels)
        data[self.output_label_key] = levels
        return data
