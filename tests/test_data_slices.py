"""Axial slice selection and the cached slice dataset."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, Transform

from monai_aeflow.data.slices import SliceDataset, extract_slice, make_slice_dataset, select_slices
from monai_aeflow.data.transforms import build_volume_preprocessing
from monai_aeflow.errors import AEFlowInputError


def _ellipsoid(shape=(32, 32, 24)):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return (x**2 + y**2 + (z * 1.1) ** 2) < 1.0


def _expected(mask, label, fraction, healthy_only):
    """Slice selection written as a plain loop."""
    areas = [int(mask[:, :, k].sum()) for k in range(mask.shape[2])]
    largest = max(areas)
    kept = []
    for k, area in enumerate(areas):
        if area == 0 or area < fraction * largest:
            continue
        if healthy_only and label is not None and label[:, :, k].any():
            continue
        kept.append(k)
    return kept


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9])
def test_select_slices_matches_a_loop(fraction):
    mask = _ellipsoid()
    label = np.zeros_like(mask)
    label[10:14, 12:16, 9:13] = True
    for healthy in (False, True):
        got = select_slices(mask[None], label[None], fraction, healthy).tolist()
        assert got == _expected(mask, label, fraction, healthy)
    assert len(select_slices(mask, None, 0.0)) == 20  # slices 2..21 of 24 hold brain (|z| < 1/1.1)
    assert len(select_slices(mask, label, 0.0, healthy_only=True)) == 16  # minus slices 9..12


def test_select_slices_errors():
    with pytest.raises(AEFlowInputError, match="min_area_fraction"):
        select_slices(np.ones((2, 2, 2)), min_area_fraction=1.5)
    with pytest.raises(AEFlowInputError, match="label shape"):
        select_slices(np.ones((2, 2, 2)), np.ones((2, 2, 3)), healthy_only=True)


def _volume(subject, seed, lesion=True):
    rng = np.random.default_rng(seed)
    mask = _ellipsoid()
    image = (rng.random(mask.shape) * mask).astype(np.float32)
    label = np.zeros(mask.shape, np.uint8)
    if lesion:
        label[12:18, 12:18, 10:15] = 1
    return {
        "image": torch.from_numpy(image)[None],
        "mask": torch.from_numpy(mask.astype(np.uint8))[None],
        "label": torch.from_numpy(label)[None] if lesion else None,
        "subject_id": subject,
        "modality": "t1",
    }


def test_slice_dataset_items_link_back_to_volumes():
    volumes = [_volume("a", 0), _volume("b", 1, lesion=False)]
    ds = SliceDataset(volumes, min_area_fraction=0.3)
    per_volume = ds.slices_per_volume()
    assert per_volume[0] == _expected(volumes[0]["mask"][0].numpy(), None, 0.3, False)
    assert len(ds) == sum(len(p) for p in per_volume)
    for i in (0, len(per_volume[0]) + 3, -1):
        item = ds[i]
        v, z = ds.index[i]
        assert item["volume_index"] == v and item["slice_index"] == z
        assert item["subject_id"] == volumes[v]["subject_id"] and item["modality"] == "t1"
        torch.testing.assert_close(item["image"], volumes[v]["image"][..., z])
        assert item["image"].shape == (1, 32, 32) and item["label"].dtype == torch.float32
        assert item["image"].untyped_storage().nbytes() == 32 * 32 * 4  # a copy, not a view of the volume
    lesion_slices = {z for z in per_volume[0] if volumes[0]["label"][..., z].any()}
    assert lesion_slices == set(range(10, 15))
    assert [ds[i]["slice_label"] for i in range(len(per_volume[0]))] == [int(z in lesion_slices) for z in per_volume[0]]
    with pytest.raises(IndexError):
        ds[len(ds)]

    train = SliceDataset(volumes, min_area_fraction=0.3, healthy_only=True)
    assert train.slices_per_volume()[0] == [z for z in per_volume[0] if z not in lesion_slices]
    assert train.slices_per_volume()[1] == per_volume[1]  # no label: every brain slice is healthy
    assert all(train[i]["label"].sum() == 0 for i in range(len(train)))


def test_slice_dataset_requires_a_mask():
    volume = _volume("a", 0)
    volume["mask"] = None
    with pytest.raises(AEFlowInputError, match="no brain mask"):
        SliceDataset([volume])


class _CountCalls(Transform):
    """Counts how many volumes went through the preprocessing."""

    calls = 0

    def __call__(self, data):
        type(self).calls += 1
        return data


def _write_cohort(tmp_path, n=3):
    records = []
    for s in range(n):
        vol = _volume(f"sub{s}", s)
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        image = tmp_path / f"sub{s}.nii.gz"
        seg = tmp_path / f"sub{s}_seg.nii.gz"
        nib.save(nib.Nifti1Image(vol["image"][0].numpy() * 1000, affine), str(image))
        nib.save(nib.Nifti1Image(vol["label"][0].numpy(), affine), str(seg))
        records.append(
            {"image": str(image), "mask": None, "label": str(seg), "subject_id": f"sub{s}", "modality": "t1"}
        )
    return records


def _pipeline():
    return Compose([*build_volume_preprocessing(spatial_size=(32, 32)).transforms, _CountCalls()])


def test_memory_cache_preprocesses_each_volume_once(tmp_path):
    records = _write_cohort(tmp_path)
    _CountCalls.calls = 0
    ds = make_slice_dataset(records, _pipeline(), cache="memory", healthy_only=True, min_area_fraction=0.25)
    assert _CountCalls.calls == 3
    loader = DataLoader(ds, batch_size=5, shuffle=True, num_workers=0)
    for _ in range(2):
        seen = []
        for batch in loader:
            assert batch["image"].shape[1:] == (1, 32, 32)
            assert float(batch["label"].sum()) == 0.0
            seen += list(zip(batch["subject_id"], batch["slice_index"].tolist(), strict=True))
        assert sorted(seen) == sorted((f"sub{v}", z) for v, z in ds.index)
    assert _CountCalls.calls == 3  # two epochs, no volume re-read


def test_no_cache_rereads_volumes(tmp_path):
    records = _write_cohort(tmp_path, n=2)
    _CountCalls.calls = 0
    ds = make_slice_dataset(records, _pipeline(), cache="none", min_area_fraction=0.25)
    assert _CountCalls.calls == 2
    for i in (0, len(ds) - 1, 0):  # alternating volumes: each access misses the one-volume cache
        ds[i]
    assert _CountCalls.calls == 5


def test_disk_cache_survives_a_new_dataset(tmp_path):
    (tmp_path / "data").mkdir()
    records = _write_cohort(tmp_path / "data", n=2)
    _CountCalls.calls = 0
    first = make_slice_dataset(records, _pipeline(), cache="disk", cache_dir=tmp_path / "cache")
    assert _CountCalls.calls == 2
    second = make_slice_dataset(records, _pipeline(), cache="disk", cache_dir=tmp_path / "cache")
    assert _CountCalls.calls == 2  # read back from the cache files
    assert first.index == second.index
    torch.testing.assert_close(first[7]["image"], second[7]["image"])


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_bad_volume_fails_the_dataset_with_its_name(tmp_path, cache):
    records = _write_cohort(tmp_path, n=2)
    records[1]["label"] = str(tmp_path / "missing_seg.nii.gz")
    with pytest.raises(AEFlowInputError, match="file not found") as info:
        make_slice_dataset(records, _pipeline(), cache=cache)
    assert info.value.path == str(tmp_path / "missing_seg.nii.gz")


def test_extract_slice_without_label():
    volume = _volume("a", 0, lesion=False)
    item = extract_slice(volume, 12)
    assert item["label"].shape == (1, 32, 32) and float(item["label"].sum()) == 0 and item["slice_label"] == 0


def test_make_slice_dataset_options():
    with pytest.raises(AEFlowInputError, match="cache must be"):
        make_slice_dataset([], cache="ram")
    with pytest.raises(AEFlowInputError, match="cache_dir"):
        make_slice_dataset([], cache="disk")
