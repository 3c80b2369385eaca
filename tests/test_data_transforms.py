"""Preprocessing transforms: brain mask, percentile scaling, resampling, smoothing, crop/pad, pipelines."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from PIL import Image

from monai_aeflow.data.transforms import (
    BinarizeLabeld,
    BrainMaskd,
    CropOrPadInPlaned,
    CurvatureFlowd,
    ResampleToSpacingd,
    ScaleIntensityInMaskd,
    build_image_preprocessing,
    build_volume_preprocessing,
    percentile_scale,
)
from monai_aeflow.errors import AEFlowInputError


def _phantom(shape=(40, 44, 20), seed=0):
    """Raw int16-like head: background 0, CSF/GM/WM classes with increasing intensity, plus noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(x**2 + y**2 + (z * 0.9) ** 2)
    tissue = np.zeros(shape, np.int64)
    tissue[r < 0.9] = 1  # CSF
    tissue[r < 0.75] = 2  # GM
    tissue[r < 0.5] = 3  # WM
    means = np.array([0.0, 150.0, 400.0, 700.0])
    raw = means[tissue] + rng.normal(0, 30, shape) * (tissue > 0)
    return np.clip(raw, 1, None).astype(np.int16) * (tissue > 0), tissue


def _meta(array, spacing=(1.0, 1.0, 1.0)):
    affine = np.diag([*spacing, 1.0])
    return MetaTensor(torch.as_tensor(np.asarray(array), dtype=torch.float32)[None], affine=torch.as_tensor(affine))


def test_percentile_scale_matches_torch_quantile():
    rng = np.random.default_rng(3)
    image = rng.gamma(2.0, 100.0, size=(30, 31, 12)).astype(np.float32)
    mask = rng.random(image.shape) > 0.4
    out = percentile_scale(image, mask, 1.0, 99.0)
    inside = torch.as_tensor(image[mask], dtype=torch.float64)
    lo, hi = torch.quantile(inside, torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
    expected = np.where(mask, np.clip((image - lo) / (hi - lo), 0, 1), 0)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.dtype == np.float32
    # exactly 1% of brain voxels are at 0 or below the lower percentile, 1% at 1
    assert abs((out[mask] <= 0).mean() - 0.01) < 2e-3 and abs((out[mask] >= 1).mean() - 0.01) < 2e-3


def test_raw_and_zscored_volumes_give_the_same_scaled_image_with_contrast():
    raw, tissue = _phantom()
    brain = tissue > 0
    values = raw[brain].astype(np.float64)
    zscored = np.full(raw.shape, -1.7, np.float32)  # BraTS-like: background is not 0 after z-scoring
    zscored[brain] = (values - values.mean()) / values.std()
    scale = ScaleIntensityInMaskd("image", "mask")
    mask = _meta(brain.astype(np.uint8))
    a = scale({"image": _meta(raw), "mask": mask})["image"][0].numpy()
    b = scale({"image": _meta(zscored), "mask": mask})["image"][0].numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.min() == 0.0 and a.max() == 1.0
    assert np.all(a[~brain] == 0)
    csf, gm, wm = (a[tissue == k].mean() for k in (1, 2, 3))
    assert 0.05 < csf < gm < wm < 0.95 and gm - csf > 0.2 and wm - gm > 0.2


def test_zscored_without_mask_file_uses_minimum_as_background():
    raw, tissue = _phantom()
    z = np.where(tissue > 0, (raw - 300.0) / 200.0, -1.5).astype(np.float32)
    d = BrainMaskd(background="min")({"image": _meta(z), "mask": None})
    np.testing.assert_array_equal(d["mask"][0].numpy() > 0, tissue > 0)
    auto = BrainMaskd()({"image": _meta(z), "mask": None})  # default "auto" finds the shifted background
    np.testing.assert_array_equal(auto["mask"][0].numpy() > 0, tissue > 0)
    # with a zero background the whole field of view would be "brain"
    d0 = BrainMaskd(background=0.0)({"image": _meta(z), "mask": None})
    assert (d0["mask"][0].numpy() > 0).all()


def test_auto_background_keeps_zero_for_raw_volumes_with_negative_voxels():
    raw, tissue = _phantom()
    shifted = raw.astype(np.float32)
    shifted[20, 22, 10] = -19.5  # interpolation undershoot inside the brain: not the background
    d = BrainMaskd()({"image": _meta(shifted), "mask": None})
    np.testing.assert_array_equal(d["mask"][0].numpy() > 0, tissue > 0)
    with pytest.raises(AEFlowInputError, match="background must be"):
        BrainMaskd(background="mode")


def test_brain_mask_from_file_threshold_and_erosion():
    raw, tissue = _phantom()
    probabilistic = np.where(tissue > 0, 0.9999, 0.3)
    d = BrainMaskd(erosion_iterations=1)({"image": _meta(raw), "mask": _meta(probabilistic)})
    mask = d["mask"]
    assert mask.dtype == torch.uint8 and isinstance(mask, MetaTensor)
    brain = np.pad(tissue > 0, 1)
    expected = brain.copy()
    for axis in range(3):  # 6-connected erosion written out with shifts
        for shift in (-1, 1):
            expected &= np.roll(brain, shift, axis=axis)
    np.testing.assert_array_equal(mask[0].numpy() > 0, expected[1:-1, 1:-1, 1:-1])


def test_brain_mask_errors_name_the_files():
    raw, _ = _phantom()
    image = _meta(raw)
    image.meta["filename_or_obj"] = "/data/sub-01_T1w.nii.gz"
    with pytest.raises(AEFlowInputError, match="no brain voxels") as info:
        BrainMaskd()({"image": _meta(np.zeros((5, 5, 5))), "mask": None})
    empty = _meta(np.zeros(raw.shape))
    empty.meta["filename_or_obj"] = "/data/empty_mask.nii.gz"
    with pytest.raises(AEFlowInputError, match="empty_mask.nii.gz") as info:
        BrainMaskd()({"image": image, "mask": empty})
    assert info.value.path == "/data/sub-01_T1w.nii.gz"
    wrong = _meta(np.ones((3, 3, 3)))
    wrong.meta["filename_or_obj"] = "/data/other_mask.nii.gz"
    with pytest.raises(AEFlowInputError, match="differs from the image shape") as info:
        BrainMaskd()({"image": image, "mask": wrong})
    assert info.value.path == "/data/other_mask.nii.gz"


def test_pipeline_raises_input_errors_unwrapped(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "blank.nii.gz"))
    preprocess = build_volume_preprocessing(spatial_size=(16, 16))
    with pytest.raises(AEFlowInputError, match="no brain voxels") as info:
        preprocess({"image": str(tmp_path / "blank.nii.gz"), "mask": None, "label": None})
    assert info.value.path == str(tmp_path / "blank.nii.gz")
    with pytest.raises(AEFlowInputError, match="file not found") as info:
        preprocess({"image": str(tmp_path / "gone.nii.gz"), "mask": None, "label": None})
    assert info.value.path == str(tmp_path / "gone.nii.gz")


def test_constant_brain_is_an_error():
    with pytest.raises(AEFlowInputError, match="constant"):
        ScaleIntensityInMaskd()({"image": _meta(np.ones((4, 4, 4))), "mask": _meta(np.ones((4, 4, 4)))})


def test_crop_pad_keeps_slices_and_centres_the_brain():
    shape = (300, 200, 7)
    image = np.zeros(shape, np.float32)
    image[200:290, 50:150, :] = np.arange(7, dtype=np.float32) + 1  # off-centre "brain"
    mask = (image > 0).astype(np.uint8)
    t = CropOrPadInPlaned(spatial_size=(128, 256))
    d = t({"image": _meta(image), "mask": _meta(mask), "label": None})
    assert tuple(d["image"].shape) == (1, 128, 256, 7)
    assert d["label"] is None
    # every brain voxel survived, every slice kept its index
    assert d["mask"].sum() == mask.sum()
    for k in range(7):
        assert torch.all(d["image"][0, ..., k][d["mask"][0, ..., k] > 0] == k + 1)
    # padding along y: 28 columns before the original 200
    assert d["mask"][0, :, :28].sum() == 0 and d["mask"][0, :, 28 + 50].sum() > 0
    back = t.inverse(d)
    assert tuple(back["image"].shape) == (1, *shape)
    np.testing.assert_array_equal(back["image"][0].numpy(), image)


def test_crop_warns_when_the_brain_is_wider_than_the_window():
    mask = np.zeros((80, 40, 3), np.uint8)
    mask[5:75, 10:30] = 1
    image = _meta(mask * 5.0)
    image.meta["filename_or_obj"] = "/data/big_brain.nii.gz"
    with pytest.warns(UserWarning, match="big_brain.nii.gz: the brain extends over 70 voxels"):
        out = CropOrPadInPlaned(spatial_size=(64, 64))({"image": image, "mask": _meta(mask)})
    assert tuple(out["image"].shape) == (1, 64, 64, 3)


def test_crop_pad_size_must_be_divisible_by_16():
    with pytest.raises(AEFlowInputError, match="multiples of 16"):
        CropOrPadInPlaned(spatial_size=(250, 256))


def test_resample_to_1mm():
    raw, tissue = _phantom(shape=(20, 22, 10))
    d = {"image": _meta(raw, (2.0, 2.0, 2.0)), "mask": _meta(tissue > 0, (2, 2, 2)), "label": None}
    d["mask"] = d["mask"].to(torch.uint8)
    out = ResampleToSpacingd(pixdim=1.0)(d)
    assert tuple(out["image"].shape[1:]) == (39, 43, 19)
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [1, 1, 1])
    assert out["mask"].dtype == torch.uint8 and set(torch.unique(out["mask"]).tolist()) == {0, 1}
    assert out["label"] is None
    # nearest-neighbour mask: even output voxels sit on input voxels
    np.testing.assert_array_equal(out["mask"][0, ::2, ::2, ::2].numpy(), (tissue > 0).astype(np.uint8))


def test_curvature_flow_smooths_noise_and_keeps_the_edge():
    rng = np.random.default_rng(5)
    clean = np.zeros((24, 24, 24), np.float32)
    clean[12:] = 100.0
    noisy = clean + rng.normal(0, 10, clean.shape).astype(np.float32)
    out = CurvatureFlowd(iterations=10, time_step=0.0625)({"image": _meta(noisy)})["image"][0].numpy()
    flat = (slice(2, 9), slice(2, 22), slice(2, 22))
    assert out[flat].std() < 0.6 * noisy[flat].std()
    step = out[14:22].mean() - out[2:10].mean()
    assert step > 90.0


def test_binarize_label():
    lab = _meta(np.array([0, 1, 2, 4, 0, 3], np.float32).reshape(1, 2, 3))
    out = BinarizeLabeld()({"label": lab})["label"]
    assert out.dtype == torch.uint8
    assert out.flatten().tolist() == [0, 1, 1, 1, 0, 1]
    assert BinarizeLabeld()({"label": None})["label"] is None


def test_volume_pipeline_end_to_end_and_inverse(tmp_path):
    raw, tissue = _phantom(shape=(40, 44, 20))
    affine = np.diag([-1.2, -1.0, 1.5, 1.0])  # LPS storage
    nib.save(nib.Nifti1Image(raw, affine), str(tmp_path / "t1.nii.gz"))
    label = np.zeros(raw.shape, np.uint8)
    label[15:20, 18:24, 8:11] = 2  # a multi-class lesion label
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "seg.nii.gz"))
    preprocess = build_volume_preprocessing(spatial_size=(64, 64))
    record = {"image": str(tmp_path / "t1.nii.gz"), "mask": None, "label": str(tmp_path / "seg.nii.gz")}
    out = preprocess(dict(record, subject_id="s1"))
    assert out["subject_id"] == "s1"
    assert tuple(out["image"].shape) == (1, 64, 64, 20)
    assert out["image"].dtype == torch.float32 and 0 <= out["image"].min() and out["image"].max() == 1
    assert out["label"].dtype == torch.uint8 and int(out["label"].sum()) == int((label > 0).sum())
    assert int(out["mask"].sum()) == int((raw != 0).sum())
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [1.2, 1.0, 1.5], atol=1e-6)
    # a map computed on the preprocessed volume goes back to the input's voxel grid
    inverted = Invertd(keys="label", transform=preprocess, orig_keys="label")(out)
    assert tuple(inverted["label"].shape) == (1, 40, 44, 20)
    np.testing.assert_array_equal(inverted["label"][0].numpy() > 0, label > 0)


def test_volume_pipeline_with_resampling_and_smoothing(tmp_path):
    raw, _ = _phantom(shape=(20, 22, 10))
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(raw, affine), str(tmp_path / "v.nii.gz"))
    label = np.zeros(raw.shape, np.uint8)
    label[6:9, 6:9, 3:5] = 1
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "l.nii.gz"))
    preprocess = build_volume_preprocessing(spatial_size=(48, 48), spacing=1.0, smoothing=True, smoothing_iterations=2)
    out = preprocess({"image": str(tmp_path / "v.nii.gz"), "mask": None, "label": str(tmp_path / "l.nii.gz")})
    assert tuple(out["image"].shape) == (1, 48, 48, 19)
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [1, 1, 1])
    assert float(out["image"].min()) == 0.0 and float(out["image"].max()) == 1.0
    # back through crop/pad, resampling and reorientation to the stored 2 mm LPS grid
    out["pred"] = out["label"].float()
    back = Invertd(keys="pred", transform=preprocess, orig_keys="label")(out)["pred"]
    assert tuple(back.shape) == (1, 20, 22, 10)
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-5)
    np.testing.assert_array_equal(back[0].numpy() > 0.5, label > 0)


def test_image_pipeline_2d(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(300, 200), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    out = build_image_preprocessing()({"image": str(tmp_path / "x.png"), "mask": None, "label": 1})
    assert tuple(out["image"].shape) == (1, 256, 256)
    assert tuple(out["mask"].shape) == (1, 256, 256) and int(out["mask"].min()) == 1
    assert out["label"] == 1
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0


def test_pipelines_and_smoothing_keep_their_old_import_path():
    """The pipelines moved to data/preprocessing.py and CurvatureFlowd to data/smoothing.py: old paths still work."""
    import monai_aeflow.data.transforms as transforms
    from monai_aeflow.data import preprocessing, smoothing

    for name in ("PreprocessingCompose", "build_volume_preprocessing", "build_image_preprocessing"):
        assert getattr(transforms, name) is getattr(preprocessing, name)
    assert transforms.CurvatureFlowd is smoothing.CurvatureFlowd
    with pytest.raises(AttributeError):
        transforms.no_such_name  # noqa: B018
