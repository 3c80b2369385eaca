"""Benchmark: what can AE-FLOW's decoder learn to reconstruct from a frozen encoder's stride-16 features?

The demo's reconstruction column stays a smooth brain outline. This separates the three possible causes: too few
optimiser steps, a decoder that cannot represent the anatomy, or encoder features that do not let a decoder
generalise from a few healthy subjects. The AE-FLOW decoder (:class:`~monai_aeflow.networks.decoder.AEFlowDecoder`,
its default widths) is trained alone, with the MSE, on fixed inputs computed once from healthy training slices:

- ``<backbone>:<weights>``: the frozen encoder's features (``efficientnet_lite0:imagenet`` is the offline default
  encoder, ``resnet18:none`` a random one), exactly what the flow receives;
- ``pixels``: the slice itself rearranged into 16 x 16 blocks (``pixel_unshuffle``: the same 1/16 grid, with all of
  the information). It bounds what the decoder itself can learn from the same grid in the same steps.

Every input is standardised per channel with the training slices' mean and standard deviation, as the flow's ActNorm
layer is initialised (a random encoder's raw features are far from unit scale).

Adam (lr 2e-3, the demo's; ``--lr``), batch 8. At five points of training: PSNR (data range 1) on the training
slices and on held-out healthy slices, and the held-out MSE over the MSE of predicting the mean training image
(``mse_ratio``: 1 is a grey blob); at the end, a figure of four held-out slices with each input's reconstruction
(``--figure``). Data: the demo's kind of synthetic cohort (FLAIR-like, 128 x 128 x 32 at 1.5 x 1.5 x 3.75 mm) with
each number of training subjects of ``--n-train`` and three held-out healthy subjects; with ``--brats`` also the
tumour-free slices of two BraTS dev cases for training and of a third for the held-out numbers (2 mm, 128 x 128,
FLAIR; there lr 2e-3 can kill the decoder: use ``--lr 1e-3``).

Prints one JSON object.

Run::

    python benchmarks/bench_decoder.py --threads 2                                # about 12 min on 2 cores
    python benchmarks/bench_decoder.py --threads 2 --n-train '' --brats --lr 1e-3  # 2 min
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from monai_aeflow.data.slices import select_slices
from monai_aeflow.data.synthetic import make_slices
from monai_aeflow.engines.metrics import ReconstructionQuality
from monai_aeflow.networks.backbone import FeatureEncoder
from monai_aeflow.networks.decoder import AEFlowDecoder

BENCH_DIR = Path(__file__).resolve().parent
BRATS_DIR = BENCH_DIR.parents[1] / "shared" / "data" / "brats2015_dev"
DEMO_SHAPE = (128, 128, 32)
DEMO_SPACING = (1.5, 1.5, 3.75)
STRIDE = 16


def quality(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR (mean over slices), SSIM and MSE with a data range of 1 (the engine's ``ReconstructionQuality``)."""
    metric = ReconstructionQuality()
    metric.update(target, pred)
    return metric.compute()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over slices of the PSNR (data range 1)."""
    return quality(pred, target)["psnr"]


def make_inputs(source: str, *slices: torch.Tensor, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """The decoder's inputs for each stack of slices (N, 1, H, W), all from one encoder.

    ``source`` is ``"pixels"`` (the slices on the 1/16 grid) or ``"<backbone>:<weights>"`` (the frozen encoder's
    features; a random encoder is drawn once, from ``seed``).
    """
    if source == "pixels":
        return [F.pixel_unshuffle(x, STRIDE) for x in slices]
    backbone, _, weights = source.partition(":")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = FeatureEncoder(backbone, None if weights in ("", "none") else weights, slices[0].shape[1]).eval()
    with torch.no_grad():
        return [torch.cat([encoder(x[i : i + batch]) for i in range(0, len(x), batch)]) for x in slices]


def standardise(z_train: torch.Tensor, z_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs standardised per channel with the training input's statistics (the ActNorm initialisation)."""
    mean = z_train.mean((0, 2, 3), keepdim=True)
    std = z_train.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (z_train - mean) / std, (z_test - mean) / std


def fit_decoder(
    z_train: torch.Tensor,
    x_train: torch.Tensor,
    z_test: torch.Tensor,
    x_test: torch.Tensor,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
    points: int = 5,
) -> tuple[list[dict[str, Any]], AEFlowDecoder]:
    """Train a fresh decoder on ``(z_train, x_train)``.

    Returns:
        the training / held-out numbers at ``points`` steps, and the trained decoder (in eval mode).
    """
    torch.manual_seed(seed)
    decoder = AEFlowDecoder(z_train.shape[1], x_train.shape[1])
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    mean_mse = float((x_train.mean(0, keepdim=True) - x_test).pow(2).mean())
    log = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        decoder.train()
        idx = torch.randint(0, len(z_train), (batch_size,), generator=gen)
        loss = F.mse_loss(decoder(z_train[idx]), x_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(steps // points, 1) == 0 or step == steps:
            decoder.eval()
            with torch.no_grad():
                rec_train = torch.cat([decoder(z_train[i : i + 64]) for i in range(0, len(z_train), 64)])
                rec_test = torch.cat([decoder(z_test[i : i + 64]) for i in range(0, len(z_test), 64)])
            held_out = quality(rec_test, x_test)
            log.append(
                {
                    "step": step,
                    "train_psnr": round(psnr(rec_train, x_train), 3),
                    "test_psnr": round(held_out["psnr"], 3),
                    "test_mse_ratio": round(held_out["mse"] / mean_mse, 4),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
    return log, decoder.eval()


def save_figure(path: Path, rows: dict[str, dict[str, np.ndarray]]) -> Path:
    """One row per data set and input: the held-out slices, then each input's reconstruction of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [(name, label, img) for name, cols in rows.items() for label, img in cols.items()]
    n_cols = lines[0][2].shape[0]
    fig, axes = plt.subplots(len(lines), n_cols, figsize=(2.0 * n_cols, 2.0 * len(lines)), squeeze=False)
    for r, (name, label, img) in enumerate(lines):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(np.rot90(img[c]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"{name}\n{label}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def synthetic_data(n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Healthy training and held-out slices of the demo's kind of cohort."""
    kw = {"shape": DEMO_SHAPE, "spacing": DEMO_SPACING}
    train = torch.from_numpy(make_slices(n_train, lesion=False, seed=seed, **kw)["image"])
    test = torch.from_numpy(make_slices(3, lesion=False, seed=seed + 1000, **kw)["image"])
    return train, test


def brats_data(cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Tumour-free FLAIR slices of two dev cases (training) and of a third (held out), 2 mm, 128 x 128."""
    sys.path.insert(0, str(BENCH_DIR))
    import bench_maps as bm

    vols = bm.load_volumes(BRATS_DIR, "flair", cache, 128, 2.0)

    def healthy(v: dict[str, Any]) -> torch.Tensor:
        keep = select_slices(v["mask"], v["any_label"], 0.2, healthy_only=True)
        return bm._stack(v, keep)

    return torch.cat([healthy(vols[2]), healthy(vols[3])]), healthy(vols[0])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", default="efficientnet_lite0:imagenet,resnet18:none,pixels", help="decoder inputs")
    p.add_argument(
        "--n-train", default="6,24", help="training subjects of the synthetic cohort, comma-separated ('': none)"
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--brats", action="store_true", help="also the BraTS dev cases (skipped when absent)")
    p.add_argument("--cache", default=str(Path("bench_out") / "bench_decoder_cache"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--figure", default=str(Path("bench_out") / "bench_decoder.png"), help="PNG of reconstructions")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = [s for s in args.sources.split(",") if s]
    data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n in (int(v) for v in args.n_train.split(",") if v):
        data[f"synthetic_{n}_subjects"] = synthetic_data(n, args.seed)
    if args.brats and BRATS_DIR.exists():
        data["brats_flair"] = brats_data(Path(args.cache))
    results: dict[str, Any] = {}
    pictures: dict[str, dict[str, np.ndarray]] = {}
    for name, (x_train, x_test) in data.items():
        results[name] = {"train_slices": len(x_train), "test_slices": len(x_test), "runs": {}}
        show = np.linspace(len(x_test) // 4, 3 * len(x_test) // 4, 4).astype(int)
        pictures[name] = {"held-out input": x_test[show, 0].numpy()}
        for source in sources:
            z_train, z_test = standardise(*make_inputs(source, x_train, x_test, seed=args.seed))
            log, decoder = fit_decoder(z_train, x_train, z_test, x_test, args.steps, lr=args.lr, seed=args.seed)
            with torch.no_grad():
                pictures[name][source] = decoder(z_test[show])[:, 0].numpy()
            best = max(log, key=lambda r: r["test_psnr"])
            results[name]["runs"][source] = {"channels": int(z_train.shape[1]), "log": log, "best_test": best}
            print(
                f"{name} {source}: held-out PSNR {best['test_psnr']:.2f} dB at step {best['step']} "
                f"(last {log[-1]['test_psnr']:.2f}, training {log[-1]['train_psnr']:.2f})",
                file=sys.stderr,
                flush=True,
            )
    out = {
        "benchmark": "bench_decoder",
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": 8,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
        "figure": str(save_figure(Path(args.figure), pictures)) if pictures else None,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
