"""The MONAI bundles in ``bundles/``: train, infer, evaluate, verify, export and distributed training.

Each bundle is run the way a MONAI user runs it, ``python -m monai.bundle run ...`` in a subprocess, on a tiny
synthetic dataset that the bundle generates itself (32 x 32 slices, one short epoch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_aeflow.bundle import (
    AnomalyMapNet,
    build_bundle_network,
    index_isic,
    initialize_flow,
    is_synthetic_dataset,
    prepare_image_datalist,
)
from monai_aeflow.checkpoint import load_model

sys.path.insert(0, str(Path(__file__).parent))
from bundle_harness import BRAIN_TINY, IMAGES_TINY_DATA, TIMEOUT, bundle_env, run_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
BRAIN = BUNDLES / "aeflow_brain_mri"
IMAGES = BUNDLES / "aeflow_2d_images"
SCHEMA = BUNDLES / "schema" / "meta_schema_20240725.json"

IMAGES_TINY = [*IMAGES_TINY_DATA, "--max_epochs", "1", "--flow_init", "16"]


def _bundle(bundle: Path, args: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return run_bundle(bundle, args, timeout)


def _configs(*names: str) -> str:
    return "[" + ",".join(f"'configs/{n}'" for n in names) + "]"


def _check_train_properties(bundle: Path, root: Path, data: Path) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(root / "properties"),
        dataset_dir=str(data),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def _scalar_tags(log_dir: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for events in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


@pytest.fixture(scope="module")
def brain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The brain MRI bundle trained for one epoch with ``run training`` on a cohort it generates itself.

    No ``dataset_dir``: the default, ``<bundle_root>/data/synthetic``, is where the bundle generates its cohort.
    """
    root = tmp_path_factory.mktemp("brain_bundle")
    data = root / "data" / "synthetic"
    assert not data.exists()
    _bundle(BRAIN, ["run", "training", "--config_file", "configs/train.json", "--bundle_root", str(root)] + BRAIN_TINY)
    return {"root": root, "data": data}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 2D bundle trained for one epoch with ``run training`` on a synthetic image folder it generates.

    ``dataset_dir`` is not the default folder, so ``--synthetic true`` asks for the generation.
    """
    root = tmp_path_factory.mktemp("images_bundle")
    data = root / "data"
    _bundle(
        IMAGES,
        [
            "run",
            "training",
            "--config_file",
            "configs/train.json",
            "--bundle_root",
            str(root),
            "--dataset_dir",
            str(data),
            "--synthetic",
            "true",  # Fire passes the string "true"; the bundle reads it as a flag
        ]
        + IMAGES_TINY,
    )
    return {"root": root, "data": data}


# ------------------------------------------------------------------------------------------------------------
# brain MRI bundle
# ------------------------------------------------------------------------------------------------------------


def test_brain_training_writes_model_checkpoint_and_tensorboard(brain: dict[str, Path]) -> None:
    root, data = brain["root"], brain["data"]
    assert (data / "cohort.csv").is_file() and len(list(data.glob("synth-*_image.nii.gz"))) == 8
    net, ckpt = load_model(root / "models" / "model.pt")
    cfg = ckpt["config"]
    assert cfg["model_name"] == "aeflow" and cfg["model"]["backbone"] == "efficientnet_lite0"
    assert cfg["preprocessing"]["spatial_size"] == [32, 32] and cfg["score"]["beta"] == 0.9
    assert "val_auroc" in cfg["training"]["metrics"] and cfg["training"]["epoch"] == 1
    from monai_aeflow.models.aeflow import RECIPES

    # the bundle trains with the default recipe, recorded as aeflow-cli train records it
    assert cfg["training"]["recipe"] == "balanced" and cfg["training"]["alpha"] == RECIPES["balanced"]["alpha"]
    assert net.flow.actnorm is None or bool(net.flow.actnorm.initialized)
    assert list((root / "models").glob("training_*.pt")), "resumable checkpoint"
    scalars, grids = _scalar_tags(root / "logs")
    assert {"train/loss", "train/loss_flow", "train/loss_recon", "train/lr", "val_auroc"} <= scalars
    assert grids, "image grid of input / reconstruction / residual"
    _check_train_properties(BRAIN, root, data)


def test_brain_run_without_id_trains_too(brain: dict[str, Path], tmp_path: Path) -> None:
    _bundle(
        BRAIN,
        [
            "run",
            "--config_file",
            "configs/train.json",
            "--bundle_root",
            str(tmp_path),
            "--dataset_dir",
            str(brain["data"]),
        ]
        + BRAIN_TINY
        + ["--train#trainer#epoch_length", "1"],
    )
    assert (tmp_path / "models" / "model.pt").is_file()


def test_brain_inference_writes_maps_on_the_input_grid(brain: dict[str, Path]) -> None:
    root, data = brain["root"], brain["data"]
    _bundle(
        BRAIN,
        ["run", "--config_file", "configs/inference.json", "--bundle_root", str(root), "--dataset_dir", str(data)]
        + ["--image_size", "[32, 32]", "--split_fractions", "[0.5, 0.25, 0.25]"]
        + ["--synthetic_cohort#shape", "[32, 32, 24]"],
    )
    out = root / "eval" / "inference"
    summary = json.loads((out / "scores.json").read_text())
    assert summary["n_inputs"] == summary["n_ok"] == 3  # test split: 1 healthy and 2 lesioned subjects
    for row in summary["inputs"]:
        amap = nib.load(row["outputs"]["anomaly"])
        src = nib.load(row["input"])
        assert amap.shape == src.shape and np.allclose(amap.affine, src.affine)
        assert np.isfinite(amap.get_fdata()).all() and amap.get_fdata().max() > 0
        scores = json.loads(Path(row["outputs"]["scores"]).read_text())
        assert scores["volume_score"] == pytest.approx(row["volume_score"])
        assert Path(row["outputs"]["anomaly"]).name.endswith("_anomaly.nii.gz")


def test_brain_evaluate_writes_slice_and_volume_metrics(brain: dict[str, Path]) -> None:
    root, data = brain["root"], brain["data"]
    _bundle(
        BRAIN,
        ["run", "--config_file", _configs("train.json", "evaluate.json"), "--bundle_root", str(root)]
        + ["--dataset_dir", str(data), "--n_bootstrap", "10", "--evaluation#n_thresholds", "256"]
        + BRAIN_TINY,
    )
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["test_slice_auroc"] <= 1.0
    assert {"auroc", "f1", "acc", "sen", "spe"} <= set(metrics["slice"])
    assert metrics["n_slices"] > 0 and metrics["n_abnormal_slices"] > 0
    protocol = metrics["volume_protocol"]["metrics"]
    assert {"pixel", "slice", "volume"} <= set(protocol)
    assert 0.0 <= protocol["pixel"]["auroc"]["value"] <= 1.0
    assert (root / "eval" / "report" / "metrics.json").is_file()
    assert (root / "eval" / "slice_scores.csv").read_text().startswith("name,subject_id,label,score")


def test_brain_ckpt_export_torchscript_matches_eager(brain: dict[str, Path]) -> None:
    root, data = brain["root"], brain["data"]
    ts_path = root / "models" / "model.ts"
    _bundle(
        BRAIN,
        ["ckpt_export", "network_def", "--filepath", str(ts_path), "--ckpt_file", str(root / "models" / "model.pt")]
        + ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
        + ["--key_in_ckpt", "network", "--use_trace", "True", "--input_shape", "[1, 1, 32, 32]"]
        + ["--bundle_root", str(root), "--dataset_dir", str(data)],
    )
    scripted = torch.jit.load(str(ts_path))
    eager = AnomalyMapNet(load_model(root / "models" / "model.pt")[0]).eval()
    torch.manual_seed(1)
    for x in (torch.rand(3, 1, 32, 32), torch.rand(2, 1, 32, 32) * 0.5):
        with torch.no_grad():
            expected, got = eager(x), scripted(x)
        assert got.shape == expected.shape == (x.shape[0], 1, 32, 32)
        assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


def test_brain_multi_gpu_config_gives_each_rank_a_disjoint_shard(brain: dict[str, Path], tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    record.write_text(
        json.dumps(
            {
                "recorder": {
                    "_target_": "monai_aeflow.engines.metrics.BatchRecorder",
                    "path": str(tmp_path / "seen{rank}.json"),
                },
                "run": ["$@recorder.attach(@train#trainer)", "$@train#trainer.run()"],
            }
        )
    )
    root = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    cmd += ["-m", "monai.bundle", "run", "--config_file"]
    cmd += ["['configs/train.json','configs/multi_gpu_train.json','" + str(record) + "']"]
    cmd += ["--bundle_root", str(root), "--dataset_dir", str(brain["data"]), *BRAIN_TINY]
    res = subprocess.run(cmd, cwd=BRAIN, env=bundle_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in seen] == [0, 1] and all(s["world_size"] == 2 for s in seen)
    shards = [set(zip(s["volume_index"], s["slice_index"], strict=True)) for s in seen]
    assert len(shards[0]) == len(seen[0]["slice_index"]) and len(shards[1]) == len(seen[1]["slice_index"])
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert abs(len(shards[0]) - len(shards[1])) == 0
    assert (root / "models" / "model.pt").is_file()
    assert len(list((root / "logs").glob("events.out.tfevents.*"))) == 1, "only rank 0 writes TensorBoard events"


# ------------------------------------------------------------------------------------------------------------
# 2D image bundle
# ------------------------------------------------------------------------------------------------------------


def test_images_training_inference_and_evaluate(images: dict[str, Path]) -> None:
    root, data = images["root"], images["data"]
    assert (data / "synthetic_images.csv").is_file() and list((data / "abnormal").glob("*.png"))
    _, ckpt = load_model(root / "models" / "model.pt")
    assert ckpt["config"]["preprocessing"] == {"spatial_size": [32, 32], "percentiles": [1.0, 99.0], "grayscale": True}
    scalars, grids = _scalar_tags(root / "logs")
    assert {"train/loss", "train/lr", "val_auroc"} <= scalars and grids
    _check_train_properties(IMAGES, root, data)

    common = ["--bundle_root", str(root), "--dataset_dir", str(data), "--split_fractions", "[0.5, 0.25, 0.25]"]
    _bundle(IMAGES, ["run", "--config_file", "configs/inference.json", "--image_size", "[32, 32]", *common])
    summary = json.loads((root / "eval" / "inference" / "scores.json").read_text())
    assert summary["n_inputs"] == summary["n_ok"] > 0
    for row in summary["inputs"]:
        src = Image.open(row["input"])
        amap = Image.open(row["outputs"]["anomaly"])
        assert amap.size == src.size and Path(row["outputs"]["scores"]).is_file()

    _bundle(
        IMAGES,
        ["run", "--config_file", _configs("train.json", "evaluate.json"), "--n_bootstrap", "10", *common] + IMAGES_TINY,
    )
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["test_image_auroc"] <= 1.0
    assert metrics["n_images"] == summary["n_inputs"] and metrics["n_abnormal_images"] > 0
    assert {"auroc", "auprc", "f1", "acc", "sen", "spe"} <= set(metrics["image"])


# ------------------------------------------------------------------------------------------------------------
# metadata, network in/out, glue
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", [BRAIN, IMAGES], ids=["brain", "images"])
def test_verify_metadata_against_the_schema_in_the_repository(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monai.bundle import verify_metadata

    def _no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr("monai.apps.utils._download_with_progress", _no_download)
    before = SCHEMA.read_bytes()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith(SCHEMA.name)
    assert {"network_data_format", "version", "changelog", "required_packages_version", "intended_use"} <= set(meta)
    assert meta["version"] in meta["changelog"] and any("AE-FLOW" in ref for ref in meta["references"])
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    assert SCHEMA.read_bytes() == before
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps({k: v for k, v in meta.items() if k != "network_data_format"}))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", [BRAIN, IMAGES], ids=["brain", "images"])
def test_verify_net_in_out_gets_the_anomaly_map(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(bundle)
    verify_net_in_out(
        net_id="network_def",
        meta_file="configs/metadata.json",
        config_file="configs/inference.json",
        device="cpu",
        n=2,
        dataset_dir="/nonexistent/synthetic",
        synthetic=True,
    )


def test_anomaly_map_net_wraps_the_model_file_keys() -> None:
    net = build_bundle_network("aeflow", in_channels=1, backbone="resnet18", backbone_weights=None, flow_blocks=2)
    wrapper = AnomalyMapNet(net).eval()
    assert list(wrapper.state_dict()) == list(net.state_dict())
    x = torch.rand(2, 1, 32, 32)
    initialize_flow(net, [{"image": img} for img in x])
    assert not net.flow.needs_initialization
    with torch.no_grad():
        amap = wrapper(x)
        expected = (x - net(x).x_rec).abs()
    assert amap.shape == (2, 1, 32, 32) and torch.allclose(amap, expected, atol=1e-6)
    clone = AnomalyMapNet(build_bundle_network(backbone="resnet18", backbone_weights=None, flow_blocks=2)).eval()
    clone.load_state_dict(wrapper.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(x), amap)


def test_build_bundle_network_leaves_out_settings_a_model_does_not_take() -> None:
    from torch import nn

    from monai_aeflow.models import MODELS, ModelSpec, register_model

    class Tiny(nn.Module):
        def __init__(self, in_channels: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_channels, in_channels, 1)
            self.hparams = {"in_channels": in_channels}

    register_model(
        ModelSpec(name="tiny_test_model", network_cls=Tiny, make_loss=lambda t: None, score=lambda *a, **k: {})
    )
    try:
        net = build_bundle_network("tiny_test_model", in_channels=2, backbone="resnet18", flow_blocks=8)
        assert isinstance(net, Tiny) and net.hparams == {"in_channels": 2}
    finally:
        MODELS.pop("tiny_test_model", None)


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24), value, np.uint8)).save(path)


def test_image_datalist_keeps_a_release_split_and_trains_on_normal_images(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("NORMAL", "PNEUMONIA"):
            for i in range(n):
                _png(tmp_path / split / cls / f"person{i}_{cls.lower()}_{split}.jpeg")
    assert not is_synthetic_dataset(tmp_path)
    lists = prepare_image_datalist(tmp_path, fractions=(0.5, 0.5, 0.0), subject_pattern=r"(person\d+)_")
    assert all(r["label"] == 0 for r in lists["train"]) and lists["val"]
    assert {r["split"] for r in lists["test"]} == {"test"} and len(lists["test"]) == 4
    train_subjects = {r["subject_id"] for r in lists["train"]}
    assert not train_subjects & {r["subject_id"] for r in lists["val"]}


def test_index_isic_ground_truth_layouts(tmp_path: Path) -> None:
    names = [f"ISIC_{i:07d}" for i in range(6)]
    for name in names:
        _png(tmp_path / "ISIC2018_Task3_Training_Input" / f"{name}.png")
    rows = ["image,MEL,NV,BCC"] + [
        f"{n},{float(i % 3 == 0)},{float(i % 3 == 1)},{float(i % 3 == 2)}" for i, n in enumerate(names)
    ]
    (tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv").write_text("\n".join(rows) + "\n")
    meta = ["lesion_id,image_id"] + [f"HAM_{i // 2:07d},{n}" for i, n in enumerate(names)]
    (tmp_path / "HAM10000_metadata.csv").write_text("\n".join(meta) + "\n")
    records = index_isic(tmp_path)
    assert [r["label"] for r in records] == [1, 0, 1, 1, 0, 1]
    assert records[0]["subject_id"] == "HAM_0000000" and records[1]["subject_id"] == "HAM_0000000"
    lists = prepare_image_datalist(tmp_path, fractions=(0.34, 0.33, 0.33))
    assert lists["train"] and all(r["label"] == 0 for r in lists["train"])
    (tmp_path / "HAM10000_metadata.csv").unlink()
    (tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv").write_text(
        "image_name,patient_id,target\n" + "\n".join(f"{n},IP_{i},{i % 2}" for i, n in enumerate(names)) + "\n"
    )
    assert [r["label"] for r in index_isic(tmp_path)] == [0, 1, 0, 1, 0, 1]


def test_brain_inference_config_slice_inferer_maps_a_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.bundle import ConfigParser

    monkeypatch.chdir(BRAIN)
    parser = ConfigParser()
    parser.read_config("configs/inference.json")
    parser.update(
        {
            "dataset_dir": "/nonexistent/synthetic",
            "synthetic": True,
            "image_size": [32, 32],
            "network_def#network#flow_blocks": 2,
        }
    )
    net = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    volume = torch.rand(1, 1, 32, 32, 5)
    with torch.no_grad():
        out = inferer(volume, net)
        reference = net(volume[..., 3])
    assert out.shape == volume.shape
    assert torch.allclose(torch.as_tensor(out)[..., 3], reference, atol=1e-5)
