"""Segmentation and detection metrics: Dice, AUROC, AUPRC, the AE-FLOW paper's metrics, bootstrap CIs.

The ROC and precision-recall computations work on confusion counts ordered by decreasing threshold, so that
the same code serves exact curves of a few thousand slice scores (:func:`curve_counts`, scikit-learn's
conventions: a sample is positive when ``score >= threshold``) and pooled curves of millions of voxels
swept on a threshold grid (:mod:`monai_aeflow.evaluation.sweep`). Both agree with
``sklearn.metrics.roc_auc_score`` and ``average_precision_score`` when every distinct score is a threshold.

Example::

    m = best_f1_metrics(slice_scores, slice_labels)   # {"auroc": ..., "f1": ..., "acc": ..., "sen": ..., ...}
    res = classification_metrics(slice_scores, slice_labels, groups=volume_ids, n_bootstrap=1000)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "dice_from_counts",
    "dice_coefficient",
    "curve_counts",
    "roc_points",
    "auroc_from_counts",
    "average_precision_from_counts",
    "roc_auc",
    "average_precision",
    "best_f1_metrics",
    "bootstrap_ci",
    "classification_metrics",
    "CLASSIFICATION_METRICS",
]

CLASSIFICATION_METRICS: tuple[str, ...] = ("auroc", "auprc", "f1", "acc", "sen", "spe", "precision")
"""Metrics of :func:`best_f1_metrics` that get a confidence interval; ``auroc`` is the paper's AUC."""


def dice_from_counts(tp: np.ndarray | float, fp: np.ndarray | float, fn: np.ndarray | float) -> np.ndarray:
    """Dice ``2 TP / (2 TP + FP + FN)`` (equal to F1), elementwise; NaN where the denominator is 0.

    Args:
        tp: true positives.
        fp: false positives.
        fn: false negatives.

    Returns:
        The Dice values (float64 array, 0-d for scalar inputs).
    """
    tp = np.asarray(tp, dtype=np.float64)
    den = 2.0 * tp + np.asarray(fp, dtype=np.float64) + np.asarray(fn, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2.0 * tp / np.where(den > 0, den, 1.0), np.nan)


def dice_coefficient(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary arrays; NaN when both are empty.

    Args:
        pred: predicted mask.
        target: ground-truth mask of the same shape.

    Returns:
        The Dice coefficient.
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(target, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    tp = np.count_nonzero(p & t)
    return float(dice_from_counts(tp, np.count_nonzero(p) - tp, np.count_nonzero(t) - tp))


def curve_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Cumulative counts of ``score >= v`` for each distinct score ``v``, from the highest down.

    Args:
        scores: 1D scores.
        labels: 1D booleans (``True`` = abnormal).

    Returns:
        ``(thresholds, tp, fp, n_pos, n_neg)``: the distinct scores in decreasing order, the true and false
        positives when predicting ``score >= threshold``, and the class sizes.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    if s.size == 0:
        return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64), 0, 0
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]
    tp = np.cumsum(y[order], dtype=np.int64)[last]
    fp = (last + 1) - tp
    n_pos = int(y.sum())
    return s_sorted[last], tp, fp, n_pos, int(s.size - n_pos)


def _with_ends(tp: np.ndarray, fp: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray):
    """Prepend the point (0, 0) and append (n_pos, n_neg) along the last axis."""
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    n_pos = np.asarray(n_pos, dtype=np.float64)[..., None]
    n_neg = np.asarray(n_neg, dtype=np.float64)[..., None]
    zeros = np.zeros(tp.shape[:-1] + (1,))
    tp = np.concatenate([zeros, tp, np.broadcast_to(n_pos, zeros.shape)], axis=-1)
    fp = np.concatenate([zeros, fp, np.broadcast_to(n_neg, zeros.shape)], axis=-1)
    return tp, fp, n_pos, n_neg


def roc_points(
    tp: np.ndarray, fp: np.ndarray, n_pos: int | np.ndarray, n_neg: int | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of counts ordered by decreasing threshold, with both end points.

    Args:
        tp: cumulative true positives, last axis ordered by decreasing threshold.
        fp: cumulative false positives, same shape.
        n_pos: number of positives (broadcast over leading axes).
        n_neg: number of negatives.

    Returns:
        ``(fpr, tpr)`` starting at (0, 0) and ending at (1, 1).
    """
    tp, fp, n_pos, n_neg = _with_ends(tp, fp, n_pos, n_neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        return fp / n_neg, tp / n_pos


def auroc_from_counts(
    tp: np.ndarray, fp: np.ndarray, n_pos: int | np.ndarray, n_neg: int | np.ndarray
) -> np.ndarray | float:
    """Area under the ROC curve (trapezoids, ties counted half) from cumulative counts.

    Args:
        tp: cumulative true positives, last axis ordered by decreasing threshold.
        fp: cumulative false positives, same shape.
        n_pos: number of positives; NaN is returned where it or ``n_neg`` is 0.
        n_neg: number of negatives.

    Returns:
        The AUROC (a float for 1D inputs).
    """
    fpr, tpr = roc_points(tp, fp, n_pos, n_neg)
    auc = np.sum(np.diff(fpr, axis=-1) * (tpr[..., 1:] + tpr[..., :-1]) * 0.5, axis=-1)
    return float(auc) if np.ndim(auc) == 0 else auc


def average_precision_from_counts(
    tp: np.ndarray, fp: np.ndarray, n_pos: int | np.ndarray, n_neg: int | np.ndarray
) -> np.ndarray | float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` (scikit-learn's AUPRC) from cumulative counts.

    Args:
        tp: cumulative true positives, last axis ordered by decreasing threshold.
        fp: cumulative false positives, same shape.
        n_pos: number of positives; NaN is returned where it is 0.
        n_neg: number of negatives.

    Returns:
        The average precision (a float for 1D inputs).
    """
    tp, fp, n_pos_b, _ = _with_ends(tp, fp, n_pos, n_neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / n_pos_b
        predicted = tp + fp
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1.0), 1.0)
        ap = np.sum(np.diff(recall, axis=-1) * precision[..., 1:], axis=-1)
    ap = np.where(np.asarray(n_pos) > 0, ap, np.nan)
    return float(ap) if np.ndim(ap) == 0 else ap


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of scores against binary labels (NaN with a single class).

    Args:
        scores: 1D scores, higher = more abnormal.
        labels: 1D booleans.

    Returns:
        The AUROC.
    """
    _, tp, fp, n_pos, n_neg = curve_counts(scores, labels)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(auroc_from_counts(tp, fp, n_pos, n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (AUPRC) of scores against binary labels (NaN without positives).

    Args:
        scores: 1D scores, higher = more abnormal.
        labels: 1D booleans.

    Returns:
        The average precision.
    """
    _, tp, fp, n_pos, n_neg = curve_counts(scores, labels)
    if n_pos == 0:
        return float("nan")
    return float(average_precision_from_counts(tp, fp, n_pos, n_neg))


def best_f1_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The AE-FLOW paper's metrics: AUC, and F1, ACC, SEN, SPE at the threshold of best F1.

    A sample is predicted abnormal when ``score >= threshold``; every distinct score is a candidate and,
    among thresholds with the same best F1, the highest is kept.

    Args:
        scores: 1D scores, higher = more abnormal.
        labels: 1D booleans.

    Returns:
        ``{"auroc", "auprc", "f1", "acc", "sen", "spe", "precision", "threshold", "n", "n_abnormal"}``
        (NaN where undefined, e.g. without abnormal samples).
    """
    thr, tp, fp, n_pos, n_neg = curve_counts(scores, labels)
    n = n_pos + n_neg
    nan = float("nan")
    out = {
        "auroc": nan,
        "auprc": nan,
        "f1": nan,
        "acc": nan,
        "sen": nan,
        "spe": nan,
        "precision": nan,
        "threshold": nan,
        "n": float(n),
        "n_abnormal": float(n_pos),
    }
    if n_pos == 0:
        return out
    if n_neg > 0:
        out["auroc"] = float(auroc_from_counts(tp, fp, n_pos, n_neg))
    out["auprc"] = float(average_precision_from_counts(tp, fp, n_pos, n_neg))
    f1 = dice_from_counts(tp, fp, n_pos - tp)
    k = int(np.nanargmax(f1))
    tn = n_neg - fp[k]
    out.update(
        f1=float(f1[k]),
        acc=float((tp[k] + tn) / n),
        sen=float(tp[k] / n_pos),
        spe=float(tn / n_neg) if n_neg else nan,
        precision=float(tp[k] / (tp[k] + fp[k])),
        threshold=float(thr[k]),
    )
    return out


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray | float],
    n_units: int,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap confidence interval, resampling ``n_units`` units with replacement.

    Args:
        statistic: maps an index array of resampled units (length ``n_units``) to a value or a 1D array of
            values; NaN results (e.g. a resample with a single class) are ignored.
        n_units: number of units (volumes, images).
        n_bootstrap: number of resamples; 0 gives NaN bounds.
        confidence: coverage of the interval.
        seed: seed of the resampling.

    Returns:
        ``(low, high)``, arrays shaped like the statistic.
    """
    first = np.asarray(statistic(np.arange(n_units)), dtype=np.float64)
    shape = first.shape
    nan = np.full(shape, np.nan)
    if n_bootstrap <= 0 or n_units == 0:
        return nan, nan.copy()
    rng = np.random.default_rng(seed)
    values = np.empty((n_bootstrap, first.size))
    for b in range(n_bootstrap):
        values[b] = np.asarray(statistic(rng.integers(0, n_units, size=n_units)), dtype=np.float64).ravel()
    alpha = (1.0 - confidence) / 2.0
    low = np.full(first.size, np.nan)
    high = np.full(first.size, np.nan)
    ok = np.isfinite(values).any(axis=0)
    if ok.any():
        low[ok], high[ok] = np.nanpercentile(values[:, ok], [100 * alpha, 100 * (1 - alpha)], axis=0)
    return low.reshape(shape), high.reshape(shape)


def classification_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """:func:`best_f1_metrics` with bootstrap confidence intervals.

    Args:
        scores: 1D scores (slices, volumes or images).
        labels: 1D booleans.
        groups: optional unit of each sample (e.g. the volume of each slice): whole units are resampled so
            that correlated samples stay together. ``None`` resamples samples.
        n_bootstrap: number of resamples (0: no intervals).
        confidence: coverage of the intervals.
        seed: seed of the resampling.

    Returns:
        ``{metric: {"value", "ci_low", "ci_high"}}`` for :data:`CLASSIFICATION_METRICS`, plus
        ``threshold``, ``n`` and ``n_abnormal`` (without intervals).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    point = best_f1_metrics(s, y)
    if groups is None:
        members = [np.array([i]) for i in range(s.size)]
    else:
        g = np.asarray(groups).ravel()
        _, inverse = np.unique(g, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1) if s.size else []

    def stat(idx: np.ndarray) -> np.ndarray:
        sel = np.concatenate([members[i] for i in idx]) if len(idx) else np.zeros(0, dtype=int)
        m = best_f1_metrics(s[sel], y[sel])
        return np.array([m[k] for k in CLASSIFICATION_METRICS])

    low, high = bootstrap_ci(stat, len(members), n_bootstrap, confidence, seed)
    out: dict[str, dict[str, float]] = {}
    for i, k in enumerate(CLASSIFICATION_METRICS):
        out[k] = {"value": point[k], "ci_low": float(low[i]), "ci_high": float(high[i])}
    for k in ("threshold", "n", "n_abnormal"):
        out[k] = {"value": point[k], "ci_low": float("nan"), "ci_high": float("nan")}
    return out
