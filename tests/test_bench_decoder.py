"""``benchmarks/bench_decoder.py``: its PSNR against MONAI's metric, its lossless reference input, and its training."""

import importlib.util
from pathlib import Path

import torch
from monai.metrics import PSNRMetric

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decoder.py"
_SPEC = importlib.util.spec_from_file_location("bench_decoder_under_test", _PATH)
bench_decoder = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_decoder)


def test_psnr_equals_monai_metric():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(5, 1, 32, 32, generator=gen)
    pred = (target + 0.1 * torch.randn(5, 1, 32, 32, generator=gen)).clamp(0, 1)
    expected = PSNRMetric(max_val=1.0)(pred, target).mean().item()  # per slice, then the mean
    assert abs(bench_decoder.psnr(pred, target) - expected) < 1e-4


def test_pixels_source_keeps_all_information_on_the_stride_16_grid():
    x = torch.rand(3, 1, 64, 48)
    (z,) = bench_decoder.make_inputs("pixels", x)
    assert z.shape == (3, 256, 4, 3)
    assert torch.equal(torch.nn.functional.pixel_shuffle(z, 16), x)


def test_fit_decoder_learns_beyond_the_mean_image():
    # smooth random images: a decoder fed their 16 x 16 blocks must beat predicting the mean image
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(48, 1, 4, 4, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    (z,) = bench_decoder.make_inputs("pixels", x)
    log, decoder = bench_decoder.fit_decoder(z[:40], x[:40], z[40:], x[40:], steps=150, points=3)
    assert [r["step"] for r in log] == [50, 100, 150]
    assert log[-1]["test_mse_ratio"] < 0.5
    assert log[-1]["train_psnr"] > log[0]["train_psnr"]
    assert not decoder.training


def test_standardise_uses_the_training_statistics():
    gen = torch.Generator().manual_seed(1)
    z_train = 5 + 3 * torch.randn(20, 4, 3, 3, generator=gen)
    z_test = 5 + 3 * torch.randn(6, 4, 3, 3, generator=gen)
    a, b = bench_decoder.standardise(z_train, z_test)
    flat = a.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(flat.std(1), torch.ones(4), atol=1e-5)
    mean = z_train.transpose(0, 1).reshape(4, -1).mean(1).view(1, 4, 1, 1)
    std = z_train.transpose(0, 1).reshape(4, -1).std(1).view(1, 4, 1, 1)
    assert torch.allclose(b, (z_test - mean) / std, atol=1e-5)


def test_one_random_encoder_for_training_and_held_out_slices():
    # the held-out features must come from the same random encoder as the training features
    x = torch.rand(2, 1, 32, 32)
    a, b = bench_decoder.make_inputs("resnet18:none", x, x)
    assert a.shape == (2, 256, 2, 2)
    assert torch.equal(a, b)
    (c,) = bench_decoder.make_inputs("resnet18:none", x)
    assert torch.equal(a, c)
