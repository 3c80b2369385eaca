"""``aeflow-cli compare`` survives a failing model and reports both validated thresholds."""

from __future__ import annotations

import csv
import json
import math

import pytest
from click.testing import CliRunner

from aeflow_cli.main import cli
from monai_aeflow import compare as compare_module
from monai_aeflow.checkpoint import load_model

TINY = ["--synthetic", "--n-train", "2", "--shape", "64", "64", "32", "--bootstrap", "0", "--grid-size", "256"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_failing_model_is_recorded_and_the_others_complete(tmp_path, monkeypatch):
    original = compare_module.train_model

    def failing(network, train, output_dir, **kwargs):
        if output_dir.name == "ae":
            raise RuntimeError("forced failure of the autoencoder")
        return original(network, train, output_dir, **kwargs)

    monkeypatch.setattr(compare_module, "train_model", failing)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        cli,
        ["compare", *TINY, "--models", "ae,intensity", "--epochs", "1", "--out", str(out), "-q"],
    )
    assert res.exit_code == 1, res.output
    assert "model ae failed: RuntimeError: forced failure of the autoencoder" in res.stderr
    # The tables are written: the failing row holds its error, the other model its metrics.
    md = (out / "comparison.md").read_text()
    assert "| ae | failed |" in md and "ae failed: RuntimeError: forced failure of the autoencoder" in md
    with open(out / "comparison.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert rows["ae"]["error"] == "RuntimeError: forced failure of the autoencoder" and rows["ae"]["dice_pooled"] == ""
    assert rows["intensity"]["error"] == "" and 0.0 <= float(rows["intensity"]["pixel_auroc"]) <= 1.0
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["failed"] == {"ae": "RuntimeError: forced failure of the autoencoder"}
    assert [r["model"] for r in summary["rows"]] == ["ae", "intensity"]
    assert (out / "models" / "intensity" / "model.pt").is_file()


def test_compare_reports_sweep_and_greedy_thresholds(tmp_path):
    cfg = compare_module.CompareConfig(
        output_dir=str(tmp_path / "cmp"),
        models=["intensity", "ae"],
        model_args={"ae": {"channels": [8, 16, 32, 64]}},
        data=compare_module.DataConfig(
            synthetic=compare_module.SyntheticCohortConfig(n_train=2, shape=(64, 64, 32)),
        ),
        epochs=1,
        n_bootstrap=0,
        n_thresholds=256,
    )
    result = compare_module.run_comparison(cfg)
    assert result["failed"] == {}
    row = result["rows"][0]
    thresholds = result["results"]["intensity"]["evaluation"]["metrics"]["thresholds"]
    assert result["results"]["intensity"]["evaluation"]["protocol"]["threshold"]["method"] == "sweep"
    # The main Dice is the sweep's; both thresholds and their test Dice are reported.
    assert row["dice_pooled"] == row["dice_pooled_sweep"] == thresholds["sweep"]["dice_pooled"]["value"]
    assert row["dice_pooled_greedy"] == thresholds["greedy"]["dice_pooled"]["value"]
    assert row["threshold"] == row["threshold_sweep"] and math.isfinite(row["threshold_greedy"])
    # The exact sweep is never worse than the greedy search on the validation split it is chosen on.
    assert (
        thresholds["sweep"]["validation_dice_pooled"]["value"]
        >= thresholds["greedy"]["validation_dice_pooled"]["value"] - 1e-12
    )
    # The intensity baseline does not reconstruct: no PSNR / SSIM, not a made-up number.
    assert math.isnan(row["val_psnr"]) and math.isnan(row["val_ssim"])
    assert "DICE_T (greedy thr.)" in result["markdown"] and "val PSNR" in result["markdown"]
    # The autoencoder reconstructs: PSNR / SSIM of the healthy validation slices, also in its model file.
    ae_row = result["rows"][1]
    assert 0.0 < ae_row["val_psnr"] < 100.0 and -1.0 <= ae_row["val_ssim"] <= 1.0
    _, ckpt = load_model(result["results"]["ae"]["info"]["model_path"])
    stored = ckpt["config"]["training"]["metrics"]
    assert stored["val_psnr"] == pytest.approx(ae_row["val_psnr"]) and stored["val_ssim"] == pytest.approx(
        ae_row["val_ssim"]
    )
    assert ckpt["config"]["training"]["reconstruction"]["n_images"] > 0
