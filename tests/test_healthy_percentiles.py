"""The healthy-validation percentiles stored beside the threshold (they grade the MONAI Label heat-map levels)."""

from __future__ import annotations

import numpy as np
import pytest

from monai_aeflow.evaluation.pipeline import EvaluationConfig, evaluate_maps
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.label.levels import level_bounds


def _case(rng: np.random.Generator, name: str, lesion: bool) -> dict:
    shape = (24, 24, 6)
    brain = np.zeros(shape, dtype=np.uint8)
    brain[3:21, 3:21, :] = 1
    amap = rng.random(shape).astype(np.float32) * 0.4
    label = np.zeros(shape, dtype=np.uint8)
    if lesion:
        label[8:14, 8:14, 1:5] = 1
        amap[label > 0] += 0.6
    return {"name": name, "map": amap, "label": label, "mask": brain}


@pytest.mark.parametrize("with_healthy_volume", [True, False])
def test_percentiles_are_those_of_healthy_brain_voxels_of_the_validation_split(with_healthy_volume):
    rng = np.random.default_rng(0)
    val = [_case(rng, "v0", True), _case(rng, "v1", not with_healthy_volume)]
    test = [_case(rng, "t0", True)]
    # no median filter, no erosion, positive residual = identity on a non-negative map: the post-processed map is
    # the map itself inside the brain, so the percentiles can be computed independently with numpy
    pp = PostprocessConfig(
        residual="positive", normalize="none", erosion_iterations=0, median_size=1, min_component_size=0
    )
    result = evaluate_maps(val, test, EvaluationConfig(postprocess=pp, n_bootstrap=0))
    stored = result["protocol"]["threshold"]["healthy_percentiles"]
    if with_healthy_volume:
        voxels = val[1]["map"][val[1]["mask"] > 0]
        assert stored["reference"].startswith("brain voxels of healthy")
    else:
        voxels = np.concatenate([c["map"][(c["mask"] > 0) & (c["label"] == 0)] for c in val])
        assert stored["reference"].startswith("brain voxels outside lesions")
    np.testing.assert_allclose([stored["95"], stored["99"]], np.percentile(voxels, [95, 99]), rtol=1e-6)
    # the test split never contributes
    assert stored["99"] < 0.4
    # the Label heat-map levels use them when they lie below the threshold
    bounds = level_bounds(1.0, result["protocol"]["threshold"])
    assert (bounds.low, bounds.medium) == pytest.approx((stored["95"], stored["99"]))
    assert bounds.source.startswith("healthy validation percentiles")
