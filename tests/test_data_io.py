"""Loading and validation of NIfTI volumes, 2D images and DICOM folders (synthetic files)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_aeflow.data.io import LoadImageCheckedd, file_kind, load_image
from monai_aeflow.errors import AEFlowInputError


def _save(path, array, affine=None):
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _lps_volume(tmp_path, name="vol.nii.gz", shape=(12, 10, 8), spacing=(1.5, 0.8, 2.0)):
    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS+ voxel axes
    affine[:3, 3] = [10.0, 20.0, -5.0]
    return _save(tmp_path / name, data, affine), data


def test_nifti_is_loaded_in_ras_with_spacing_and_affine(tmp_path):
    path, data = _lps_volume(tmp_path)
    image = load_image(path)
    canonical = nib.as_closest_canonical(nib.load(str(path)))
    assert tuple(image.shape) == (1, *canonical.shape)
    np.testing.assert_allclose(image[0].numpy(), canonical.get_fdata(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image[0].numpy(), data[::-1, ::-1, :], atol=1e-6)
    np.testing.assert_allclose(image.pixdim.numpy(), [1.5, 0.8, 2.0], atol=1e-6)
    np.testing.assert_allclose(image.affine.numpy(), canonical.affine, atol=1e-5)
    assert str(path) in str(image.meta["filename_or_obj"])


def test_keep_stored_orientation(tmp_path):
    path, data = _lps_volume(tmp_path)
    image = load_image(path, orientation=None)
    np.testing.assert_allclose(image[0].numpy(), data, atol=1e-6)


def test_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(AEFlowInputError, match="file not found") as info:
        load_image(missing)
    assert str(missing) in str(info.value)
    assert info.value.path == str(missing)


def test_truncated_nifti_names_the_file(tmp_path):
    path, _ = _lps_volume(tmp_path, shape=(40, 40, 30))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AEFlowInputError, match="truncated or corrupt") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_uncompressed_truncated_nifti(tmp_path):
    path, _ = _lps_volume(tmp_path, name="vol.nii", shape=(20, 20, 20))
    raw = path.read_bytes()
    path.write_bytes(raw[:1000])
    with pytest.raises(AEFlowInputError, match=str(path.name)):
        load_image(path)


def test_garbage_nifti_header(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    with pytest.raises(AEFlowInputError, match="not a readable NIfTI") as info:
        load_image(path)
    assert info.value.path == str(path)


def test_4d_volume_is_rejected(tmp_path):
    path = _save(tmp_path / "fmri.nii.gz", np.zeros((6, 6, 5, 3), np.float32))
    with pytest.raises(AEFlowInputError, match="4D image") as info:
        load_image(path)
    assert "fmri.nii.gz" in str(info.value)


def test_trailing_singleton_axis_is_a_3d_volume(tmp_path):
    path = _save(tmp_path / "v.nii.gz", np.ones((6, 7, 5, 1), np.float32))
    assert tuple(load_image(path, spatial_dims=3).shape) == (1, 6, 7, 5)


def test_wrong_dimensionality_and_non_finite(tmp_path):
    flat = _save(tmp_path / "flat.nii.gz", np.ones((6, 7), np.float32))
    with pytest.raises(AEFlowInputError, match="expected 3"):
        load_image(flat, spatial_dims=3)
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(AEFlowInputError, match="NaN"):
        load_image(_save(tmp_path / "nan.nii.gz", data))


def test_unsupported_types(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AEFlowInputError, match="unsupported file type"):
        file_kind(text)
    empty_dir = tmp_path / "series"
    empty_dir.mkdir()
    (empty_dir / "readme.txt").write_text("x")
    with pytest.raises(AEFlowInputError, match="without DICOM files"):
        load_image(empty_dir)


def test_unreadable_dicom_folder(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 50)
    assert file_kind(folder) == "dicom"
    with pytest.raises(AEFlowInputError, match="DICOM series") as info:
        load_image(folder)
    assert info.value.path == str(folder)


def test_png_grey_and_colour(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(30, 50), dtype=np.uint8)  # (rows, columns)
    Image.fromarray(grey).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png", spatial_dims=2)
    assert tuple(image.shape) == (1, 50, 30)  # MONAI order: (x = columns, y = rows)
    np.testing.assert_array_equal(image[0].numpy(), grey.T.astype(np.float32))

    colour = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "c.jpg", quality=100)
    expected = np.asarray(Image.open(tmp_path / "c.jpg").convert("L")).T
    image = load_image(tmp_path / "c.jpg")
    assert tuple(image.shape) == (1, 50, 30)
    np.testing.assert_array_equal(image[0].numpy(), expected.astype(np.float32))
    assert tuple(load_image(tmp_path / "c.jpg", grayscale=False).shape) == (3, 50, 30)


def test_loadd_image_mask_label_and_none(tmp_path):
    img, data = _lps_volume(tmp_path, "img.nii.gz")
    mask = _save(tmp_path / "mask.nii.gz", (data > 0).astype(np.uint8), nib.load(str(img)).affine)
    out = LoadImageCheckedd(spatial_dims=3)({"image": str(img), "mask": str(mask), "label": None, "subject_id": "s"})
    assert out["label"] is None and out["subject_id"] == "s"
    # the mask went through the same reorientation as the image
    np.testing.assert_array_equal(out["mask"][0].numpy() > 0, out["image"][0].numpy() > 0)


def test_loadd_mask_shape_mismatch_names_the_mask(tmp_path):
    img, _ = _lps_volume(tmp_path, "img.nii.gz", shape=(12, 10, 8))
    mask = _save(tmp_path / "brainmask.nii.gz", np.ones((12, 10, 9), np.uint8))
    with pytest.raises(AEFlowInputError, match="differs from the image shape") as info:
        LoadImageCheckedd()({"image": str(img), "mask": str(mask), "label": None})
    assert info.value.path.endswith("brainmask.nii.gz")


def test_multichannel_image_from_several_files(tmp_path):
    a, da = _lps_volume(tmp_path, "flair.nii.gz")
    b = _save(tmp_path / "t1c.nii.gz", da * 2, nib.load(str(a)).affine)
    image = load_image([a, b])
    assert tuple(image.shape) == (2, 12, 10, 8)
    torch.testing.assert_close(image[1], image[0] * 2)
    c = _save(tmp_path / "t2.nii.gz", np.zeros((3, 3, 3), np.float32))
    with pytest.raises(AEFlowInputError, match="differs from the shape"):
        load_image([a, c])


def _nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return str(path)


def test_a_mask_of_the_right_shape_on_another_grid_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    image = np.zeros((24, 20, 8), np.float32)
    image[4:20, 4:16, 1:7] = rng.random((16, 12, 6)) + 1
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    shifted = affine.copy()
    shifted[0, 3] += 50.0  # the same shape, 50 mm away
    img = _nifti(tmp_path / "img.nii.gz", image, affine)
    bad = _nifti(tmp_path / "mask_shifted.nii.gz", image > 0, shifted)
    loader = LoadImageCheckedd(keys=("image", "mask"))
    with pytest.raises(AEFlowInputError, match="not its grid") as info:
        loader({"image": img, "mask": bad})
    assert info.value.path == bad and "50 mm" in str(info.value)
    # float rounding of an affine written by another tool is the same grid
    close = _nifti(tmp_path / "mask_close.nii.gz", image > 0, affine + 1e-5)
    out = loader({"image": img, "mask": close})
    assert tuple(out["mask"].shape) == tuple(out["image"].shape)
