"""Fast threshold sweeps: confusion counts for many thresholds at once.

Binarising a map and counting true and false positives once per threshold costs ``O(n T)`` for ``n`` voxels
and ``T`` thresholds. Here the scores of lesion and of normal voxels are sorted once and the number of
scores above every threshold is read with a binary search: ``O(n log n + T log n)``, exact for every
threshold (the binarisation is ``score > threshold``, as in :func:`~monai_aeflow.evaluation.postprocess.binarize`).

Candidate thresholds for a whole split come from :func:`threshold_grid`: all distinct values when there are
few of them (then the pooled ROC and precision-recall curves are exact), else quantiles of the pooled scores.

Example::

    grid = threshold_grid([s1, s2], n_thresholds=4096)
    sweep = sweep_counts([s1, s2], [y1, y2], grid)       # per-volume counts, shape (2, T)
    pooled_dice = dice_from_counts(sweep.tp.sum(0), sweep.fp.sum(0), sweep.fn.sum(0))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monai_aeflow.evaluation.metrics import dice_from_counts

__all__ = ["SweepCounts", "threshold_grid", "exceedance_counts", "sweep_counts", "dice_sweep"]


@dataclass
class SweepCounts:
    """Confusion counts of ``score > threshold`` for each volume and threshold.

    Attributes:
        thresholds: the thresholds, shape ``(T,)``, increasing.
        tp: true positives, shape ``(V, T)`` (``V`` volumes).
        fp: false positives, shape ``(V, T)``.
        n_pos: lesion voxels per volume, shape ``(V,)``.
        n_neg: normal voxels per volume, shape ``(V,)``.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: np.ndarray
    n_neg: np.ndarray

    @property
    def fn(self) -> np.ndarray:
        """False negatives, shape ``(V, T)``."""
        return self.n_pos[:, None] - self.tp

    @property
    def tn(self) -> np.ndarray:
        """True negatives, shape ``(V, T)``."""
        return self.n_neg[:, None] - self.fp

    def pooled(self) -> SweepCounts:
        """The counts summed over volumes (one row)."""
        return SweepCounts(
            self.thresholds,
            self.tp.sum(0, keepdims=True),
            self.fp.sum(0, keepdims=True),
            self.n_pos.sum(keepdims=True),
            self.n_neg.sum(keepdims=True),
        )

    def __add__(self, other: SweepCounts) -> SweepCounts:
        if not np.array_equal(self.thresholds, other.thresholds):
            raise ValueError("cannot add sweeps over different thresholds")
        return SweepCounts(
            self.thresholds, self.tp + other.tp, self.fp + other.fp, self.n_pos + other.n_pos, self.n_neg + other.n_neg
        )


def threshold_grid(
    scores: Sequence[np.ndarray], n_thresholds: int = 16384, max_samples: int = 2_000_000, seed: int = 0
) -> np.ndarray:
    """Candidate thresholds for a set of score arrays.

    When the scores take at most ``n_thresholds`` distinct values, the grid is exactly these values;
    otherwise it is ``n_thresholds + 1`` quantiles (distinct values kept once) of a random subsample of at
    most ``max_samples`` pooled scores, so that the grid is dense where the scores are.

    Args:
        scores: one flat array of scores per volume (for instance the brain voxels).
        n_thresholds: the size of the grid.
        max_samples: the largest subsample used for the quantiles.
        seed: seed of the subsample.

    Returns:
        The increasing grid, float64.
    """
    arrays = [np.asarray(s).ravel() for s in scores]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return np.zeros(1)
    distinct: np.ndarray | None = np.zeros(0)
    for a in arrays:
        u = np.unique(a)
        if u.size > n_thresholds or np.union1d(distinct, u).size > n_thresholds:
            distinct = None
            break
        distinct = np.union1d(distinct, u)
    if distinct is not None:
        return distinct.astype(np.float64)
    total = sum(a.size for a in arrays)
    rng = np.random.default_rng(seed)
    if total > max_samples:
        parts = [a[rng.integers(0, a.size, size=max(1, round(max_samples * a.size / total)))] for a in arrays]
    else:
        parts = arrays
    sample = np.sort(np.concatenate(parts).astype(np.float64))
    # Order statistics at evenly spaced ranks: the thresholds are observed scores.
    grid = sample[np.linspace(0, sample.size - 1, n_thresholds + 1).round().astype(np.int64)]
    lo = min(float(a.min()) for a in arrays)
    hi = max(float(a.max()) for a in arrays)
    return np.unique(np.concatenate([[lo], grid, [hi]]))


def exceedance_counts(
    scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """How many lesion and normal scores exceed each threshold (``score > t``).

    Args:
        scores: flat scores.
        labels: flat booleans, ``True`` for lesion voxels.
        thresholds: thresholds in any order.

    Returns:
        ``(tp, fp, n_pos, n_neg)``: counts of lesion and normal scores above each threshold (int64, shape of
        ``thresholds``), and the numbers of lesion and normal scores.
    """
    s = np.asarray(scores).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    t = np.asarray(thresholds)
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    tp = pos.size - np.searchsorted(pos, t, side="right")
    fp = neg.size - np.searchsorted(neg, t, side="right")
    return tp.astype(np.int64), fp.astype(np.int64), int(pos.size), int(neg.size)


def sweep_counts(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], thresholds: np.ndarray) -> SweepCounts:
    """Confusion counts of every volume at every threshold, sorting each volume once.

    Args:
        scores: one flat score array per volume.
        labels: one flat boolean label array per volume.
        thresholds: the increasing thresholds.

    Returns:
        The :class:`SweepCounts`.
    """
    if len(scores) != len(labels):
        raise ValueError("scores and labels must have one entry per volume")
    t = np.asarray(thresholds, dtype=np.float64)
    n = len(scores)
    tp = np.zeros((n, t.size), dtype=np.int64)
    fp = np.zeros((n, t.size), dtype=np.int64)
    n_pos = np.zeros(n, dtype=np.int64)
    n_neg = np.zeros(n, dtype=np.int64)
    for i, (s, y) in enumerate(zip(scores, labels, strict=True)):
        tp[i], fp[i], n_pos[i], n_neg[i] = exceedance_counts(s, y, t)
    return SweepCounts(t, tp, fp, n_pos, n_neg)


def dice_sweep(
    scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled Dice and per-volume Dice of ``score > t`` for every threshold ``t``.

    Args:
        scores: one flat score array per volume.
        labels: one flat boolean label array per volume.
        thresholds: the thresholds.

    Returns:
        ``(pooled, per_volume)``: shapes ``(T,)`` and ``(V, T)``; NaN where a volume has neither lesion nor
        predicted voxels.
    """
    sc = sweep_counts(scores, labels, thresholds)
    pooled = dice_from_counts(sc.tp.sum(0), sc.fp.sum(0), sc.fn.sum(0))
    return pooled, dice_from_counts(sc.tp, sc.fp, sc.fn)
