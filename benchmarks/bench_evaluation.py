"""Benchmark of the evaluation: fast threshold sweep vs. a per-threshold numpy loop, and pixel metrics time.

Prints one JSON object:

- ``sweep``: Dice of ``score > t`` for every threshold of a grid on full 240x240x155 volumes, computed by
  :func:`monai_aeflow.evaluation.sweep.sweep_counts` (sort once, binary search) and by a straightforward
  numpy loop that recomputes the binary mask and its counts for every threshold. The counts are asserted
  identical; the speed-up is reported.
- ``pixel_metrics``: the test-split metrics of the protocol (Dice at the threshold with component removal,
  pixel AUROC / AUPRC over brain voxels with bootstrap CIs, Dice curves, oracle, slice and volume metrics) on
  synthetic post-processed 240x240x155 volumes, with the time scaled to one hundred volumes; also the
  post-processing time (erosion, median filter) per volume, and the time and validation Dice of the two
  validated thresholds: the exact sweep (default; every distinct value of the component-opened maps) and the
  seed thesis' greedy search.

Run::

    python benchmarks/bench_evaluation.py                 # defaults: 4 sweep volumes, 20 metric volumes
    python benchmarks/bench_evaluation.py --quick         # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from scipy import ndimage

from monai_aeflow.evaluation.cases import prepare_case
from monai_aeflow.evaluation.metrics import dice_from_counts
from monai_aeflow.evaluation.pipeline import EvaluationConfig, evaluate_prepared, select_threshold
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.evaluation.sweep import sweep_counts, threshold_grid


def synthetic_volume(seed: int, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """A brain-like ellipsoid mask, smooth lesion blobs, and a residual that is higher in the lesions."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [n / 2 for n in shape]
    radii = [0.36 * shape[0], 0.42 * shape[1], 0.40 * shape[2]]
    mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
    small = rng.random(tuple(max(4, n // 8) for n in shape))
    blobs = ndimage.zoom(
        ndimage.gaussian_filter(small, 1.0), [n / m for n, m in zip(shape, small.shape, strict=True)], order=1
    )
    label = (blobs > np.quantile(blobs[mask], 0.97)) & mask
    residual = rng.gamma(2.0, 0.04, size=shape).astype(np.float32)
    residual += label * rng.normal(0.25, 0.08, size=shape).astype(np.float32)
    return {"residual": residual * mask, "label": label, "mask": mask}


def naive_counts(volumes: list[np.ndarray], labels: list[np.ndarray], thresholds: np.ndarray):
    """Recompute the binary mask and its TP / FP for every threshold and volume."""
    tp = np.zeros((len(volumes), thresholds.size), dtype=np.int64)
    fp = np.zeros_like(tp)
    for i, (v, y) in enumerate(zip(volumes, labels, strict=True)):
        for j, t in enumerate(thresholds):
            pred = v > t
            tp[i, j] = np.count_nonzero(pred & y)
            fp[i, j] = np.count_nonzero(pred) - tp[i, j]
    return tp, fp


def bench_sweep(n_volumes: int, shape, n_thresholds: int) -> dict:
    data = [synthetic_volume(100 + i, shape) for i in range(n_volumes)]
    vols = [d["residual"] for d in data]
    labels = [d["label"] for d in data]
    top = max(float(v.max()) for v in vols)
    grid = np.linspace(0.0, top, n_thresholds)
    t0 = time.perf_counter()
    tp_n, fp_n = naive_counts(vols, labels, grid)
    naive_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc = sweep_counts([v.ravel() for v in vols], [y.ravel() for y in labels], grid)
    fast_s = time.perf_counter() - t0
    assert np.array_equal(sc.tp, tp_n) and np.array_equal(sc.fp, fp_n), "fast sweep differs from the naive loop"
    pooled_fast = dice_from_counts(sc.tp.sum(0), sc.fp.sum(0), sc.fn.sum(0))
    pooled_naive = dice_from_counts(tp_n.sum(0), fp_n.sum(0), sc.n_pos.sum() - tp_n.sum(0))
    assert np.array_equal(pooled_fast, pooled_naive, equal_nan=True)
    # The same fast sweep on the default grid size of the protocol (no naive counterpart: too slow).
    big_grid = threshold_grid([v[m] for v, m in zip(vols, [d["mask"] for d in data], strict=True)], 16384)
    t0 = time.perf_counter()
    sweep_counts([v.ravel() for v in vols], [y.ravel() for y in labels], big_grid)
    fast_big_s = time.perf_counter() - t0
    return {
        "n_volumes": n_volumes,
        "shape": list(shape),
        "voxels_per_volume": int(np.prod(shape)),
        "n_thresholds": int(grid.size),
        "naive_numpy_s": round(naive_s, 3),
        "fast_sweep_s": round(fast_s, 3),
        "speedup": round(naive_s / fast_s, 1),
        "identical_counts": True,
        "best_pooled_dice": float(np.nanmax(pooled_fast)),
        "fast_sweep_16384_thresholds_s": round(fast_big_s, 3),
        "fast_sweep_16384_thresholds": int(big_grid.size),
    }


def bench_pixel_metrics(n_volumes: int, shape, n_val: int) -> dict:
    pp = PostprocessConfig(
        residual="absolute", erosion_iterations=3, median_size=5, median_dims=2, min_component_size=7
    )
    prep_s = 0.0
    prepared = []
    for i in range(n_volumes + n_val):
        d = synthetic_volume(i, shape)
        t0 = time.perf_counter()
        prepared.append(prepare_case({"name": f"v{i:03d}", **d}, pp))
        prep_s += time.perf_counter() - t0
    val, test = prepared[:n_val], prepared[n_val:]

    t0 = time.perf_counter()
    threshold = select_threshold(val, EvaluationConfig(postprocess=pp))
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy = select_threshold(val, EvaluationConfig(postprocess=pp, threshold_method="greedy"))
    greedy_s = time.perf_counter() - t0

    cfg = EvaluationConfig(postprocess=pp, threshold_method="fixed", threshold=threshold["value"])
    t0 = time.perf_counter()
    result = evaluate_prepared([], test, cfg)
    metrics_s = time.perf_counter() - t0
    px = result["metrics"]["pixel"]
    scale = 100.0 / n_volumes
    return {
        "n_test_volumes": n_volumes,
        "shape": list(shape),
        "brain_voxels_per_volume": int(np.mean([c.n_brain for c in test])),
        "postprocess_s_per_volume": round(prep_s / (n_volumes + n_val), 3),
        "threshold_validation_volumes": n_val,
        "sweep_threshold_s": round(search_s, 3),
        "sweep_candidates": threshold["n_candidates"],
        "sweep_validation_dice_pooled": threshold["validation_dice_pooled"],
        "greedy_search_s": round(greedy_s, 3),
        "greedy_validation_dice_pooled": greedy["validation_dice_pooled"],
        "metrics_s": round(metrics_s, 3),
        "metrics_s_scaled_to_100_volumes": round(metrics_s * scale, 1),
        "n_bootstrap": cfg.n_bootstrap,
        "n_thresholds": cfg.n_thresholds,
        "dice_pooled": px["dice_pooled"]["value"],
        "pixel_auroc": px["auroc"]["value"],
        "pixel_auprc": px["auprc"]["value"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-volumes", type=int, default=4)
    parser.add_argument("--sweep-thresholds", type=int, default=256)
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--val-volumes", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small volumes, for a smoke test")
    args = parser.parse_args()
    shape = (96, 96, 60) if args.quick else (240, 240, 155)
    out = {
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count()},
        "sweep": bench_sweep(args.sweep_volumes, shape, args.sweep_thresholds),
        "pixel_metrics": bench_pixel_metrics(args.volumes, shape, args.val_volumes),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
