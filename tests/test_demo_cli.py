"""``aeflow-cli demo`` end to end on a tiny configuration, and its error handling."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
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
