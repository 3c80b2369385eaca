"""Benchmark: AE-FLOW's training recipes - does the decoder learn the anatomy, and does the flow learn the density?

Each recipe of :data:`monai_aeflow.models.aeflow.RECIPES` (``balanced``, the default, and ``paper``) trains the flow
and the decoder of the same AE-FLOW (frozen ImageNet EfficientNet-Lite0 encoder, 128 x 128 slices, Adam with weight
decay 1e-5, batch 8, ActNorm initialised on the training features, the loss of ``make_loss({"recipe": name})``).
The encoder's features are computed once and reused (the encoder is frozen and in eval mode, as in the engine).

- **synthetic**: the demo's kind of cohort (:func:`monai_aeflow.data.synthetic.make_slices`, FLAIR-like, 128 x 128
  x 32): six healthy training subjects, one healthy and two lesioned test subjects. Reported on the healthy test
  slices: reconstruction MSE over the MSE of predicting the mean training image (``mse_ratio``: 1 is a grey blob,
  the reconstruction test asks for < 0.5), PSNR and SSIM (data range 1), the flow's per-dimension NLL (nats; lower:
  the flow fits the features' density better); and the slice AUROC of the AE-FLOW image score and of its flow
  term (healthy test slices against lesioned slices with >= 30 lesion pixels).
- **brats** (when ``../shared/data/brats2015_dev`` exists): one fold of ``benchmarks/bench_maps.py``'s rotated dev
  protocol (train on the healthy slices of two cases, threshold on the third, test on the fourth; 2 mm, FLAIR against
  the whole tumour with the positive residual): test Dice at the validated threshold, pixel AUROC, slice AUROC of the
  residual map and of the image score, and the reconstruction numbers on the test case's tumour-free slices.

Prints one JSON object.

Run::

    python benchmarks/bench_recipe.py --threads 1                      # both parts, seed 0
    python benchmarks/bench_recipe.py --threads 1 --seeds 0,1,2 --no-brats
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from monai_aeflow.data.slices import select_slices
from monai_aeflow.data.synthetic import make_slices
from monai_aeflow.engines.metrics import ReconstructionQuality
from monai_aeflow.losses import flow_nll_per_dim
from monai_aeflow.models.aeflow import RECIPES, make_loss
from monai_aeflow.networks import AEFlow
from monai_aeflow.networks.aeflow import AEFlowOutput
from monai_aeflow.scores import combined_score, flow_score, recon_score

BENCH_DIR = Path(__file__).resolve().parent
BRATS_DIR = BENCH_DIR.parents[1] / "shared" / "data" / "brats2015_dev"


def _features(net: AEFlow, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net.encoder(x[i : i + 32]) for i in range(0, len(x), 32)])


def train_recipe(
    net: AEFlow, x: torch.Tensor, z: torch.Tensor, recipe: str, epochs: int, lr: float, seed: int
) -> dict[str, float]:
    """Train the flow and the decoder of ``net`` with a recipe's loss; return the last epoch's mean loss terms."""
    gen = torch.Generator().manual_seed(seed)
    net.flow.initialize(z[:256])
    opt = torch.optim.Adam(net.trainable_parameters(), lr=lr, weight_decay=1e-5)
    loss_fn = make_loss({"recipe": recipe})
    terms: dict[str, list[float]] = {}
    for _ in range(epochs):
        net.flow.train()
        net.decoder.train()
        terms = {"loss_flow": [], "loss_recon": []}
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 8):
            idx = order[i : i + 8]
            zp, log_det = net.flow(z[idx])
            losses = loss_fn(AEFlowOutput(z[idx], zp, log_det, net.decoder(zp)), x[idx])
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            for key in terms:
                terms[key].append(float(losses[key]))
    net.eval()
    return {f"train_{k}": float(np.mean(v)) for k, v in terms.items()}


@torch.no_grad()
def run_network(net: AEFlow, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reconstruction, per-dimension NLL, image score and flow score of each slice."""
    out: dict[str, list[torch.Tensor]] = {"recon": [], "nll": [], "score": [], "score_flow": []}
    for i in range(0, len(x), 32):
        xb, zb = x[i : i + 32], z[i : i + 32]
        zp, log_det = net.flow(zb)
        xr = net.decoder(zp).float()
        s_flow = flow_score(zp)
        out["recon"].append(xr)
        out["nll"].append(flow_nll_per_dim(zp, log_det))
        out["score"].append(combined_score(s_flow, recon_score(xb, xr), 0.9))
        out["score_flow"].append(s_flow)
    return {k: torch.cat(v) for k, v in out.items()}


def reconstruction(x: torch.Tensor, recon: torch.Tensor, mean_image: torch.Tensor) -> dict[str, float]:
    """MSE over the mean-image MSE, PSNR and SSIM (the project's :class:`ReconstructionQuality`)."""
    q = ReconstructionQuality()
    q.update(x, recon)
    got = q.compute()
    base = float(((mean_image - x) ** 2).mean())
    return {"mse_ratio": got["mse"] / base, "mse": got["mse"], "psnr": got["psnr"], "ssim": got["ssim"]}


def synthetic(recipes: Sequence[str], seeds: Sequence[int], epochs: int, lr: float, say: Any) -> dict[str, Any]:
    shape = (128, 128, 32)
    train_x = torch.from_numpy(make_slices(6, lesion=False, seed=1, shape=shape)["image"])
    test_h = torch.from_numpy(make_slices(1, lesion=False, seed=4, shape=shape)["image"])
    les = make_slices(2, lesion=True, seed=5, shape=shape)
    area = les["label"].reshape(len(les["label"]), -1).sum(1)
    keep = (area == 0) | (area >= 30)  # lesioned slices with a visible lesion, and the lesioned subjects' others
    test_l = torch.from_numpy(les["image"][keep])
    truth = np.concatenate([np.zeros(len(test_h)), (area[keep] >= 30).astype(float)])
    say(f"synthetic: {len(train_x)} training slices, {len(test_h)} healthy test slices, {int(truth.sum())} lesioned")
    mean_image = train_x.mean(0, keepdim=True)
    rows: dict[str, list[dict[str, float]]] = {r: [] for r in recipes}
    for seed in seeds:
        for recipe in recipes:
            torch.manual_seed(seed)
            net = AEFlow(backbone="efficientnet_lite0", backbone_weights="imagenet").eval()
            z_train, z_h, z_l = _features(net, train_x), _features(net, test_h), _features(net, test_l)
            t0 = time.perf_counter()
            row: dict[str, float] = dict(train_recipe(net, train_x, z_train, recipe, epochs, lr, seed))
            row["train_seconds"] = time.perf_counter() - t0
            healthy, lesioned = run_network(net, test_h, z_h), run_network(net, test_l, z_l)
            row.update(reconstruction(test_h, healthy["recon"], mean_image))
            row["flow_nll_per_dim"] = float(healthy["nll"].mean())
            for key in ("score", "score_flow"):
                scores = torch.cat([healthy[key], lesioned[key]]).numpy()
                row[f"slice_auroc_{key}"] = float(roc_auc_score(truth, scores))
            row["seed"] = seed
            rows[recipe].append(row)
            say(f"synthetic seed {seed} {recipe}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return {"per_seed": rows, "mean": _mean(rows)}


def _mean(rows: Mapping[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {r: {k: float(np.mean([x[k] for x in v])) for k in v[0] if k != "seed"} for r, v in rows.items() if v}


def brats(recipes: Sequence[str], fold: int, epochs: int, lr: float, out: Path, say: Any) -> dict[str, Any]:
    """One fold of bench_maps.py's rotated protocol on FLAIR (whole tumour, positive residual)."""
    sys.path.insert(0, str(BENCH_DIR))
    import bench_maps as bm  # the dev protocol's loading, scoring and evaluation

    modality = "flair"
    mode = bm.SETTINGS[modality][1]
    vols = bm.load_volumes(BRATS_DIR, modality, out / "cache")
    test_i, val_i = fold, (fold + 1) % 4
    train_i = [i for i in range(4) if i not in (test_i, val_i)]
    xs = [
        bm._stack(vols[i], select_slices(vols[i]["mask"], vols[i]["any_label"], 0.2, healthy_only=True))
        for i in train_i
    ]
    x_train = torch.cat(xs)
    test, val = vols[test_i], vols[val_i]
    healthy_idx = select_slices(test["mask"], test["any_label"], 0.2, healthy_only=True)
    x_healthy = bm._stack(test, healthy_idx)
    say(f"brats fold {fold}: test {test['name']}, val {val['name']}, {len(x_train)} training slices")
    rows: dict[str, dict[str, float]] = {
        "intensity": bm.evaluate(bm._case(val, val["image"]), bm._case(test, test["image"]), mode, None)
    }
    mean_image = x_train.mean(0, keepdim=True)
    for recipe in recipes:
        torch.manual_seed(0)
        net = AEFlow(in_channels=1, backbone="efficientnet_lite0", backbone_weights="imagenet").eval()
        feats = {i: _features(net, bm._stack(vols[i], bm._slices(vols[i]))) for i in (test_i, val_i)}
        t0 = time.perf_counter()
        row = dict(train_recipe(net, x_train, _features(net, x_train), recipe, epochs, lr, 0))
        row["train_seconds"] = time.perf_counter() - t0
        raw_val, raw_test = bm.score_volume(net, val, feats[val_i]), bm.score_volume(net, test, feats[test_i])
        keep = select_slices(test["mask"], None, 0.2)
        img = {"scores": raw_test["scores"][keep], "labels": test["label"][..., keep].any((0, 1))}
        row.update(bm.evaluate(bm._case(val, raw_val["residual"]), bm._case(test, raw_test["residual"]), mode, img))
        healthy = run_network(net, x_healthy, _features(net, x_healthy))
        row.update(reconstruction(x_healthy, healthy["recon"], mean_image))
        row["flow_nll_per_dim"] = float(healthy["nll"].mean())
        rows[recipe] = row
        say(f"brats fold {fold} {recipe}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return {"fold": fold, "test_case": test["name"], "val_case": val["name"], "lr": lr, "epochs": epochs, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--lr", type=float, default=2e-3, help="Adam learning rate on the synthetic slices (the demo's)"
    )
    parser.add_argument("--brats-lr", type=float, default=1e-3, help="Adam learning rate on BraTS (aeflow-cli train's)")
    parser.add_argument("--brats-fold", type=int, default=0)
    parser.add_argument("--no-brats", action="store_true")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--out", default="bench_recipe_out", help="cache of the preprocessed BraTS volumes")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "recipes": {r: {k: v for k, v in RECIPES[r].items()} for r in recipes},
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if not args.no_synthetic:
        seeds = [int(s) for s in args.seeds.split(",")]
        report["synthetic"] = {
            "lr": args.lr,
            "epochs": args.epochs,
            **synthetic(recipes, seeds, args.epochs, args.lr, say),
        }
    if not args.no_brats:
        if BRATS_DIR.is_dir():
            report["brats_flair"] = brats(recipes, args.brats_fold, args.epochs, args.brats_lr, Path(args.out), say)
        else:
            report["brats_flair"] = f"skipped: {BRATS_DIR} not found"
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
