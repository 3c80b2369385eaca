"""Denoising autoencoder: the coarse noise (spectrum, foreground), the engine's corrupted input, and a real short
training on synthetic slices.

Training protocol (stated so that the thresholds can be judged): skull-stripped synthetic FLAIR-like slices of
64 x 64 pixels; the UNet (widths 16, 32, 64, 128) trains through the shared engine for 12 epochs on the healthy
slices of 4 subjects with Adam at lr 3e-3 and the paper's noise (standard deviation 0.2 on a 16 x 16 grid,
upsampled; 8 x 8 for these 64-pixel slices, the same noise scale relative to the image); test on the slices of 2
other healthy subjects against those of 2 lesioned subjects. Measured: lesion map mean 2.4x that of healthy brain
tissue, pixel AUROC 0.88, slice AUROC 0.74, squared error on the healthy test slices 7 % of their energy
(thresholds: 1.5x, 0.8, 0.6, 25 %).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from sklearn.metrics import roc_auc_score

from monai_aeflow.checkpoint import load_model
from monai_aeflow.engines import TrainingConfig, create_engines
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.inference import score_slices
from monai_aeflow.models import build_network, get_model_spec
from monai_aeflow.models.dae import DenoisingLoss, coarse_noise

SHAPE = (64, 64, 32)
MIN_LESION_PIXELS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _low_frequency_fraction(noise: np.ndarray, cutoff: int) -> float:
    """Fraction of the power of (B, C, H, W) images at spatial frequencies of at most ``cutoff`` cycles."""
    power = np.abs(np.fft.fft2(noise, axes=(-2, -1))) ** 2
    fy = np.abs(np.fft.fftfreq(noise.shape[-2]) * noise.shape[-2])
    fx = np.abs(np.fft.fftfreq(noise.shape[-1]) * noise.shape[-1])
    low = (fy[:, None] <= cutoff) & (fx[None, :] <= cutoff)
    return float(power[..., low].sum() / power.sum())


def test_noise_is_coarse_and_only_inside_the_foreground():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 1, 128, 128)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    brain = ((yy - 64) ** 2 / 50**2 + (xx - 64) ** 2 / 40**2 <= 1).float()
    x[:, 0] = 0.5 * brain
    loss = DenoisingLoss(noise_std=0.2, noise_resolution=16)
    noisy = loss.corrupt(x, brain.expand(8, 1, -1, -1), generator=gen)
    noise = (noisy - x).numpy()
    outside = brain.expand(8, 1, -1, -1).numpy() == 0
    assert np.all(noise[outside] == 0) and np.abs(noise[~outside]).mean() > 0.05
    # without a mask the foreground is x > 0: the same here
    torch.testing.assert_close(loss.corrupt(x, None, generator=torch.Generator().manual_seed(0)), noisy)
    # coarse: a 16 x 16 grid holds frequencies up to 8 cycles per image; bilinear upsampling keeps most of the power
    # there, against (17/128)^2 = 1.8 % for white noise
    raw = coarse_noise((8, 1, 128, 128), 0.2, 16, generator=gen).numpy()
    white = torch.randn(8, 1, 128, 128, generator=gen).numpy()
    assert _low_frequency_fraction(raw, 8) > 0.9
    assert _low_frequency_fraction(white, 8) < 0.05
    assert 0.1 < raw.std() < 0.2  # interpolation averages neighbouring grid values of std 0.2
    with pytest.raises(AEFlowInputError, match="unknown loss option"):
        get_model_spec("dae").make_loss({"loss_options": {"nope": 1}})


def test_the_engine_feeds_the_network_the_corrupted_image(tmp_path):
    torch.manual_seed(0)
    net = build_network("dae", channels=[4, 8, 8])
    seen: list[torch.Tensor] = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.rand(4, 1, 32, 32)
    mask = torch.zeros(4, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    loader = DataLoader([{"image": x[i], "mask": mask[i]} for i in range(4)], batch_size=4)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_epochs=1, progress=False)
    trainer, _ = create_engines(net, loader, None, cfg)
    trainer.run()
    diff = seen[0] - x
    assert torch.all(diff[mask == 0] == 0) and diff[mask > 0].abs().mean() > 0.01


def test_dae_trains_and_scores_lesions_above_healthy_tissue(tmp_path, slice_cohort):
    cohort = slice_cohort(4, SHAPE, MIN_LESION_PIXELS)
    items = [{"image": img, "mask": m} for img, m in zip(cohort["train"], cohort["train_brain"], strict=True)]
    torch.manual_seed(0)
    net = build_network("dae", channels=[16, 32, 64, 128])
    loader = DataLoader(items, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = TrainingConfig(
        output_dir=str(tmp_path), max_epochs=12, lr=3e-3, progress=False, loss_options={"noise_resolution": 8}
    )
    trainer, _ = create_engines(net, loader, None, cfg)
    trainer.run()
    model, ckpt = load_model(trainer.model_path)
    assert ckpt["config"]["model_name"] == "dae"
    out_h = score_slices(model, cohort["healthy"], batch_size=64)
    out_l = score_slices(model, cohort["lesion"], batch_size=64)
    label, brain, keep = cohort["label"], cohort["brain"], cohort["lesioned"]
    amap = out_l["anomaly_map"][:, 0].numpy()
    y = np.r_[np.zeros(len(out_h["score"])), np.ones(int(keep.sum()))]
    s = np.r_[out_h["score"].numpy(), out_l["score"].numpy()[keep]]
    x_h = cohort["healthy"]
    relative_error = float(((x_h - out_h["reconstruction"]) ** 2).mean() / (x_h**2).mean())
    metrics = {
        "slice_auroc": roc_auc_score(y, s),
        "pixel_auroc": roc_auc_score(label[brain], amap[brain]),
        "lesion_mean": amap[label].mean(),
        "healthy_tissue_mean": amap[brain & ~label].mean(),
        "relative_error": relative_error,
    }
    print(metrics)
    assert metrics["lesion_mean"] > 1.5 * metrics["healthy_tissue_mean"]
    assert metrics["pixel_auroc"] > 0.8
    assert metrics["slice_auroc"] > 0.6
    assert relative_error < 0.25


def test_compare_runs_the_peers_beside_a_baseline(tmp_path):
    """``aeflow-cli compare`` trains the DAE and fits PatchCore on one split and scores them in one table."""
    from click.testing import CliRunner

    from aeflow_cli.main import cli

    args = ["compare", "--synthetic", "--n-train", "2", "--shape", "64", "64", "24", "--epochs", "1"]
    args += ["--models", "intensity,dae,patchcore", "--bootstrap", "10", "--grid-size", "256"]
    args += ["--model-arg", "dae.channels=[8,16,16]", "--loss-arg", "patchcore.coreset_fraction=0.05"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "cmp"), "--json", "-q"])
    assert res.exit_code == 0, res.output
    rows = {r["model"]: r for r in json.loads(res.output[res.output.index("{") :])["rows"]}
    assert list(rows) == ["intensity", "dae", "patchcore"]
    for row in rows.values():
        assert 0.0 <= row["pixel_auroc"] <= 1.0
    assert rows["patchcore"]["params_trainable"] == 0
