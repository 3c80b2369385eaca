"""The torch post-processing (any device) equals the scipy path of ``evaluation.postprocess`` voxel for voxel:
erosion, median filter, small-component removal and the whole map -> mask chain, on random volumes and on a
real scan (skipped when ``/work/shared/data`` is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_aeflow.evaluation.postprocess import (
    PostprocessConfig,
    erode_mask_per_slice,
    median_filter,
    postprocess_map,
    remove_small_components,
    segment,
)
from monai_aeflow.inference.postprocess_torch import (
    erode_mask_per_slice_torch,
    median_filter_torch,
    normalize_map_torch,
    postprocess_map_torch,
    remove_small_components_torch,
    segment_torch,
)

DATA = Path("/work/shared/data")


def _scipy_component_removal(b: np.ndarray, max_size: int, dims: int, connectivity: int) -> np.ndarray:
    """Reference written directly on scipy.ndimage.label (full volume, no bounding box)."""
    if dims == 3:
        structure = ndimage.generate_binary_structure(3, connectivity)
    else:
        structure = np.zeros((3, 3, 3), bool)
        structure[:, :, 1] = ndimage.generate_binary_structure(2, min(connectivity, 2))
    labels, _ = ndimage.label(b, structure=structure)
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_size
    keep[0] = False
    return keep[labels]


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_erosion_equals_scipy(iterations):
    rng = np.random.default_rng(iterations)
    mask = ndimage.binary_closing(rng.random((40, 36, 7)) > 0.35, iterations=2)
    expected = erode_mask_per_slice(mask, iterations)
    direct = ndimage.binary_erosion(
        mask, structure=np.pad(ndimage.generate_binary_structure(2, 1)[..., None], ((0, 0), (0, 0), (1, 1))),
        iterations=iterations, border_value=0,
    ) if iterations else mask  # fmt: skip
    got = erode_mask_per_slice_torch(torch.from_numpy(mask), iterations).numpy()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, direct)


@pytest.mark.parametrize(("size", "dims"), [(3, 2), (5, 2), (9, 2), (3, 3), (5, 3)])
def test_median_filter_equals_scipy(size, dims, monkeypatch):
    rng = np.random.default_rng(size * dims)
    vol = (rng.random((23, 19, 11)) * (rng.random((23, 19, 11)) > 0.3)).astype(np.float32)
    monkeypatch.setattr("monai_aeflow.inference.postprocess_torch.MEDIAN_CHUNK_VALUES", 5000)  # several chunks
    got = median_filter_torch(torch.from_numpy(vol), size, dims).numpy()
    ksize = (size, size, size if dims == 3 else 1)
    np.testing.assert_array_equal(got, ndimage.median_filter(vol, size=ksize, mode="reflect"))
    np.testing.assert_array_equal(got, median_filter(vol, size, dims))
    # 2D images: one slice
    img = vol[..., 0]
    np.testing.assert_array_equal(
        median_filter_torch(torch.from_numpy(img), size, 2).numpy(), median_filter(img, size, 2)
    )


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("density", [0.2, 0.45, 0.6])
def test_component_removal_equals_scipy_label(dims, connectivity, density):
    rng = np.random.default_rng(int(density * 100) + dims + 10 * connectivity)
    b = rng.random((31, 27, 9)) < density
    for max_size in (0, 1, 7, 40):
        expected = _scipy_component_removal(b, max_size, dims, connectivity) if max_size else b
        got = remove_small_components_torch(torch.from_numpy(b), max_size, dims, connectivity).numpy()
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, remove_small_components(b, max_size, dims, connectivity))


def test_component_removal_long_snake():
    # one 1-voxel-wide serpentine component of ~900 voxels: propagation needs pointer jumping to finish fast
    b = np.zeros((61, 61, 1), bool)
    b[::2, :, 0] = True
    b[1::4, -1, 0] = True
    b[3::4, 0, 0] = True
    b[0, 0, 0] = False
    got = remove_small_components_torch(torch.from_numpy(b), 7, 2, 1).numpy()
    np.testing.assert_array_equal(got, _scipy_component_removal(b, 7, 2, 1))
    assert got.sum() == b.sum()


@pytest.mark.parametrize(
    "config",
    [
        PostprocessConfig(),
        PostprocessConfig(residual="positive", median_size=3, median_dims=3, component_connectivity=2),
        PostprocessConfig(erosion_iterations=0, median_size=1, min_component_size=0),
        PostprocessConfig(normalize="robust"),
    ],
    ids=["default", "3d", "none", "robust"],
)
def test_postprocess_chain_equals_cpu_path_on_random_volume(config):
    rng = np.random.default_rng(5)
    residual = ndimage.gaussian_filter(rng.normal(size=(48, 44, 12)), 1.5).astype(np.float32)
    xx, yy, _ = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 44), np.arange(12), indexing="ij")
    brain = (xx**2 + yy**2 < 0.8) & (rng.random((48, 44, 12)) > 0.02)  # an ellipse with holes
    ref = postprocess_map(residual, brain, config)
    got = postprocess_map_torch(torch.from_numpy(residual), torch.from_numpy(brain), config)
    np.testing.assert_array_equal(got.numpy(), ref)
    threshold = float(np.quantile(ref[ref > 0], 0.8))
    np.testing.assert_array_equal(segment_torch(got, threshold, config).numpy(), segment(ref, threshold, config))


@pytest.mark.parametrize("shape", [(17, 13, 5), (16, 12, 4), (30, 31)])
def test_robust_normalisation_equals_numpy_percentiles(shape):
    """(m - median) / IQR over the brain voxels, against numpy's percentiles (odd and even voxel counts, 2D)."""
    rng = np.random.default_rng(len(shape) * 10 + shape[0])
    amap = (rng.gamma(2.0, 0.05, size=shape) + 0.01).astype(np.float32)
    brain = rng.random(shape) > 0.3
    q25, q50, q75 = np.percentile(amap[brain].astype(np.float64), [25, 50, 75])
    expected = (amap - q50) / (q75 - q25)
    got = normalize_map_torch(torch.from_numpy(amap), torch.from_numpy(brain)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    q25, q50, q75 = np.percentile(amap.astype(np.float64), [25, 50, 75])  # no mask: the whole map
    np.testing.assert_allclose(normalize_map_torch(torch.from_numpy(amap), None).numpy(), (amap - q50) / (q75 - q25),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    spiky = np.zeros(shape, np.float32)
    spiky.flat[3] = 4.0  # interquartile range 0: the standard deviation scales
    np.testing.assert_allclose(normalize_map_torch(torch.from_numpy(spiky), None).numpy(), spiky / spiky.std(),
                               rtol=1e-5)  # fmt: skip
    assert torch.equal(normalize_map_torch(torch.ones(shape), None), torch.zeros(shape))


def test_postprocess_chain_equals_cpu_path_on_real_scan():
    case = DATA / "brats2015_dev" / "brats_2013_pat0003_1"
    if not (case / "Flair_subtrMeanDivStd.nii.gz").is_file():
        pytest.skip("no real scans in /work/shared/data")
    import nibabel as nib

    slab = (..., slice(60, 100))  # 40 axial slices through the tumour keep the scipy reference quick
    vol = np.asarray(nib.load(case / "Flair_subtrMeanDivStd.nii.gz").dataobj, dtype=np.float32)[slab]
    brain = np.asarray(nib.load(case / "brainmask.nii.gz").dataobj)[slab] > 0.5
    # a residual-like map: the z-scored FLAIR minus its smoothed self (240 x 240 x 40)
    residual = (vol - ndimage.uniform_filter(vol, 7)).astype(np.float32)
    config = PostprocessConfig()
    ref = postprocess_map(residual, brain, config)
    got = postprocess_map_torch(torch.from_numpy(residual), torch.from_numpy(brain), config)
    np.testing.assert_array_equal(got.numpy(), ref)
    for q in (0.9, 0.99):
        threshold = float(np.quantile(ref[ref > 0], q))
        np.testing.assert_array_equal(segment_torch(got, threshold, config).numpy(), segment(ref, threshold, config))
