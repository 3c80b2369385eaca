"""Choosing the binarisation threshold of anomaly maps on a validation split (never on the test split).

- :func:`sweep_threshold`: the exact maximiser of the pooled validation Dice of the full pipeline
  (binarisation and component removal) over all thresholds: the cleaned segmentation only changes at the
  distinct values of the component-opened map, and the Dice at each of them comes from one sorted count.
- :func:`greedy_threshold_search`: the interval search of the brain MRI protocol. Start from ``[0, max]``,
  evaluate the objective (pooled Dice) at the 25% and 75% points, keep the half on the side of the better
  point, repeat 10 times; the best evaluated threshold wins.
- :func:`threshold_at_fpr`: the smallest threshold whose false-positive rate on normal (healthy) voxels is at
  most a target.
- :func:`oracle_threshold`: the best threshold on a split's own labels, for an upper bound reported under its
  own name, never used as the validated threshold.

Example::

    objective = pooled_dice_objective(validation_cases, postprocess_config)
    result = greedy_threshold_search(objective, high=max(c.max_score() for c in validation_cases))
    result.threshold, result.score
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.cases import PreparedCase
from monai_aeflow.evaluation.metrics import dice_from_counts
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.evaluation.sweep import sweep_counts, threshold_grid

__all__ = [
    "SweepSearchResult",
    "sweep_threshold",
    "GreedySearchResult",
    "greedy_threshold_search",
    "pooled_dice_objective",
    "threshold_at_fpr",
    "oracle_threshold",
    "exact_oracle_threshold",
]


@dataclass
class GreedySearchResult:
    """Outcome of :func:`greedy_threshold_search`.

    Attributes:
        threshold: the best evaluated threshold.
        score: its objective value.
        low: lower end of the initial interval.
        high: upper end of the initial interval.
        steps: number of halvings.
        trace: every evaluation as ``(threshold, score)``, in order.
    """

    threshold: float
    score: float
    low: float
    high: float
    steps: int
    trace: list[tuple[float, float]] = field(default_factory=list)

    @property
    def step_width(self) -> float:
        """Width of the final interval, ``(high - low) / 2**steps``."""
        return (self.high - self.low) / 2**self.steps


def greedy_threshold_search(
    objective: Callable[[float], float], high: float, low: float = 0.0, steps: int = 10
) -> GreedySearchResult:
    """Greedy interval search for the threshold that maximises ``objective``.

    At each step the objective is evaluated at the 25% and 75% points of the interval; the half containing
    the better point is kept (the lower half on a tie). The best of all evaluated points is returned.

    Args:
        objective: threshold -> value to maximise (e.g. pooled validation Dice); NaN counts as -inf.
        high: upper end of the initial interval (e.g. the largest validation score).
        low: lower end of the initial interval.
        steps: number of halvings.

    Returns:
        The :class:`GreedySearchResult`.
    """
    if not (np.isfinite(low) and np.isfinite(high)) or high < low:
        raise AEFlowInputError(f"invalid threshold search interval [{low}, {high}]")
    lo, hi = float(low), float(high)
    trace: list[tuple[float, float]] = []
    for _ in range(steps):
        width = hi - lo
        a, b = lo + 0.25 * width, lo + 0.75 * width
        fa, fb = float(objective(a)), float(objective(b))
        trace += [(a, fa), (b, fb)]
        if np.nan_to_num(fa, nan=-np.inf) >= np.nan_to_num(fb, nan=-np.inf):
            hi = lo + 0.5 * width
        else:
            lo = lo + 0.5 * width
    if not trace:
        mid = 0.5 * (low + high)
        trace.append((mid, float(objective(mid))))
    values = np.array([np.nan_to_num(v, nan=-np.inf) for _, v in trace])
    k = int(np.argmax(values))
    return GreedySearchResult(trace[k][0], trace[k][1], float(low), float(high), steps, trace)


@dataclass
class SweepSearchResult:
    """Outcome of :func:`sweep_threshold`.

    Attributes:
        threshold: the chosen threshold (midway between the best candidate and the next larger one).
        score: the pooled Dice at that threshold (the maximum over all thresholds).
        candidate: the best candidate (a value of the opened validation maps); every threshold in
            ``[candidate, next_value)`` gives the same segmentation.
        next_value: the next larger distinct value (``candidate`` when there is none).
        n_candidates: the number of distinct thresholds compared.
    """

    threshold: float
    score: float
    candidate: float
    next_value: float
    n_candidates: int


def sweep_threshold(cases: Sequence[PreparedCase], config: PostprocessConfig) -> SweepSearchResult:
    """The threshold that maximises the pooled Dice of the full pipeline over the cases, exactly.

    The cleaned segmentation at ``t`` is ``opened > t`` with the component-opened scores
    (:meth:`PreparedCase.opened_scores`), so it only changes at the distinct opened values; the pooled Dice is
    computed at each of them (and at 0) from sorted counts. Ties go to the smallest threshold. The returned
    threshold lies midway between the best value and the next larger one (same validation segmentation,
    furthest from both ends).

    Args:
        cases: the prepared validation cases.
        config: post-processing parameters.

    Returns:
        The :class:`SweepSearchResult`.

    Raises:
        AEFlowInputError: when no case has lesion voxels.
    """
    if not any(c.n_lesion for c in cases):
        raise AEFlowInputError(
            "the validation labels are empty: the Dice threshold search needs validation volumes with lesions"
        )
    opened = [c.opened_scores(config) for c in cases]
    values = np.unique(np.concatenate([np.zeros(1, np.float32), *opened]).astype(np.float64))
    values = values[values >= 0]
    sc = sweep_counts(opened, [c.labels for c in cases], values)
    dice = dice_from_counts(sc.tp.sum(0), sc.fp.sum(0), sc.fn.sum(0))
    dice = np.nan_to_num(np.asarray(dice, dtype=np.float64), nan=-np.inf)
    k = int(np.argmax(dice))
    nxt = float(values[k + 1]) if k + 1 < values.size else float(values[k])
    # Scores are float32 and compared in float32: the midpoint must be a float32 strictly below the next value.
    threshold = float(np.float32(0.5 * (float(values[k]) + nxt)))
    if not values[k] <= threshold < nxt:
        threshold = float(values[k])  # adjacent float32 values (or the largest value): nothing in between
    return SweepSearchResult(threshold, float(dice[k]), float(values[k]), nxt, int(values.size))


def pooled_dice_objective(cases: Sequence[PreparedCase], config: PostprocessConfig) -> Callable[[float], float]:
    """Pooled Dice of the full pipeline (binarisation and component removal) over cases, as a function.

    Args:
        cases: the prepared validation cases.
        config: post-processing parameters.

    Returns:
        ``threshold -> 2 sum(TP) / (2 sum(TP) + sum(FP) + sum(FN))``.

    Raises:
        AEFlowInputError: when no case has lesion voxels (the Dice search needs them).
    """
    if not any(c.n_lesion for c in cases):
        raise AEFlowInputError(
            "the validation labels are empty: the Dice threshold search needs validation volumes with lesions"
        )

    def objective(threshold: float) -> float:
        counts = np.array([c.counts_at(threshold, config) for c in cases], dtype=np.int64).sum(0)
        return float(dice_from_counts(*counts))

    return objective


def threshold_at_fpr(normal_scores: Sequence[np.ndarray], fpr: float) -> tuple[float, float]:
    """The smallest threshold with a false-positive rate of at most ``fpr`` on normal voxels.

    With ``n`` normal scores, at most ``floor(fpr * n)`` of them exceed the returned threshold (ties may make
    the achieved rate lower).

    Args:
        normal_scores: scores of normal voxels (e.g. brain voxels of healthy validation volumes).
        fpr: target false-positive rate in ``[0, 1)``.

    Returns:
        ``(threshold, achieved_fpr)``.
    """
    if not 0.0 <= fpr < 1.0:
        raise AEFlowInputError(f"target false-positive rate must be in [0, 1), got {fpr}")
    s = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in normal_scores]) if normal_scores else []
    n = len(s)
    if n == 0:
        raise AEFlowInputError("no normal voxels to set a threshold at a false-positive rate")
    k = int(np.floor(fpr * n))
    t = float(np.partition(s, n - k - 1)[n - k - 1])
    return t, float(np.count_nonzero(s > t) / n)


def exact_oracle_threshold(cases: Sequence[PreparedCase], config: PostprocessConfig) -> float:
    """The threshold of the best pooled Dice on the cases' own labels after component removal, exactly (the
    :func:`sweep_threshold` of the test split): the upper bound of any threshold's test Dice.

    It uses the labels it is scored on: report it under its own name, never as a validated threshold.

    Args:
        cases: prepared cases with lesion voxels.
        config: post-processing parameters.

    Returns:
        The threshold.
    """
    return sweep_threshold(cases, config).threshold


def oracle_threshold(cases: Sequence[PreparedCase], n_thresholds: int = 4096) -> tuple[float, float]:
    """Best pooled Dice of ``score > t`` over a grid of thresholds, on the cases' own labels.

    This is an upper bound that uses the labels it is scored on: report it under its own name and never use
    it as a validated threshold. Component removal is not part of the sweep.

    Args:
        cases: prepared cases.
        n_thresholds: size of the threshold grid.

    Returns:
        ``(threshold, pooled_dice)``.
    """
    grid = threshold_grid([c.scores for c in cases], n_thresholds)
    sc = sweep_counts([c.scores for c in cases], [c.labels for c in cases], grid)
    dice = dice_from_counts(sc.tp.sum(0), sc.fp.sum(0), sc.fn.sum(0))
    if not np.isfinite(dice).any():
        return float(grid[0]), float("nan")
    k = int(np.nanargmax(dice))
    return float(grid[k]), float(dice[k])
