"""BraTS regions (whole tumour, tumour core, enhancing tumour) for every label naming the indexer knows."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from monai_aeflow.data.datalists import DataConfig, prepare_data
from monai_aeflow.data.indexers import brats_label_scheme, index_brats, with_brats_region
from monai_aeflow.data.preprocessing import build_volume_preprocessing
from monai_aeflow.data.transforms import BinarizeLabeld
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.io import load_case

# The regions as the BraTS papers define them, per label naming (written out here, not read from the code).
EXPECTED = {
    "2013-2015": {"wt": {1, 2, 3, 4}, "tc": {1, 3, 4}, "et": {4}},
    "2017-2021": {"wt": {1, 2, 4}, "tc": {1, 4}, "et": {4}},
    "2023+": {"wt": {1, 2, 3}, "tc": {1, 3}, "et": {3}},
}
SHAPE = (32, 32, 10)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4)), str(path))


def _label(seed: int, values: set[int], tumour_slices=range(4, 9)) -> np.ndarray:
    """A label volume using every value of the naming, tumour only in ``tumour_slices``."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.int16)
    for k in tumour_slices:
        lab[8:24, 8:24, k] = rng.choice(sorted(values), size=(16, 16))
    return lab


def _image(seed: int) -> np.ndarray:
    img = np.random.default_rng(seed + 100).random(SHAPE).astype(np.float32) + 0.5
    img[:3], img[-3:] = 0, 0  # background around the brain
    return img


def _write_case(root, scheme: str, i: int, label: np.ndarray) -> None:
    if scheme == "2013-2015":
        case = root / f"brats_2013_pat{i:04d}_1"
        _save(case / "Flair_subtrMeanDivStd.nii.gz", _image(i))
        _save(case / "OTMultiClass.nii.gz", label)
    elif scheme == "2017-2021":
        _save(root / f"BraTS2021_{i:05d}" / f"BraTS2021_{i:05d}_flair.nii.gz", _image(i))
        _save(root / f"BraTS2021_{i:05d}" / f"BraTS2021_{i:05d}_seg.nii.gz", label)
    else:
        _save(root / f"BraTS-GLI-{i:05d}-000" / f"BraTS-GLI-{i:05d}-000-t2f.nii.gz", _image(i))
        _save(root / f"BraTS-GLI-{i:05d}-000" / f"BraTS-GLI-{i:05d}-000-seg.nii.gz", label)


@pytest.mark.parametrize("scheme", list(EXPECTED))
@pytest.mark.parametrize("region", ["wt", "tc", "et"])
def test_region_labels_for_each_naming(tmp_path, scheme, region):
    labels = {i: _label(i, EXPECTED[scheme]["wt"]) for i in (1, 2)}
    for i, lab in labels.items():
        _write_case(tmp_path, scheme, i, lab)
    records = index_brats(tmp_path, modality="flair", region=region)
    assert len(records) == 2 and all(brats_label_scheme(r["label"]) == scheme for r in records)
    assert records[0].get("region", "wt") == region
    preprocess = build_volume_preprocessing(spatial_size=SHAPE[:2], percentiles=(1.0, 99.0), spacing=None)
    for record, (_, raw) in zip(records, sorted(labels.items()), strict=True):
        out = preprocess(dict(record))
        got = out["label"][0].numpy().astype(bool)
        expected = np.isin(raw, sorted(EXPECTED[scheme][region]))
        assert got.shape == expected.shape and np.array_equal(got, expected)
        if region != "wt":
            assert got.sum() < (raw > 0).sum()  # a strict sub-region of the tumour
        # The evaluation reader gives the same region from the label file.
        case = {"map": np.zeros(SHAPE, np.float32), "label": record["label"], "name": "c"}
        values = None if region == "wt" else record["region_labels"]
        assert np.array_equal(load_case(case, label_values=values)["label"], expected)


def test_training_slices_hold_no_tumour_label_whatever_the_region(tmp_path):
    # every case has tumour (oedema only, label 2, in slices 2-3; core in slices 5-7)
    raws = {}
    for i in range(1, 5):
        lab = np.zeros(SHAPE, np.int16)
        lab[10:20, 10:20, 2:4] = 2
        lab[12:18, 12:18, 5:8] = np.random.default_rng(i).choice([1, 4], size=(6, 6, 3))
        raws[i] = lab
        _write_case(tmp_path / "data", "2017-2021", i, lab)
    subjects = {
        "train": ["BraTS2021_00001", "BraTS2021_00002"],
        "val": ["BraTS2021_00003"],
        "test": ["BraTS2021_00004"],
    }
    for region in ("wt", "tc", "et"):
        cfg = DataConfig(
            data_dir=str(tmp_path / "data"),
            dataset="brats",
            subjects=subjects,
            spatial_size=SHAPE[:2],
            spacing=1.0,  # goes through the resampling (MONAI treats "label_*" keys as meta dicts there)
            min_area_fraction=0.0,
            region=region,
        )
        data = prepare_data(cfg, tmp_path / f"out_{region}")
        # training slices: none of slices 2, 3 (oedema) and 5-7 (core), whatever the region
        healthy = [k for k in range(SHAPE[2]) if not (raws[1][..., k] > 0).any()]
        assert len(healthy) == SHAPE[2] - 5 and len(data.train) == 2 * len(healthy)
        for item in data.train:
            assert not torch.as_tensor(item["label"]).any()
        assert all("region_labels" not in r for r in data.splits["train"])
        # evaluation labels: the region
        expected = np.isin(raws[3], sorted(EXPECTED["2017-2021"][region]))
        assert np.array_equal(torch.as_tensor(data.val[0]["label"])[0].numpy().astype(bool), expected)


def test_region_errors():
    with pytest.raises(AEFlowInputError, match="unknown BraTS region"):
        with_brats_region([{"label": "OTMultiClass.nii.gz"}], "core")
    with pytest.raises(AEFlowInputError, match="not a BraTS segmentation"):
        with_brats_region([{"label": "/data/case1_label.nii.gz"}], "tc")
    with pytest.raises(AEFlowInputError, match="BraTS region"):
        prepare_data(DataConfig(region="tc"), "/nonexistent")
    # a record without a label (healthy subject) is left alone
    assert with_brats_region([{"label": None, "image": "a"}], "tc") == [{"label": None, "image": "a"}]


def test_evaluate_cli_region_needs_the_label_naming(tmp_path):
    from aeflow_cli.evaluate import evaluate

    for split in ("val", "test"):
        for sub in ("maps", "labels"):
            _save(tmp_path / split / sub / "c1.nii.gz", np.zeros(SHAPE))
    res = CliRunner().invoke(
        evaluate, ["--val", str(tmp_path / "val"), "--test", str(tmp_path / "test"), "--no-masks", "--region", "tc"]
    )
    assert res.exit_code == 2 and "--brats-labels" in res.output


def test_real_brats2015_tumour_core(shared_data):
    root = shared_data / "brats2015_dev"
    if not root.is_dir():
        pytest.skip("brats2015_dev not present")
    records = index_brats(root, modality="t1c", region="tc")
    assert len(records) == 4 and all(r["region_labels"] == [1, 3, 4] for r in records)
    for record in records[:2]:
        raw = np.asarray(nib.load(record["label"]).dataobj)
        assert set(np.unique(raw).astype(int)) <= {0, 1, 2, 3, 4}
        out = BinarizeLabeld()({"label": torch.as_tensor(raw[None]), "region_labels": record["region_labels"]})
        core = out["label"][0].numpy().astype(bool)
        assert np.array_equal(core, np.isin(raw, [1, 3, 4]))
        assert 0 < core.sum() < (raw > 0).sum()  # the core leaves the oedema out
