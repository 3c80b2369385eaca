"""Scoring under float16 and bfloat16 autocast gives finite maps equal to float32 (CPU autocast runs both).

The network's flow is made numerically hard: the coupling subnets' hidden activations are scaled by 1e4 (and
their output convolutions by 1e-4, so that the float32 network computes the same function): beyond float16's
range (65504). The flow's output is scaled too (|z'| in the hundreds, so ``z'^2`` exceeds float16's range).
Without float32 coupling arithmetic, float32 subnets under float16 and float32 densities, the float16 maps are
NaN. The float32 result is the reference; the tolerances are those of a half-precision encoder and decoder.
"""

from __future__ import annotations

import pytest
import torch

from monai_aeflow.inference import score_slices
from monai_aeflow.networks import AEFlow
from monai_aeflow.networks.flow import NormalizingFlow

HIDDEN_SCALE = 1e4
# max |map - float32 map| allowed, times max(1, the map's maximum); measured 2e-4 (float16), 3e-3 (bfloat16)
MAP_TOL = {"float16": 5e-3, "bfloat16": 2e-2}
SCORE_TOL = {"float16": 2e-3, "bfloat16": 5e-3}


def _hard_flow(flow: NormalizingFlow) -> None:
    """Scale hidden activations by HIDDEN_SCALE without changing the float32 function (ReLU is homogeneous)."""
    with torch.no_grad():
        for block in flow.inn.module_list:
            first, last = block.subnet[0], block.subnet[-1]
            first.weight.mul_(HIDDEN_SCALE)
            first.bias.mul_(HIDDEN_SCALE)
            last.weight.div_(HIDDEN_SCALE)


@pytest.fixture(scope="module")
def hard_network() -> tuple[AEFlow, torch.Tensor]:
    torch.manual_seed(0)
    net = AEFlow(1, "resnet18", None, flow_blocks=4).eval()
    x = torch.rand(4, 1, 64, 64)
    net.initialize_flow(x)
    with torch.no_grad():
        before = net(x)
        _hard_flow(net.flow)
        after = net(x)
        net.flow.actnorm.log_scale.add_(2.0)  # |z'| about 300
        sub = net.flow.inn.module_list[0].subnet
        hidden = torch.relu(sub[0](net.flow.actnorm(net.encoder(x))[0][:, : sub[0].in_channels]))
        z_prime = net(x).z_prime
    # the scaling keeps the float32 function and puts activations beyond float16's range
    torch.testing.assert_close(after.z_prime, before.z_prime, rtol=1e-4, atol=1e-3)
    assert hidden.abs().max() > 65504
    assert z_prime.abs().max() > 256  # z'^2 > 65504
    return net, x


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("map_kind", ["residual", "flow", "ssim", "product"])
def test_scorer_under_autocast_equals_float32(hard_network, dtype, map_kind):
    net, x = hard_network
    ref = score_slices(net, x, batch_size=4, map_kind=map_kind, amp_dtype="none")
    out = score_slices(net, x, batch_size=4, map_kind=map_kind, amp_dtype=dtype)
    for key in ("anomaly_map", "reconstruction", "score", "score_flow", "score_recon"):
        assert torch.isfinite(out[key]).all(), f"{key} not finite under {dtype}"
        assert out[key].dtype == torch.float32
    # relative to the map's range: the product map (residual times flow NLL) is not bounded by 1
    tol = MAP_TOL[dtype] * max(1.0, float(ref["anomaly_map"].abs().max()))
    assert (out["anomaly_map"] - ref["anomaly_map"]).abs().max() <= tol
    assert (out["score"] - ref["score"]).abs().max() <= SCORE_TOL[dtype]
    assert (out["score_recon"] - ref["score_recon"]).abs().max() <= SCORE_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flow_log_det_and_inverse_in_float32_under_autocast(dtype):
    torch.manual_seed(1)
    flow = NormalizingFlow(64, n_blocks=4).eval()
    _hard_flow(flow)
    z = 30 * torch.randn(2, 64, 32, 32)
    with torch.no_grad():
        ref, ref_det = flow(z)
        with torch.autocast("cpu", dtype=dtype):
            z_prime, log_det = flow(z)
            back = flow.inverse(z_prime)
    assert z_prime.dtype == log_det.dtype == back.dtype == torch.float32
    assert torch.isfinite(log_det).all() and torch.isfinite(z_prime).all()
    # a log-det of 65536 terms: float32 sums agree to float32 rounding, the subnets' precision aside
    torch.testing.assert_close(log_det, ref_det, rtol=2e-2 if dtype == torch.bfloat16 else 1e-3, atol=1.0)
    torch.testing.assert_close(z_prime, ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max()))
    # bfloat16 subnets round the recovered halves differently from block to block: 1% of the feature range
    inv_tol = 1e-2 if dtype == torch.float16 else 1e-2 * float(z.abs().max())
    torch.testing.assert_close(back, z, rtol=1e-3, atol=inv_tol)


def test_permutation_gather_equals_freia_convolution():
    torch.manual_seed(2)
    flow = NormalizingFlow(16, n_blocks=2).eval()
    block = flow.inn.module_list[0]
    x = torch.randn(3, 16, 5, 7)
    scale = block.global_scale_activation(block.global_scale)
    expected = torch.nn.functional.conv2d(x * scale + block.global_offset, block.w_perm)
    got, log_jac = block._permute(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(log_jac, torch.sum(torch.log(scale)))
    back, _ = block._permute(got, rev=True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
