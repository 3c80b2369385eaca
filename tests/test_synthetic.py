"""Tests of the synthetic brain-MRI generator (monai_aeflow.data.synthetic)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from monai_aeflow.data import synthetic
from monai_aeflow.data.synthetic import (
    TISSUE_LABELS,
    SyntheticSubject,
    extract_slices,
    generate_cohort,
    make_slices,
    make_subject,
)

SMALL = (64, 64, 40)
TINY = (48, 48, 32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def flair_pair() -> tuple[SyntheticSubject, SyntheticSubject]:
    """A lesioned FLAIR subject and its healthy twin (same seed)."""
    return make_subject(3, lesion=True, shape=SMALL), make_subject(3, lesion=False, shape=SMALL)


@pytest.fixture(scope="module")
def default_subject() -> SyntheticSubject:
    return make_subject(21)


def test_same_seed_is_reproducible():
    a = make_subject(5, shape=TINY)
    b = make_subject(5, shape=TINY)
    for name in ("image", "brain_mask", "head_mask", "label", "affine", "tissue"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.subject_id == b.subject_id == "synth-seed5"
    assert a.contrast == "flair"


def test_different_seeds_differ_in_shape_and_intensity():
    a = make_subject(1, lesion=False, shape=SMALL)
    b = make_subject(2, lesion=False, shape=SMALL)
    assert not np.allclose(a.image, b.image)
    assert _dice(a.brain_mask, b.brain_mask) < 0.98
    assert _dice(a.head_mask, b.head_mask) < 0.99
    # ventricle size varies between subjects too
    va = (a.tissue == TISSUE_LABELS["ventricle"]).sum()
    vb = (b.tissue == TISSUE_LABELS["ventricle"]).sum()
    assert va > 0 and vb > 0 and va != vb


def test_dtypes_ranges_and_masks(flair_pair):
    for s in flair_pair:
        assert s.image.shape == s.brain_mask.shape == s.head_mask.shape == s.label.shape == SMALL
        assert s.image.dtype == np.float32
        assert s.brain_mask.dtype == s.head_mask.dtype == s.label.dtype == np.uint8
        assert s.affine.dtype == np.float64 and s.affine.shape == (4, 4)
        assert set(np.unique(s.brain_mask)) == {0, 1} and set(np.unique(s.head_mask)) == {0, 1}
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        assert np.all(s.image[s.head_mask == 0] == 0.0)
        # the head is imaged: almost no exact zeros inside it, and it does not touch the in-plane border
        assert (s.image[s.head_mask == 1] > 0).mean() > 0.98
        assert not s.head_mask[[0, -1]].any() and not s.head_mask[:, [0, -1]].any()
        # brain inside the head, with scalp and skull around it
        assert np.all(s.head_mask[s.brain_mask == 1] == 1)
        assert s.head_mask.sum() > 1.3 * s.brain_mask.sum()
        # the brain is a single connected region
        assert ndimage.label(s.brain_mask)[1] == 1


def test_affine_is_ras_and_centred():
    s = make_subject(0, shape=TINY, spacing=(1.2, 1.5, 2.0))
    np.testing.assert_allclose(np.diag(s.affine)[:3], (1.2, 1.5, 2.0))
    assert nib.aff2axcodes(s.affine) == ("R", "A", "S")
    centre = s.affine @ np.array([*((np.array(TINY) - 1) / 2.0), 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_healthy_and_lesioned_labels():
    for seed in range(3):
        healthy = make_subject(seed, lesion=False, shape=TINY)
        assert healthy.label.sum() == 0
        sick = make_subject(seed, lesion=True, shape=TINY)
        assert sick.label.sum() > 0
        assert np.all(sick.brain_mask[sick.label == 1] == 1)
    t1 = make_subject(7, lesion=True, shape=TINY, contrast="t1")
    assert t1.label.sum() > 0 and np.all(t1.brain_mask[t1.label == 1] == 1)


def test_lesion_changes_only_the_labelled_voxels(flair_pair):
    sick, healthy = flair_pair
    lab = sick.label.astype(bool)
    # same anatomy and acquisition: masks equal, intensities equal away from the lesions
    np.testing.assert_array_equal(sick.brain_mask, healthy.brain_mask)
    np.testing.assert_array_equal(sick.head_mask, healthy.head_mask)
    near = ndimage.binary_dilation(lab, structure=np.ones((5, 5, 5), bool))
    np.testing.assert_array_equal(sick.image[~near], healthy.image[~near])
    # every labelled voxel was changed, by a clear amount on average
    diff = sick.image[lab] - healthy.image[lab]
    assert diff.mean() > 0.2
    # lesions sit mostly in white matter of the healthy anatomy, never in the ventricles
    before = healthy.tissue[lab]
    assert (before == TISSUE_LABELS["white_matter"]).mean() > 0.5
    assert not np.any(before == TISSUE_LABELS["ventricle"])
    assert not np.any(before == TISSUE_LABELS["csf"])
    np.testing.assert_array_equal(sick.tissue == TISSUE_LABELS["lesion"], lab)


def test_flair_lesions_are_hyperintense():
    for seed in (0, 4, 9):
        s = make_subject(seed, shape=SMALL)
        lab, brain = s.label == 1, s.brain_mask == 1
        wm = s.tissue == TISSUE_LABELS["white_matter"]
        assert s.image[lab].mean() > s.image[brain & ~lab].mean() + 0.15
        assert s.image[lab].mean() > np.median(s.image[wm]) + 0.15


def test_t1_lesions_are_hypointense():
    for seed in (0, 4, 9):
        s = make_subject(seed, shape=SMALL, contrast="t1")
        lab, brain = s.label == 1, s.brain_mask == 1
        wm = s.tissue == TISSUE_LABELS["white_matter"]
        assert s.image[lab].mean() < s.image[brain & ~lab].mean() - 0.05
        assert s.image[lab].mean() < np.median(s.image[wm]) - 0.2


def test_lesion_polarity_option():
    hypo = make_subject(4, shape=TINY, contrast="flair", lesion_polarity="hypo")
    wm = hypo.tissue == TISSUE_LABELS["white_matter"]
    assert hypo.image[hypo.label == 1].mean() < np.median(hypo.image[wm]) - 0.1
    mixed = make_subject(4, shape=TINY, lesion_polarity="mixed", n_lesions=(3, 3))
    assert mixed.label.sum() > 0
    with pytest.raises(ValueError):
        make_subject(4, shape=TINY, lesion_polarity="bright")
    with pytest.raises(ValueError):
        make_subject(4, shape=TINY, contrast="t2")
    with pytest.raises(ValueError):
        make_subject(4, shape=TINY, n_lesions=(3, 1))


def test_flair_and_t1_tissue_contrast():
    flair = make_subject(6, lesion=False, shape=SMALL, contrast="flair")
    t1 = make_subject(6, lesion=False, shape=SMALL, contrast="t1")
    np.testing.assert_array_equal(flair.brain_mask, t1.brain_mask)  # same anatomy, other contrast

    def means(s):
        return {k: float(s.image[s.tissue == v].mean()) for k, v in TISSUE_LABELS.items() if v > 0 and v < 9}

    f, t = means(flair), means(t1)
    assert f["ventricle"] < f["white_matter"] - 0.2 and f["csf"] < f["white_matter"] - 0.15
    assert f["grey_matter"] > f["white_matter"] + 0.03
    assert 0.4 < f["white_matter"] < 0.6
    assert t["white_matter"] > t["grey_matter"] + 0.2 > t["csf"] + 0.2
    assert f["skull"] < f["scalp"] - 0.3
    # independent of the tissue map: ventricles near the centre of the brain show as the darkest brain voxels
    mid = flair.image.shape[2] // 2
    brain_slice = flair.image[:, :, mid][flair.brain_mask[:, :, mid] == 1]
    assert np.percentile(brain_slice, 2) < 0.3 < np.median(brain_slice)


def test_at_least_one_large_lesion(default_subject):
    parts, n = ndimage.label(default_subject.label)
    assert n >= 1
    largest = np.bincount(parts.ravel())[1:].max()
    # a lesion of radius >= 6 voxels, allowing for its irregular shape and the cut-off by sulci
    assert largest >= 0.5 * 4.0 / 3.0 * np.pi * 6**3


def test_anatomy_scales_with_the_grid(default_subject):
    small = make_subject(21, shape=SMALL)
    zoomed = ndimage.zoom(small.brain_mask, 2, order=0)
    assert _dice(zoomed, default_subject.brain_mask) > 0.9


def test_brain_area_smaller_at_top_and_bottom(default_subject):
    area = default_subject.brain_mask.sum(axis=(0, 1))
    top = np.flatnonzero(area)[[0, -1]]
    assert area[top[0]] < 0.5 * area.max() and area[top[1]] < 0.5 * area.max()
    assert area[0] == 0 or area[0] < area.max()


def test_generate_cohort_files(tmp_path: Path):
    out = tmp_path / "cohort"
    records = generate_cohort(out, n_healthy=2, n_lesion=2, seed=3, shape=TINY, spacing=(1.5, 1.5, 1.5))
    assert [r["subject_id"] for r in records] == [f"synth-{i:03d}" for i in range(4)]
    assert [r["healthy"] for r in records] == [True, True, False, False]

    expected_files = {"cohort.csv"}
    for index, rec in enumerate(records):
        subject = make_subject(synthetic._subject_seed(3, index), lesion=not rec["healthy"], shape=TINY)
        for key, suffix in (
            ("image", "image"),
            ("brain_mask", "brainmask"),
            ("head_mask", "headmask"),
            ("label", "label"),
        ):
            path = Path(rec[key])
            assert path.is_absolute() and path.name == f"{rec['subject_id']}_{suffix}.nii.gz"
            expected_files.add(path.name)
            img = nib.load(path)
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            np.testing.assert_allclose(img.header.get_zooms()[:3], (1.5, 1.5, 1.5))
            np.testing.assert_allclose(img.affine, subject.affine, atol=1e-5)
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            data = np.asarray(img.dataobj)
            reference = getattr(subject, key)
            assert data.dtype == (np.float32 if key == "image" else np.uint8)
            np.testing.assert_allclose(data, reference, atol=1e-6)
        assert (subject.label.sum() == 0) == rec["healthy"]

    # nothing else in the folder: no temporary files left behind
    assert {p.name for p in out.iterdir()} == expected_files

    with open(out / "cohort.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["subject_id", "image", "brain_mask", "head_mask", "label", "healthy", "contrast"]
    assert len(rows) == len(records)
    for row, rec in zip(rows, records, strict=True):
        assert row["subject_id"] == rec["subject_id"]
        assert bool(int(row["healthy"])) == rec["healthy"]
        assert row["contrast"] == "flair"
        for key in ("image", "brain_mask", "head_mask", "label"):
            assert not Path(row[key]).is_absolute()
            assert (out / row[key]).resolve() == Path(rec[key])


def test_generate_cohort_is_reproducible_and_atomic(tmp_path: Path, monkeypatch):
    a = generate_cohort(tmp_path / "a", n_healthy=1, n_lesion=1, seed=8, shape=TINY)
    b = generate_cohort(tmp_path / "b", n_healthy=1, n_lesion=1, seed=8, shape=TINY)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(nib.load(ra["image"]).get_fdata(), nib.load(rb["image"]).get_fdata())

    # a write that dies half-way leaves neither a truncated target nor a temporary file
    real_save = nib.save

    def failing_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        generate_cohort(tmp_path / "c", n_healthy=1, n_lesion=0, shape=TINY)
    assert list((tmp_path / "c").iterdir()) == []
    monkeypatch.setattr(synthetic.nib, "save", real_save)


def test_extract_slices_matches_direct_computation():
    subjects = [make_subject(s, lesion=s == 1, shape=TINY) for s in (0, 1)]
    frac = 0.3
    out = extract_slices(subjects, min_brain_fraction=frac)
    n = out["image"].shape[0]
    assert out["image"].shape == (n, 1, *TINY[:2]) and out["image"].dtype == np.float32
    assert out["label"].shape == out["brain_mask"].shape == (n, 1, *TINY[:2])
    assert out["label"].dtype == out["brain_mask"].dtype == np.uint8
    for key in ("slice_label", "subject_index", "slice_index"):
        assert out[key].shape == (n,) and out[key].dtype == np.int64

    expected = []
    for i, s in enumerate(subjects):
        areas = [int(np.count_nonzero(s.brain_mask[:, :, z])) for z in range(s.brain_mask.shape[2])]
        expected += [(i, z) for z, a in enumerate(areas) if a >= frac * max(areas)]
        # the criterion drops some slices at the top and bottom of the head
        assert 0 < sum(a >= frac * max(areas) for a in areas) < len(areas)
    assert list(zip(out["subject_index"].tolist(), out["slice_index"].tolist(), strict=True)) == expected

    for k in range(n):
        s, z = subjects[out["subject_index"][k]], out["slice_index"][k]
        np.testing.assert_array_equal(out["image"][k, 0], s.image[:, :, z])
        np.testing.assert_array_equal(out["label"][k, 0], s.label[:, :, z])
        np.testing.assert_array_equal(out["brain_mask"][k, 0], s.brain_mask[:, :, z])
        assert out["slice_label"][k] == int(s.label[:, :, z].any())
    assert out["slice_label"][out["subject_index"] == 0].sum() == 0
    assert out["slice_label"][out["subject_index"] == 1].sum() > 0

    everything = extract_slices(subjects, min_brain_fraction=0.0)
    assert everything["image"].shape[0] == sum(s.image.shape[2] for s in subjects)


def test_make_slices():
    healthy = make_slices(2, lesion=False, seed=1, shape=TINY)
    sick = make_slices(2, lesion=True, seed=1, shape=TINY, min_brain_fraction=0.5)
    assert healthy["label"].sum() == 0 and healthy["slice_label"].sum() == 0
    assert sick["slice_label"].sum() > 0
    assert set(healthy["subject_index"].tolist()) == set(sick["subject_index"].tolist()) == {0, 1}
    # healthy and lesioned sets of the same seed are different subjects
    assert not np.array_equal(healthy["brain_mask"][:5], sick["brain_mask"][:5])
    again = make_slices(2, lesion=False, seed=1, shape=TINY)
    np.testing.assert_array_equal(healthy["image"], again["image"])
    t1 = make_slices(1, lesion=True, seed=1, shape=TINY, contrast="t1")
    assert t1["image"].shape[1:] == (1, *TINY[:2])
