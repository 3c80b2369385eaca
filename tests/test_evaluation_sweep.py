"""The fast threshold sweep against recomputing the binary mask and its counts for every threshold."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from monai_aeflow.evaluation.metrics import dice_from_counts
from monai_aeflow.evaluation.sweep import dice_sweep, exceedance_counts, sweep_counts, threshold_grid


def _naive_counts(scores, labels, thresholds):
    tp = np.array([np.count_nonzero((scores > t) & labels) for t in thresholds])
    fp = np.array([np.count_nonzero((scores > t) & ~labels) for t in thresholds])
    return tp, fp


@pytest.mark.parametrize("seed", range(3))
def test_exceedance_counts_match_naive(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random(5000).astype(np.float32)
    scores[::7] = 0.0  # ties (background)
    scores[1::11] = 0.5
    labels = rng.random(5000) < 0.2
    # thresholds on, between, below and above the data, in float64
    t = np.concatenate([[-1.0, 0.0, 0.5, 2.0], rng.random(50), scores[:30].astype(np.float64)])
    t = np.concatenate([t, np.nextafter(scores[:30].astype(np.float64), 2.0)])
    tp, fp, n_pos, n_neg = exceedance_counts(scores, labels, t)
    ntp, nfp = _naive_counts(scores, labels, t)
    np.testing.assert_array_equal(tp, ntp)
    np.testing.assert_array_equal(fp, nfp)
    assert (n_pos, n_neg) == (labels.sum(), (~labels).sum())


def test_dice_sweep_matches_per_threshold_dice():
    rng = np.random.default_rng(4)
    vols = [rng.random(3000) for _ in range(3)]
    labs = [rng.random(3000) < 0.1 + 0.1 * i for i in range(3)]
    vols = [v + 0.3 * y for v, y in zip(vols, labs, strict=True)]
    grid = threshold_grid(vols, n_thresholds=64)
    pooled, per_volume = dice_sweep(vols, labs, grid)
    all_s, all_y = np.concatenate(vols), np.concatenate(labs)
    for j in range(0, grid.size, 7):
        assert pooled[j] == pytest.approx(f1_score(all_y, all_s > grid[j], zero_division=np.nan), abs=1e-12)
        for i in range(3):
            expected = f1_score(labs[i], vols[i] > grid[j], zero_division=np.nan)
            np.testing.assert_allclose(per_volume[i, j], expected, atol=1e-12)


def test_sweep_counts_pooled_and_addition():
    rng = np.random.default_rng(0)
    s = [rng.random(100), rng.random(50)]
    y = [rng.random(100) < 0.3, rng.random(50) < 0.3]
    t = np.linspace(0, 1, 11)
    sc = sweep_counts(s, y, t)
    pooled = sc.pooled()
    assert pooled.tp.shape == (1, 11)
    np.testing.assert_array_equal(pooled.tp[0], sc.tp.sum(0))
    both = sc + sc
    np.testing.assert_array_equal(both.fn, 2 * sc.fn)
    np.testing.assert_array_equal(sc.tn + sc.fp, np.broadcast_to(sc.n_neg[:, None], sc.tn.shape))
    np.testing.assert_allclose(dice_from_counts(sc.tp, sc.fp, sc.fn)[1], dice_sweep(s, y, t)[1][1], equal_nan=True)


def test_threshold_grid_exact_and_quantile():
    a = np.array([0.0, 0.0, 0.25, 0.5, 0.5])
    b = np.array([0.75, 0.25])
    np.testing.assert_array_equal(threshold_grid([a, b], n_thresholds=10), [0.0, 0.25, 0.5, 0.75])
    rng = np.random.default_rng(0)
    c = rng.random(100_000)
    grid = threshold_grid([c], n_thresholds=100)
    assert grid[0] == c.min() and grid[-1] == c.max()
    assert 90 <= grid.size <= 103
    assert np.all(np.diff(grid) > 0)
    # roughly equal numbers of scores between consecutive thresholds
    counts = np.diff(np.searchsorted(np.sort(c), grid))
    assert counts.max() < 2.0 * c.size / 100
