"""Metrics, curves and figure cases of a prepared split, the pieces that :mod:`monai_aeflow.evaluation.pipeline`
assembles into an evaluation result.

Pooled and per-volume Dice with bootstrap intervals, pixel AUROC / AUPRC from threshold sweeps, Dice-vs-threshold
curves, ROC / precision-recall curves thinned for reports, and the best / median / worst test cases for the
report figures. Each works on :class:`~monai_aeflow.evaluation.cases.PreparedCase` objects or on their counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.cases import PreparedCase
from monai_aeflow.evaluation.io import load_case
from monai_aeflow.evaluation.metrics import (
    auroc_from_counts,
    average_precision_from_counts,
    bootstrap_ci,
    curve_counts,
    dice_from_counts,
    roc_points,
)
from monai_aeflow.evaluation.sweep import SweepCounts, sweep_counts, threshold_grid

if TYPE_CHECKING:
    from monai_aeflow.evaluation.pipeline import EvaluationConfig


def _metric(value: float, low: float = float("nan"), high: float = float("nan")) -> dict[str, float]:
    return {"value": float(value), "ci_low": float(low), "ci_high": float(high)}


def healthy_percentiles(cases: Sequence[PreparedCase], q: Sequence[float] = (95.0, 99.0)) -> dict[str, object] | None:
    """Percentiles of the post-processed map over healthy brain voxels of a (validation) split.

    The voxels are the brain voxels of the volumes without lesion voxels, or, when every volume has lesions, the
    brain voxels outside lesions. Stored beside the threshold in the model file, they grade the map below the
    threshold (the MONAI Label heat-map levels).

    Args:
        cases: prepared cases.
        q: percentiles in [0, 100].

    Returns:
        ``{"95": value, "99": value, "reference": ...}`` (keys are the percentiles as written by ``f"{q:g}"``), or
        None when there is no healthy brain voxel.
    """
    healthy = [c.brain_scores() for c in cases if not c.volume_label]
    reference = "brain voxels of healthy validation volumes"
    if not healthy or not sum(v.size for v in healthy):
        healthy = [c.brain_scores()[~c.brain_labels()] for c in cases]
        reference = "brain voxels outside lesions of the validation volumes"
    values = np.concatenate(healthy) if healthy else np.zeros(0)
    if not values.size:
        return None
    out: dict[str, object] = {f"{p:g}": float(v) for p, v in zip(q, np.percentile(values, list(q)), strict=True)}
    out["reference"] = reference
    return out


def _split_sweep(cases: Sequence[PreparedCase], n_thresholds: int, seed: int) -> tuple[SweepCounts, SweepCounts]:
    """Sweeps over brain voxels and over all stored voxels, on the split's own grid."""
    grid = threshold_grid([c.scores for c in cases], n_thresholds, seed=seed)
    brain = sweep_counts([c.brain_scores() for c in cases], [c.brain_labels() for c in cases], grid)
    extra = sweep_counts([c.scores[c.n_brain :] for c in cases], [c.labels[c.n_brain :] for c in cases], grid)
    return brain, brain + extra


def _dice_curves(support: SweepCounts, lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pooled = dice_from_counts(support.tp.sum(0), support.fp.sum(0), support.fn.sum(0))
    if lesion.any():
        per_volume = dice_from_counts(support.tp[lesion], support.fp[lesion], support.fn[lesion])
        mean = np.nanmean(per_volume, axis=0)
    else:
        mean = np.full(pooled.shape, np.nan)
    return pooled, mean


def _pixel_metrics(brain: SweepCounts, config: EvaluationConfig) -> dict[str, dict[str, float]]:
    # Decreasing thresholds: reverse the grid axis.
    tp, fp = brain.tp[:, ::-1], brain.fp[:, ::-1]

    def stat(idx: np.ndarray) -> np.ndarray:
        w = np.bincount(idx, minlength=tp.shape[0]).astype(np.float64)
        ptp, pfp = w @ tp, w @ fp
        n_pos, n_neg = w @ brain.n_pos, w @ brain.n_neg
        if n_pos == 0 or n_neg == 0:
            return np.array([np.nan, np.nan])
        return np.array(
            [auroc_from_counts(ptp, pfp, n_pos, n_neg), average_precision_from_counts(ptp, pfp, n_pos, n_neg)]
        )

    point = stat(np.arange(tp.shape[0]))
    low, high = bootstrap_ci(stat, tp.shape[0], config.n_bootstrap, config.confidence, config.seed)
    return {"auroc": _metric(point[0], low[0], high[0]), "auprc": _metric(point[1], low[1], high[1])}


def _dice_metrics(counts: np.ndarray, config: EvaluationConfig) -> dict[str, dict[str, float]]:
    """Pooled Dice (DICE_T) and mean / std of per-volume Dice (DICE_S) over volumes with lesions."""
    per = dice_from_counts(counts[:, 0], counts[:, 1], counts[:, 2])
    lesion = counts[:, 0] + counts[:, 2] > 0

    def stat(idx: np.ndarray) -> np.ndarray:
        c = counts[idx].sum(0)
        sel = idx[lesion[idx]]
        mean = float(np.mean(per[sel])) if sel.size else np.nan
        return np.array([float(dice_from_counts(*c)), mean])

    point = stat(np.arange(len(counts)))
    low, high = bootstrap_ci(stat, len(counts), config.n_bootstrap, config.confidence, config.seed)
    std = float(np.std(per[lesion])) if lesion.any() else float("nan")
    return {
        "dice_pooled": _metric(point[0], low[0], high[0]),
        "dice_mean": _metric(point[1], low[1], high[1]),
        "dice_std": _metric(std),
    }


def _thin(*arrays: np.ndarray, max_points: int = 1000) -> list[np.ndarray]:
    n = len(arrays[0])
    if n <= max_points:
        return [np.asarray(a) for a in arrays]
    idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
    return [np.asarray(a)[idx] for a in arrays]


def _classification_curves(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray] | None:
    _, tp, fp, n_pos, n_neg = curve_counts(scores, labels)
    if n_pos == 0 or n_neg == 0:
        return None
    fpr, tpr = roc_points(tp, fp, n_pos, n_neg)
    recall = tp / n_pos
    precision = tp / np.maximum(tp + fp, 1)
    return {"fpr": fpr, "tpr": tpr, "recall": recall, "precision": precision}


def _figure_cases(test: Sequence[PreparedCase], dice: np.ndarray, threshold: float, config: EvaluationConfig):
    lesion = np.flatnonzero([c.volume_label for c in test])
    if lesion.size == 0:
        return []
    order = lesion[np.argsort(np.nan_to_num(dice[lesion], nan=-1.0), kind="stable")[::-1]]
    picks: dict[int, list[str]] = {}
    for role, i in (("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])):
        picks.setdefault(int(i), []).append(role)
    out = []
    for i, roles in picks.items():
        role = ", ".join(roles)
        case = test[i]
        z = case.show_slice
        entry = {
            "role": role,
            "name": case.name,
            "dice": float(dice[i]),
            "slice": int(z),
            "map": case.score_volume()[..., z],
            "label": case.label_volume()[..., z],
            "prediction": case.prediction_volume(threshold, config.postprocess)[..., z],
            "image": None,
            "reconstruction": None,
        }
        src = case.source or {}
        if src.get("image") is not None or src.get("reconstruction") is not None:
            try:
                # read again for the figure only: its label was checked (and warned about) when prepared
                arrays = load_case(src, check_affine=config.check_affine, reorient=config.reorient, warn_labels=False)
            except AEFlowInputError:
                arrays = {}
            for key in ("image", "reconstruction"):
                vol = arrays.get(key)
                if vol is not None:
                    vol = vol[..., None] if vol.ndim == 2 else vol
                    entry[key] = vol[..., z]
        out.append(entry)
    return out
