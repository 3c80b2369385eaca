"""Benchmark: AE-FLOW's pixel maps and training recipe on the BraTS dev protocol (rotated folds).

The four BraTS 2013/2015 cases beside the repository (``../shared/data/brats2015_dev``), sorted by name, are
rotated: fold ``k`` tests on case ``k``, chooses the threshold (and any calibration) on case ``k + 1`` and trains
on the healthy slices (no tumour label of any kind) of the other two, so every case is tested once and no
choice ever sees the test case. Volumes are resampled to 2 mm (``--spacing``; ``none``: the native 1 mm grid) and
cropped / padded to 128 x 128 (``--size``) with the project's preprocessing; FLAIR is scored against the whole
tumour (labels 1-4), T1c against the tumour core (labels 1, 3, 4).

AE-FLOW uses the frozen ImageNet EfficientNet-Lite0 encoder by default (``--backbones NAME:WEIGHTS,...`` compares
several frozen encoders in one run, ``WEIGHTS`` ``imagenet`` or ``none`` for a random encoder seeded with
``--seed``; one row group per encoder, the intensity row once). Its features are computed once per slice, on
``--device``, kept there and reused when no augmentation changes the input; the flow and the decoder train there
with Adam (weight decay 1e-5, batch ``--batch-size`` 8, ActNorm initialised on training images) for each recipe
of the grid (learning rate, intensity augmentation), and every map is measured at each epoch snapshot. Candidate
maps of one trained network:

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

Prints one JSON object (per fold and mean, plus a Markdown table, encoder feature, training and evaluation
times) and writes it to ``<out>/bench_maps.json`` and ``<out>/bench_maps.md`` after every fold, so that an
interrupted run leaves its results; ``--max-minutes M`` shares ``M`` minutes evenly between the modalities still to
run (time a modality leaves unused goes to the next), stops a modality after the fold that passes its share, writes
the mean over the folds done (the table says how many) and exits 0. On CUDA the maps' CPU protocol runs in
``--eval-workers`` processes beside the training.

Run::

    python benchmarks/bench_maps.py --threads 1 --modalities flair --out bench_maps_flair
    python benchmarks/bench_maps.py --quick      # one fold, one recipe, 3 epochs (smoke test)

On one GPU, the paper's setting (256 x 256 at the native 1 mm, Wide-ResNet-50-2 with random weights: no internet)
against the pretrained Lite0 at the same size, FLAIR and T1c, the paper's recipe (lr 2e-4, alpha 0.5), in about 3-4
minutes of an H100 (16 cores)::

    python benchmarks/bench_maps.py --device cuda --size 256 --spacing none \\
        --backbones wide_resnet50_2:none,efficientnet_lite0:imagenet --recipes 2e-4:noaug --epochs 5,15 \\
        --max-minutes 4 --out bench_maps_gpu

The estimate, from the pieces measured on a CPU at 256 x 256 / 1 mm: about 92 healthy training slices per fold (12
steps of 8), a Wide-ResNet-50-2 training step of 76 GFLOP per slice (Lite0: 4.7), so the step is bound by its
kernel launches (assumed 20-30 ms) rather than by its arithmetic: about 0.35 s per epoch, 15 epochs x 2 encoders x 4
folds x 2 modalities = 240 epochs, about 90 s; scoring plus the candidate maps about 1.5 s per snapshot (32: 50 s);
the protocol 2.6 CPU-s per map (232 evaluations over 14 processes: 45 s, beside the training); preprocessing 6-10 s
per modality, start-up 15-20 s. The three default recipes would take about three times the training and scoring
(7-8 minutes): more than 5.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
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
BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
DEFAULT_ENCODER = ("efficientnet_lite0", "imagenet")
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


def parse_spacing(text: str) -> float | None:
    """``--spacing``: millimetres, or ``None`` (no resampling) for ``0`` / ``none`` / ``native``."""
    if text.strip().lower() in ("0", "0.0", "none", "native"):
        return None
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"spacing must be a positive number of mm or none, got {text!r}")
    return value


def parse_encoders(text: str) -> list[tuple[str, str]]:
    """``--backbones``: ``NAME[:WEIGHTS],...`` -> ``[(backbone, weights)]``; ``imagenet`` (default) or ``none``."""
    encoders = []
    for item in text.split(","):
        name, _, weights = item.strip().partition(":")
        weights = weights.strip().lower() or "imagenet"
        if name not in BACKBONES:
            raise argparse.ArgumentTypeError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
        if weights not in ("imagenet", "none"):
            raise argparse.ArgumentTypeError(f"backbone weights must be imagenet or none, got {weights!r}")
        if (name, weights) in encoders:
            raise argparse.ArgumentTypeError(f"encoder {name}:{weights} given twice")
        encoders.append((name, weights))
    return encoders


def cache_name(modality: str, region: str, size: int, spacing: float | None) -> str:
    """File name of the preprocessed volumes of one modality, region, in-plane size and spacing."""
    return f"volumes_{modality}_{region}_{size}px_{'native' if spacing is None else f'{spacing:g}mm'}.npz"


def load_volumes(
    brats: Path, modality: str, cache: Path, size: int = 128, spacing: float | None = 2.0
) -> list[dict[str, Any]]:
    """Preprocessed volumes ``{"name", "image", "mask", "label" (region), "any_label" (whole tumour)}``."""
    region = SETTINGS[modality][0]
    cache.mkdir(parents=True, exist_ok=True)
    stored = cache / cache_name(modality, region, size, spacing)
    if stored.exists():
        data = np.load(stored)
        names = [str(n) for n in data["names"]]
        return [
            {k: (n if k == "name" else data[f"{n}_{k}"]) for k in ("name", "image", "mask", "label", "any_label")}
            for n in names
        ]
    pre = build_volume_preprocessing(spatial_size=[size, size], percentiles=(1.0, 99.0), spacing=spacing)
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
    tmp = stored.with_name(stored.name + ".tmp.npz")
    np.savez_compressed(tmp, names=np.array([v["name"] for v in vols]), **arrays)
    os.replace(tmp, stored)
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
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.7), math.log(1.5), generator=gen)).to(x.device)
    scale = torch.empty(b, 1, 1, 1).uniform_(0.9, 1.1, generator=gen).to(x.device)
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
    batch_size: int = 8,
) -> Any:
    """Train the flow and decoder on the device of ``x_train``; yield ``epoch`` after each snapshot epoch (the
    network is then in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    net.flow.initialize(z_train[:64])
    params = net.trainable_parameters()
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-5)
    loss_fn = AEFlowLoss(alpha)
    n = x_train.shape[0]
    for epoch in range(1, max(snapshots) + 1):
        net.flow.train()
        net.decoder.train()
        order = torch.randperm(n, generator=gen).to(x_train.device)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
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


def _host(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t[:, 0].float().cpu().numpy(), 0, -1)


@torch.no_grad()
def score_volume(net: AEFlow, vol: Mapping[str, Any], z: torch.Tensor, batch: int = 32) -> dict[str, np.ndarray]:
    """Signed residual, NLL and 1 - SSIM maps (X, Y, Z) and the AE-FLOW score of each brain slice (computed on the
    device of ``z``, returned as numpy)."""
    idx = _slices(vol)
    x = _stack(vol, idx).to(z.device)
    maps = {k: np.zeros(vol["image"].shape, np.float32) for k in ("residual", "nll", "ssim")}
    scores = np.zeros(vol["image"].shape[-1], np.float64)
    for i in range(0, len(idx), batch):
        xb, zb = x[i : i + batch], z[i : i + batch]
        zp, _ = net.flow(zb)
        xr = net.decoder(zp).float()
        sl = idx[i : i + batch]
        maps["residual"][..., sl] = _host(xb - xr)
        maps["nll"][..., sl] = _host(flow_nll_map(zp, tuple(xb.shape[-2:])))
        maps["ssim"][..., sl] = _host(ssim_anomaly_map(xb, xr))
        scores[sl] = combined_score(flow_score(zp), recon_score(xb, xr), 0.9).cpu().numpy()
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


def evaluate(
    val_maps: list[dict], test_maps: list[dict], mode: str, image_scores: dict | None, normalize: str = "none"
) -> dict[str, float]:
    """Threshold maximising validation Dice; test Dice, pixel / slice AUROC, oracle Dice (project protocol; raw
    maps, or standardised per scan with ``normalize="robust"``)."""
    pp = PostprocessConfig(
        residual=mode, normalize=normalize, erosion_iterations=3, median_size=5, median_dims=2, min_component_size=7
    )
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


def _sync(device: torch.device) -> float:
    """Wait for the device's queued work; return ``time.perf_counter()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def encoder_text(backbone: str, weights: str, seed: int) -> str:
    """How one encoder is described in the protocol and the table."""
    return f"{backbone} ({'ImageNet' if weights == 'imagenet' else f'random, seed {seed}'}, frozen)"


@torch.no_grad()
def build_encoders(args: argparse.Namespace, vols: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict]:
    """One AE-FLOW network per ``args.encoders`` (seeded), its initial state and its features of every brain slice
    of every volume, computed and kept on ``device``."""
    encoders = []
    for backbone, weights in args.encoders:
        torch.manual_seed(args.seed)
        net = AEFlow(in_channels=1, backbone=backbone, backbone_weights=None if weights == "none" else weights)
        net = net.eval().to(device)
        init_state = {k: v.clone() for k, v in net.state_dict().items()}
        t0, b = _sync(device), args.score_batch_size
        feats = []
        for v in vols:
            x = _stack(v, _slices(v))
            feats.append(torch.cat([net.encoder(x[i : i + b].to(device)) for i in range(0, len(x), b)]))
        seconds = _sync(device) - t0
        encoders.append(
            {"label": f"{backbone}:{weights}", "net": net, "init": init_state, "feats": feats, "s": seconds}
        )
    return encoders


def mean_over_folds(per_fold: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of every metric of every row over the folds done."""
    keys = list(next(iter(per_fold.values())))
    mean = {key: {m: float(np.mean([per_fold[f][key][m] for f in per_fold])) for m in METRICS} for key in keys}
    for key in keys:
        if "image_score_slice_auroc" in per_fold[next(iter(per_fold))][key]:
            mean[key]["image_score_slice_auroc"] = float(
                np.mean([per_fold[f][key]["image_score_slice_auroc"] for f in per_fold])
            )
    return mean


def submit_evaluation(pool: Executor | None, *args: Any) -> Future:
    """:func:`evaluate` in a worker process of ``pool`` (the CPU protocol runs beside the device's training), or
    here and now when ``pool`` is ``None``."""
    if pool is not None:
        return pool.submit(evaluate, *args)
    done: Future = Future()
    done.set_result(evaluate(*args))
    return done


def run_modality(
    args: argparse.Namespace,
    modality: str,
    say: Any,
    device: torch.device,
    deadline: float,
    publish: Any,
    pool: Executor | None = None,
) -> dict[str, Any]:
    """The rotated folds of one modality for every encoder; ``publish(result)`` after each fold; stops after the
    fold that passes ``deadline`` (``time.perf_counter()`` seconds); the maps are evaluated in ``pool``."""
    region, mode = SETTINGS[modality]
    vols = load_volumes(Path(args.brats), modality, Path(args.out) / "cache", args.size, args.spacing)
    if len(vols) != 4:
        raise SystemExit(f"{args.brats}: need four BraTS cases, found {len(vols)}")
    encoders = build_encoders(args, vols, device)
    grouped = len(encoders) > 1 or args.encoders[0] != DEFAULT_ENCODER  # rows named by encoder
    for enc in encoders:
        say(f"[{modality}] {enc['label']} features of {sum(len(f) for f in enc['feats'])} slices: {enc['s']:.1f} s")
    snapshots = [int(e) for e in args.epochs.split(",")]
    recipes = [(float(lr), aug == "aug") for lr, aug in (r.split(":") for r in args.recipes.split(","))]
    folds = [int(f) for f in args.folds.split(",")]
    per_fold: dict[str, dict[str, dict[str, float]]] = {}
    timing: dict[str, float] = {}
    eval_timing: dict[str, float] = {}
    result: dict[str, Any] = {"region": region, "residual_mode": mode, "folds_planned": len(folds)}
    result.update(encoders=[e["label"] for e in encoders], feature_seconds={e["label"]: e["s"] for e in encoders})
    for k in folds:
        t_fold = time.perf_counter()
        test_i, val_i = k, (k + 1) % 4
        train_i = [i for i in range(4) if i not in (test_i, val_i)]
        xs, picks = [], []
        for i in train_i:
            pos = {s: j for j, s in enumerate(_slices(vols[i]))}
            keep = select_slices(vols[i]["mask"], vols[i]["any_label"], 0.2, healthy_only=True)
            xs.append(_stack(vols[i], keep))
            picks.append(torch.tensor([pos[s] for s in keep], dtype=torch.long))
        x_train = torch.cat(xs).to(device)
        fold = f"fold{k}"
        say(f"[{modality} {fold}] test {vols[test_i]['name']}, val {vols[val_i]['name']}, {len(x_train)} train slices")
        rows: dict[str, Future] = {}
        val, test = vols[val_i], vols[test_i]
        rows["intensity"] = submit_evaluation(
            pool, _case(val, val["image"]), _case(test, test["image"]), mode, None, args.normalize
        )
        for enc in encoders:
            net, feats = enc["net"], enc["feats"]
            z_train = torch.cat([feats[i][p.to(device)] for i, p in zip(train_i, picks, strict=True)])
            for lr, aug in recipes:
                net.load_state_dict(enc["init"])
                t0 = _sync(device)
                snaps = train_snapshots(
                    net, x_train, z_train, lr, aug, snapshots, args.seed, args.alpha, args.batch_size
                )
                for epoch in snaps:
                    t_eval = _sync(device)
                    t_train = t_eval - t0
                    raw_val = score_volume(net, vols[val_i], feats[val_i], args.score_batch_size)
                    raw_test = score_volume(net, vols[test_i], feats[test_i], args.score_batch_size)
                    calib = {
                        "res": _healthy_stats(apply_residual_mode(raw_val["residual"], mode), vols[val_i]),
                        "nll": _healthy_stats(raw_val["nll"], vols[val_i]),
                    }
                    mv = candidate_maps(raw_val, vols[val_i], mode, calib)
                    mt = candidate_maps(raw_test, vols[test_i], mode, calib)
                    keep = select_slices(vols[test_i]["mask"], None, 0.2)
                    img = {"scores": raw_test["scores"][keep], "labels": vols[test_i]["label"][..., keep].any((0, 1))}
                    recipe = (f"{enc['label']} | " if grouped else "") + (
                        f"lr={lr:g} aug={'yes' if aug else 'no'} epochs={epoch}"
                    )
                    for name in MAPS[1:]:
                        rows[f"{recipe} | {name}"] = submit_evaluation(
                            pool,
                            _case(val, mv[name]),
                            _case(test, mt[name]),
                            mode,
                            img if name == "residual" else None,
                            args.normalize,
                        )
                    timing[f"{fold} {recipe}"] = t_train
                    t_ev = eval_timing[f"{fold} {recipe}"] = time.perf_counter() - t_eval
                    say(f"[{modality} {fold}] {recipe}: trained {t_train:.1f} s, scored (and evaluated) {t_ev:.1f} s")
                    t0 += _sync(device) - t_eval  # the evaluation does not count as training time
        t_wait = time.perf_counter()
        per_fold[fold] = {key: future.result() for key, future in rows.items()}
        result.setdefault("eval_wait_seconds", {})[fold] = time.perf_counter() - t_wait
        for key, m in per_fold[fold].items():
            if key.endswith(" | residual"):
                zsum = per_fold[fold][key[: -len("residual")] + "zsum"]["dice"]
                say(f"[{modality} {fold}] {key[: -len(' | residual')]}: residual Dice {m['dice']:.3f}, zsum {zsum:.3f}")
        result.update(per_fold=per_fold, mean=mean_over_folds(per_fold), train_seconds=timing)
        result.update(eval_seconds=eval_timing, folds_done=len(per_fold))
        result.setdefault("fold_seconds", {})[fold] = time.perf_counter() - t_fold
        if time.perf_counter() > deadline and k != folds[-1]:
            result["stopped"] = f"time limit after {len(per_fold)} of {len(folds)} folds"
            say(f"[{modality}] {result['stopped']}")
        publish(result)  # results survive an interrupted run
        if "stopped" in result:
            break
    return result


def markdown(report: Mapping[str, Any]) -> str:
    """One table per modality: mean over folds, then the test Dice of each fold."""
    proto = report.get("protocol", {})
    lines = []
    if proto:
        spacing = proto.get("spacing_mm")
        lines += [
            f"Encoder(s): {proto.get('encoder')}; {' x '.join(str(s) for s in proto.get('size', []))} at "
            + ("the native spacing" if spacing in (None, "native") else f"{spacing:g} mm")
            + f"; device {proto.get('device', 'cpu')}; maps normalised per scan: {proto.get('normalize', 'none')}.",
            "",
        ]
    for modality, res in report["modalities"].items():
        folds = list(res["per_fold"])
        grouped = any(key.count(" | ") == 2 for key in res["mean"])
        stopped = f" of {res['folds_planned']} ({res['stopped']})" if "stopped" in res else ""
        lines += [
            f"### {modality.upper()} ({res['region'].upper()}, {res['residual_mode']} residual), "
            f"mean of {len(folds)} fold(s){stopped}",
            "",
            ("| encoder " if grouped else "")
            + "| recipe | map | test Dice | pixel AUROC | slice AUROC | oracle Dice | val Dice | "
            + " | ".join(f"Dice {f}" for f in folds)
            + " |",
            ("|---" if grouped else "") + "|---|---|---|---|---|---|---|" + "---|" * len(folds),
        ]
        for key, m in res["mean"].items():
            parts = key.split(" | ")
            parts = ["-"] * ((3 if grouped else 2) - len(parts)) + parts
            cells = [f"{m[x]:.3f}" for x in METRICS] + [f"{res['per_fold'][f][key]['dice']:.3f}" for f in folds]
            lines.append("| " + " | ".join(parts + cells) + " |")
        scores = {k: v["image_score_slice_auroc"] for k, v in res["mean"].items() if "image_score_slice_auroc" in v}
        if scores:
            lines += [
                "",
                "AE-FLOW image score, slice AUROC: "
                + "; ".join(f"{k.rpartition(' | ')[0]}: {v:.3f}" for k, v in scores.items()),
            ]
        lines.append("")
    if report.get("not_run"):
        lines += [f"Not run (time limit): {', '.join(report['not_run'])}.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``encoders`` is the list of ``(backbone, weights)`` to compare."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brats", default=str(BRATS_DIR), help="folder of the four BraTS 2013/2015 cases")
    parser.add_argument("--out", default="bench_maps_out", help="output folder (cache, JSON, Markdown)")
    parser.add_argument("--modalities", default="flair,t1c")
    parser.add_argument("--folds", default="0,1,2,3")
    parser.add_argument("--recipes", default="2e-4:noaug,1e-3:noaug,1e-3:aug", help="lr:aug|noaug, comma-separated")
    parser.add_argument("--epochs", default="5,15", help="epoch snapshots evaluated (the last is trained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--normalize",
        default="none",
        choices=["none", "robust"],
        help="per-scan standardisation of every map before thresholding (robust), or raw maps (none, the default)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="flow weight of the loss (0.5: the paper's; the balanced recipe: 0.02)"
    )
    parser.add_argument("--backbone", default=DEFAULT_ENCODER[0], choices=BACKBONES, help="frozen encoder")
    parser.add_argument("--backbone-weights", default="imagenet", choices=("imagenet", "none"), help="none: random")
    parser.add_argument(
        "--backbones", type=parse_encoders, default=None, help="several encoders, NAME:imagenet|none,... (one run)"
    )
    parser.add_argument("--size", type=int, default=128, help="in-plane crop/pad size (a multiple of 16)")
    parser.add_argument("--spacing", type=parse_spacing, default=2.0, help="mm; 0 or none: no resampling (native)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=8, help="training batch")
    parser.add_argument("--score-batch-size", type=int, default=32, help="encoder / scoring batch")
    parser.add_argument(
        "--eval-workers",
        type=int,
        default=None,
        help="processes evaluating the maps beside training (default: 0 = inline on cpu, cores - 2 up to 14 on cuda)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after the fold that passes M minutes (shared between modalities)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="fold 0, lr 1e-3 without augmentation, 3 epochs")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 16:
        parser.error(f"--size must be a positive multiple of 16, got {args.size}")
    if args.batch_size < 1 or args.score_batch_size < 1:
        parser.error("--batch-size and --score-batch-size must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.eval_workers is not None and args.eval_workers < 0:
        parser.error("--eval-workers must be at least 0")
    args.encoders = args.backbones or [(args.backbone, args.backbone_weights)]
    if args.quick:
        args.folds, args.recipes, args.epochs = "0", "1e-3:noaug", "3"
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.brats).is_dir():
        print(json.dumps({"skipped": f"{args.brats} not found"}))
        return
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    deadline = t0 + 60.0 * args.max_minutes if args.max_minutes else math.inf
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "protocol": {
            "spacing_mm": "native" if args.spacing is None else args.spacing,
            "size": [args.size, args.size],
            "encoder": "; ".join(encoder_text(b, w, args.seed) for b, w in args.encoders),
            "encoders": [{"backbone": b, "weights": w, "frozen": True} for b, w in args.encoders],
            "batch_size": args.batch_size,
            "score_batch_size": args.score_batch_size,
            "device": str(device),
            "weight_decay": 1e-5,
            "alpha": args.alpha,
            "normalize": args.normalize,
            "folds": args.folds,
            "seed": args.seed,
            "max_minutes": args.max_minutes,
            "threshold": "maximises the validation case's pooled Dice",
        },
        "modalities": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        report["wall_seconds"] = time.perf_counter() - t0
        report["markdown"] = markdown(report)
        for name, text in (
            ("bench_maps.json", json.dumps(to_jsonable(report), indent=2)),
            ("bench_maps.md", report["markdown"]),
        ):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)

    workers = args.eval_workers
    if workers is None:
        workers = 0 if device.type == "cpu" else max(1, min(14, (os.cpu_count() or 4) - 2))
    report["protocol"]["eval_workers"] = workers
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds a CUDA context
    pool = ProcessPoolExecutor(workers, mp_context=spawn) if workers else None
    modalities = args.modalities.split(",")
    for i, modality in enumerate(modalities):
        now = time.perf_counter()
        if now > deadline:
            report["not_run"] = modalities[i:]
            say(f"time limit: {', '.join(modalities[i:])} not run")
            break

        def publish(result: dict[str, Any], modality: str = modality) -> None:
            report["modalities"][modality] = result
            write()

        share = now + (deadline - now) / (len(modalities) - i)  # inf without a limit
        run_modality(args, modality, say, device, share, publish, pool)
    if pool is not None:
        pool.shutdown()
    write()
    print(json.dumps(to_jsonable(report), indent=2))


if __name__ == "__main__":
    main()
