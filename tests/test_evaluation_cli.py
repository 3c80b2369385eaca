"""``aeflow-cli evaluate`` end to end on tiny NIfTI folders, bad inputs, and storing the threshold in a model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from aeflow_cli.evaluate import evaluate
from monai_aeflow.errors import CheckpointError
from monai_aeflow.evaluation.checkpoint import save_threshold

FAST = ["--bootstrap", "20", "--grid-size", "256", "-q"]


def _write_split(root: Path, seeds, healthy=(), shape=(32, 32, 10), affine=None) -> Path:
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine  # LPS, like BraTS
    for sub in ("maps", "labels", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        mask = np.zeros(shape, np.uint8)
        mask[2:30, 2:30, 1:9] = 1
        label = np.zeros(shape, np.uint8)
        if seed not in healthy:
            g = ndimage.gaussian_filter(rng.random(shape), 2)
            inner = ndimage.binary_erosion(mask > 0, structure=np.ones((3, 3, 1)), iterations=4)
            label = ((g > np.quantile(g[inner], 0.85)) & inner).astype(np.uint8)
        residual = (rng.gamma(2.0, 0.05, shape) + 0.4 * label) * mask
        name = f"sub{seed:02d}.nii.gz"
        nib.save(nib.Nifti1Image(residual.astype(np.float32), affine), root / "maps" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / name)
        nib.save(nib.Nifti1Image(mask, affine), root / "masks" / name)
    return root


@pytest.fixture
def splits(tmp_path):
    val = _write_split(tmp_path / "val", [1, 2, 3], healthy=(3,))
    test = _write_split(tmp_path / "test", [11, 12, 13, 14], healthy=(14,))
    return val, test


def _fake_model(path: Path) -> Path:
    torch.save(
        {
            "format": "monai-aeflow/1",
            "config": {"model": {"backbone": "resnet18"}},
            "network": {"decoder.weight": torch.zeros(3)},
            "threshold": None,
            "threshold_protocol": {},
        },
        path,
    )
    return path


def test_evaluate_end_to_end(splits, tmp_path):
    val, test = splits
    out = tmp_path / "report"
    ckpt = _fake_model(tmp_path / "model.pt")
    res = CliRunner().invoke(
        evaluate,
        [
            "--val",
            str(val),
            "--test",
            str(test),
            "-o",
            str(out),
            "--json",
            "--checkpoint",
            str(ckpt),
            "--test-images",
            str(test / "maps"),
            *FAST,
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    saved = json.loads((out / "metrics.json").read_text())
    assert printed == saved
    protocol = saved["protocol"]
    assert protocol["threshold"]["method"] == "sweep" and protocol["threshold"]["source"] == "validation split"
    assert protocol["threshold"]["validation_cases"] == ["sub01", "sub02", "sub03"]
    assert protocol["splits"]["test"]["cases"] == ["sub11", "sub12", "sub13", "sub14"]
    assert protocol["postprocessing"]["median_size"] == 5 and protocol["postprocessing"]["min_component_size"] == 7
    assert protocol["postprocessing"]["normalize"] == "none"  # the default: raw maps
    pixel = saved["metrics"]["pixel"]
    assert 0.5 < pixel["dice_pooled"]["value"] <= 1.0
    assert pixel["dice_pooled"]["ci_low"] <= pixel["dice_pooled"]["value"] <= pixel["dice_pooled"]["ci_high"]
    assert 0.9 < pixel["auroc"]["value"] <= 1.0
    assert "dice_pooled" in saved["metrics"]["oracle"]
    for level in ("slice", "volume"):
        assert set(saved["metrics"][level]) >= {"auroc", "auprc", "f1", "acc", "sen", "spe"}
    for name in (
        "metrics.csv",
        "cases.csv",
        "dice_vs_threshold.csv",
        "roc_pr.png",
        "score_distributions.png",
        "dice_vs_threshold.png",
        "cases.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*"))  # no hidden temporary file left
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    dice_row = next(r for r in rows if r["level"] == "pixel" and r["metric"] == "dice_pooled")
    assert dice_row["threshold_source"] == "exact Dice maximum on the validation split"
    assert float(dice_row["threshold"]) == pytest.approx(protocol["threshold"]["value"])
    assert dice_row["median_size"] == "5" and dice_row["split"] == "test"
    # The threshold went into the model file, readable with weights_only=True.
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["threshold"] == pytest.approx(protocol["threshold"]["value"])
    assert stored["threshold_protocol"]["method"] == "sweep"
    assert stored["threshold_protocol"]["postprocessing"]["median_size"] == 5
    healthy = stored["threshold_protocol"]["healthy_percentiles"]  # the Label heat-map levels read them
    assert 0 <= healthy["95"] <= healthy["99"]
    assert torch.equal(stored["network"]["decoder.weight"], torch.zeros(3))


def test_evaluate_options_and_fixed_threshold(splits, tmp_path):
    _, test = splits
    out = tmp_path / "fixed"
    args = [
        "--test",
        str(test),
        "-o",
        str(out),
        "--threshold",
        "0.25",
        "--median-size",
        "9",
        "--median-dims",
        "3",
        "--min-component-size",
        "0",
        "--residual",
        "positive",
        "--normalize",
        "robust",
        "--no-plots",
        *FAST,
    ]
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 0, res.output
    assert "DICE_T" in res.stdout
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["protocol"]["threshold"] == {"value": 0.25, "method": "fixed", "source": "given by the user"}
    pp = saved["protocol"]["postprocessing"]
    assert (pp["median_size"], pp["median_dims"], pp["component_dims"], pp["residual"]) == (9, 3, 3, "positive")
    assert pp["normalize"] == "robust"
    assert not (out / "roc_pr.png").exists()


def test_evaluate_image_scores_csv(splits, tmp_path):
    val, test = splits
    rng = np.random.default_rng(0)
    labels = rng.random(40) < 0.5
    scores = rng.normal(size=40) + labels
    table = tmp_path / "scores.csv"
    rows = [f"img{i},{s},{int(y)}" for i, (s, y) in enumerate(zip(scores, labels, strict=True))]
    table.write_text("\n".join(["name,score,label", *rows]) + "\n")
    args = ["--val", str(val), "--test", str(test), "-o", str(tmp_path / "o"), "--json", "--no-plots", *FAST]
    res = CliRunner().invoke(evaluate, [*args, "--scores-csv", str(table)])
    assert res.exit_code == 0, res.output
    image = json.loads(res.stdout)["metrics"]["image"]
    assert image["auroc"]["value"] == pytest.approx(roc_auc_score(labels, scores))
    table.write_text("name,score\nimg0,1.0\n")
    _assert_user_error(CliRunner().invoke(evaluate, [*args, "--scores-csv", str(table)]), "label")


def test_evaluate_fpr_method(splits, tmp_path):
    val, test = splits
    res = CliRunner().invoke(
        evaluate,
        [
            "--val",
            str(val),
            "--test",
            str(test),
            "-o",
            str(tmp_path / "o"),
            "--method",
            "fpr",
            "--target-fpr",
            "0.05",
            "--json",
            "--no-plots",
            *FAST,
        ],
    )
    assert res.exit_code == 0, res.output
    thr = json.loads(res.stdout)["protocol"]["threshold"]
    assert thr["method"] == "fpr" and thr["achieved_fpr"] <= 0.05


def _assert_user_error(res, *fragments):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err, err
    for f in fragments:
        assert f in err, err


def test_bad_inputs_exit_2_without_traceback(splits, tmp_path):
    val, test = splits
    run = CliRunner().invoke
    out = ["-o", str(tmp_path / "o"), "--no-plots", *FAST]
    _assert_user_error(run(evaluate, ["--val", str(tmp_path / "missing"), "--test", str(test), *out]), "not found")
    _assert_user_error(run(evaluate, ["--test", str(test), *out]), "validation split")
    _assert_user_error(run(evaluate, ["--test", str(test), "--method", "fixed", *out]), "fixed threshold")

    # A map without a label.
    (val / "labels" / "sub02.nii.gz").rename(tmp_path / "moved.nii.gz")
    _assert_user_error(run(evaluate, ["--val", str(val), "--test", str(test), *out]), "sub02", "no label")
    (tmp_path / "moved.nii.gz").rename(val / "labels" / "sub02.nii.gz")

    # Shape mismatch between map and label.
    bad = _write_split(tmp_path / "bad", [21])
    nib.save(
        nib.Nifti1Image(np.zeros((32, 32, 9), np.uint8), np.diag([-1.0, -1.0, 1, 1])), bad / "labels" / "sub21.nii.gz"
    )
    _assert_user_error(run(evaluate, ["--val", str(val), "--test", str(bad), *out]), "shape")

    # Validation volumes without lesions cannot drive the Dice search.
    healthy = _write_split(tmp_path / "healthy", [31, 32], healthy=(31, 32))
    _assert_user_error(run(evaluate, ["--val", str(healthy), "--test", str(test), *out]), "validation labels are empty")

    # A model file that is not a checkpoint.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    _assert_user_error(
        run(evaluate, ["--val", str(val), "--test", str(test), "--checkpoint", str(junk), *out]), "junk.pt"
    )
    # Map on another voxel grid than its label.
    moved = _write_split(tmp_path / "moved", [41])
    img = nib.load(moved / "maps" / "sub41.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([2.0, 2.0, 2.0, 1.0])), moved / "maps" / "sub41.nii.gz")
    _assert_user_error(run(evaluate, ["--val", str(val), "--test", str(moved), *out]), "affine")
    assert run(evaluate, ["--val", str(val), "--test", str(moved), "--ignore-affine", *out]).exit_code == 0


def test_save_threshold_atomic_and_checked(tmp_path):
    ckpt = _fake_model(tmp_path / "m.pt")
    save_threshold(ckpt, 0.125, {"method": "greedy", "values": (1.0, float("nan")), "nested": {"k": np.float32(2)}})
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["threshold"] == 0.125
    assert stored["threshold_protocol"] == {"method": "greedy", "values": [1.0, None], "nested": {"k": 2.0}}
    assert stored["format"] == "monai-aeflow/1" and stored["config"]["model"]["backbone"] == "resnet18"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    with pytest.raises(CheckpointError):
        save_threshold(tmp_path / "absent.pt", 0.1, {})
    with pytest.raises(CheckpointError):
        save_threshold(ckpt, float("nan"), {})
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError):
        save_threshold(tmp_path / "other.pt", 0.1, {})
