"""Scoring a folder of 2D images (chest X-rays): forward passes shared by consecutive images against one image per
pass, in the same run; prints one JSON.

:func:`monai_aeflow.inference.score_paths` groups consecutive decoded 2D images of one size into forward passes
of the scorer's batch (its device's default when unset); ``batch_size=1`` gives one pass per image, what it did
before. Both runs score the same copies with the same model (random weights: the speed does not depend on
them) and write the same outputs; the largest difference between their maps is reported.

Inputs: ``--sources`` (a glob of images; default the chest X-rays beside the repository,
``../shared/data/cxr_2d/*/*.png``, copied ``--images`` times over), else generated grey-scale images.

Usage::

    python benchmarks/bench_images.py --images 96 --backbone efficientnet_lite0 --size 256
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from monai_aeflow.checkpoint import save_model
from monai_aeflow.inference import AnomalyScorer, score_paths
from monai_aeflow.networks import AEFlow

CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_2d"


def make_inputs(work: Path, n: int, pattern: str | None) -> tuple[list[Path], str]:
    """``n`` image files: copies of the files matching ``pattern`` (or of the chest X-rays), else generated."""
    sources = sorted(glob.glob(pattern)) if pattern else sorted(glob.glob(str(CXR / "*" / "*.png")))
    folder = work / "inputs"
    folder.mkdir(parents=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        dest = folder / f"img{i:04d}.png"
        if sources:
            shutil.copyfile(sources[i % len(sources)], dest)
        else:
            yy, xx = np.mgrid[:460, :512]
            body = ((yy - 230) / 200.0) ** 2 + ((xx - 256) / 230.0) ** 2 < 1
            Image.fromarray((body * rng.uniform(80, 200, body.shape)).astype(np.uint8)).save(dest)
        paths.append(dest)
    return paths, (pattern or str(CXR / "*" / "*.png")) if sources else "generated"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256, help="model input size (a multiple of 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sources", default=None, help="glob of 2D images (default: the chest X-rays)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs, source = make_inputs(work, args.images + 1, args.sources)
        torch.manual_seed(0)
        net = AEFlow(backbone=args.backbone, backbone_weights=None).eval()
        net.initialize_flow(torch.rand(4, 1, args.size, args.size))
        prep = {"spatial_size": [args.size, args.size], "percentiles": [1.0, 99.0]}
        model = save_model(net, work / "model.pt", {"preprocessing": prep}, threshold=0.2)
        runs = {}
        for label, batch in (("one image per pass", 1), ("shared passes", None)):
            scorer = AnomalyScorer(model, device=device, batch_size=batch)
            score_paths(scorer, inputs[:1], work / f"warm_{batch}", preview=False, workers=0, progress=False)
            out = work / f"out_{batch}"
            start = time.perf_counter()
            rows = score_paths(scorer, inputs[1:], out, preview=False, workers=args.workers, progress=False)
            wall = time.perf_counter() - start
            ok = [r for r in rows if r["status"] == "ok"]
            runs[label] = {
                "batch_size": batch,
                "images": len(rows),
                "ok": len(ok),
                "wall_seconds": wall,
                "images_per_second": len(ok) / wall,
                "network_seconds": sum(r["model_seconds"] for r in ok),
                "out": out,
            }
        a, b = (runs[k].pop("out") for k in ("one image per pass", "shared passes"))
        diff = max(
            float(np.abs(np.asarray(Image.open(f)) - np.asarray(Image.open(b / f.name))).max())
            for f in sorted(a.glob("*_anomaly.tif"))
        )
        report = {
            "benchmark": "images",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "backbone": args.backbone,
            "size": args.size,
            "sources": source,
            "runs": runs,
            "speedup_shared_over_one_per_pass": runs["shared passes"]["images_per_second"]
            / runs["one image per pass"]["images_per_second"],
            "max_map_difference": diff,
        }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
