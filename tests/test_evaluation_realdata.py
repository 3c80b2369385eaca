"""The evaluation protocol on real BraTS 2015 cases (skipped when ../shared/data is absent).

The FLAIR intensity itself is used as the anomaly map: tumours are bright in FLAIR, so a validated threshold
on the median-filtered FLAIR is a known, strong baseline (pooled Dice around 0.7 to 0.8).
"""

from __future__ import annotations

import numpy as np
import pytest

from monai_aeflow.evaluation import EvaluationConfig, PostprocessConfig, evaluate_maps, find_cases, load_case

pytestmark = pytest.mark.realdata


def _brats_cases(shared_data):
    root = shared_data / "brats2015_dev"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    cases = [
        {
            "name": d.name,
            "map": d / "Flair_subtrMeanDivStd.nii.gz",
            "label": d / "OTMultiClass.nii.gz",
            "mask": d / "brainmask.nii.gz",
        }
        for d in sorted(root.iterdir())
        if (d / "Flair_subtrMeanDivStd.nii.gz").exists()
    ]
    if len(cases) < 4:
        pytest.skip("fewer than 4 BraTS cases")
    return cases


def test_brats_flair_baseline(shared_data):
    cases = _brats_cases(shared_data)
    cfg = EvaluationConfig(postprocess=PostprocessConfig(residual="positive"), n_bootstrap=50, n_thresholds=4096)
    result = evaluate_maps(cases[:2], cases[2:4], cfg)
    pixel = result["metrics"]["pixel"]
    assert result["protocol"]["threshold"]["validation_cases"] == [c["name"] for c in cases[:2]]
    assert pixel["dice_pooled"]["value"] > 0.5
    assert pixel["auroc"]["value"] > 0.8
    assert result["metrics"]["oracle"]["dice_pooled"]["value"] >= pixel["dice_pooled"]["value"] - 0.05
    assert result["metrics"]["slice"]["auroc"]["value"] > 0.7
    assert pixel["n_brain_voxels"]["value"] > 2e6


def test_brats_loading_orientation(shared_data):
    """LPS volumes are brought to RAS axis order; label and mask stay aligned with the map."""
    case = _brats_cases(shared_data)[0]
    arrays = load_case(case)
    assert arrays["residual"].shape == (240, 240, 155)
    # a few hundred tumour voxels lie outside the dataset's brain mask; a misaligned mask would leave many
    assert np.count_nonzero(arrays["label"] & ~arrays["mask"]) < 0.01 * np.count_nonzero(arrays["label"])


def test_find_cases_on_real_layout(shared_data, tmp_path):
    """Matching by file name across folders of symbolic links to the real files."""
    cases = _brats_cases(shared_data)[:2]
    for sub, key in (("maps", "map"), ("labels", "label"), ("masks", "mask")):
        (tmp_path / sub).mkdir()
        for c in cases:
            (tmp_path / sub / f"{c['name']}.nii.gz").symlink_to(c[key])
    found = find_cases(tmp_path / "maps", tmp_path / "labels", tmp_path / "masks")
    assert [c["name"] for c in found] == [c["name"] for c in cases]
