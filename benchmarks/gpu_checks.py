"""Correctness checks that need a GPU, printed as one JSON document (run by ``benchmarks/gpu_session.sh``).

1. No NaN under autocast: a Wide-ResNet-50-2 AE-FLOW (random weights, ActNorm initialised) scores 256 x 256
   slices under float16, bfloat16 and float32 on CUDA; every map and score must be finite and the autocast
   maps close to float32 (max abs difference reported).
2. Post-processing on the GPU equals scipy: :func:`postprocess_map_torch` / :func:`segment_torch` on CUDA
   against :mod:`monai_aeflow.evaluation.postprocess` on random 240 x 240 x 155 volumes (2D and 3D settings),
   with the time of each.
3. The scorer's inverse transforms and post-processing on the device against the same on the CPU
   (``postprocess_device="cpu"``), same network outputs: max map difference and mask agreement.

Usage::

    python benchmarks/gpu_checks.py
    python benchmarks/gpu_checks.py --device cpu --size 64 --shape 64,64,20 --backbone resnet18   # a dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy import ndimage

from monai_aeflow.evaluation.postprocess import PostprocessConfig, postprocess_map, segment
from monai_aeflow.inference import score_slices
from monai_aeflow.inference.postprocess_torch import postprocess_map_torch, segment_torch
from monai_aeflow.networks import AEFlow


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_check(device: torch.device, backbone: str, size: int) -> dict:
    torch.manual_seed(0)
    net = AEFlow(backbone=backbone, backbone_weights=None).to(device).eval()
    x = torch.rand(16, 1, size, size)
    net.initialize_flow(x[:8].to(device))
    out = {}
    ref = score_slices(net, x, batch_size=16, amp_dtype="none", map_kind="ssim")
    for dtype in ("float16", "bfloat16"):
        got = score_slices(net, x, batch_size=16, amp_dtype=dtype, map_kind="ssim")
        out[dtype] = {
            "finite": all(bool(torch.isfinite(v).all()) for v in got.values()),
            "max_abs_map_diff": float((got["anomaly_map"] - ref["anomaly_map"]).abs().max()),
            "max_abs_score_diff": float((got["score"] - ref["score"]).abs().max()),
        }
    return out


def postprocess_check(device: torch.device, shape: tuple[int, int, int]) -> list[dict]:
    rng = np.random.default_rng(0)
    residual = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    xx, yy, zz = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    brain = xx**2 + yy**2 + zz**2 < 0.8
    rows = []
    for cfg in (PostprocessConfig(), PostprocessConfig(median_dims=3, component_connectivity=3)):
        t = time.perf_counter()
        ref = postprocess_map(residual, brain, cfg)
        threshold = float(np.quantile(ref[ref > 0], 0.9))
        ref_mask = segment(ref, threshold, cfg)
        cpu_s = time.perf_counter() - t
        r, b = torch.from_numpy(residual).to(device), torch.from_numpy(brain).to(device)
        segment_torch(postprocess_map_torch(r, b, cfg), threshold, cfg)  # warm-up
        _sync(device)
        t = time.perf_counter()
        got = postprocess_map_torch(r, b, cfg)
        mask = segment_torch(got, threshold, cfg)
        _sync(device)
        gpu_s = time.perf_counter() - t
        rows.append({
            "config": cfg.to_dict(),
            "map_equal": bool(np.array_equal(got.cpu().numpy(), ref)),
            "mask_equal": bool(np.array_equal(mask.cpu().numpy(), ref_mask)),
            "scipy_seconds": cpu_s,
            "torch_seconds": gpu_s,
        })  # fmt: skip
    return rows


def scorer_check(device: torch.device, backbone: str, shape: tuple[int, int, int]) -> dict:
    import tempfile
    from pathlib import Path

    from monai_aeflow.checkpoint import save_model
    from monai_aeflow.data.synthetic import generate_cohort
    from monai_aeflow.inference import AnomalyScorer

    with tempfile.TemporaryDirectory() as tmp:
        image = generate_cohort(Path(tmp), 0, 1, seed=2, shape=shape, spacing=(1.0, 1.0, 1.0))[0]["image"]
        torch.manual_seed(0)
        net = AEFlow(backbone=backbone, backbone_weights=None).eval()
        size = (shape[0] + 15) // 16 * 16
        net.initialize_flow(torch.rand(4, 1, size, size))
        prep = {"spatial_size": [size, size], "percentiles": [1.0, 99.0], "orientation": "RAS"}
        model = save_model(net, Path(tmp) / "m.pt", {"preprocessing": prep}, threshold=0.05)
        on_device = AnomalyScorer(model, device=device)
        data = on_device.preprocess(image)
        t = time.perf_counter()
        a = on_device.score_preprocessed(data)
        dev_s = time.perf_counter() - t
        on_cpu = AnomalyScorer(model, device=device, postprocess_device="cpu")
        t = time.perf_counter()
        b = on_cpu.score_preprocessed(on_cpu.preprocess(image))
        cpu_s = time.perf_counter() - t
    return {
        "max_abs_map_diff": float(np.abs(a.anomaly_map - b.anomaly_map).max()),
        "mask_voxels_device": int(a.lesion_mask.sum()),
        "mask_voxels_cpu": int(b.lesion_mask.sum()),
        "mask_disagreement_voxels": int((a.lesion_mask != b.lesion_mask).sum()),
        "score_seconds_device_after_network": dev_s,
        "score_seconds_cpu_after_network": cpu_s,
        "timing_device": a.scores["timing"],
        "timing_cpu": b.scores["timing"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shape", default="240,240,155")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"benchmark": "gpu_checks", "device": name, "torch": torch.__version__}
    report["autocast"] = amp_check(device, args.backbone, args.size)
    shape = tuple(int(v) for v in args.shape.split(","))
    report["postprocess"] = postprocess_check(device, shape)
    report["scorer_device_vs_cpu_after_network"] = scorer_check(device, args.backbone, shape)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
