"""The package's resampling/resizing/padding transforms against the MONAI transforms they mirror.

``ResampleToSpacingd`` is MONAI ``Spacingd`` (bilinear image, nearest masks), ``ResizeImaged`` is ``Resized``
(anti-aliased bilinear image, nearest masks) and ``pad_to_multiple`` is ``DivisiblePad(k, method="symmetric")``.
Each is checked on synthetic data and on the real scans of ../shared/data (skipped when absent): values,
shapes, affines, and the inverse where the transform is invertible (``Invertd``, as inference/scorer.py uses
it). The package transforms differ from plain MONAI only where the pipelines rely on it: ``None`` values pass
through, masks keep their dtype (MONAI returns float32), and ``ResizeImaged`` skips non-tensor values (an
integer image-level label), validates multiples of 16 and clamps the image to [0, 1].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import DivisiblePad, Invertd, Resized, Spacingd

from monai_aeflow.data.io import LoadImageCheckedd
from monai_aeflow.data.transforms import (
    BinarizeLabeld,
    BrainMaskd,
    PreprocessingCompose,
    ResampleToSpacingd,
    ResizeImaged,
    ScaleIntensityInMaskd,
)
from monai_aeflow.inference.volume import pad_to_multiple

ATOL = 1e-5


def _meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(affine, dtype=torch.float64))


def _diff(ours: torch.Tensor, plain: torch.Tensor) -> float:
    """Asserts equal shapes and affines; returns the largest absolute value difference."""
    assert tuple(ours.shape) == tuple(plain.shape)
    np.testing.assert_allclose(ours.affine.numpy(), plain.affine.numpy(), atol=1e-6)
    return float((ours.float() - plain.float()).abs().max())


def _invert(transform, out: dict, key: str = "image") -> MetaTensor:
    """Invert a map carrying ``out[key]``'s trace with ``Invertd``, as AnomalyScorer does."""
    amap = MetaTensor(out[key].as_tensor().float().clone(), meta=dict(out[key].meta))
    amap.applied_operations = list(out[key].applied_operations)
    invert = Invertd("amap", transform=transform, orig_keys=key, nearest_interp=False)
    return invert({"amap": amap, key: out[key]})["amap"]


def _compare_resample(d: dict, keys: tuple, pixdim) -> float:
    """Largest difference between ResampleToSpacingd and plain Spacingd, forward and through Invertd."""
    ours_t = ResampleToSpacingd(keys, pixdim=pixdim)
    present = tuple(k for k in keys if d.get(k) is not None)
    modes = tuple("bilinear" if k == "image" else "nearest" for k in present)
    plain_t = Spacingd(present, pixdim=pixdim, mode=modes, padding_mode="zeros")
    ours, plain = ours_t(d), plain_t({k: d[k] for k in present})
    worst = 0.0
    for key in keys:
        if d.get(key) is None:
            assert ours[key] is None
            continue
        worst = max(worst, _diff(ours[key], plain[key]))
        assert plain[key].dtype == torch.float32  # Spacingd: float32 masks
        assert ours[key].dtype == (torch.float32 if key == "image" else d[key].dtype)
    back_ours, back_plain = _invert(ours_t, ours), _invert(plain_t, plain)
    assert tuple(back_ours.shape) == tuple(d["image"].shape)
    np.testing.assert_allclose(back_ours.affine.numpy(), d["image"].affine.numpy(), atol=1e-5)
    return max(worst, _diff(back_ours, back_plain))


def test_resample_matches_spacingd_synthetic():
    rng = np.random.default_rng(0)
    affine = np.diag([0.9, 1.3, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 7.5)
    image = rng.normal(size=(23, 17, 11)).astype(np.float32)
    mask = (rng.random((23, 17, 11)) > 0.4).astype(np.uint8)
    d = {"image": _meta(image, affine), "mask": _meta(mask, affine), "label": None}
    for pixdim in (1.0, (1.5, 0.7, 2.0)):
        assert _compare_resample(d, ("image", "mask", "label"), pixdim) <= ATOL


def _load_volume(image: str, mask: str | None = None, label: str | None = None) -> dict:
    keys = ("image", "mask", "label")
    load = PreprocessingCompose(
        [LoadImageCheckedd(keys, image_key="image", orientation="RAS", spatial_dims=3), BrainMaskd(), BinarizeLabeld()]
    )
    return load({"image": image, "mask": mask, "label": label})


def test_resample_matches_spacingd_on_real_scans(shared_data):
    ixi, brats = shared_data / "ixi_healthy", shared_data / "brats2015_dev" / "brats_2013_pat0003_1"
    cases = [
        # anisotropic 0.94 x 0.94 x 1.25 mm T2 with its HD-BET mask, to 1 mm
        (
            _load_volume(
                str(ixi / "hd_bet_IXI002-Guys-0828-T2.nii.gz"), str(ixi / "hd_bet_mask_IXI002-Guys-0828-T2.nii.gz")
            ),
            1.0,
        ),
        # 2 mm raw T1 (mask from the nonzero voxels), to 1.5 mm
        (_load_volume(str(ixi / "IXI012-HH-1211_T1.nii.gz")), 1.5),
        # BraTS FLAIR with brain mask and lesion label, 1 mm to 1.5 x 1.5 x 2 mm
        (
            _load_volume(
                str(brats / "Flair_subtrMeanDivStd.nii.gz"),
                str(brats / "brainmask.nii.gz"),
                str(brats / "OTMultiClass.nii.gz"),
            ),
            (1.5, 1.5, 2.0),
        ),
    ]
    for d, pixdim in cases:
        assert _compare_resample(d, ("image", "mask", "label"), pixdim) <= ATOL


def _compare_resize(d: dict, size=(256, 256)) -> float:
    ours = ResizeImaged(("image", "mask"), size)(d)
    plain = Resized(("image", "mask"), size, mode=("bilinear", "nearest"), anti_aliasing=(True, False))(
        {"image": d["image"], "mask": d["mask"]}
    )
    assert ours["mask"].dtype == d["mask"].dtype and plain["mask"].dtype == torch.float32
    # ResizeImaged clamps to [0, 1]: the clamp changes nothing on [0, 1] input (anti-aliasing and bilinear
    # interpolation are convex combinations)
    assert float(plain["image"].min()) >= 0.0 and float(plain["image"].max()) <= 1.0
    return max(_diff(ours[k], plain[k]) for k in ("image", "mask"))


def test_resize_matches_resized_synthetic():
    rng = np.random.default_rng(1)
    for shape in ((300, 200), (97, 131), (256, 256), (64, 500)):
        image = rng.random(shape, dtype=np.float32)
        mask = (rng.random(shape) > 0.3).astype(np.uint8)
        d = {"image": _meta(image, np.eye(4)), "mask": _meta(mask, np.eye(4)), "label": 1}
        assert _compare_resize(d) <= ATOL
        assert ResizeImaged(("image", "mask", "label"))(d)["label"] == 1  # non-tensor values pass through


def test_resize_matches_resized_on_real_chest_xrays(shared_data):
    keys = ("image", "mask")
    load = PreprocessingCompose(
        [
            LoadImageCheckedd(keys, image_key="image", spatial_dims=2, grayscale=True),
            BrainMaskd(background=None),
            ScaleIntensityInMaskd(),
        ]
    )
    files = sorted((shared_data / "cxr_2d").glob("*/*.png"))
    assert files
    for path in files:
        assert _compare_resize(load({"image": str(path), "mask": None})) <= ATOL


def _compare_pad(x: torch.Tensor, k: int) -> None:
    """pad_to_multiple equals DivisiblePad(symmetric) on (N, C, H, W) (the batch axis as channel), and its
    returned widths undo it as DivisiblePad.inverse does."""
    ours, (left, right, top, bottom) = pad_to_multiple(x, k)
    padder = DivisiblePad((1, k, k), method="symmetric")
    plain = padder(x)
    assert torch.equal(ours, plain.as_tensor())
    h, w = ours.shape[-2:]
    assert torch.equal(ours[..., top : h - bottom, left : w - right], x)
    assert torch.equal(padder.inverse(plain).as_tensor(), x)


def test_pad_matches_divisible_pad_synthetic():
    for h in (1, 15, 16, 17, 31, 33, 240, 255):
        for w in (1, 17, 32, 47, 421):
            x = torch.rand(3, 2, h, w)
            for k in (16, 32):
                _compare_pad(x, k)


def test_pad_matches_divisible_pad_on_real_scans(shared_data):
    brats = shared_data / "brats2015_dev" / "brats_2013_pat0003_1" / "Flair_subtrMeanDivStd.nii.gz"
    vol = _load_volume(str(brats))["image"].as_tensor()  # 240 x 240 axial slices
    _compare_pad(vol[..., 60:68].permute(3, 0, 1, 2), 16)
    _compare_pad(vol[..., 60:68].permute(3, 0, 1, 2)[..., 1:, 3:], 32)  # odd totals
    load = LoadImageCheckedd("image", image_key="image", spatial_dims=2, grayscale=True)
    for path in sorted((shared_data / "cxr_2d").glob("*/*.png"))[:6]:  # 512 x 297..460: odd totals
        _compare_pad(load({"image": str(path)})["image"].as_tensor()[None].float(), 16)


@pytest.mark.parametrize("k", [16, 32])
def test_pad_split_for_odd_totals(k):
    x = torch.ones(1, 1, k + 1, k - 3)
    _, pad = pad_to_multiple(x, k)
    # left/top get floor(total / 2), right/bottom the rest, in both implementations
    assert pad == (1, 2, (k - 1) // 2, k - 1 - (k - 1) // 2)
    widths = DivisiblePad((1, k, k), method="symmetric").compute_pad_width(x.shape[1:])
    assert [tuple(int(v) for v in w) for w in widths[2:]] == [(pad[2], pad[3]), (pad[0], pad[1])]
