"""``aeflow-cli score`` over N GPUs (torchrun, one rank per GPU) against one GPU, on the same generated volumes;
prints one JSON document with the wall times, volumes/s and the speed-up (the target: >= 1.8x on 2 GPUs).

Usage::

    python benchmarks/bench_multi_gpu.py --gpus 2 --volumes 100 --backbone wide_resnet50_2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_volumes import make_inputs, make_model  # noqa: E402


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--workers", type=int, default=6, help="decoding processes per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = [str(p) for p in make_inputs(work, args.volumes, (240, 240, 155))]
        model = str(make_model(work, args.backbone, 240))
        common = ["score", *inputs, "-m", model, "--quiet", "--no-preview", "--workers", str(args.workers)]
        one = run([sys.executable, "-m", "aeflow_cli", *common, "-o", str(work / "one"), "--device", "cuda"])
        many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(args.gpus), "-m", "aeflow_cli", *common, "-o", str(work / "many")])  # fmt: skip
    report = {
        "benchmark": "multi_gpu",
        "device": torch.cuda.get_device_name(0),
        "gpus": args.gpus,
        "volumes": args.volumes,
        "backbone": args.backbone,
        "note": "wall times include process start and model loading of each run",
        "one_gpu_seconds": one,
        "many_gpu_seconds": many,
        "one_gpu_volumes_per_s": args.volumes / one,
        "many_gpu_volumes_per_s": args.volumes / many,
        "speedup": one / many,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
