"""Dataset indexers on synthetic folder trees in each naming scheme, and subject-level splits."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from monai_aeflow.data.indexers import (
    index_atlas,
    index_brats,
    index_dataset,
    index_folder,
    index_image_folder_2d,
    index_ixi,
)
from monai_aeflow.data.splits import check_disjoint_subjects, read_split_csv, split_by_subject, write_split_csv
from monai_aeflow.errors import AEFlowInputError

KEYS = {"image", "mask", "label", "subject_id", "modality"}


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _nifti(path, value=1.0, shape=(6, 6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.float32), np.eye(4)), str(path))
    return path


# ---------------------------------------------------------------- BraTS


def test_brats_2015_deepmedic_layout(tmp_path):
    for case in ("brats_2013_pat0003_1", "brats_2013_pat0001_1"):
        for name in ("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd", "T1_subtrMeanDivStd", "OTMultiClass", "brainmask"):
            _touch(tmp_path / "HGG" / case / f"{name}.nii.gz")
        _touch(tmp_path / "HGG" / case / "License_CC_BY_NC_SA_3.0.txt")
    records = index_brats(tmp_path, modality="flair")
    assert [r["subject_id"] for r in records] == ["brats_2013_pat0001_1", "brats_2013_pat0003_1"]
    r = records[0]
    assert set(r) == KEYS
    assert r["image"].endswith("pat0001_1/Flair_subtrMeanDivStd.nii.gz")
    assert r["label"].endswith("OTMultiClass.nii.gz") and r["mask"].endswith("brainmask.nii.gz")
    assert r["modality"] == "flair"
    t1 = index_brats(tmp_path, modality="T1")[0]
    t1c = index_brats(tmp_path, modality="t1ce")[0]
    assert t1["image"].endswith("/T1_subtrMeanDivStd.nii.gz") and t1c["image"].endswith("/T1c_subtrMeanDivStd.nii.gz")
    with pytest.raises(AEFlowInputError, match="no t2 image") as info:
        index_brats(tmp_path, modality="t2")
    assert "brats_2013_pat0001_1" in str(info.value)


def test_brats_2015_original_release_layout(tmp_path):
    case = tmp_path / "BRATS2015_Training" / "HGG" / "brats_2013_pat0001_1"
    _touch(case / "VSD.Brain.XX.O.MR_Flair.54512" / "VSD.Brain.XX.O.MR_Flair.54512.mha")
    _touch(case / "VSD.Brain.XX.O.MR_T1c.54514" / "VSD.Brain.XX.O.MR_T1c.54514.mha")
    _touch(case / "VSD.Brain_3more.XX.O.OT.54517" / "VSD.Brain_3more.XX.O.OT.54517.mha")
    (r,) = index_brats(tmp_path, modality="flair")
    assert r["subject_id"] == "brats_2013_pat0001_1"
    assert r["image"].endswith("MR_Flair.54512.mha") and r["label"].endswith("OT.54517.mha")
    assert r["mask"] is None


def test_brats_2021_layout_and_multichannel(tmp_path):
    for case in ("BraTS2021_00002", "BraTS2021_00000"):
        for seq in ("t1", "t1ce", "t2", "flair", "seg"):
            _touch(tmp_path / case / f"{case}_{seq}.nii.gz")
    _touch(tmp_path / "BraTS2021_00009" / "BraTS2021_00009_flair.nii.gz")  # validation case: no seg
    with pytest.raises(AEFlowInputError, match="BraTS2021_00009 has no t1c"):
        index_brats(tmp_path, modality=["flair", "t1c"])
    records = index_brats(tmp_path, modality="flair")
    assert [r["subject_id"] for r in records] == ["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00009"]
    assert records[0]["label"].endswith("BraTS2021_00000_seg.nii.gz") and records[2]["label"] is None
    with pytest.raises(AEFlowInputError, match="no segmentation"):
        index_brats(tmp_path, modality="flair", require_label=True)
    (tmp_path / "BraTS2021_00009" / "BraTS2021_00009_flair.nii.gz").unlink()
    (tmp_path / "BraTS2021_00009").rmdir()
    multi = index_brats(tmp_path, modality=["flair", "t1c"])
    assert multi[0]["image"][0].endswith("_flair.nii.gz") and multi[0]["image"][1].endswith("_t1ce.nii.gz")
    assert multi[0]["modality"] == "flair+t1c"


def test_brats_2023_layout(tmp_path):
    case = "BraTS-GLI-00000-000"
    for seq in ("t1n", "t1c", "t2w", "t2f", "seg"):
        _touch(tmp_path / "ASNR-MICCAI-BraTS2023-GLI" / case / f"{case}-{seq}.nii.gz")
    (r,) = index_brats(tmp_path, modality="flair")
    assert r["subject_id"] == case and r["image"].endswith("-t2f.nii.gz") and r["label"].endswith("-seg.nii.gz")
    assert index_brats(tmp_path, modality="t1")[0]["image"].endswith("-t1n.nii.gz")
    assert index_brats(tmp_path, modality="t2")[0]["image"].endswith("-t2w.nii.gz")


def test_brats_nothing_recognised(tmp_path):
    _touch(tmp_path / "something.nii.gz")
    with pytest.raises(AEFlowInputError, match="no BraTS case recognised") as info:
        index_brats(tmp_path)
    assert info.value.path == str(tmp_path)
    with pytest.raises(AEFlowInputError, match="not found"):
        index_brats(tmp_path / "missing")
    with pytest.raises(AEFlowInputError, match="unknown MRI modality"):
        index_brats(tmp_path, modality="dwi")


# ---------------------------------------------------------------- IXI


def test_ixi_names_masks_and_sites(tmp_path):
    _touch(tmp_path / "hd_bet_IXI002-Guys-0828-T1.nii.gz")
    _touch(tmp_path / "hd_bet_mask_IXI002-Guys-0828-T1.nii.gz")
    _touch(tmp_path / "hd_bet_IXI002-Guys-0828-T2.nii.gz")
    _touch(tmp_path / "IXI012-HH-1211_T1.nii.gz")
    _touch(tmp_path / "sub" / "IXI100-IOP-0999-T1.nii.gz")
    _touch(tmp_path / "IXI100-IOP-0999-DTI-00.nii.gz")
    records = index_ixi(tmp_path, "T1")
    assert [r["subject_id"] for r in records] == ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI100-IOP-0999"]
    assert [r["site"] for r in records] == ["Guys", "HH", "IOP"]
    assert records[0]["mask"].endswith("hd_bet_mask_IXI002-Guys-0828-T1.nii.gz")
    assert records[1]["mask"] is None and all(r["label"] is None for r in records)
    assert all(KEYS <= set(r) for r in records)
    (t2,) = index_ixi(tmp_path, "t2")
    assert t2["image"].endswith("hd_bet_IXI002-Guys-0828-T2.nii.gz") and t2["modality"] == "t2"
    with pytest.raises(AEFlowInputError, match="no IXI PD volume"):
        index_ixi(tmp_path, "PD")
    _touch(tmp_path / "IXI002-Guys-0828-T1.nii.gz")  # raw and skull-stripped side by side
    with pytest.raises(AEFlowInputError, match="several T1 images for IXI002-Guys-0828"):
        index_ixi(tmp_path, "T1")


# ---------------------------------------------------------------- ATLAS


def test_atlas_bids(tmp_path):
    base = tmp_path / "ATLAS_2" / "Training" / "R001"
    for sub in ("sub-r001s002", "sub-r001s001"):
        anat = base / sub / "ses-1" / "anat"
        stem = f"{sub}_ses-1_space-MNI152NLin2009aSym"
        _touch(anat / f"{stem}_T1w.nii.gz")
        _touch(anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz")
    test_anat = tmp_path / "ATLAS_2" / "Testing" / "R009" / "sub-r009s010" / "ses-1" / "anat"
    _touch(test_anat / "sub-r009s010_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz")
    records = index_atlas(tmp_path)
    assert [r["subject_id"] for r in records] == ["sub-r001s001", "sub-r001s002", "sub-r009s010"]
    assert records[0]["label"].endswith("sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz")
    assert records[2]["label"] is None and records[0]["session"] == "1" and records[0]["site"] == "r001"
    assert records[0]["modality"] == "t1" and records[0]["mask"] is None
    with pytest.raises(AEFlowInputError, match="no \\*_desc-T1lesion_mask"):
        index_atlas(tmp_path, require_label=True)


def test_atlas_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AEFlowInputError, match="no ATLAS v2 image recognised"):
        index_atlas(tmp_path / "empty")


# ---------------------------------------------------------------- generic folder


def test_generic_folder_with_masks_and_labels(tmp_path):
    for name in ("case01", "case02"):
        _touch(tmp_path / "images" / f"{name}.nii.gz")
        _touch(tmp_path / "masks" / f"{name}_brainmask.nii.gz")
    _touch(tmp_path / "labels" / "case01.nii.gz")
    series = tmp_path / "images" / "case03"
    series.mkdir()
    (series / "IM0001").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(AEFlowInputError, match="no brain mask matches 1 image"):
        index_folder(tmp_path)
    records = index_folder(tmp_path, strict=False, modality="flair")
    assert [r["subject_id"] for r in records] == ["case01", "case02", "case03"]
    assert records[0]["mask"].endswith("case01_brainmask.nii.gz") and records[0]["label"].endswith("case01.nii.gz")
    assert records[1]["label"] is None and records[2]["mask"] is None and records[2]["image"].endswith("case03")
    assert records[0]["modality"] == "flair"
    only = index_folder(tmp_path / "images")  # no masks given: nothing to match
    assert len(only) == 3 and all(r["mask"] is None for r in only)


def test_generic_folder_nothing_recognised(tmp_path):
    _touch(tmp_path / "notes.txt")
    with pytest.raises(AEFlowInputError, match="no volume found"):
        index_folder(tmp_path)


# ---------------------------------------------------------------- 2D folders


def test_chest_xray_release_layout(tmp_path):
    for split, cls, names in (
        ("train", "NORMAL", ["IM-0115-0001.jpeg", "IM-0117-0001.jpeg"]),
        ("train", "PNEUMONIA", ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person3_virus_5.jpeg"]),
        ("test", "NORMAL", ["IM-0001-0001.jpeg"]),
        ("test", "PNEUMONIA", ["person100_bacteria_475.jpeg"]),
    ):
        for n in names:
            _touch(tmp_path / split / cls / n)
    _touch(tmp_path / "train" / "NORMAL" / ".DS_Store")
    records = index_image_folder_2d(tmp_path, modality="xray", subject_pattern=r"^(person\d+|IM-\d+)")
    assert len(records) == 7
    train = [r for r in records if r["split"] == "train"]
    assert [r["label"] for r in train] == [0, 0, 1, 1, 1]
    assert [r["subject_id"] for r in train] == ["IM-0115", "IM-0117", "person1", "person1", "person3"]
    assert all(KEYS <= set(r) and r["mask"] is None and r["modality"] == "xray" for r in records)
    assert {r["class_name"] for r in records} == {"NORMAL", "PNEUMONIA"}


def test_normal_abnormal_layout_and_errors(tmp_path):
    for i in range(3):
        _touch(tmp_path / "normal" / f"n{i}.png")
    for i in range(4):
        _touch(tmp_path / "abnormal" / f"a{i}.PNG")
    records = index_image_folder_2d(tmp_path)
    assert sorted(r["label"] for r in records) == [0, 0, 0, 1, 1, 1, 1]
    assert all(r["split"] is None for r in records)
    assert index_dataset("images2d", tmp_path) == records
    with pytest.raises(AEFlowInputError, match="does not match"):
        index_image_folder_2d(tmp_path, subject_pattern=r"patient(\d+)")
    with pytest.raises(AEFlowInputError, match="no normal class"):
        index_image_folder_2d(tmp_path, normal_classes=("healthy",))
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    with pytest.raises(AEFlowInputError, match="no 2D image recognised"):
        index_image_folder_2d(empty)
    with pytest.raises(AEFlowInputError, match="unknown dataset kind"):
        index_dataset("mvtec", tmp_path)


def test_indexed_records_go_through_preprocessing(tmp_path):
    from monai_aeflow.data.transforms import build_volume_preprocessing

    case = "BraTS2021_00000"
    _nifti(tmp_path / case / f"{case}_flair.nii.gz", value=0.0)
    image = np.zeros((6, 6, 4), np.float32)
    image[1:5, 1:5, :] = np.arange(16, dtype=np.float32).reshape(4, 4, 1) + 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / case / f"{case}_flair.nii.gz"))
    _nifti(tmp_path / case / f"{case}_seg.nii.gz", value=0.0)
    (record,) = index_brats(tmp_path)
    out = build_volume_preprocessing(spatial_size=(16, 16))(record)
    assert tuple(out["image"].shape) == (1, 16, 16, 4) and out["subject_id"] == case
    assert int(out["mask"].sum()) == 16 * 4 and int(out["label"].sum()) == 0


# ---------------------------------------------------------------- splits


def _records(n_subjects=20, per_subject=3):
    return [
        {"image": f"/d/s{s:02d}_{k}.nii.gz", "mask": None, "label": None, "subject_id": f"s{s:02d}", "modality": "t1"}
        for s in range(n_subjects)
        for k in range(per_subject)
    ]


def test_split_is_subject_level_deterministic_and_sized():
    records = _records()
    splits = split_by_subject(records, (0.6, 0.2, 0.2), seed=7)
    subjects = {name: {r["subject_id"] for r in recs} for name, recs in splits.items()}
    assert [len(subjects[n]) for n in ("train", "val", "test")] == [12, 4, 4]
    assert not (
        subjects["train"] & subjects["val"]
        or subjects["train"] & subjects["test"]
        or subjects["val"] & subjects["test"]
    )
    assert sum(len(v) for v in splits.values()) == len(records)
    check_disjoint_subjects(splits)
    reversed_test = split_by_subject(records[::-1], (0.6, 0.2, 0.2), seed=7)["test"]
    assert {r["subject_id"] for r in reversed_test} == subjects["test"]  # independent of record order
    assert split_by_subject(records, (0.6, 0.2, 0.2), seed=7) == splits
    other = {r["subject_id"] for r in split_by_subject(records, (0.6, 0.2, 0.2), seed=8)["test"]}
    assert other != subjects["test"]


def test_split_stratified_and_errors():
    records = [
        {"image": f"/d/{i}.png", "mask": None, "label": int(i >= 10), "subject_id": f"p{i}", "modality": "xray"}
        for i in range(30)
    ]
    splits = split_by_subject(records, (0.5, 0.2, 0.3), seed=0, stratify=True)
    assert [sum(r["label"] for r in splits[n]) for n in ("train", "val", "test")] == [10, 4, 6]
    assert [len(splits[n]) for n in ("train", "val", "test")] == [15, 6, 9]
    with pytest.raises(AEFlowInputError, match="fractions"):
        split_by_subject(records, (0.5, 0.5))
    with pytest.raises(AEFlowInputError, match="subjects in two splits: p1"):
        check_disjoint_subjects({"train": records[:2], "test": records[1:3]})


def test_split_csv_round_trip(tmp_path):
    records = _records(6, 2)
    records[0]["label"] = "/d/s00_seg.nii.gz"
    records[1]["image"] = ["/d/s00_flair.nii.gz", "/d/s00_t1c.nii.gz"]
    records[2]["site"] = "HH"
    records += [{"image": "x/a.png", "mask": None, "label": 1, "subject_id": "p9", "modality": "xray"}]
    splits = split_by_subject(records, seed=3)
    path = write_split_csv(splits, tmp_path / "out" / "splits.csv")
    back = read_split_csv(path)
    for name in ("train", "val", "test"):
        expected = [{**r, "site": r.get("site")} for r in splits[name]]
        assert back[name] == expected
    rooted = read_split_csv(path, root=tmp_path)
    moved = [r for recs in rooted.values() for r in recs if r["subject_id"] == "p9"][0]
    assert moved["image"] == str(tmp_path / "x" / "a.png") and moved["label"] == 1


def test_split_csv_errors(tmp_path):
    with pytest.raises(AEFlowInputError, match="split file not found"):
        read_split_csv(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,image\ns1,/a.nii.gz\n")
    with pytest.raises(AEFlowInputError, match="lacks the column"):
        read_split_csv(bad)
    clash = tmp_path / "clash.csv"
    clash.write_text("split,subject_id,image,mask,label,modality\ntrain,s1,/a.nii.gz,,,t1\ntest,s1,/b.nii.gz,,,t1\n")
    with pytest.raises(AEFlowInputError, match="s1") as info:
        read_split_csv(clash)
    assert info.value.path == str(clash)
