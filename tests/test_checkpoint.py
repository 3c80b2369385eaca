"""Model files: round trip, and refusal of pickled code, foreign checkpoints and missing files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from monai_aeflow.checkpoint import atomic_torch_save, load_model, read_checkpoint, save_model
from monai_aeflow.errors import CheckpointError
from monai_aeflow.networks import AEFlow


def _net() -> AEFlow:
    return AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2, subnet="resnet")


def test_round_trip_gives_identical_outputs(tmp_path):
    net = _net().eval()
    path = save_model(net, tmp_path / "m.pt", {"preprocessing": {"spatial_size": [64, 64]}}, threshold=0.25)
    loaded, ckpt = load_model(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a, b = net(x), loaded(x)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert ckpt["threshold"] == 0.25
    assert ckpt["config"]["model"]["subnet"] == "resnet"
    assert ckpt["config"]["preprocessing"]["spatial_size"] == [64, 64]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"network": {}, "config": {"model": {}}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        read_checkpoint(path)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match=str(raw)):
        load_model(raw)


def test_foreign_and_broken_checkpoints(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not a monai-aeflow checkpoint"):
        load_model(other)
    mismatch = tmp_path / "mismatch.pt"
    rec = torch.load(save_model(_net(), tmp_path / "ok.pt"), weights_only=True)
    rec["config"]["model"]["backbone"] = "wide_resnet50_2"
    atomic_torch_save(rec, mismatch)
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(mismatch)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes((tmp_path / "ok.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        load_model(tmp_path)


@pytest.mark.parametrize("content", [os.urandom(64), b'{"network": {}}', b""])
def test_a_file_that_is_not_a_torch_file_says_so(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content if not content.startswith((b"PK", b"\x80")) else b"x" + content)
    with pytest.raises(CheckpointError, match="is not a PyTorch file") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "pickled" not in str(info.value)
