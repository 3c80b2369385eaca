"""Threshold selection: greedy search against brute force, FPR thresholds, and no use of the test split."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import norm

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation import pipeline as pipeline_module
from monai_aeflow.evaluation.cases import prepare_case
from monai_aeflow.evaluation.metrics import dice_from_counts
from monai_aeflow.evaluation.pipeline import EvaluationConfig, evaluate_maps, select_threshold
from monai_aeflow.evaluation.postprocess import PostprocessConfig, postprocess_map, segment
from monai_aeflow.evaluation.sweep import dice_sweep
from monai_aeflow.evaluation.thresholds import (
    greedy_threshold_search,
    oracle_threshold,
    pooled_dice_objective,
    threshold_at_fpr,
)

RAW = PostprocessConfig(normalize="none", erosion_iterations=0, median_size=1, min_component_size=0)


def _case(seed: int, shape=(32, 32, 8), lesion: bool = True, scale: float = 1.0) -> dict:
    """A residual volume: gamma noise in a box-shaped brain, brighter smooth blobs as lesions."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    mask[3:29, 3:29, 1:7] = True
    label = np.zeros(shape, bool)
    if lesion:
        g = ndimage.gaussian_filter(rng.random(shape), 2)
        label = (g > np.quantile(g[mask], 0.93)) & mask
    residual = rng.gamma(2.0, 0.05, shape) + label * rng.normal(0.35, 0.08, shape)
    return {
        "name": f"case{seed:03d}",
        "map": (scale * residual * mask).astype(np.float32),
        "label": label,
        "mask": mask,
    }


def _gaussian_dice_case(seed: int):
    """One volume whose pooled Dice curve is smooth and unimodal (deterministic Gaussian score quantiles)."""
    rng = np.random.default_rng(seed)
    mu, sigma = rng.uniform(0.4, 0.8), rng.uniform(0.05, 0.15)
    n_pos, n_neg, shape = int(rng.integers(3000, 12000)), 100_000, (50, 50, 50)
    s = np.concatenate(
        [
            norm.ppf((np.arange(n_pos) + 0.5) / n_pos, mu, sigma),
            np.abs(norm.ppf((np.arange(n_neg) + 0.5) / n_neg, 0.0, 0.12)),
        ]
    ).clip(0)
    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    perm = rng.permutation(s.size)
    scores = np.zeros(np.prod(shape), np.float32)
    labels = np.zeros(np.prod(shape), bool)
    scores[: s.size], labels[: s.size] = s[perm], y[perm]
    arrays = {"residual": scores.reshape(shape), "label": labels.reshape(shape), "mask": np.ones(shape, bool)}
    return prepare_case(arrays, RAW)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_search_within_one_step_on_symmetric_unimodal_objectives(seed):
    rng = np.random.default_rng(seed)
    high = rng.uniform(0.5, 5.0)
    peak = rng.uniform(0.02, 0.98) * high
    width = rng.uniform(0.02, 0.3) * high
    objectives = [lambda t: np.exp(-(((t - peak) / width) ** 2)), lambda t: 1.0 - abs(t - peak)]
    for objective in objectives:
        res = greedy_threshold_search(objective, high=high, steps=10)
        grid = np.linspace(0.0, high, 200_001)
        best = grid[np.argmax([objective(t) for t in grid])]  # brute force
        assert abs(res.threshold - best) <= res.step_width
        assert res.step_width == pytest.approx(high / 1024)
        assert len(res.trace) == 20


@pytest.mark.parametrize("seed", range(4))
def test_greedy_search_on_pooled_dice_against_brute_force_sweep(seed):
    case = _gaussian_dice_case(seed)
    objective = pooled_dice_objective([case], RAW)
    high = case.max_score()
    res = greedy_threshold_search(objective, high=high, steps=10)
    grid = np.linspace(0.0, high, 20_001)
    pooled, _ = dice_sweep([case.scores], [case.labels], grid)  # brute-force sweep
    best = np.nanmax(pooled)
    assert res.score == pytest.approx(objective(res.threshold))
    assert res.score >= best - 1e-3
    # within one search step of a threshold that is as good as the best
    near = np.abs(grid - res.threshold) <= res.step_width
    assert np.nanmax(pooled[near]) >= best - 1e-3


def test_greedy_keeps_lower_half_on_ties_and_handles_nan():
    res = greedy_threshold_search(lambda t: 0.0, high=8.0, steps=3)
    assert [t for t, _ in res.trace] == [2.0, 6.0, 1.0, 3.0, 0.5, 1.5]
    res = greedy_threshold_search(lambda t: np.nan if t > 4 else t, high=8.0, steps=4)
    assert res.threshold <= 4.0
    with pytest.raises(AEFlowInputError):
        greedy_threshold_search(lambda t: 0.0, high=-1.0)


def test_prepared_case_counts_match_full_volume_pipeline():
    """The compact case gives the same TP/FP/FN as post-processing and segmenting the full volume."""
    rng = np.random.default_rng(3)
    shape = (32, 32, 8)
    mask = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.47  # ragged: the median filter leaks out of it
    label = (ndimage.gaussian_filter(rng.random(shape), 2) > 0.52) & mask
    label[0:2, 0:2, 0:2] = True  # lesion voxels outside the brain mask
    residual = (rng.gamma(2.0, 0.05, shape) + 0.3 * label).astype(np.float32)
    cfg = PostprocessConfig(residual="absolute", erosion_iterations=0, median_size=5, min_component_size=6)
    case = {"map": residual, "label": label, "mask": mask}
    prepared = prepare_case({"residual": case["map"], "label": case["label"], "mask": case["mask"]}, cfg)
    score = postprocess_map(case["map"], case["mask"], cfg)
    assert np.any((score > 0.12) & ~mask)  # predictions outside the brain are counted too
    np.testing.assert_array_equal(prepared.score_volume(), score)
    np.testing.assert_array_equal(prepared.label_volume(), case["label"])
    for t in (0.0, 0.05, 0.12, 0.3, 10.0):
        pred = segment(score, t, cfg)
        tp = int(np.sum(pred & case["label"]))
        expected = (tp, int(pred.sum()) - tp, int(case["label"].sum()) - tp)
        assert prepared.counts_at(t, cfg) == expected
        np.testing.assert_array_equal(prepared.prediction_volume(t, cfg), pred)


def test_threshold_at_fpr_matches_direct_count():
    rng = np.random.default_rng(0)
    normal = [rng.random(1000), np.round(rng.random(500), 2)]
    pooled = np.concatenate(normal)
    for fpr in (0.0, 0.01, 0.05, 0.2):
        t, achieved = threshold_at_fpr(normal, fpr)
        assert achieved == np.mean(pooled > t) <= fpr
        # smallest such threshold: one step lower among the data values exceeds the target
        lower = pooled[pooled < t]
        if lower.size:
            assert np.mean(pooled > lower.max()) > fpr
    with pytest.raises(AEFlowInputError):
        threshold_at_fpr(normal, 1.0)
    with pytest.raises(AEFlowInputError):
        threshold_at_fpr([], 0.1)


def test_fpr_threshold_uses_healthy_validation_volumes():
    cfg = EvaluationConfig(postprocess=RAW, threshold_method="fpr", target_fpr=0.02, n_bootstrap=0)
    val = [prepare_case(_load(_case(i, lesion=i > 0)), RAW) for i in range(3)]
    info = select_threshold(val, cfg)
    expected, _ = threshold_at_fpr([val[0].brain_scores()], 0.02)
    assert info["value"] == expected and info["source"] == "validation split"
    with pytest.raises(AEFlowInputError, match="healthy"):
        select_threshold(val[1:], cfg)
    cfg2 = EvaluationConfig(postprocess=RAW, threshold_method="fpr", fpr_reference="normal_voxels", n_bootstrap=0)
    assert np.isfinite(select_threshold(val[1:], cfg2)["value"])


def _load(case: dict) -> dict:
    return {"name": case["name"], "residual": case["map"], "label": case["label"], "mask": case["mask"]}


def test_empty_validation_labels_raise():
    val = [prepare_case(_load(_case(i, lesion=False)), RAW) for i in range(2)]
    with pytest.raises(AEFlowInputError, match="validation labels are empty"):
        pooled_dice_objective(val, RAW)


def test_thresholds_never_come_from_the_test_split(monkeypatch):
    # raw maps (no per-scan normalisation), so that scaling the validation maps scales the threshold
    cfg = EvaluationConfig(
        postprocess=PostprocessConfig(normalize="none"), n_bootstrap=0, n_thresholds=256, threshold_method="greedy"
    )
    val = [_case(i) for i in range(3)]
    test = [_case(100 + i, lesion=i != 1) for i in range(3)]
    seen: list[list[str]] = []
    original = pipeline_module.pooled_dice_objective

    def spy(cases, config):
        seen.append([c.name for c in cases])
        return original(cases, config)

    monkeypatch.setattr(pipeline_module, "pooled_dice_objective", spy)
    result = evaluate_maps(val, test, cfg)
    assert seen == [[c["name"] for c in val]]
    t = result["protocol"]["threshold"]["value"]
    assert result["protocol"]["threshold"]["source"] == "validation split"
    # The search starts from [0, largest post-processed validation score].
    prepared_val = pipeline_module.prepare_cases(val, cfg)
    high = max(c.max_score() for c in prepared_val)
    assert result["protocol"]["threshold"]["search_interval"] == [0.0, high]
    assert result["protocol"]["threshold"]["trace"][:2] == [
        [0.25 * high, pytest.approx(pooled_dice_objective(prepared_val, cfg.postprocess)(0.25 * high))],
        [0.75 * high, pytest.approx(pooled_dice_objective(prepared_val, cfg.postprocess)(0.75 * high))],
    ]

    # Very different test maps and labels: same threshold. Different validation maps: another one.
    changed_test = [dict(c, map=c["map"] * 3.0, label=np.roll(c["label"], 5, axis=0)) for c in test]
    assert evaluate_maps(val, changed_test, cfg)["protocol"]["threshold"]["value"] == t
    scaled_val = [dict(c, map=c["map"] * 2.0) for c in val]
    assert evaluate_maps(scaled_val, test, cfg)["protocol"]["threshold"]["value"] == pytest.approx(2 * t, rel=1e-6)

    # The oracle is reported under its own name and uses the test labels.
    oracle = result["metrics"]["oracle"]
    prepared_test = pipeline_module.prepare_cases(test, cfg)
    t_grid, dice_grid = oracle_threshold(prepared_test, n_thresholds=256)
    assert oracle["dice_pooled_before_component_removal"]["value"] == pytest.approx(dice_grid)
    # the oracle's threshold is scored after component removal and is at least as good as the grid's there
    grid_counts = np.array([c.counts_at(t_grid, cfg.postprocess) for c in prepared_test]).sum(0)
    assert oracle["dice_pooled"]["value"] >= float(dice_from_counts(*grid_counts)) - 1e-12
    counts = np.array([c.counts_at(t, cfg.postprocess) for c in prepared_test]).sum(0)
    assert result["metrics"]["pixel"]["dice_pooled"]["value"] == pytest.approx(float(dice_from_counts(*counts)))


def test_fixed_threshold_needs_no_validation():
    cfg = EvaluationConfig(threshold_method="fixed", threshold=0.2, n_bootstrap=0, n_thresholds=64)
    result = evaluate_maps(None, [_case(7)], cfg)
    assert result["protocol"]["threshold"] == {"value": 0.2, "method": "fixed", "source": "given by the user"}
    with pytest.raises(AEFlowInputError):
        EvaluationConfig(threshold_method="fixed")
    with pytest.raises(AEFlowInputError, match="validation split"):
        evaluate_maps(None, [_case(7)], EvaluationConfig(n_bootstrap=0))
