"""``aeflow-cli compare`` and ``aeflow-cli train`` end to end on tiny settings, and their error handling."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from aeflow_cli.main import cli
from monai_aeflow.checkpoint import load_model
from monai_aeflow.compare import DataConfig, SyntheticCohortConfig, parse_assignments, prepare_data
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.networks.baselines import ConvAutoEncoder

TINY = ["--synthetic", "--n-train", "2", "--shape", "64", "64", "32"]
FAST_EVAL = ["--bootstrap", "10", "--grid-size", "256"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def test_compare_synthetic_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    res = _invoke(
        [
            "compare",
            *TINY,
            "--models",
            "intensity,ae,vae",
            "--epochs",
            "1",
            *FAST_EVAL,
            "--model-arg",
            "ae.channels=[8,16,32,64]",
            "--model-arg",
            "vae.latent_dim=16",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("{") :])["rows"]
    assert [r["model"] for r in rows] == ["intensity", "ae", "vae"]

    md = (out / "comparison.md").read_text()
    assert (out / "comparison.png").read_bytes()[
        :8
    ] == b"\x89PNG\r\n\x1a\n"  # the figure (tests/test_compare_figure.py)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | params (trainable) | train s | DICE_T")
    assert [line.split("|")[1].strip() for line in table[1:]] == ["intensity", "ae", "vae"]
    with open(out / "comparison.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["model"] for r in csv_rows] == ["intensity", "ae", "vae"]
    for key in ("params_trainable", "train_seconds", "dice_pooled", "pixel_auroc", "slice_auroc_score", "threshold"):
        assert key in csv_rows[0]

    # parameter counts and times, checked against the saved models
    for row in rows:
        model, ckpt = load_model(out / "models" / row["model"] / "model.pt")
        assert row["params_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert row["params_total"] == sum(p.numel() for p in model.parameters())
        assert ckpt["config"]["model_name"] == row["model"]
    assert rows[0]["params_trainable"] == 0 and rows[0]["train_seconds"] == 0.0 and rows[0]["epochs"] == 0
    assert rows[1]["train_seconds"] > 0 and rows[1]["epochs"] == 1
    ae, _ = load_model(out / "models" / "ae" / "model.pt")
    assert isinstance(ae, ConvAutoEncoder) and ae.hparams["channels"] == [8, 16, 32, 64]
    vae, _ = load_model(out / "models" / "vae" / "model.pt")
    assert vae.hparams["image_size"] == [64, 64] and vae.hparams["latent_dim"] == 16  # from the data
    for row in rows:
        for key in ("dice_pooled", "pixel_auroc", "pixel_auprc", "slice_auroc_map", "slice_auroc_score"):
            assert 0.0 <= row[key] <= 1.0, (row["model"], key)

    # the intensity row's slice AUROC (score), recomputed independently: max of the 5x5 median-filtered slice
    data = prepare_data(DataConfig(synthetic=SyntheticCohortConfig(n_train=2, shape=(64, 64, 32))), out)
    scores, labels = [], []
    for vol in data.test:
        image = np.asarray(vol["image"])[0]
        mask = np.asarray(vol["mask"])[0] > 0
        label = np.asarray(vol["label"])[0] > 0
        area = mask.sum((0, 1))
        for z in np.flatnonzero((area > 0) & (area >= 0.2 * area.max())):
            scores.append(ndimage.median_filter(image[..., z], size=5, mode="reflect").max())
            labels.append(label[..., z].any())
    assert rows[0]["slice_auroc_score"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)

    summary = json.loads((out / "comparison.json").read_text())
    assert summary["data"]["splits"]["train"] == ["synth-000", "synth-002"]  # seeded split
    assert summary["results"]["vae"]["evaluation"]["protocol"]["threshold"]["source"] == "validation split"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "intensity,nope"], "unknown model"),
        (["--models", "ae,ae"], "listed twice"),
        (["--models", "ae", "--model-arg", "latent_dim=3"], "MODEL.KEY=VALUE"),
        (["--models", "ae", "--model-arg", "vae.latent_dim=3"], "not compared"),
        (["--models", "ae", "--model-arg", "ae.nope=3"], "takes no argument"),
        (["--models", "intensity", "--data", "."], "not both"),
    ],
)
def test_compare_reports_user_errors(tmp_path, args, message):
    res = _invoke(["compare", *TINY, *args, "--out", str(tmp_path / "x"), "-q"])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_compare_without_data_is_an_error(tmp_path):
    res = _invoke(["compare", "--models", "intensity", "--out", str(tmp_path / "x"), "-q"])
    assert res.exit_code == 2 and "--synthetic" in res.output


def test_train_cli_trains_a_baseline_and_saves_it(tmp_path):
    out = tmp_path / "ae"
    args = ["train", "--model", "ae", *TINY, "--epochs", "1", "--model-arg", "channels=[8,16,32,64]"]
    res = _invoke([*args, "--loss-arg", "recon_loss=l1", "--out", str(out), "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["model"] == "ae" and summary["epochs"] == 1 and summary["parameters"]["trainable"] > 0
    model, ckpt = load_model(summary["model_path"])
    assert isinstance(model, ConvAutoEncoder)
    assert ckpt["config"]["training"]["loss_options"] == {"recon_loss": "l1"}
    assert ckpt["config"]["preprocessing"]["spatial_size"] == [64, 64]
    assert summary["splits"]["train"] == ["synth-000", "synth-002"]

    res = _invoke(["train", "--model", "intensity", *TINY, "--out", str(tmp_path / "int"), "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["epochs"] == 0 and summary["parameters"] == {"trainable": 0, "total": 1}


def test_train_cli_rejects_unknown_models_before_preparing_data(tmp_path):
    res = _invoke(["train", "--model", "nope", *TINY, "--out", str(tmp_path / "x"), "-q"])
    assert res.exit_code == 2 and "unknown model 'nope'" in res.output
    assert not (tmp_path / "x" / "data").exists()


def test_parse_assignments():
    assert parse_assignments(["a=1", "b=[1,2]", "c=text", "d=true"]) == {"a": 1, "b": [1, 2], "c": "text", "d": True}
    assert parse_assignments(["vae.latent_dim=64", "VAE.kl=0.5"], nested=True) == {"vae": {"latent_dim": 64, "kl": 0.5}}
    with pytest.raises(AEFlowInputError):
        parse_assignments(["novalue"])


@pytest.mark.realdata
def test_compare_on_brats_cases(shared_data, tmp_path):
    root = shared_data / "brats2015_dev"
    if not root.is_dir():
        pytest.skip("BraTS cases not present")
    cases = sorted(p.name for p in root.iterdir() if p.is_dir())
    res = _invoke(
        [
            "compare",
            "--models",
            "intensity",
            "--data",
            str(root),
            "--modality",
            "flair",
            "--train-subjects",
            ",".join(cases[:2]),
            "--val-subjects",
            cases[2],
            "--test-subjects",
            cases[3],
            "--spacing",
            "3",
            "--spatial-size",
            "80",
            "80",
            *FAST_EVAL,
            "--out",
            str(tmp_path / "brats"),
            "--json",
        ]
    )
    assert res.exit_code == 0, res.output
    row = json.loads(res.output[res.output.index("{") :])["rows"][0]
    assert row["model"] == "intensity"
    assert row["pixel_auroc"] > 0.8  # FLAIR tumours are hyper-intense
    assert 0.0 < row["dice_pooled"] <= 1.0
