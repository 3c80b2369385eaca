"""Reconstruction quality: MONAI PSNR / SSIM against scikit-image, logged during validation, stored in model.pt."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from monai_aeflow.checkpoint import load_model
from monai_aeflow.engines import TrainingConfig, train
from monai_aeflow.engines.handlers import ValidationStatsHandler
from monai_aeflow.engines.metrics import ReconstructionQuality
from monai_aeflow.evaluation.scoring import reconstruction_quality
from monai_aeflow.networks.autoencoder import ConvAutoEncoder


def _independent(images: np.ndarray, recons: np.ndarray) -> tuple[float, float, float]:
    """Mean PSNR and SSIM per image (scikit-image, data range 1, Gaussian 11-pixel window) and the MSE."""
    psnr = [peak_signal_noise_ratio(x[0], y[0], data_range=1.0) for x, y in zip(images, recons, strict=True)]
    ssim = [
        structural_similarity(x[0], y[0], data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for x, y in zip(images, recons, strict=True)
    ]
    return float(np.mean(psnr)), float(np.mean(ssim)), float(np.mean((images - recons) ** 2))


def test_reconstruction_quality_matches_scikit_image():
    rng = np.random.default_rng(0)
    x = rng.random((5, 1, 40, 36)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    q = ReconstructionQuality()
    q.update(torch.from_numpy(x[:2]), torch.from_numpy(y[:2]))
    q.update(torch.from_numpy(x[2:]), torch.from_numpy(y[2:]))
    got = q.compute()
    psnr, ssim, mse = _independent(x, y)
    assert got["n_images"] == 5
    assert got["psnr"] == pytest.approx(psnr, rel=1e-5)
    assert got["ssim"] == pytest.approx(ssim, abs=1e-4)
    assert got["mse"] == pytest.approx(mse, rel=1e-5)
    assert ReconstructionQuality().compute() == {}


def _stub_engine(network, batches):
    state = SimpleNamespace(metrics={}, output=None, batch=None)
    return SimpleNamespace(network=network, state=state), batches


def _run_handler(network, batches) -> dict:
    engine, batches = _stub_engine(network, batches)
    handler = ValidationStatsHandler()
    handler._reset(engine)
    for out in batches:
        engine.state.output, engine.state.batch = out, {}
        handler._update(engine)
    handler._compute(engine)
    return engine.state.metrics


def test_validation_handler_measures_normal_images_only_and_skips_models_that_do_not_reconstruct():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((6, 1, 32, 32)).astype(np.float32))
    rec = (x + 0.05 * torch.from_numpy(rng.standard_normal((6, 1, 32, 32)).astype(np.float32))).clamp(0, 1)
    label = torch.tensor([0, 1, 0, 0, 1, 0])
    batches = [
        {"image": x[:3], "recon": rec[:3], "label": label[:3], "anomaly_map": (x - rec)[:3].abs()},
        {"image": x[3:], "recon": rec[3:], "label": label[3:], "anomaly_map": (x - rec)[3:].abs()},
    ]
    metrics = _run_handler(ConvAutoEncoder(channels=(8, 16, 32, 64)), batches)
    normal = (label == 0).numpy()
    psnr, ssim, _ = _independent(x.numpy()[normal], rec.numpy()[normal])
    assert metrics["val_psnr"] == pytest.approx(psnr, rel=1e-5)
    assert metrics["val_ssim"] == pytest.approx(ssim, abs=1e-4)
    # a model that does not reconstruct (its "recon" is a stand-in) reports nothing, not a made-up number
    no_recon = SimpleNamespace(reconstructs=False)
    assert "val_psnr" not in _run_handler(no_recon, batches) and "val_ssim" not in _run_handler(no_recon, batches)


def test_psnr_ssim_are_logged_and_stored_in_the_model_file(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    images = ndimage_blobs(rng, 24)
    train_items = [{"image": torch.from_numpy(im)} for im in images[:16]]
    val_items = [{"image": torch.from_numpy(im), "label": torch.zeros(1)} for im in images[16:]]
    cfg = TrainingConfig(output_dir=str(tmp_path), max_epochs=2, lr=1e-3, progress=False, seed=0)
    net = ConvAutoEncoder(channels=(8, 16, 32, 64))
    summary = train(net, DataLoader(train_items, batch_size=8), DataLoader(val_items, batch_size=8), cfg)
    model, ckpt = load_model(summary["model_path"])
    stored = ckpt["config"]["training"]["metrics"]
    # the stored numbers are those of the stored model on the healthy validation images, recomputed independently
    x = np.stack(images[16:])
    with torch.no_grad():
        rec = model.eval()(torch.from_numpy(x)).x_rec.numpy()
    psnr, ssim, _ = _independent(x, rec)
    assert stored["val_psnr"] == pytest.approx(psnr, rel=1e-4)
    assert stored["val_ssim"] == pytest.approx(ssim, abs=1e-3)
    assert ckpt["config"]["training"]["epoch"] == 2  # all-healthy validation: undefined AUROC keeps the latest
    # TensorBoard has them too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in tmp_path.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"val_psnr", "val_ssim"} <= tags, tags


def ndimage_blobs(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Smooth random images in [0, 1], (1, 32, 32)."""
    from scipy import ndimage

    return [
        np.clip(ndimage.gaussian_filter(rng.random((32, 32)), 3) * 3 - 1, 0, 1).astype(np.float32)[None]
        for _ in range(n)
    ]


def test_scored_cases_report_healthy_slices_only_and_nothing_without_reconstruction():
    rng = np.random.default_rng(3)
    image = rng.random((16, 16, 6)).astype(np.float32)
    recon = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1).astype(np.float32)
    label = np.zeros(image.shape, bool)
    label[4:8, 4:8, 2] = True
    mask = np.ones(image.shape, bool)
    case = {"image": image, "reconstruction": recon, "label": label, "mask": mask}
    got = reconstruction_quality([case], min_area_fraction=0.0)
    keep = [0, 1, 3, 4, 5]  # the slice with lesion voxels is left out
    x = np.moveaxis(image[..., keep], -1, 0)[:, None]
    y = np.moveaxis(recon[..., keep], -1, 0)[:, None]
    psnr, ssim, mse = _independent(x, y)
    assert got["n_images"] == 5 and got["psnr"] == pytest.approx(psnr, rel=1e-5)
    assert got["ssim"] == pytest.approx(ssim, abs=1e-4) and got["mse"] == pytest.approx(mse, rel=1e-5)
    assert reconstruction_quality([{"map": image, "label": label, "mask": mask}]) == {}


# ---------------------------------------------------------------- does the decoder reconstruct, or is it a grey blob?

SHAPE = (64, 64, 24)


def _mse_ratio(reconstruction: np.ndarray, test: np.ndarray, train_images: np.ndarray) -> float:
    """Held-out MSE of a reconstruction over the MSE of predicting the mean training image (1: a grey blob)."""
    mean_image = train_images.mean(0, keepdims=True)
    return float(((reconstruction - test) ** 2).mean() / ((mean_image - test) ** 2).mean())


@pytest.fixture(scope="module")
def healthy_slices() -> tuple[np.ndarray, np.ndarray]:
    from monai_aeflow.data.synthetic import make_slices

    train_s = make_slices(3, lesion=False, seed=1, shape=SHAPE)["image"]
    test_s = make_slices(1, lesion=False, seed=4, shape=SHAPE)["image"]
    return train_s, test_s


def test_the_reconstruction_check_rejects_grey_blobs(healthy_slices):
    """The check ``held-out MSE < 0.5 x mean-image MSE`` fails for a mean-image predictor, a blurred image and an
    untrained AE-FLOW decoder, and passes for a reconstruction that keeps the anatomy (a 1-pixel blur)."""
    from scipy import ndimage

    from monai_aeflow.networks import AEFlow

    train_s, test_s = healthy_slices
    mean_image = np.broadcast_to(train_s.mean(0, keepdims=True), test_s.shape)
    assert _mse_ratio(mean_image, test_s, train_s) == pytest.approx(1.0)
    assert _mse_ratio(ndimage.gaussian_filter(test_s, (0, 0, 3, 3)), test_s, train_s) > 0.5
    assert _mse_ratio(ndimage.gaussian_filter(test_s, (0, 0, 1, 1)), test_s, train_s) < 0.5
    torch.manual_seed(0)
    net = AEFlow(backbone="efficientnet_lite0", backbone_weights="imagenet").eval()
    with torch.no_grad():
        untrained = net(torch.from_numpy(test_s)).x_rec.numpy()
    ratio = _mse_ratio(untrained, test_s, train_s)
    print(f"untrained AE-FLOW decoder: held-out MSE / mean-image MSE = {ratio:.3f}")
    assert ratio > 0.5


@pytest.fixture(scope="module")
def healthy_slices_128() -> tuple[np.ndarray, np.ndarray]:
    """The demo's slice size: 128 x 128 gives the stride-16 encoder an 8 x 8 bottleneck (64 x 64 gives 4 x 4)."""
    from monai_aeflow.data.synthetic import make_slices

    train_s = make_slices(6, lesion=False, seed=1, shape=SHAPE_128)["image"]
    test_s = make_slices(1, lesion=False, seed=4, shape=SHAPE_128)["image"]
    return train_s, test_s


SHAPE_128 = (128, 128, 32)
BATCH, EPOCHS, LR = 8, 20, 2e-3  # 480 steps: the decoder needs a few hundred (the demo's 72 are too few)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ae", "aeflow"])
def test_trained_decoder_beats_the_mean_image(name, healthy_slices_128, tmp_path):
    """Trained with the engine's defaults (AE-FLOW: the default ``balanced`` recipe), the decoder reconstructs
    held-out healthy slices with less than half the error of the mean training image."""
    from monai_aeflow.networks import AEFlow

    train_s, test_s = healthy_slices_128
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        if name == "aeflow":
            net = AEFlow(backbone="efficientnet_lite0", backbone_weights="imagenet")
        else:
            net = ConvAutoEncoder(channels=(16, 32, 64, 128))
        items = [{"image": torch.from_numpy(im)} for im in train_s]
        loader = DataLoader(items, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
        cfg = TrainingConfig(output_dir=str(tmp_path), max_epochs=EPOCHS, lr=LR, progress=False, seed=0)
        model, ckpt = load_model(train(net, loader, None, cfg)["model_path"])
        with torch.no_grad():
            rec = model.eval()(torch.from_numpy(test_s)).x_rec.numpy()
    finally:
        torch.set_num_threads(threads)
    if name == "aeflow":
        assert ckpt["config"]["training"]["recipe"] == "balanced"
    ratio = _mse_ratio(rec, test_s, train_s)
    print(f"{name}: held-out MSE / mean-image MSE = {ratio:.3f}")
    assert ratio < 0.5
