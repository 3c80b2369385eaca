"""Scores, pixel maps and the loss against independent computations (scikit-image, MONAI, torch.distributions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric
from skimage.metrics import structural_similarity

from monai_aeflow.losses import AEFlowLoss, flow_nll_per_dim
from monai_aeflow.networks import AEFlow
from monai_aeflow.networks.aeflow import AEFlowOutput
from monai_aeflow.scores import (
    anomaly_map,
    flow_map,
    flow_score,
    image_score,
    recon_score,
    residual_map,
    ssim,
    ssim_anomaly_map,
    ssim_map,
)


def _structured(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    a = 0.5 + 0.3 * np.sin(8 * xx) * np.cos(5 * yy)
    a[size // 4 : size // 2, size // 3 : 2 * size // 3] = 0.9
    b = a.copy()
    b[10:20, 30:45] = 0.1  # a structural change
    b = np.clip(b + 0.03 * rng.standard_normal(b.shape), 0, 1)
    return a.astype(np.float32), b.astype(np.float32)


def _random(size: int = 48, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random((size, size + 8)).astype(np.float32)
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    return a, b


def _sk(a: np.ndarray, b: np.ndarray):
    # Gaussian weights, sigma 1.5 (window 11), data range 1, population covariance as in Wang et al.
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True
    )


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)[None, None]


@pytest.mark.parametrize("pair", [_structured(), _random(), _structured(96, seed=5)])
def test_ssim_matches_scikit_image(pair):
    a, b = pair
    mean, full = _sk(a, b)
    assert abs(float(ssim(_t(a), _t(b))) - mean) < 1e-3
    assert np.abs(ssim_map(_t(a), _t(b))[0, 0].numpy() - full).max() < 1e-3
    assert abs(float(recon_score(_t(a), _t(b))) + mean) < 1e-3


def test_ssim_matches_monai_metric_and_multichannel():
    a = torch.rand(2, 3, 40, 40)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    ref = SSIMMetric(spatial_dims=2, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)(a, b)
    assert torch.allclose(ssim(a, b), ref.flatten(), atol=1e-5)
    sk = [
        structural_similarity(
            a[i].numpy(),
            b[i].numpy(),
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(2)
    ]
    assert np.allclose(ssim(a, b).numpy(), sk, atol=1e-3)


def test_ssim_data_range_is_fixed():
    a, b = _structured()
    dim = 0.5 * a, 0.5 * b  # a dimmer pair is not rescaled to its own range
    assert abs(float(ssim(_t(dim[0]), _t(dim[1]))) - _sk(dim[0], dim[1])[0]) < 1e-3
    assert abs(float(ssim(_t(dim[0]), _t(dim[1]))) - float(ssim(_t(a), _t(b)))) > 1e-3


def test_flow_score_is_negative_per_dimension_density():
    z = torch.randn(3, 8, 4, 4) * torch.tensor([0.5, 1.0, 3.0]).view(3, 1, 1, 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = -torch.exp(normal.log_prob(z).flatten(1).mean(1))
    assert torch.allclose(flow_score(z), expected, atol=1e-6)
    s = flow_score(z)
    assert (s < 0).all() and (s >= -1 / math.sqrt(2 * math.pi) - 1e-6).all()
    assert s[0] < s[1] < s[2]  # farther from N(0, 1) is more anomalous
    huge = flow_score(torch.full((1, 1024, 16, 16), 0.1))  # no underflow even for 262,144 dimensions
    assert float(huge) < -0.3


def test_image_score_weighting_and_calibration():
    z = torch.randn(4, 8, 2, 2)
    x = torch.rand(4, 1, 32, 32)
    rec = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    s = image_score(z, x, rec, beta=0.9)
    assert torch.allclose(s, 0.9 * flow_score(z) + 0.1 * recon_score(x, rec), atol=1e-6)
    cal = {"flow_mean": -0.2, "flow_std": 0.05, "recon_mean": -0.5, "recon_std": 0.1}
    sc = image_score(z, x, rec, beta=0.5, calibration=cal)
    exp = 0.5 * (flow_score(z) + 0.2) / 0.05 + 0.5 * (recon_score(x, rec) + 0.5) / 0.1
    assert torch.allclose(sc, exp, atol=1e-5)


def test_pixel_maps():
    x = torch.rand(2, 3, 32, 48)
    rec = torch.rand(2, 3, 32, 48)
    assert torch.allclose(residual_map(x, rec), (x - rec).abs().mean(1, keepdim=True))
    z = torch.zeros(2, 16, 2, 3)
    z[0, :, 1, 2] = 4.0  # one anomalous location
    fm = flow_map(z, (32, 48))
    assert fm.shape == (2, 1, 32, 48)
    assert fm[0, 0, 24, 40] > fm[0, 0, 4, 4]
    sm = ssim_anomaly_map(x, rec)
    assert sm.shape == (2, 1, 32, 48)
    assert torch.allclose(anomaly_map(z, x, rec, "ssim"), sm)
    assert torch.allclose(anomaly_map(z, x, rec, "residual"), residual_map(x, rec))
    with pytest.raises(ValueError, match="unknown anomaly map"):
        anomaly_map(z, x, rec, "nope")


def test_flow_nll_per_dim_against_torch_distributions():
    z = torch.randn(3, 6, 4, 4) * 1.7
    log_det = torch.tensor([1.0, -20.0, 3.5])
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = -(normal.log_prob(z).flatten(1).sum(1) + log_det) / z[0].numel()
    assert torch.allclose(flow_nll_per_dim(z, log_det), expected, atol=1e-5)


def test_loss_combination_and_ssim_option():
    z = torch.randn(2, 8, 2, 2)
    x = torch.rand(2, 1, 32, 32)
    rec = torch.rand(2, 1, 32, 32)
    out = AEFlowOutput(z, z, torch.zeros(2), rec)
    losses = AEFlowLoss(alpha=0.3)(out, x)
    nll = flow_nll_per_dim(z, torch.zeros(2)).mean()
    assert torch.allclose(losses["loss"], 0.3 * nll + 0.7 * torch.mean((rec - x) ** 2))
    ls = AEFlowLoss(alpha=0.0, recon="ssim")(out, x)
    assert torch.allclose(ls["loss"], 1 - ssim(rec, x).mean())
    with pytest.raises(ValueError):
        AEFlowLoss(alpha=1.5)


def test_per_dimension_loss_terms_within_two_orders_at_init():
    from monai_aeflow.data.synthetic import make_slices

    slices = make_slices(2, lesion=False, seed=0, shape=(64, 64, 40))
    x = torch.from_numpy(slices["image"][:8])
    net = AEFlow(backbone="resnet18", backbone_weights=None).train()
    with torch.no_grad():
        out = net(x)
        losses = AEFlowLoss()(out, x)
    ratio = float(losses["loss_flow"].abs() / losses["loss_recon"])
    assert 1e-2 < ratio < 1e2, ratio
    # the raw (summed) NLL would dominate by far more than two orders of magnitude
    raw = float(losses["loss_flow"].abs()) * out.z_prime[0].numel()
    assert raw / float(losses["loss_recon"]) > 1e3
