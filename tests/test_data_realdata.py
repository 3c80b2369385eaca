"""Integration tests on the real scans of ../shared/data (skipped when the folder is absent).

Expected numbers are computed directly with nibabel/numpy (or read from the DICOM text dump), not
with the package's own code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset

from monai_aeflow.data.indexers import index_brats, index_folder, index_image_folder_2d, index_ixi
from monai_aeflow.data.io import load_image
from monai_aeflow.data.slices import DEFAULT_MIN_AREA_FRACTION, SliceDataset
from monai_aeflow.data.transforms import build_image_preprocessing, build_volume_preprocessing

pytestmark = pytest.mark.realdata

DATA = Path(os.environ.get("AEFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} not present")
    return DATA


@pytest.fixture(scope="module")
def brats(data_root):
    records = index_brats(data_root / "brats2015_dev", modality="flair")
    volumes = CacheDataset(records, build_volume_preprocessing(), copy_cache=False, num_workers=1, progress=False)
    return records, volumes


def _nib(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _expected_slices(case: Path, healthy_only: bool) -> list[int]:
    brain = _nib(case / "brainmask.nii.gz") > 0.5
    tumour = _nib(case / "OTMultiClass.nii.gz") > 0
    area = brain.sum(axis=(0, 1))
    keep = (area > 0) & (area >= DEFAULT_MIN_AREA_FRACTION * area.max())
    if healthy_only:
        keep &= tumour.sum(axis=(0, 1)) == 0
    return np.flatnonzero(keep).tolist()


def test_brats_cases_index_with_labels(brats):
    records, _ = brats
    assert [r["subject_id"] for r in records] == [f"brats_2013_pat000{k}_1" for k in (3, 4, 5, 6)]
    for r in records:
        assert r["image"].endswith("Flair_subtrMeanDivStd.nii.gz")
        assert r["label"].endswith("OTMultiClass.nii.gz") and Path(r["label"]).is_file()
        assert r["mask"].endswith("brainmask.nii.gz") and Path(r["mask"]).is_file()


def test_brats_healthy_slice_counts_match_nibabel(brats, data_root):
    records, volumes = brats
    train = SliceDataset(volumes, healthy_only=True)
    test = SliceDataset(volumes, healthy_only=False)
    for v, record in enumerate(records):
        case = data_root / "brats2015_dev" / record["subject_id"]
        assert train.slices_per_volume()[v] == _expected_slices(case, healthy_only=True)
        assert test.slices_per_volume()[v] == _expected_slices(case, healthy_only=False)
    counts = [len(s) for s in train.slices_per_volume()]
    assert all(35 <= c <= 60 for c in counts), counts  # about 50 tumour-free slices per case
    item = train[0]
    assert item["subject_id"] == records[0]["subject_id"] and item["image"].shape == (1, 256, 256)


def test_brats_scaling_matches_numpy_and_keeps_contrast(brats, data_root):
    records, volumes = brats
    for v in (0, 3):
        case = data_root / "brats2015_dev" / records[v]["subject_id"]
        raw = _nib(case / "Flair_subtrMeanDivStd.nii.gz").astype(np.float64)
        brain = _nib(case / "brainmask.nii.gz") > 0.5
        tumour = _nib(case / "OTMultiClass.nii.gz") > 0
        lo, hi = np.percentile(raw[brain], [1, 99])
        expected = np.where(brain, np.clip((raw - lo) / (hi - lo), 0, 1), 0)
        out = volumes[v]["image"][0].numpy()
        assert out.shape == (256, 256, 155)
        # stored LPS -> RAS flips the first two axes; 240 -> 256 pads 8 voxels on each side
        got = out[8:248, 8:248, :][::-1, ::-1, :]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert np.all(out[:8] == 0) and np.all(out[:, 248:] == 0)  # background is 0, not the z-score minimum
        assert got[tumour].mean() > got[brain & ~tumour].mean() + 0.15  # FLAIR tumour stays bright


def test_ixi_t1_loads_in_ras_with_spacing(data_root):
    records = index_ixi(data_root / "ixi_healthy", "T1")
    assert [r["subject_id"] for r in records] == ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI015-HH-1258"]
    for r in records[:2]:
        canonical = nib.as_closest_canonical(nib.load(r["image"]))
        image = load_image(r["image"])
        assert tuple(image.shape) == (1, *canonical.shape)
        np.testing.assert_allclose(image.pixdim.numpy(), canonical.header.get_zooms()[:3], rtol=1e-5)
        np.testing.assert_allclose(image.affine.numpy(), canonical.affine, atol=1e-4)
        np.testing.assert_allclose(image[0].numpy(), canonical.get_fdata(), atol=1e-3)
    assert tuple(load_image(records[1]["image"]).shape) == (1, 90, 120, 120)  # stored PSR, 2 mm


def test_ixi_int16_comes_out_in_unit_range(data_root):
    (record,) = [r for r in index_ixi(data_root / "ixi_healthy", "T1") if r["mask"]]
    out = build_volume_preprocessing()(record)
    raw = _nib(record["image"]).astype(np.float64)
    brain = _nib(record["mask"]) > 0.5
    image, mask = out["image"][0], out["mask"][0]
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert int(mask.sum()) == int(brain.sum())
    assert float(image[mask == 0].abs().max()) == 0.0
    lo, hi = np.percentile(raw[brain], [1, 99])
    median_expected = np.clip((np.median(raw[brain]) - lo) / (hi - lo), 0, 1)
    assert abs(float(torch.median(image[mask > 0])) - median_expected) < 1e-3


def test_mni_template_grey_white_contrast_raw_and_zscored(data_root, tmp_path):
    folder = data_root / "mni152"
    t1_path = folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    t1 = nib.load(str(t1_path))
    gm = _nib(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz") / 255.0
    wm = _nib(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz") / 255.0
    brain = (gm + wm) > 0.5
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), t1.affine), str(tmp_path / "brain.nii.gz"))
    raw = np.asanyarray(t1.dataobj).astype(np.float32)
    z = np.where(brain, (raw - raw[brain].mean()) / raw[brain].std(), -3.0).astype(np.float32)
    nib.save(nib.Nifti1Image(z, t1.affine), str(tmp_path / "z.nii.gz"))
    preprocess = build_volume_preprocessing()
    mask = str(tmp_path / "brain.nii.gz")
    a = preprocess({"image": str(t1_path), "mask": mask, "label": None})
    b = preprocess({"image": str(tmp_path / "z.nii.gz"), "mask": mask, "label": None})
    torch.testing.assert_close(a["image"].as_tensor(), b["image"].as_tensor(), atol=1e-5, rtol=0)
    # the template is stored RAS: undo the in-plane crop/pad by locating the brain
    image = a["image"][0].numpy()
    pad = [(256 - s) // 2 for s in raw.shape[:2]]
    assert raw.shape[0] < 256 and raw.shape[1] < 256
    image = image[pad[0] : pad[0] + raw.shape[0], pad[1] : pad[1] + raw.shape[1]]
    np.testing.assert_array_equal(image > 0, (image > 0) & brain)
    white, grey = image[wm > 0.9].mean(), image[(gm > 0.9)].mean()
    assert white > grey + 0.2, (white, grey)


def test_dicom_series_loads_in_ras(data_root):
    folder = data_root / "dicom_t1_series"
    n_files = len(list(folder.glob("*.dcm")))
    dump = (folder / "00001.dcm.nfo").read_text(errors="replace")
    rows = int(re.search(r"\(0028,0010\) US (\d+)", dump).group(1))
    columns = int(re.search(r"\(0028,0011\) US (\d+)", dump).group(1))
    (record,) = index_folder(folder)
    image = load_image(record["image"], spatial_dims=3)
    assert n_files == 176 and (rows, columns) == (256, 256)
    assert tuple(image.shape) == (1, n_files, rows, columns)  # sagittal slices along R
    np.testing.assert_allclose(image.pixdim.numpy(), [1.0, 1.0, 1.0], atol=1e-3)
    direction = image.affine.numpy()[:3, :3]
    assert np.all(np.diag(direction) > 0.9)  # voxel axes point to R, A, S
    out = build_volume_preprocessing()(record)
    assert tuple(out["image"].shape) == (1, 256, 256, 256)


def test_chest_xray_folder(data_root):
    records = index_image_folder_2d(data_root / "cxr_2d", modality="xray")
    labels = [r["label"] for r in records]
    assert labels.count(0) == 10 and labels.count(1) == 14
    assert all(r["class_name"] == ("normal" if r["label"] == 0 else "abnormal") for r in records)
    out = build_image_preprocessing()(records[0])
    assert tuple(out["image"].shape) == (1, 256, 256)
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
