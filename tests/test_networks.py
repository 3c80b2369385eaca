"""Backbone, flow, decoder and AEFlow: shapes, weights loading, frozen encoder, invertibility, log-det."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from monai_aeflow.errors import CheckpointError
from monai_aeflow.networks import (
    AEFlow,
    AEFlowDecoder,
    FeatureEncoder,
    NormalizingFlow,
    ResNetFeatureExtractor,
)
from monai_aeflow.networks.backbone import BACKBONES, load_backbone_weights


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# torchvision's published totals (resnet18: 11,689,512; wide_resnet50_2: 68,883,240) minus layer4 and fc,
# counted by hand from the architectures: resnet18 layer4 8,393,728 + fc 513,000;
# wide_resnet50_2 layer4 41,971,712 + fc 2,049,000.
@pytest.mark.parametrize("name,params,channels", [("resnet18", 2_782_784, 256), ("wide_resnet50_2", 24_862_528, 1024)])
def test_backbone_matches_torchvision_architecture(name, params, channels):
    net = ResNetFeatureExtractor(name)
    assert _n_params(net) == params
    assert net.out_channels == channels
    keys = set(net.state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer3.0.downsample.0.weight",
        "layer3.0.downsample.1.num_batches_tracked",
    ):
        assert key in keys
    assert not any(k.startswith(("layer4", "fc")) for k in keys)
    out = net.eval()(torch.rand(1, 3, 64, 96))
    assert out.shape == (1, channels, 4, 6)


def _torchvision_like_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    state = {k: v.clone() for k, v in ResNetFeatureExtractor(name).state_dict().items()}
    state["layer4.0.conv1.weight"] = torch.zeros(3)  # extra keys of the full model are ignored
    state["fc.weight"] = torch.zeros(10, 3)
    return state


def test_load_local_state_dict_file(tmp_path):
    state = _torchvision_like_state("resnet18")
    path = tmp_path / "resnet18-local.pth"
    torch.save(state, path)
    enc = FeatureEncoder("resnet18", weights=path)
    for k, v in enc.net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_wrong_file_names_problem(tmp_path):
    state = _torchvision_like_state("resnet18")
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not wide_resnet50_2 weights"):
        FeatureEncoder("wide_resnet50_2", weights=path)
    with pytest.raises(CheckpointError, match="not found"):
        FeatureEncoder("resnet18", weights=tmp_path / "missing.pth")


def test_offline_imagenet_download_message(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError) as info:
        FeatureEncoder("wide_resnet50_2", weights="imagenet")
    msg = str(info.value)
    assert BACKBONES["wide_resnet50_2"]["url"] in msg
    assert "local path" in msg and "weights=" in msg


def test_encoder_frozen_and_always_eval():
    net = AEFlow(backbone="resnet18", backbone_weights=None)
    net.train()
    assert not net.encoder.training and not net.encoder.net.layer1[0].bn1.training
    assert net.flow.training and net.decoder.training
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    out = net(torch.rand(4, 1, 64, 64))
    (out.x_rec.mean() + out.z_prime.mean()).backward()
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed while frozen"
    assert all(p.grad is None for p in net.encoder.parameters())
    assert all(not p.requires_grad for p in net.encoder.parameters())
    assert {id(p) for p in net.trainable_parameters()} == {
        id(p) for p in list(net.flow.parameters()) + list(net.decoder.parameters()) if p.requires_grad
    }


def test_encoder_fine_tuning_option():
    net = AEFlow(backbone="resnet18", backbone_weights=None, train_encoder=True)
    net.train()
    assert net.encoder.training
    assert any(p.requires_grad for p in net.encoder.parameters())


@pytest.mark.parametrize("channels", [1, 3])
def test_aeflow_shapes(channels):
    net = AEFlow(in_channels=channels, backbone="resnet18", backbone_weights=None).eval()
    x = torch.rand(2, channels, 64, 96)
    out = net(x)
    assert out.z.shape == out.z_prime.shape == (2, 256, 4, 6)
    assert out.log_det.shape == (2,)
    assert out.x_rec.shape == x.shape
    assert float(out.x_rec.min()) >= 0.0 and float(out.x_rec.max()) <= 1.0


def test_aeflow_rejects_bad_inputs():
    net = AEFlow(backbone="resnet18", backbone_weights=None).eval()
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 100, 96))
    with pytest.raises(ValueError, match="channel"):
        net(torch.rand(1, 2, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match="in_channels"):
        AEFlow(in_channels=2, backbone_weights=None)


def test_decoder_paper_channels():
    dec = AEFlowDecoder(1024, 1)
    convs = [m for m in dec.modules() if isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Conv2d))]
    assert [(m.in_channels, m.out_channels) for m in convs] == [
        (1024, 512),
        (512, 512),
        (512, 256),
        (256, 256),
        (256, 64),
        (64, 64),
        (64, 1),
    ]
    assert isinstance(dec.layers[-1], torch.nn.Sigmoid)


@pytest.mark.parametrize("subnet", ["conv", "resnet"])
def test_flow_invertible(subnet):
    flow = NormalizingFlow(64, n_blocks=8, subnet=subnet).eval()
    with torch.no_grad():  # move away from the initial parameters so the test is not trivially near identity
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        z = torch.randn(3, 64, 6, 5)
        z_prime, log_det = flow(z)
        assert not torch.allclose(z_prime, z, atol=1e-2)
        z_back = flow.inverse(z_prime)
    assert torch.allclose(z_back, z, atol=1e-4), float((z_back - z).abs().max())
    assert torch.isfinite(log_det).all()


@pytest.mark.parametrize("subnet", ["conv", "resnet"])
def test_flow_log_det_matches_brute_force_jacobian(subnet):
    torch.manual_seed(1)
    flow = NormalizingFlow(4, n_blocks=3, subnet=subnet).double().eval()
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(1, 4, 3, 2, dtype=torch.float64)
    _, log_det = flow(z)

    def fn(flat: torch.Tensor) -> torch.Tensor:
        return flow(flat.view(1, 4, 3, 2))[0].flatten()

    jac = torch.autograd.functional.jacobian(fn, z.flatten())
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    assert torch.allclose(log_det[0], logabs, atol=1e-6), (float(log_det[0]), float(logabs))


def test_flow_permutation_fixed_and_seeded():
    a, b = NormalizingFlow(16, permutation_seed=3), NormalizingFlow(16, permutation_seed=3)
    c = NormalizingFlow(16, permutation_seed=4)
    pa = [blk.w_perm for blk in a.inn.module_list]
    assert all(torch.equal(x, y.w_perm) for x, y in zip(pa, b.inn.module_list, strict=True))
    assert not all(torch.equal(x, y.w_perm) for x, y in zip(pa, c.inn.module_list, strict=True))
    assert "inn.module_list.0.w_perm" in a.state_dict()


def test_weights_mapping_is_accepted():
    net = ResNetFeatureExtractor("resnet18")
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    load_backbone_weights(net, state)
    assert float(net.conv1.weight.abs().sum()) == 0.0


def test_actnorm_data_initialisation_and_persistence():
    net = AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2).eval()
    x = torch.rand(6, 1, 64, 64)
    assert net.flow.needs_initialization
    net.initialize_flow(x)
    assert not net.flow.needs_initialization
    with torch.no_grad():
        normed, _ = net.flow.actnorm(net.encoder(x))
    flat = normed.transpose(0, 1).reshape(normed.shape[1], -1)
    live = flat.std(1) > 1e-2  # channels with signal are standardised
    assert torch.allclose(flat.mean(1)[live], torch.zeros(int(live.sum())), atol=1e-4)
    assert torch.allclose(flat.std(1)[live], torch.ones(int(live.sum())), atol=1e-3)
    fresh = AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2)
    fresh.load_state_dict(net.state_dict())
    assert not fresh.flow.needs_initialization
