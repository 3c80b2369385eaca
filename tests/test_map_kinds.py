"""AE-FLOW's pixel-map kinds against independent NumPy / SciPy computations."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage, stats

from monai_aeflow.evaluation.postprocess import apply_residual_mode
from monai_aeflow.model_config import validate_score
from monai_aeflow.models.aeflow import aeflow_score
from monai_aeflow.networks import AEFlow
from monai_aeflow.scores import DEFAULT_MAP_KIND, anomaly_map, flow_nll_map, product_map


def test_flow_nll_map_matches_scipy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 6, 3, 5)) * 1.5
    got = flow_nll_map(torch.from_numpy(z).float(), (12, 20)).numpy()
    local = -stats.norm.logpdf(z).mean(1)  # per-location NLL per channel
    for b in range(2):
        # bilinear with half-pixel centres and clamped edges = PyTorch's align_corners=False
        want = ndimage.zoom(local[b], (4, 4), order=1, grid_mode=True, mode="nearest")
        np.testing.assert_allclose(got[b, 0], want, rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 1, 12, 20)
    assert got.min() >= 0.5 * math.log(2 * math.pi) - 1e-6  # the NLL of z' = 0 is the minimum


def test_product_map_matches_numpy_and_the_residual_is_the_default():
    rng = np.random.default_rng(1)
    x = rng.random((2, 3, 16, 24))
    rec = rng.random((2, 3, 16, 24))
    z = rng.normal(size=(2, 5, 4, 6))
    xt, rt, zt = (torch.from_numpy(a).float() for a in (x, rec, z))
    got = product_map(zt, xt, rt).numpy()
    residual = np.abs(x - rec).mean(1)
    nll = -stats.norm.logpdf(z).mean(1)
    want = np.stack(
        [residual[b] * ndimage.zoom(nll[b], (4, 4), order=1, grid_mode=True, mode="nearest") for b in range(2)]
    )
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-6)
    assert DEFAULT_MAP_KIND == "residual"  # one default with the engine, the CLI and the bundles
    assert torch.equal(anomaly_map(zt, xt, rt, "product"), product_map(zt, xt, rt))
    np.testing.assert_allclose(anomaly_map(zt, xt, rt).numpy()[:, 0], residual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(anomaly_map(zt, xt, rt, "residual").numpy()[:, 0], residual, rtol=1e-5, atol=1e-6)


def test_aeflow_scorer_gives_the_product_map_by_name_and_the_residual_by_default():
    torch.manual_seed(0)
    net = AEFlow(in_channels=1, backbone="resnet18", backbone_weights=None, flow_blocks=2).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = net(x)
        product = aeflow_score(net, x, map_kind="product")
        paper = aeflow_score(net, x)
    rec, zp = out.x_rec.numpy(), out.z_prime.numpy()
    nll = -stats.norm.logpdf(zp).mean(1)
    want = np.abs(x.numpy() - rec)[:, 0] * np.stack(
        [ndimage.zoom(nll[b], (16, 16), order=1, grid_mode=True, mode="nearest") for b in range(2)]
    )
    np.testing.assert_allclose(product["anomaly_map"].numpy()[:, 0], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(paper["anomaly_map"].numpy()[:, 0], np.abs(x.numpy() - rec)[:, 0], atol=1e-6)
    assert torch.equal(product["score"], paper["score"])  # the map kind changes the map only
    validate_score({"map_kind": "product"}, "aeflow")  # a model file may store it


def test_flow_kind_is_non_negative_and_bounded():
    # the negative density -exp(mean log N) would be zeroed by the protocol's positive mode and inverted by the
    # absolute mode; the "flow" kind is 1 - exp(-mean z'^2 / 2), which both modes leave unchanged
    rng = np.random.default_rng(2)
    z = rng.normal(size=(1, 4, 2, 3)) * 2.0
    x = torch.rand(1, 1, 8, 12)
    got = anomaly_map(torch.from_numpy(z).float(), x, x, "flow").numpy()[0, 0]
    density = np.exp(stats.norm.logpdf(z).mean(1)[0]) * math.sqrt(2 * math.pi)
    want = ndimage.zoom(1.0 - density, (4, 4), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.min() >= 0.0 and got.max() < 1.0
    np.testing.assert_array_equal(apply_residual_mode(got, "positive"), got.astype(np.float32))
