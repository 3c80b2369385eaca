"""Benchmark: which per-slice score of one trained AE-FLOW ranks tumour slices best (BraTS dev protocol).

The rotated folds of :mod:`bench_maps` (train on the healthy slices of two cases, validate on the third, test on
the fourth; 2 mm, 128 x 128, frozen pretrained EfficientNet-Lite0, the balanced recipe by default); after each epoch
snapshot every candidate slice score of the same network is computed on the validation and the test case:

- ``paper``: ``0.9 S_flow + 0.1 S_recon`` over the whole slice (the paper's image score, the project's default);
- ``flow`` / ``recon``: each term alone;
- ``calibrated``: both terms standardised with the mean and standard deviation of the validation case's healthy
  slices, then weighted 0.9 / 0.1;
- ``flow_residual``: the standardised ``flow`` plus the standardised ``brain_residual_mean``, equal weights;
- ``brain_nll_mean`` / ``brain_nll_max``: mean / maximum over the slice's brain voxels of the flow's per-location
  NLL (bilinearly upsampled);
- ``brain_residual_mean`` / ``brain_residual_p99``: mean / 99th percentile over the brain of the residual in the
  protocol's mode (positive part for FLAIR, absolute for T1c);
- ``brain_intensity_mean`` / ``brain_intensity_p99``: the same of the image itself (the baseline, no model).

Slices: brain area at least 0.2 of the largest, a slice is positive when it holds a voxel of the scored region
(FLAIR whole tumour, T1c tumour core); AUROC by scikit-learn. Besides the test AUROC of every candidate, the
``validated`` row is the candidate with the best AUROC on the fold's validation case, scored on its test case
(a choice that never sees the test case).

The same candidates (those the scorer's outputs give: ``paper``, ``flow``, ``recon``, ``calibrated``,
``flow_residual``, ``brain_residual_mean``, ``brain_intensity_mean``) are also measured on the synthetic cohort of
``aeflow-cli demo`` (``--synthetic-seeds``: one demo per seed, its model scored on the demo's test subjects with
:class:`monai_aeflow.inference.AnomalyScorer`, the calibration on its validation subjects' healthy slices), a
second data set that a choice made on the four BraTS cases has to survive.

Run::

    python benchmarks/bench_slice_scores.py --threads 1 --modalities flair,t1c --epochs 5,15,30
    python benchmarks/bench_slice_scores.py --threads 2 --modalities none --synthetic-seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_maps  # noqa: E402

from monai_aeflow.data.slices import select_slices  # noqa: E402
from monai_aeflow.evaluation.postprocess import apply_residual_mode  # noqa: E402
from monai_aeflow.scores import combined_score, flow_nll_map, flow_score, recon_score  # noqa: E402

CANDIDATES = (
    "paper",
    "flow",
    "recon",
    "calibrated",
    "flow_residual",
    "brain_nll_mean",
    "brain_nll_max",
    "brain_residual_mean",
    "brain_residual_p99",
    "brain_intensity_mean",
    "brain_intensity_p99",
)


@torch.no_grad()
def slice_terms(net: Any, vol: Mapping[str, Any], feats: torch.Tensor, mode: str, batch: int = 32) -> dict:
    """Per brain slice (brain area >= 0.2 of the largest): the score terms and the brain statistics of the maps,
    with the slice labels."""
    every = bench_maps._slices(vol)
    keep = select_slices(vol["mask"], None, 0.2)
    pos = {s: j for j, s in enumerate(every)}
    rows = [pos[s] for s in keep]
    x = bench_maps._stack(vol, keep)
    z = feats[torch.as_tensor(rows, device=feats.device)]
    out: dict[str, list] = {k: [] for k in ("flow", "recon", "nll", "residual")}
    for i in range(0, len(keep), batch):
        xb = x[i : i + batch].to(z.device)
        zp, _ = net.flow(z[i : i + batch])
        xr = net.decoder(zp).float()
        out["flow"].append(flow_score(zp).cpu())
        out["recon"].append(recon_score(xb, xr).cpu())
        out["nll"].append(flow_nll_map(zp, tuple(xb.shape[-2:]))[:, 0].cpu())
        out["residual"].append((xb - xr)[:, 0].cpu())
    flow, recon = torch.cat(out["flow"]).numpy(), torch.cat(out["recon"]).numpy()
    nll = np.moveaxis(torch.cat(out["nll"]).numpy(), 0, -1)
    res = apply_residual_mode(np.moveaxis(torch.cat(out["residual"]).numpy(), 0, -1), mode)
    brain = vol["mask"][..., keep]
    image = vol["image"][..., keep]

    def per_slice(values: np.ndarray, fn: Any) -> np.ndarray:
        return np.array([fn(values[..., j][brain[..., j]]) for j in range(len(keep))], np.float64)

    p99 = lambda v: np.percentile(v, 99)  # noqa: E731
    return {
        "flow": flow.astype(np.float64),
        "recon": recon.astype(np.float64),
        "brain_nll_mean": per_slice(nll, np.mean),
        "brain_nll_max": per_slice(nll, np.max),
        "brain_residual_mean": per_slice(res, np.mean),
        "brain_residual_p99": per_slice(res, p99),
        "brain_intensity_mean": per_slice(image, np.mean),
        "brain_intensity_p99": per_slice(image, p99),
        "label": vol["label"][..., keep].any((0, 1)),
        "healthy": ~vol["any_label"][..., keep].any((0, 1)),
    }


def candidate_scores(terms: Mapping[str, np.ndarray], calib: Mapping[str, tuple[float, float]]) -> dict:
    """Every candidate slice score from :func:`slice_terms` (``calib``: healthy validation mean / std per term)."""
    z = {k: (terms[k] - calib[k][0]) / max(calib[k][1], 1e-12) for k in ("flow", "recon", "brain_residual_mean")}
    scores = {k: terms[k] for k in CANDIDATES if k in terms}
    scores["paper"] = combined_score(torch.from_numpy(terms["flow"]), torch.from_numpy(terms["recon"]), 0.9).numpy()
    scores["calibrated"] = 0.9 * z["flow"] + 0.1 * z["recon"]
    scores["flow_residual"] = 0.5 * z["flow"] + 0.5 * z["brain_residual_mean"]
    return scores


def aurocs(scores: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """scikit-learn's AUROC of every candidate (NaN when the case has one class only)."""
    if labels.all() or not labels.any():
        return {k: float("nan") for k in scores}
    return {k: float(roc_auc_score(labels, v)) for k, v in scores.items()}


def synthetic_run(seed: int, out: Path) -> dict[str, float]:
    """Test slice AUROC of the candidates on one demo run (synthetic cohort, default demo settings)."""
    import nibabel as nib

    from monai_aeflow.demo import DemoConfig, run_demo
    from monai_aeflow.inference import AnomalyScorer

    folder = out / f"demo_seed{seed}"
    metrics = run_demo(
        DemoConfig(output_dir=str(folder), seed=seed, progress=False, overwrite=True), say=lambda _: None
    )
    scorer = AnomalyScorer(metrics["model"], device="cpu")
    used = set(metrics["train_subjects"]) | set(metrics["test_subjects"])
    data = folder / "data"
    subjects = sorted(p.name[: -len("_image.nii.gz")] for p in data.glob("*_image.nii.gz"))

    def terms(names: list[str]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {k: [] for k in ("flow", "recon", "brain_residual_mean", "brain_intensity_mean")}
        rows.update(label=[])
        for name in names:
            r = scorer.score(data / f"{name}_image.nii.gz", data / f"{name}_brainmask.nii.gz")
            label = np.asarray(nib.load(data / f"{name}_label.nii.gz").dataobj) > 0
            image = np.asarray(nib.load(data / f"{name}_image.nii.gz").dataobj, np.float32)
            brain = np.asarray(r.brain_mask) > 0
            amap = np.asarray(r.anomaly_map)
            keep = select_slices(brain, None, 0.2)
            rows["flow"] += list(np.asarray(r.scores["slice_scores_flow"], float)[keep])
            rows["recon"] += list(np.asarray(r.scores["slice_scores_recon"], float)[keep])
            rows["brain_residual_mean"] += [float(amap[..., k][brain[..., k]].mean()) for k in keep]
            rows["brain_intensity_mean"] += [float(image[..., k][brain[..., k]].mean()) for k in keep]
            rows["label"] += list(label[..., keep].any((0, 1)))
        return {k: np.asarray(v) for k, v in rows.items()}

    val = terms([s for s in subjects if s not in used])
    test = terms(list(metrics["test_subjects"]))
    healthy = ~val["label"]
    calib = {k: (float(val[k][healthy].mean()), float(val[k][healthy].std())) for k in val if k != "label"}
    return aurocs(candidate_scores(test, calib), test["label"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brats", default=str(bench_maps.BRATS_DIR))
    parser.add_argument("--out", default="bench_slice_scores_out")
    parser.add_argument("--modalities", default="flair,t1c")
    parser.add_argument("--folds", default="0,1,2,3")
    parser.add_argument("--epochs", default="5,15,30", help="epoch snapshots scored")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--alpha", type=float, default=0.02, help="flow weight (the balanced recipe: 0.02)")
    parser.add_argument("--backbone", default="efficientnet_lite0:imagenet", help="NAME:imagenet|none")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--spacing", type=bench_maps.parse_spacing, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--synthetic-seeds", default="", help="demo seeds for the synthetic check (e.g. 0,1,2)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modalities = [] if args.modalities == "none" else args.modalities.split(",")
    if modalities and not Path(args.brats).is_dir():
        print(json.dumps({"skipped": f"{args.brats} not found"}))
        return
    args.encoders = bench_maps.parse_encoders(args.backbone)
    args.score_batch_size = 32
    device = torch.device("cpu")
    snapshots = [int(e) for e in args.epochs.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"protocol": {k: str(v) for k, v in vars(args).items()}, "modalities": {}}
    t0 = time.perf_counter()
    for modality in modalities:
        _, mode = bench_maps.SETTINGS[modality]
        vols = bench_maps.load_volumes(Path(args.brats), modality, out / "cache", args.size, args.spacing)
        enc = bench_maps.build_encoders(args, vols, device)[0]
        net, feats = enc["net"], enc["feats"]
        res: dict[str, Any] = {}
        for k in (int(f) for f in args.folds.split(",")):
            test_i, val_i = k, (k + 1) % 4
            train_i = [i for i in range(4) if i not in (test_i, val_i)]
            xs, zs = [], []
            for i in train_i:
                pos = {s: j for j, s in enumerate(bench_maps._slices(vols[i]))}
                keep = select_slices(vols[i]["mask"], vols[i]["any_label"], 0.2, healthy_only=True)
                xs.append(bench_maps._stack(vols[i], keep))
                zs.append(feats[i][torch.as_tensor([pos[s] for s in keep])])
            net.load_state_dict(enc["init"])
            for epoch in bench_maps.train_snapshots(
                net, torch.cat(xs), torch.cat(zs), args.lr, False, snapshots, args.seed, args.alpha
            ):
                tv = slice_terms(net, vols[val_i], feats[val_i], mode)
                tt = slice_terms(net, vols[test_i], feats[test_i], mode)
                calib = {t: (float(tv[t][tv["healthy"]].mean()), float(tv[t][tv["healthy"]].std())) for t in tv}
                val = aurocs(candidate_scores(tv, calib), tv["label"])
                test = aurocs(candidate_scores(tt, calib), tt["label"])
                best = max((v, c) for c, v in val.items() if not c.startswith("brain_intensity"))[1]
                test["validated"] = test[best]
                entry = res.setdefault(f"epochs={epoch}", {})
                entry[f"fold{k}"] = {"test": test, "val": val, "validated_choice": best}
                print(
                    f"[{modality} fold{k} epoch {epoch}] " + ", ".join(f"{c} {v:.3f}" for c, v in test.items()),
                    file=sys.stderr,
                    flush=True,
                )
        for entry in res.values():
            folds = [f for f in entry if f.startswith("fold")]
            names = entry[folds[0]]["test"]
            entry["mean_test"] = {c: float(np.nanmean([entry[f]["test"][c] for f in folds])) for c in names}
        report["modalities"][modality] = res
        report["wall_seconds"] = time.perf_counter() - t0
        (out / "bench_slice_scores.json").write_text(json.dumps(report, indent=2))
    if args.synthetic_seeds:
        runs = {f"seed{s}": synthetic_run(int(s), out) for s in args.synthetic_seeds.split(",")}
        mean = {c: float(np.nanmean([r[c] for r in runs.values()])) for c in next(iter(runs.values()))}
        report["synthetic"] = {"runs": runs, "mean_test": mean}
        report["wall_seconds"] = time.perf_counter() - t0
        (out / "bench_slice_scores.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
