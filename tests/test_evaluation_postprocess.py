"""Post-processing against scipy.ndimage: median filter, per-slice erosion, connected-component removal."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.postprocess import (
    PostprocessConfig,
    apply_residual_mode,
    erode_mask_per_slice,
    median_filter,
    normalize_map,
    postprocess_map,
    remove_small_components,
    segment,
)


def _masked_map(seed: int, shape=(36, 40, 11), touch_border: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.random(shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    if touch_border:
        mask[0:20, 5:40, 0:7] = True
    else:
        mask[9:27, 8:30, 3:8] = True
    return vol * mask


@pytest.mark.parametrize("k", [5, 9])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("touch_border", [False, True])
def test_median_filter_matches_scipy(k, dims, touch_border):
    vol = _masked_map(k + dims, touch_border=touch_border)
    size = (k, k, k if dims == 3 else 1)
    expected = ndimage.median_filter(vol, size=size)
    np.testing.assert_array_equal(median_filter(vol, size=k, dims=dims), expected)


def test_median_filter_dense_2d_and_trivial_inputs():
    rng = np.random.default_rng(0)
    img = rng.random((30, 25)).astype(np.float32)  # no zero background at all
    np.testing.assert_array_equal(median_filter(img, 5, 2), ndimage.median_filter(img, size=5))
    zeros = np.zeros((10, 10, 3), np.float32)
    np.testing.assert_array_equal(median_filter(zeros, 5, 3), zeros)
    np.testing.assert_array_equal(median_filter(img, 1), img)


def test_erosion_is_per_slice():
    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((30, 30, 6)), 2) > 0.48
    out = erode_mask_per_slice(mask, iterations=2)
    for z in range(mask.shape[2]):
        np.testing.assert_array_equal(out[..., z], ndimage.binary_erosion(mask[..., z], iterations=2))
    np.testing.assert_array_equal(erode_mask_per_slice(mask, 0), mask)


def _remove_by_loop(binary: np.ndarray, max_size: int, structure: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(binary, structure=structure)
    out = np.zeros_like(binary)
    for i in range(1, n + 1):
        comp = labels == i
        if comp.sum() > max_size:
            out |= comp
    return out


@pytest.mark.parametrize("max_size", [0, 3, 7, 20])
@pytest.mark.parametrize("connectivity", [1, 3])
def test_component_removal_3d_matches_scipy_label(max_size, connectivity):
    rng = np.random.default_rng(max_size + connectivity)
    binary = rng.random((20, 22, 9)) > 0.8
    expected = _remove_by_loop(binary, max_size, ndimage.generate_binary_structure(3, connectivity))
    out = remove_small_components(binary, max_size, dims=3, connectivity=connectivity)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("connectivity", [1, 2])
def test_component_removal_2d_is_per_slice(connectivity):
    rng = np.random.default_rng(5)
    binary = rng.random((20, 22, 5)) > 0.75
    out = remove_small_components(binary, 4, dims=2, connectivity=connectivity)
    structure = ndimage.generate_binary_structure(2, connectivity)
    for z in range(binary.shape[2]):
        np.testing.assert_array_equal(out[..., z], _remove_by_loop(binary[..., z], 4, structure))
    # A 2D image is one slice.
    np.testing.assert_array_equal(remove_small_components(binary[..., 0], 4, 2, connectivity), out[..., 0])


def test_residual_modes():
    r = np.array([-2.0, -0.5, 0.0, 1.5])
    np.testing.assert_array_equal(apply_residual_mode(r, "positive"), [0, 0, 0, 1.5])
    np.testing.assert_array_equal(apply_residual_mode(r, "absolute"), [2, 0.5, 0, 1.5])
    with pytest.raises(AEFlowInputError):
        apply_residual_mode(r, "squared")


@pytest.mark.parametrize("normalize", ["none", "robust"])
def test_postprocess_map_and_segment_chain(normalize):
    rng = np.random.default_rng(2)
    residual = (rng.normal(size=(30, 30, 6)) * 0.3 + 0.1).astype(np.float32)
    mask = np.zeros(residual.shape, bool)
    mask[5:25, 5:25, 1:5] = True
    cfg = PostprocessConfig(
        residual="positive",
        normalize=normalize,
        erosion_iterations=2,
        median_size=5,
        median_dims=2,
        min_component_size=5,
    )
    standard = residual
    if normalize == "robust":  # numpy's own median and interquartile range of the brain voxels
        q25, q50, q75 = np.percentile(residual[mask].astype(np.float64), [25, 50, 75])
        standard = ((residual - q50) / (q75 - q25)).astype(np.float32)
    eroded = np.stack([ndimage.binary_erosion(mask[..., z], iterations=2) for z in range(6)], -1)
    expected = ndimage.median_filter(np.maximum(standard, 0) * eroded, size=(5, 5, 1))
    score = postprocess_map(residual, mask, cfg)
    np.testing.assert_allclose(score, expected, rtol=1e-5, atol=1e-6)
    seg = segment(score, 0.3, cfg)
    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    np.testing.assert_array_equal(seg, _remove_by_loop(expected > 0.3, 5, structure))


def test_robust_normalisation_makes_one_threshold_carry_over_between_scans():
    """Two scans whose raw maps differ in level and spread (another scanner's contrast): with ``robust`` the
    post-processed maps and lesion masks are the same; with ``none`` one threshold segments them differently."""
    rng = np.random.default_rng(5)
    amap = np.abs(rng.normal(size=(24, 24, 5))).astype(np.float32)
    amap[8:14, 8:14, 2] += 4.0  # a lesion
    mask = np.zeros(amap.shape, bool)
    mask[2:22, 2:22, :] = True
    other = (amap * 3.0 + 0.5).astype(np.float32)
    robust = PostprocessConfig(
        residual="positive", normalize="robust", erosion_iterations=0, median_size=3, min_component_size=3
    )
    a, b = postprocess_map(amap, mask, robust), postprocess_map(other, mask, robust)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(segment(a, 2.0, robust), segment(b, 2.0, robust))
    assert segment(a, 2.0, robust)[8:14, 8:14, 2].mean() > 0.85 and segment(a, 2.0, robust).sum() < 60
    raw = PostprocessConfig(
        residual="positive", normalize="none", erosion_iterations=0, median_size=3, min_component_size=3
    )
    ra, rb = postprocess_map(amap, mask, raw), postprocess_map(other, mask, raw)
    assert segment(ra, 2.0, raw).sum() < segment(rb, 2.0, raw).sum() / 2


def test_normalize_map_degenerate_spread_and_masks():
    flat = np.full((6, 6), 2.0, np.float32)
    assert np.all(normalize_map(flat, None) == 0.0)  # constant: scale 1, no division by zero
    spiky = np.zeros((10, 10), np.float32)
    spiky[0, 0] = 5.0  # IQR 0: the standard deviation is the scale
    np.testing.assert_allclose(normalize_map(spiky, None), spiky / spiky.std(), rtol=1e-6)
    empty = np.zeros((10, 10), bool)  # an empty mask uses the whole map
    np.testing.assert_allclose(normalize_map(spiky, empty), normalize_map(spiky, None))
    np.testing.assert_array_equal(normalize_map(spiky, None, "none"), spiky)
    with pytest.raises(AEFlowInputError, match="normalize"):
        normalize_map(spiky, None, "zscore")
    with pytest.raises(AEFlowInputError, match="normalize"):
        PostprocessConfig(normalize="zscore")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"residual": "signed"},
        {"median_dims": 4},
        {"median_size": 4},
        {"min_component_size": -1},
        {"component_dims": 1},
        {"component_connectivity": 0},
    ],
)
def test_invalid_config_raises_input_error(kwargs):
    with pytest.raises(AEFlowInputError):
        PostprocessConfig(**kwargs)


def test_mask_shape_mismatch_raises():
    with pytest.raises(AEFlowInputError, match="shape"):
        postprocess_map(np.zeros((4, 4, 2)), np.ones((4, 4, 3), bool), PostprocessConfig())
