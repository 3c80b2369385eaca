"""The MONAI bundles with a model fitted in one pass (PatchCore) and with the denoising autoencoder.

PatchCore has no trainable parameter: its spec's ``make_fitter`` builds the memory bank in one pass over the healthy
training slices, and the bundles' ``train.json`` chooses that path from the spec (no optimiser, one epoch, no
resumable checkpoint). Each bundle is run the way a MONAI user runs it, ``python -m monai.bundle run ...`` in a
subprocess, on the synthetic cohort it generates itself; the numbers are checked against scikit-learn and a
brute-force nearest-neighbour search.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monai_aeflow.bundle import AnomalyMapNet
from monai_aeflow.checkpoint import load_model
from monai_aeflow.networks.dae import DenoisingAutoEncoder
from monai_aeflow.networks.patchcore import PatchCore

sys.path.insert(0, str(Path(__file__).parent))
from bundle_harness import BRAIN_TINY, IMAGES_TINY_DATA, run_bundle, run_checked  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BRAIN = ROOT / "bundles" / "aeflow_brain_mri"
IMAGES = ROOT / "bundles" / "aeflow_2d_images"

# PatchCore's pixel AUROC over the brain voxels of the test subjects of the default synthetic cohort (64 x 64 slices,
# 10 healthy and 8 lesioned subjects), measured with cohort and split seeds 0, 1 and 2: 0.827, 0.846 and 0.750 (the
# test runs seed 0, deterministic on a CPU). Chance is 0.5; 0.70 is 0.20 over chance and 0.05 under the lowest seed.
MIN_PIXEL_AUROC = 0.70

TINY = BRAIN_TINY
IMAGES_TINY = IMAGES_TINY_DATA


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_checked(cmd, cwd)


def _bundle(bundle: Path, args: list[str]) -> subprocess.CompletedProcess:
    return run_bundle(bundle, args)


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[float]] = {}
    for events in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


def _csv_auroc(path: Path) -> float:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return float(roc_auc_score([int(r["label"]) for r in rows], [float(r["score"]) for r in rows]))


@pytest.fixture(scope="module")
def brain_patchcore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PatchCore fitted by the brain bundle's ``run training`` on its default synthetic cohort, then ``inference``."""
    root = tmp_path_factory.mktemp("brain_patchcore")
    _bundle(
        BRAIN, ["run", "training", "--config_file", "configs/train.json", "--bundle_root", str(root)]
        + ["--model_name", "patchcore"],
    )  # fmt: skip
    _bundle(BRAIN, ["run", "--config_file", "configs/inference.json", "--bundle_root", str(root)])
    return root


def test_brain_bundle_fits_patchcore_in_one_pass_over_the_healthy_training_slices(brain_patchcore: Path) -> None:
    from monai.bundle import ConfigParser

    root = brain_patchcore
    net, ckpt = load_model(root / "models" / "model.pt")
    assert isinstance(net, PatchCore) and ckpt["config"]["model_name"] == "patchcore"
    bank = net.memory_bank
    assert bank.shape[0] == ckpt["config"]["model"]["bank_size"] > 0
    assert not list((root / "models").glob("training_*.pt")), "a one-pass fit has no resumable checkpoint"
    scalars = _scalars(root / "logs")
    assert "train/lr" not in scalars and "train/loss" not in scalars
    assert scalars["fit_bank_size"] == [bank.shape[0]] and len(scalars["val_auroc"]) == 1

    # the healthy training slices, as the bundle builds them; every bank row is one of their patch features
    parser = ConfigParser()
    parser.read_config(str(BRAIN / "configs" / "train.json"))
    parser.update({"bundle_root": str(root)})
    dataset = parser.get_parsed_content("train#dataset")
    images = torch.stack([torch.as_tensor(item["image"]).as_subclass(torch.Tensor).float() for item in dataset])
    assert all(not torch.as_tensor(item["label"]).any() for item in dataset), "training slices are healthy"
    with torch.no_grad():
        feats = net.embed(images)
    feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    assert scalars["fit_patch_features"] == [feats.shape[0]], "each training slice seen once"
    assert bank.shape[0] == round(0.1 * feats.shape[0])  # the default coreset fraction
    nearest = torch.cdist(bank.double(), feats.double()).min(1).values
    assert float(nearest.max()) < 1e-3 * float(feats.norm(dim=1).mean())


def test_brain_train_config_with_patchcore_has_monai_train_properties(brain_patchcore: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BRAIN / "configs" / "train.json"),
        meta_file=str(BRAIN / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(brain_patchcore / "data" / "synthetic"),
        model_name="patchcore",
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.parser.get_parsed_content("optimizer") is None
    assert workflow.parser.get_parsed_content("train#trainer").state.max_epochs == 1


def test_brain_patchcore_maps_score_lesion_voxels_above_healthy_brain_voxels(
    brain_patchcore: Path, tmp_path: Path
) -> None:
    root = brain_patchcore
    summary = json.loads((root / "eval" / "inference" / "scores.json").read_text())
    assert summary["n_inputs"] == summary["n_ok"] > 0
    labels, maps = [], []
    for row in summary["inputs"]:
        stem = row["input"][: -len("_image.nii.gz")]
        brain = nib.load(stem + "_brainmask.nii.gz").get_fdata() > 0
        labels.append(nib.load(stem + "_label.nii.gz").get_fdata()[brain] > 0)
        maps.append(nib.load(row["outputs"]["anomaly"]).get_fdata()[brain])
    y = np.concatenate(labels)
    assert 0 < y.sum() < y.size
    auroc = roc_auc_score(y, np.concatenate(maps))
    assert auroc > MIN_PIXEL_AUROC, auroc

    # aeflow-cli score reads the bundle's model file and gives the bundle's map (same input, same brain mask)
    row = next(
        r
        for r in summary["inputs"]
        if nib.load(r["input"][: -len("_image.nii.gz")] + "_label.nii.gz").get_fdata().any()
    )
    mask = row["input"][: -len("_image.nii.gz")] + "_brainmask.nii.gz"
    out = tmp_path / "cli"
    _run(["aeflow-cli", "score", row["input"], "--model", str(root), "--out", str(out), "--mask", mask], tmp_path)
    cli_map = nib.load(out / Path(row["outputs"]["anomaly"]).name).get_fdata()
    bundle_map = nib.load(row["outputs"]["anomaly"]).get_fdata()
    assert np.allclose(cli_map, bundle_map, atol=1e-3), float(np.abs(cli_map - bundle_map).max())


def test_brain_bundle_evaluates_patchcore_from_its_model_file(brain_patchcore: Path) -> None:
    root = brain_patchcore
    # no --model_name: the evaluated network is the one the model file holds
    _bundle(
        BRAIN,
        ["run", "--config_file", "['configs/train.json','configs/evaluate.json']", "--bundle_root", str(root)]
        + ["--n_bootstrap", "10", "--evaluation#n_thresholds", "256"],
    )
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["test_slice_auroc"] == pytest.approx(_csv_auroc(root / "eval" / "slice_scores.csv"))
    assert metrics["n_abnormal_slices"] > 0
    assert 0.0 <= metrics["volume_protocol"]["metrics"]["pixel"]["auroc"]["value"] <= 1.0


def test_brain_ckpt_export_of_patchcore_matches_eager(brain_patchcore: Path) -> None:
    # no --model_name: inference.json's network_def is the network the model file holds (bank of the fitted size)
    root = brain_patchcore
    ts_path = root / "models" / "model.ts"
    _bundle(
        BRAIN,
        ["ckpt_export", "network_def", "--filepath", str(ts_path), "--ckpt_file", str(root / "models" / "model.pt")]
        + ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
        + ["--key_in_ckpt", "network", "--use_trace", "True", "--input_shape", "[1, 1, 64, 64]"]
        + ["--bundle_root", str(root)],
    )
    scripted = torch.jit.load(str(ts_path))
    eager = AnomalyMapNet(load_model(root / "models" / "model.pt")[0]).eval()
    torch.manual_seed(1)
    for x in (torch.rand(3, 1, 64, 64), torch.rand(2, 1, 64, 64) * 0.5):
        with torch.no_grad():
            expected, got = eager(x), scripted(x)
        assert got.shape == expected.shape == (x.shape[0], 1, 64, 64)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), float((got - expected).abs().max())


def test_brain_multi_gpu_config_fits_patchcore_on_every_rank(brain_patchcore: Path, tmp_path: Path) -> None:
    # two processes (gloo on the CPU): each rank fits the whole training set, so the bank has the single run's size
    root = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']"]
    cmd += ["--bundle_root", str(root), "--dataset_dir", str(brain_patchcore / "data" / "synthetic")]
    _run(cmd + ["--model_name", "patchcore"], BRAIN)
    net, _ = load_model(root / "models" / "model.pt")
    single, _ = load_model(brain_patchcore / "models" / "model.pt")
    assert isinstance(net, PatchCore) and net.memory_bank.shape == single.memory_bank.shape


def test_brain_bundle_trains_dae_by_gradient(tmp_path: Path) -> None:
    _bundle(
        BRAIN,
        ["run", "training", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path)]
        + ["--model_name", "dae", *TINY],
    )  # fmt: skip
    net, ckpt = load_model(tmp_path / "models" / "model.pt")
    assert isinstance(net, DenoisingAutoEncoder) and ckpt["config"]["model_name"] == "dae"
    assert list((tmp_path / "models").glob("training_*.pt")), "a gradient-trained model keeps its checkpoint"
    scalars = _scalars(tmp_path / "logs")
    assert {"train/loss", "train/lr", "val_auroc"} <= set(scalars)
    assert all(np.isfinite(scalars["train/loss"]))


def test_images_bundle_fits_evaluates_and_infers_patchcore(tmp_path: Path) -> None:
    data = tmp_path / "data"
    common = ["--bundle_root", str(tmp_path), "--dataset_dir", str(data), *IMAGES_TINY]
    _bundle(
        IMAGES,
        ["run", "training", "--config_file", "configs/train.json", "--synthetic", "true", "--model_name", "patchcore"]
        + common,
    )  # fmt: skip
    net, ckpt = load_model(tmp_path / "models" / "model.pt")
    assert isinstance(net, PatchCore) and net.memory_bank.shape[0] == ckpt["config"]["model"]["bank_size"] > 0
    assert not list((tmp_path / "models").glob("training_*.pt"))

    _bundle(
        IMAGES,
        ["run", "--config_file", "['configs/train.json','configs/evaluate.json']", "--n_bootstrap", "10"] + common,
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["test_image_auroc"] == pytest.approx(_csv_auroc(tmp_path / "eval" / "image_scores.csv"))

    _bundle(IMAGES, ["run", "--config_file", "configs/inference.json", *common])
    summary = json.loads((tmp_path / "eval" / "inference" / "scores.json").read_text())
    assert summary["n_inputs"] == summary["n_ok"] == metrics["n_images"] > 0
