"""Benchmark: AE-FLOW's pixel maps and training recipe on the BraTS dev protocol (rotated folds).

The four BraTS 2013/2015 cases beside the repository (``../shared/data/brats2015_dev``), sorted by name, are
rotated: fold ``k`` tests on case ``k``, chooses the threshold (and any calibration) on case ``k + 1`` and trains
on the healthy slices (no tumour label of any kind) of the other two, so every case is tested once and no
choice ever sees the test case. Volumes are resampled to 2 mm and cropped / padded to 128 x 128 with the
project's preprocessing; FLAIR is scored against the whole tumour (labels 1-4), T1c against the tumour core
(labels 1, 3, 4).

AE-FLOW uses the frozen ImageNet EfficientNet-Lite0 encoder (its features are computed once per slice and
reused when no augmentation changes the input); the flow and the decoder train with Adam (weight decay 1e-5,
batch 8, ActNorm initialised on training images) for each recipe of the grid (learning rate, intensity
augmentation), and every map is measured at each epoch snapshot. Candidate maps of one trained network:

- ``intensity``: the image itself (no model; the baseline);
- ``residual``: the paper's ``x - x'`` (positive part for FLAIR, absolute for T1c: the protocol's mode);
- ``nll``: the flow's per-location negative log-likelihood ``mean_c z'^2 / 2 + log(2 pi) / 2``, bilinearly
  upsampled (:func:`monai_aeflow.scores.flow_nll_map`);
- ``product``: residual (the protocol's mode) times nll; ``product_abs``: ``|x - x'|`` times nll, what
  :func:`monai_aeflow.scores.anomaly_map` gives (the same for T1c);
- ``zsum``: ``max(0, z(residual) + z(nll))``, each term standardised with the mean and standard deviation of
  its brain voxels on the healthy slices of the validation case;
- ``ssim``: ``1 - SSIM(x, x')`` per pixel;
- ``residual_ssim``: residual times (1 - SSIM).

Each map goes through the project's protocol (:mod:`monai_aeflow.evaluation`: eroded brain mask, 5 x 5 median
filter, components of 7 voxels or fewer removed); the threshold maximises the validation case's Dice; the
test case gives Dice, pixel AUROC over brain voxels, slice AUROC (mean map in the brain) and the oracle Dice
(best threshold on test, an upper bound). The AE-FLOW image score's slice AUROC is reported per recipe.

Prints one JSON object (per fold and mean, plus a Markdown table) and writes it to ``<out>/bench_maps.json``
and ``<out>/bench_maps.md``.

Run::

    python benchmarks/bench_maps.py --threads 1 --modalities flair --out bench_maps_flair
    python benchmarks/bench_maps.py --quick      # one fold, one recipe, 3 epochs (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from monai_aeflow.data.indexers import index_dataset
from monai_aeflow.data.preprocessing import build_volume_preprocessing
from monai_aeflow.data.slices import select_slices
from monai_aeflow.evaluation import EvaluationConfig, PostprocessConfig, evaluate_prepared, prepare_cases
from monai_aeflow.evaluation.pipeline import THRESHOLD_METHODS
from monai_aeflow.evaluation.postprocess import apply_residual_mode
from monai_aeflow.fileio import to_jsonable
from monai_aeflow.losses import AEFlowLoss
from monai_aeflow.networks import AEFlow
from monai_aeflow.networks.aeflow import AEFlowOutput
from monai_aeflow.scores import combined_score, flow_nll_map, flow_score, recon_score, ssim_anomaly_map

BRATS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2015_dev"
REGIONS = {"wt": (1, 2, 3, 4), "tc": (1, 3, 4)}
"""BraTS 2013-2015 ``OTMultiClass`` labels of each region."""
SETTINGS = {"flair": ("wt", "positive"), "t1c": ("tc", "absolute")}
"""Modality -> (region, residual mode)."""
MAPS = ("intensity", "residual", "nll", "product", "product_abs", "zsum", "ssim", "residual_ssim")
METRICS = ("dice", "pixel_auroc", "slice_auroc", "oracle_dice", "val_dice")


def _region_label(path: str, region: str, cache: Path) -> str:
    out = cache / f"{Path(path).parent.name}_{region}.nii.gz"
    if not out.exists():
        img = nib.load(path)
        data = np.isin(np.asarray(img.dataobj), REGIONS[region]).astype(np.uint8)
        tmp = out.with_name(out.name + ".tmp.nii.gz")
        nib.save(nib.Nifti1Image(data, img.affine, img.header), tmp)
        os.replace(tmp, out)
    return str(out)


def load_volumes(brats: Path, modality: str, cache: Path) -> list[dict[str, Any]]:
    """Preprocessed volumes ``{"name", "image", "mask", "label" (region), "any_label" (whole tumour)}``."""
    region = SETTINGS[modality][0]
    cache.mkdir(parents=True, exist_ok=True)
    stored = cache / f"volumes_{modality}_{region}.npz"
    if stored.exists():
        data = np.load(stored)
        names = [str(n) for n in data["names"]]
        return [
            {k: (n if k == "name" else data[f"{n}_{k}"]) for k in ("name", "image", "mask", "label", "any_label")}
            for n in names
        ]
    pre = build_volume_preprocessing(spatial_size=[128, 128], percentiles=(1.0, 99.0), spacing=2.0)
    vols = []
    for rec in sorted(index_dataset("brats", str(brats), modality=modality), key=lambda r: str(r["subject_id"])):
        whole = pre(dict(rec))
        region_rec = dict(rec, label=_region_label(rec["label"], region, cache))
        part = pre(region_rec) if region != "wt" else whole
        vols.append(
            {
                "name": str(rec["subject_id"]),
                "image": np.asarray(whole["image"])[0].astype(np.float32),
                "mask": np.asarray(whole["mask"])[0] > 0,
                "label": np.asarray(part["label"])[0] > 0,
                "any_label": np.asarray(whole["label"])[0] > 0,
            }
        )
    arrays = {f"{v['name']}_{k}": v[k] for v in vols for k in ("image", "mask", "label", "any_label")}
    np.savez_compressed(stored, names=np.array([v["name"] for v in vols]), **arrays)
    return vols


def _slices(vol: Mapping[str, Any]) -> np.ndarray:
    return select_slices(vol["mask"], None, 0.0)


def _stack(vol: Mapping[str, Any], idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol["image"][..., idx], -1, 0)))[:, None]


def _case(vol: Mapping[str, Any], amap: np.ndarray) -> list[dict[str, Any]]:
    return [{"name": vol["name"], "map": amap, "label": vol["label"], "mask": vol["mask"]}]


def augment_intensity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random gamma in [0.7, 1.5] and contrast scale in [0.9, 1.1] per image, clipped to [0, 1]."""
    b = x.shape[0]
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.7), math.log(1.5), generator=gen))
    scale = torch.empty(b, 1, 1, 1).uniform_(0.9, 1.1, generator=gen)
    return (x.clamp(0, 1).pow(gamma) * scale).clamp(0, 1)


def train_snapshots(
    net: AEFlow,
    x_train: torch.Tensor,
    z_train: torch.Tensor,
    lr: float,
    aug: bool,
    snapshots: Sequence[int],
    seed: int,
    alpha: float = 0.5,
) -> Any:
    """Train the flow and decoder; yield ``epoch`` after each snapshot epoch (the network is then in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    net.flow.initialize(z_train[:64])
    params = net.trainable_parameters()
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-5)
    loss_fn = AEFlowLoss(alpha)
    n = x_train.shape[0]
    for epoch in range(1, max(snapshots) + 1):
        net.flow.train()
        net.decoder.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, 8):
            idx = order[i : i + 8]
            x = x_train[idx]
            if aug:
                x = augment_intensity(x, gen)
                with torch.no_grad():
                    z = net.encoder(x)
            else:
                z = z_train[idx]
            zp, log_det = net.flow(z)
            losses = loss_fn(AEFlowOutput(z, zp, log_det, net.decoder(zp)), x)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
        if epoch in snapshots:
            net.eval()
            yield epoch


@torch.no_grad()
def score_volume(net: AEFlow, vol: Mapping[str, Any], z: torch.Tensor) -> dict[str, np.ndarray]:
    """Signed residual, NLL and 1 - SSIM maps (X, Y, Z) and the AE-FLOW score of each brain slice."""
    idx = _slices(vol)
    x = _stack(vol, idx)
    maps = {k: np.zeros(vol["image"].shape, np.float32) for k in ("residual", "nll", "ssim")}
    scores = np.zeros(vol["image"].shape[-1], np.float64)
    for i in range(0, len(idx), 32):
        xb, zb = x[i : i + 32], z[i : i + 32]
        zp, _ = net.flow(zb)
        xr = net.decoder(zp).float()
        sl = idx[i : i + 32]
        maps["residual"][..., sl] = np.moveaxis((xb - xr)[:, 0].numpy(), 0, -1)
        maps["nll"][..., sl] = np.moveaxis(flow_nll_map(zp, tuple(xb.shape[-2:]))[:, 0].numpy(), 0, -1)
        maps["ssim"][..., sl] = np.moveaxis(ssim_anomaly_map(xb, xr)[:, 0].numpy(), 0, -1)
        scores[sl] = combined_score(flow_score(zp), recon_score(xb, xr), 0.9).numpy()
    maps["scores"] = scores
    return maps


def _healthy_stats(values: np.ndarray, vol: Mapping[str, Any]) -> tuple[float, float]:
    keep = select_slices(vol["mask"], vol["any_label"], 0.2, healthy_only=True)
    v = values[..., keep][vol["mask"][..., keep]]
    return float(v.mean()), float(v.std())


def candidate_maps(raw: Mapping[str, np.ndarray], vol: Mapping[str, Any], mode: str, calib: Mapping) -> dict:
    """Every candidate map of one volume (non-negative except the signed residual, which the protocol's mode
    turns non-negative)."""
    res = apply_residual_mode(raw["residual"], mode)
    nll = raw["nll"]
    z = (res - calib["res"][0]) / max(calib["res"][1], 1e-12) + (nll - calib["nll"][0]) / max(calib["nll"][1], 1e-12)
    return {
        "intensity": vol["image"],
        "residual": raw["residual"],
        "nll": nll,
        "product": res * nll,
        "product_abs": np.abs(raw["residual"]) * nll,
        "zsum": np.maximum(z, 0.0).astype(np.float32),
        "ssim": raw["ssim"],
        "residual_ssim": res * raw["ssim"],
    }


def evaluate(val_maps: list[dict], test_maps: list[dict], mode: str, image_scores: dict | None) -> dict[str, float]:
    """Threshold maximising validation Dice; test Dice, pixel / slice AUROC, oracle Dice (project protocol)."""
    pp = PostprocessConfig(residual=mode, erosion_iterations=3, median_size=5, median_dims=2, min_component_size=7)
    base = {"postprocess": pp, "n_bootstrap": 0, "slice_min_brain_fraction": 0.2, "check_affine": False}
    cfg = EvaluationConfig(threshold_method="fixed", threshold=0.0, reorient=False, **base)
    val = prepare_cases(val_maps, cfg, "val")
    test = prepare_cases(test_maps, cfg, "test")
    if "sweep" in THRESHOLD_METHODS:
        from monai_aeflow.evaluation.pipeline import select_threshold

        chosen = select_threshold(val, EvaluationConfig(threshold_method="sweep", reorient=False, **base))
        t, val_dice = float(chosen["value"]), float(chosen.get("validation_dice_pooled", float("nan")))
    else:  # the validation case's own Dice-maximising threshold
        r = evaluate_prepared([], val, cfg)
        t, val_dice = r["metrics"]["oracle"]["threshold"]["value"], r["metrics"]["oracle"]["dice_pooled"]["value"]
    res = evaluate_prepared(
        [],
        test,
        EvaluationConfig(threshold_method="fixed", threshold=t, reorient=False, **base),
        image_scores=image_scores,
    )
    m = res["metrics"]
    out = {
        "dice": m["pixel"]["dice_pooled"]["value"],
        "pixel_auroc": m["pixel"]["auroc"]["value"],
        "slice_auroc": m["slice"]["auroc"]["value"],
        "oracle_dice": m["oracle"]["dice_pooled"]["value"],
        "val_dice": val_dice,
        "threshold": t,
    }
    if image_scores is not None:
        out["image_score_slice_auroc"] = m["image"]["auroc"]["value"]
    return out


def run_modality(args: argparse.Namespace, modality: str, say: Any) -> dict[str, Any]:
    region, mode = SETTINGS[modality]
    vols = load_volumes(Path(args.brats), modality, Path(args.out) / "cache")
    if len(vols) != 4:
        raise SystemExit(f"{args.brats}: need four BraTS cases, found {len(vols)}")
    torch.manual_seed(args.seed)
    net = AEFlow(in_channels=1, backbone="efficientnet_lite0", backbone_weights="imagenet").eval()
    init_state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        feats = [
            torch.cat([net.encoder(_stack(v, _slices(v))[i : i + 32]) for i in range(0, len(_slices(v)), 32)])
            for v in vols
        ]
    snapshots = [int(e) for e in args.epochs.split(",")]
    recipes = [(float(lr), aug == "aug") for lr, aug in (r.split(":") for r in args.recipes.split(","))]
    folds = [int(f) for f in args.folds.split(",")]
    per_fold: dict[str, dict[str, dict[str, float]]] = {}
    timing: dict[str, float] = {}
    for k in folds:
        test_i, val_i = k, (k + 1) % 4
        train_i = [i for i in range(4) if i not in (test_i, val_i)]
        xs, zs = [], []
        for i in train_i:
            pos = {s: j for j, s in enumerate(_slices(vols[i]))}
            keep = select_slices(vols[i]["mask"], vols[i]["any_label"], 0.2, healthy_only=True)
            xs.append(_stack(vols[i], keep))
            zs.append(feats[i][[pos[s] for s in keep]])
        x_train, z_train = torch.cat(xs), torch.cat(zs)
        fold = f"fold{k}"
        say(f"[{modality} {fold}] test {vols[test_i]['name']}, val {vols[val_i]['name']}, {len(x_train)} train slices")
        rows: dict[str, dict[str, float]] = {}
        val, test = vols[val_i], vols[test_i]
        rows["intensity"] = evaluate(_case(val, val["image"]), _case(test, test["image"]), mode, None)
        for lr, aug in recipes:
            net.load_state_dict(init_state)
            t0 = time.perf_counter()
            for epoch in train_snapshots(net, x_train, z_train, lr, aug, snapshots, args.seed, args.alpha):
                t_eval = time.perf_counter()
                t_train = t_eval - t0
                raw_val = score_volume(net, vols[val_i], feats[val_i])
                raw_test = score_volume(net, vols[test_i], feats[test_i])
                calib = {
                    "res": _healthy_stats(apply_residual_mode(raw_val["residual"], mode), vols[val_i]),
                    "nll": _healthy_stats(raw_val["nll"], vols[val_i]),
                }
                mv = candidate_maps(raw_val, vols[val_i], mode, calib)
                mt = candidate_maps(raw_test, vols[test_i], mode, calib)
                keep = select_slices(vols[test_i]["mask"], None, 0.2)
                img = {"scores": raw_test["scores"][keep], "labels": vols[test_i]["label"][..., keep].any((0, 1))}
                recipe = f"lr={lr:g} aug={'yes' if aug else 'no'} epochs={epoch}"
                for name in MAPS[1:]:
                    rows[f"{recipe} | {name}"] = evaluate(
                        _case(val, mv[name]), _case(test, mt[name]), mode, img if name == "residual" else None
                    )
                timing[f"{fold} {recipe}"] = t_train
                say(
                    f"[{modality} {fold}] {recipe}: trained {t_train:.0f} s; residual Dice "
                    f"{rows[f'{recipe} | residual']['dice']:.3f}, zsum {rows[f'{recipe} | zsum']['dice']:.3f}"
                )
                t0 += time.perf_counter() - t_eval  # the evaluation does not count as training time
        per_fold[fold] = rows
        if args.out:  # partial results survive an interrupted run
            partial = Path(args.out) / f"partial_{modality}.json"
            partial.write_text(json.dumps(to_jsonable({"per_fold": per_fold, "train_seconds": timing}), indent=2))
    keys = list(next(iter(per_fold.values())))
    mean = {key: {m: float(np.mean([per_fold[f][key][m] for f in per_fold])) for m in METRICS} for key in keys}
    for key in keys:
        if "image_score_slice_auroc" in per_fold[next(iter(per_fold))][key]:
            mean[key]["image_score_slice_auroc"] = float(
                np.mean([per_fold[f][key]["image_score_slice_auroc"] for f in per_fold])
            )
    return {"region": region, "residual_mode": mode, "per_fold": per_fold, "mean": mean, "train_seconds": timing}


def markdown(report: Mapping[str, Any]) -> str:
    """One table per modality: mean over folds, then the test Dice of each fold."""
    lines = []
    for modality, res in report["modalities"].items():
        folds = list(res["per_fold"])
        lines += [
            f"### {modality.upper()} ({res['region'].upper()}, {res['residual_mode']} residual), "
            f"mean of {len(folds)} fold(s)",
            "",
            "| recipe | map | test Dice | pixel AUROC | slice AUROC | oracle Dice | val Dice | "
            + " | ".join(f"Dice {f}" for f in folds)
            + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(folds),
        ]
        for key, m in res["mean"].items():
            recipe, _, name = key.rpartition(" | ")
            cells = [f"{m[x]:.3f}" for x in METRICS] + [f"{res['per_fold'][f][key]['dice']:.3f}" for f in folds]
            lines.append(f"| {recipe or '-'} | {name or key} | " + " | ".join(cells) + " |")
        scores = {k: v["image_score_slice_auroc"] for k, v in res["mean"].items() if "image_score_slice_auroc" in v}
        if scores:
            lines += [
                "",
                "AE-FLOW image score, slice AUROC: "
                + "; ".join(f"{k.rpartition(' | ')[0]}: {v:.3f}" for k, v in scores.items()),
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brats", default=str(BRATS_DIR), help="folder of the four BraTS 2013/2015 cases")
    parser.add_argument("--out", default="bench_maps_out", help="output folder (cache, JSON, Markdown)")
    parser.add_argument("--modalities", default="flair,t1c")
    parser.add_argument("--folds", default="0,1,2,3")
    parser.add_argument("--recipes", default="2e-4:noaug,1e-3:noaug,1e-3:aug", help="lr:aug|noaug, comma-separated")
    parser.add_argument("--epochs", default="5,15", help="epoch snapshots evaluated (the last is trained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="flow weight of the loss (0.5: the paper's; the balanced recipe: 0.02)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="fold 0, lr 1e-3 without augmentation, 3 epochs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.folds, args.recipes, args.epochs = "0", "1e-3:noaug", "3"
    if not Path(args.brats).is_dir():
        print(json.dumps({"skipped": f"{args.brats} not found"}))
        return

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
        "protocol": {
            "spacing_mm": 2.0,
            "size": [128, 128],
            "encoder": "efficientnet_lite0 (ImageNet, frozen)",
            "batch_size": 8,
            "weight_decay": 1e-5,
            "alpha": args.alpha,
            "folds": args.folds,
            "seed": args.seed,
            "threshold": "maximises the validation case's pooled Dice",
        },
        "modalities": {},
    }
    for modality in args.modalities.split(","):
        report["modalities"][modality] = run_modality(args, modality, say)
    report["wall_seconds"] = time.perf_counter() - t0
    report["markdown"] = markdown(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_maps.json").write_text(json.dumps(to_jsonable(report), indent=2))
    (out / "bench_maps.md").write_text(report["markdown"])
    print(json.dumps(to_jsonable(report), indent=2))


if __name__ == "__main__":
    main()
