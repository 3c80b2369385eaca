"""Dice, AUROC, AUPRC and the AE-FLOW paper's best-F1 metrics against scikit-learn and direct enumeration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from monai_aeflow.evaluation.metrics import (
    auroc_from_counts,
    average_precision,
    average_precision_from_counts,
    best_f1_metrics,
    bootstrap_ci,
    classification_metrics,
    curve_counts,
    dice_coefficient,
    dice_from_counts,
    roc_auc,
)
from monai_aeflow.evaluation.sweep import sweep_counts, threshold_grid


def _structured(seed: int, shape=(40, 40, 12)):
    """A smooth map with blob-shaped lesions that score higher (overlapping score distributions)."""
    rng = np.random.default_rng(seed)
    label = ndimage.gaussian_filter(rng.random(shape), 3) > 0.53
    score = ndimage.gaussian_filter(rng.random(shape), 1) + 0.08 * label + rng.normal(0, 0.02, shape)
    return score.astype(np.float32), label


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_matches_sklearn_f1(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((30, 30, 5)) > 0.7
    target = rng.random((30, 30, 5)) > 0.8
    assert dice_coefficient(pred, target) == pytest.approx(f1_score(target.ravel(), pred.ravel()), abs=1e-12)
    score, label = _structured(seed)
    pred = score > np.quantile(score, 0.8)
    assert dice_coefficient(pred, label) == pytest.approx(f1_score(label.ravel(), pred.ravel()), abs=1e-12)


def test_dice_edge_cases():
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    assert np.isnan(dice_coefficient(empty, empty))
    assert dice_coefficient(full, empty) == 0.0
    assert dice_coefficient(full, full) == 1.0
    np.testing.assert_allclose(dice_from_counts([1, 0, 0], [1, 0, 2], [0, 0, 1]), [2 / 3, np.nan, 0.0])
    with pytest.raises(ValueError):
        dice_coefficient(empty, np.zeros((3, 3), bool))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_auprc_match_sklearn_random_and_ties(seed):
    rng = np.random.default_rng(seed)
    n = 500
    y = rng.random(n) < 0.3
    continuous = rng.normal(size=n) + y
    tied = np.round(continuous, 1)  # many ties
    for s in (continuous, tied):
        assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_auroc_single_class_is_nan():
    assert np.isnan(roc_auc(np.arange(5.0), np.zeros(5, bool)))
    assert np.isnan(average_precision(np.arange(5.0), np.zeros(5, bool)))


def test_pixel_curves_from_sweep_match_sklearn_structured():
    """Pooled voxel curves from per-volume sweeps equal scikit-learn when all distinct values are thresholds."""
    vols = [_structured(s, (24, 24, 6)) for s in range(3)]
    # Quantised scores: few distinct values, so the grid holds all of them and the curves are exact.
    scores = [np.round(s * 200) / 200 for s, _ in vols]
    labels = [y for _, y in vols]
    grid = threshold_grid(scores, n_thresholds=4096)
    assert np.array_equal(grid, np.unique(np.concatenate([s.ravel() for s in scores])))
    sc = sweep_counts([s.ravel() for s in scores], [y.ravel() for y in labels], grid)
    tp, fp = sc.tp.sum(0)[::-1], sc.fp.sum(0)[::-1]
    all_s = np.concatenate([s.ravel() for s in scores])
    all_y = np.concatenate([y.ravel() for y in labels])
    auc = auroc_from_counts(tp, fp, sc.n_pos.sum(), sc.n_neg.sum())
    ap = average_precision_from_counts(tp, fp, sc.n_pos.sum(), sc.n_neg.sum())
    assert auc == pytest.approx(roc_auc_score(all_y, all_s), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(all_y, all_s), abs=1e-12)


def test_pixel_curves_on_quantile_grid_are_close_to_sklearn():
    """With continuous scores the grid is made of quantiles: the curves are approximate, but closely."""
    vols = [_structured(s, (32, 32, 8)) for s in range(3)]
    scores = [s.ravel() for s, _ in vols]
    labels = [y.ravel() for _, y in vols]
    grid = threshold_grid(scores, n_thresholds=2048)
    assert grid.size < sum(s.size for s in scores)  # not the exact path
    sc = sweep_counts(scores, labels, grid)
    tp, fp = sc.tp.sum(0)[::-1], sc.fp.sum(0)[::-1]
    all_s, all_y = np.concatenate(scores), np.concatenate(labels)
    assert auroc_from_counts(tp, fp, sc.n_pos.sum(), sc.n_neg.sum()) == pytest.approx(
        roc_auc_score(all_y, all_s), abs=1e-3
    )
    assert average_precision_from_counts(tp, fp, sc.n_pos.sum(), sc.n_neg.sum()) == pytest.approx(
        average_precision_score(all_y, all_s), abs=2e-3
    )


def _best_f1_by_enumeration(scores, labels):
    """Try every distinct score as threshold (predict score >= t); keep the highest one among the best F1."""
    best = None
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        f1 = f1_score(labels, pred, zero_division=0.0)
        if best is None or f1 > best[0]:
            tp = np.sum(pred & labels)
            tn = np.sum(~pred & ~labels)
            best = (f1, t, (tp + tn) / labels.size, tp / labels.sum(), tn / (~labels).sum())
    return best


@pytest.mark.parametrize("seed", range(5))
def test_best_f1_metrics_match_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = 120
    y = rng.random(n) < 0.4
    s = np.round(rng.normal(size=n) + 1.2 * y, 1 if seed % 2 else 6)
    m = best_f1_metrics(s, y)
    f1, t, acc, sen, spe = _best_f1_by_enumeration(s, y)
    assert m["f1"] == pytest.approx(f1, abs=1e-12)
    assert m["threshold"] == t
    assert m["acc"] == pytest.approx(acc, abs=1e-12)
    assert m["sen"] == pytest.approx(sen, abs=1e-12)
    assert m["spe"] == pytest.approx(spe, abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_best_f1_ties_keep_the_highest_threshold():
    # F1 = 2/3 both for score >= 3 (TP 2, FP 1, FN 1) and for score >= 0 (TP 3, FP 3, FN 0)
    s = np.arange(6.0)
    y = np.array([1, 0, 0, 1, 0, 1], bool)
    m = best_f1_metrics(s, y)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["threshold"] == 3.0
    assert m["acc"] == pytest.approx(4 / 6) and m["sen"] == pytest.approx(2 / 3) and m["spe"] == pytest.approx(2 / 3)
    assert _best_f1_by_enumeration(s, y)[1] == 3.0


def test_best_f1_without_abnormal_samples_is_nan():
    m = best_f1_metrics(np.arange(4.0), np.zeros(4, bool))
    assert np.isnan(m["f1"]) and np.isnan(m["auroc"]) and m["n"] == 4


def test_curve_counts_order_and_totals():
    thr, tp, fp, n_pos, n_neg = curve_counts(np.array([0.1, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1], bool))
    np.testing.assert_array_equal(thr, [0.9, 0.5, 0.1])
    np.testing.assert_array_equal(tp, [1, 2, 2])
    np.testing.assert_array_equal(fp, [0, 1, 2])
    assert (n_pos, n_neg) == (2, 2)


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 1.0, size=200)
    low, high = bootstrap_ci(lambda idx: x[idx].mean(), x.size, n_bootstrap=500, seed=3)
    assert low < x.mean() < high
    assert high - low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.25)
    assert bootstrap_ci(lambda idx: x[idx].mean(), x.size, n_bootstrap=500, seed=3) == (low, high)
    nan_low, nan_high = bootstrap_ci(lambda idx: x[idx].mean(), x.size, n_bootstrap=0)
    assert np.isnan(nan_low) and np.isnan(nan_high)


def test_classification_metrics_group_bootstrap():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(10), 20)
    y = rng.random(groups.size) < 0.3
    s = rng.normal(size=groups.size) + 2 * y
    res = classification_metrics(s, y, groups=groups, n_bootstrap=100, seed=0)
    assert res["auroc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    for key in ("auroc", "auprc", "f1", "acc", "sen", "spe"):
        assert res[key]["ci_low"] <= res[key]["value"] <= res[key]["ci_high"]
    assert np.isnan(res["threshold"]["ci_low"])
