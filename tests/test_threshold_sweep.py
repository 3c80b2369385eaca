"""The exact validation threshold (``--method sweep``) against a numpy brute force over every distinct value."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from monai_aeflow.evaluation.cases import prepare_case
from monai_aeflow.evaluation.pipeline import EvaluationConfig, evaluate_maps, select_threshold
from monai_aeflow.evaluation.postprocess import PostprocessConfig, component_opening, postprocess_map
from monai_aeflow.evaluation.thresholds import sweep_threshold


def _volume(seed: int, shape=(20, 18, 5), levels: int | None = None) -> dict:
    """Random residual, brain mask and label; ``levels`` quantises the map so that many voxels tie."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, :] = True
    g = ndimage.gaussian_filter(rng.random(shape), 1.5)
    label = (g > np.quantile(g, 0.85)) & mask
    residual = rng.gamma(2.0, 0.1, shape) + label * rng.normal(0.3, 0.2, shape)
    if levels is not None:
        residual = np.round(residual * levels) / levels
    residual[rng.random(shape) < 0.05] *= -1  # signed residual: the mode (absolute / positive) matters
    return {"name": f"v{seed}", "residual": residual.astype(np.float32), "label": label, "mask": mask}


def _brute_force(volumes: list[dict], pp: PostprocessConfig) -> tuple[float, np.ndarray]:
    """Pooled Dice of the full pipeline (scipy post-processing, labelling) at every distinct map value."""
    maps = [postprocess_map(v["residual"], v["mask"], pp) for v in volumes]
    values = np.unique(np.concatenate([[0.0], *[m.ravel() for m in maps]]))
    structure = None
    best = -1.0
    dices = []
    for t in values:
        tp = fp = fn = 0
        for m, v in zip(maps, volumes, strict=True):
            pred = m > np.float32(t)
            if pp.min_component_size > 0:
                kept = np.zeros_like(pred)
                planes = range(pred.shape[2]) if pp.effective_component_dims == 2 else [None]
                for k in planes:
                    sub = pred if k is None else pred[:, :, k]
                    structure = ndimage.generate_binary_structure(sub.ndim, min(pp.component_connectivity, sub.ndim))
                    lab, n = ndimage.label(sub, structure)
                    sizes = np.bincount(lab.ravel(), minlength=n + 1)
                    keep = sizes > pp.min_component_size
                    keep[0] = False
                    if k is None:
                        kept = keep[lab]
                    else:
                        kept[:, :, k] = keep[lab]
                pred = kept
            y = v["label"]
            tp += int(np.sum(pred & y))
            fp += int(np.sum(pred & ~y))
            fn += int(np.sum(~pred & y))
        d = 2 * tp / (2 * tp + fp + fn)
        dices.append(d)
        best = max(best, d)
    return best, np.array(dices)


CONFIGS = [
    PostprocessConfig(erosion_iterations=0, median_size=1, min_component_size=0),
    PostprocessConfig(erosion_iterations=1, median_size=3, min_component_size=4),
    PostprocessConfig(residual="positive", erosion_iterations=0, median_size=3, min_component_size=3, component_dims=3),
    PostprocessConfig(erosion_iterations=0, median_size=1, min_component_size=5, component_connectivity=2),
]


@pytest.mark.parametrize("levels", [None, 6])
@pytest.mark.parametrize("pp", CONFIGS, ids=["raw", "median3-cc4", "positive-3d", "conn2"])
def test_sweep_threshold_is_the_brute_force_maximum(pp, levels):
    volumes = [_volume(s, levels=levels) for s in (1, 2, 3)]
    best, dices = _brute_force(volumes, pp)
    cases = [prepare_case(v, pp) for v in volumes]
    res = sweep_threshold(cases, pp)
    # The chosen threshold, run through the independent pipeline, reaches the brute-force maximum.
    counts = np.array([c.counts_at(res.threshold, pp) for c in cases]).sum(0)
    assert 2 * counts[0] / (2 * counts[0] + counts[1] + counts[2]) == pytest.approx(best, abs=1e-12)
    assert res.score == pytest.approx(best, abs=1e-12)
    # Every threshold in [candidate, next value) gives the same segmentation.
    assert res.candidate <= res.threshold < res.next_value or res.candidate == res.next_value
    assert 2 <= res.n_candidates <= dices.size  # the opened map's values are among the map's values
    if levels is not None:  # quantised maps: many voxels tie at each value
        assert dices.size < 0.1 * sum(c.scores.size for c in cases)


@pytest.mark.parametrize("dims,conn", [(2, 1), (2, 2), (3, 1), (3, 3)])
def test_component_opening_levels_are_the_cleaned_masks(dims, conn):
    rng = np.random.default_rng(dims * 10 + conn)
    score = np.round(ndimage.gaussian_filter(rng.random((16, 14, 6)), 0.7) * 40) / 40
    score[score < np.quantile(score, 0.3)] = 0
    score = score.astype(np.float32)
    opened = component_opening(score, max_size=4, dims=dims, connectivity=conn)
    assert np.all(opened <= score) and np.all(opened >= 0)
    for t in np.unique(score):
        pred = score > t
        if dims == 2:
            s2 = ndimage.generate_binary_structure(2, min(conn, 2))
            structure = np.zeros((3, 3, 3), bool)
            structure[:, :, 1] = s2
        else:
            structure = ndimage.generate_binary_structure(3, conn)
        lab, n = ndimage.label(pred, structure)
        keep = np.bincount(lab.ravel(), minlength=n + 1) > 4
        keep[0] = False
        assert np.array_equal(opened > t, keep[lab]), t


def test_sweep_is_the_default_and_beats_or_equals_greedy_on_validation():
    volumes = [_volume(s) for s in (4, 5, 6)]
    pp = PostprocessConfig(erosion_iterations=1, median_size=3, min_component_size=4)
    cases = [prepare_case(v, pp) for v in volumes]
    assert EvaluationConfig().threshold_method == "sweep"
    sweep = select_threshold(cases, EvaluationConfig(postprocess=pp))
    greedy = select_threshold(cases, EvaluationConfig(postprocess=pp, threshold_method="greedy"))
    assert sweep["method"] == "sweep" and greedy["method"] == "greedy"
    assert sweep["validation_dice_pooled"] >= greedy["validation_dice_pooled"] - 1e-12
    best, _ = _brute_force(volumes, pp)
    assert sweep["validation_dice_pooled"] == pytest.approx(best, abs=1e-12)


def test_postprocessing_protocol_is_unchanged_by_the_sweep():
    """Median filter and per-slice erosion stay those of scipy: the prepared scores equal an independent pass."""
    v = _volume(7)
    pp = PostprocessConfig(
        residual="absolute", normalize="none", erosion_iterations=2, median_size=5, min_component_size=7
    )
    eroded = ndimage.binary_erosion(
        v["mask"],
        structure=np.pad(ndimage.generate_binary_structure(2, 1)[..., None], ((0, 0), (0, 0), (1, 1))),
        iterations=2,
    )
    expected = ndimage.median_filter(np.abs(v["residual"]) * eroded, size=(5, 5, 1), mode="reflect")
    case = prepare_case(v, pp)
    assert np.allclose(case.score_volume(), expected, atol=0)
    cases = {"map": v["residual"], "label": v["label"], "mask": v["mask"], "name": "a"}
    res = evaluate_maps([cases], [dict(cases, name="b")], EvaluationConfig(postprocess=pp, n_bootstrap=0))
    assert res["protocol"]["threshold"]["method"] == "sweep"
    assert res["protocol"]["postprocessing"]["median_size"] == 5


def test_sweep_threshold_never_comes_from_the_test_split(monkeypatch):
    from monai_aeflow.evaluation import pipeline as pipeline_module

    pp = PostprocessConfig(erosion_iterations=0, median_size=3, min_component_size=3)
    cfg = EvaluationConfig(postprocess=pp, n_bootstrap=0, n_thresholds=256)
    val = [dict(_volume(s), map=_volume(s)["residual"]) for s in (8, 9)]
    test = [dict(_volume(s), map=_volume(s)["residual"]) for s in (10, 11)]
    seen: list[list[str]] = []
    original = pipeline_module.sweep_threshold

    def spy(cases, config):
        seen.append([c.name for c in cases])
        return original(cases, config)

    monkeypatch.setattr(pipeline_module, "sweep_threshold", spy)
    t = evaluate_maps(val, test, cfg)["protocol"]["threshold"]["value"]
    assert seen == [["v8", "v9"]]
    changed = [dict(c, map=c["map"] * 3.0, label=np.roll(c["label"], 3, axis=0)) for c in test]
    assert evaluate_maps(val, changed, cfg)["protocol"]["threshold"]["value"] == t


@pytest.mark.parametrize("shape", [(1, 6, 3), (2, 2, 2), (7, 1, 1)])
def test_component_opening_on_thin_volumes(shape):
    """Maps only one or two voxels wide (small crops, lone lesion voxels) are handled like any other."""
    rng = np.random.default_rng(sum(shape))
    score = np.round(rng.random(shape) * 4).astype(np.float32) / 4
    for dims in (2, 3):
        opened = component_opening(score, max_size=1, dims=dims, connectivity=1)
        for t in np.unique(score):
            pred = score > t
            planes = [pred[:, :, k] for k in range(shape[2])] if dims == 2 else [pred]
            kept = []
            for plane in planes:
                lab, n = ndimage.label(plane)
                keep = np.bincount(lab.ravel(), minlength=n + 1) > 1
                keep[0] = False
                kept.append(keep[lab])
            expected = np.stack(kept, axis=2) if dims == 2 else kept[0]
            assert np.array_equal(opened > t, expected), (dims, t)


def test_oracle_is_the_best_test_dice_after_component_removal_and_bounds_every_validated_threshold():
    """The oracle is scored after component removal like the validated thresholds, so it is their upper bound:
    its pooled Dice equals the brute-force best over every distinct map value (scipy labelling)."""
    val = [_volume(s) for s in (11, 12)]
    test = [_volume(s) for s in (13, 14)]
    pp = PostprocessConfig(erosion_iterations=1, median_size=3, min_component_size=6)
    as_case = [{"map": v["residual"], "label": v["label"], "mask": v["mask"], "name": f"c{i}"} for i, v in
               enumerate(val + test)]  # fmt: skip
    cfg = EvaluationConfig(postprocess=pp, n_bootstrap=0, report_methods=("sweep", "greedy"))
    result = evaluate_maps(as_case[:2], as_case[2:], cfg)
    best, _ = _brute_force(test, pp)
    oracle = result["metrics"]["oracle"]["dice_pooled"]["value"]
    assert oracle == pytest.approx(best, abs=1e-12)
    for method in ("sweep", "greedy"):
        assert result["metrics"]["thresholds"][method]["dice_pooled"]["value"] <= oracle + 1e-12
