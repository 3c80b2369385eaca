"""Throughput of the slice training pipeline with and without volume caching, and cache memory.

Uses the four BraTS 2015 FLAIR cases of ``../shared/data/brats2015_dev`` (prints a JSON line with
``"skipped"`` and exits 0 when the folder is absent). Measures, with shuffled healthy training slices
through a ``DataLoader`` (batch 16, no worker processes):

- ``memory``: ``CacheDataset`` (volumes preprocessed once, kept in RAM): slices/s of epochs 2 and 3;
- ``disk``: ``PersistentDataset`` (preprocessed once, reloaded from disk when another volume is needed);
- ``none``: plain ``Dataset`` (a volume is re-read and re-preprocessed whenever the shuffled order moves
  to another volume), over the first batches only;
- ``none_sequential``: plain ``Dataset`` with slices in volume order (each volume read once per epoch).

Peak memory of caching the four cases is measured in a fresh subprocess: peak resident set size
(``resource.getrusage``) before and after filling the cache, the ``tracemalloc`` peak (numpy/Python
allocations only) and the exact size of the cached tensors.

Run: ``python benchmarks/bench_data_pipeline.py [--data ../shared/data] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from monai.data import DataLoader

from monai_aeflow.data.indexers import index_brats
from monai_aeflow.data.slices import make_slice_dataset
from monai_aeflow.data.transforms import build_volume_preprocessing

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH = 16


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _epoch(dataset, max_batches: int | None = None, shuffle: bool = True, seed: int = 0) -> tuple[int, float]:
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=shuffle, num_workers=0, generator=torch.Generator().manual_seed(seed)
    )
    n, start = 0, time.perf_counter()
    for b, batch in enumerate(loader):
        n += batch["image"].shape[0]
        if max_batches is not None and b + 1 >= max_batches:
            break
    return n, time.perf_counter() - start


def measure_memory(data: Path) -> dict:
    """Fill the in-memory cache with the four BraTS cases and report memory (run in a fresh process)."""
    records = index_brats(data / "brats2015_dev", modality="flair")
    rss_before = _rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    ds = make_slice_dataset(records, build_volume_preprocessing(), cache="memory", healthy_only=True, num_workers=1)
    fill_s = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    cached = sum(
        v.element_size() * v.nelement()
        for volume in ds.volumes._cache
        for v in volume.values()
        if isinstance(v, torch.Tensor)
    )
    return {
        "cases": len(records),
        "cache_fill_s": round(fill_s, 2),
        "cached_tensor_mb": round(cached / 2**20, 1),
        "rss_peak_before_mb": round(rss_before, 1),
        "rss_peak_after_mb": round(_rss_mb(), 1),
        "rss_peak_increase_mb": round(_rss_mb() - rss_before, 1),
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 1),
    }


def measure_throughput(data: Path, none_batches: int) -> dict:
    records = index_brats(data / "brats2015_dev", modality="flair")
    preprocess = build_volume_preprocessing()
    out: dict = {}

    start = time.perf_counter()
    memory = make_slice_dataset(records, preprocess, cache="memory", healthy_only=True, num_workers=1)
    build = time.perf_counter() - start
    runs = [_epoch(memory, seed=e) for e in (1, 2)]
    n, t = sum(r[0] for r in runs), sum(r[1] for r in runs)
    out["memory"] = {"build_s": round(build, 2), "slices": n, "seconds": round(t, 3), "slices_per_s": round(n / t, 1)}

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        disk = make_slice_dataset(records, preprocess, cache="disk", cache_dir=cache_dir, healthy_only=True)
        build = time.perf_counter() - start
        n, t = _epoch(disk, seed=1)
        out["disk"] = {"build_s": round(build, 2), "slices": n, "seconds": round(t, 2), "slices_per_s": round(n / t, 2)}

    start = time.perf_counter()
    none = make_slice_dataset(records, preprocess, cache="none", healthy_only=True)
    build = time.perf_counter() - start
    n, t = _epoch(none, max_batches=none_batches, seed=1)
    out["none"] = {"build_s": round(build, 2), "slices": n, "seconds": round(t, 2), "slices_per_s": round(n / t, 2)}
    n, t = _epoch(none, shuffle=False)
    out["none_sequential"] = {"slices": n, "seconds": round(t, 2), "slices_per_s": round(n / t, 2)}

    out["ratio_memory_vs_none"] = round(out["memory"]["slices_per_s"] / out["none"]["slices_per_s"], 1)
    out["ratio_memory_vs_none_sequential"] = round(
        out["memory"]["slices_per_s"] / out["none_sequential"]["slices_per_s"], 1
    )
    out["healthy_training_slices"] = len(memory)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("AEFLOW_SHARED_DATA", DEFAULT_DATA)))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--none-batches", type=int, default=4, help="batches timed without caching")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "brats2015_dev").is_dir():
        print(json.dumps({"skipped": f"{args.data / 'brats2015_dev'} not present"}))
        return
    if args.memory_only:
        print(json.dumps(measure_memory(args.data)))
        return
    child = subprocess.run(
        [sys.executable, __file__, "--data", str(args.data), "--threads", str(args.threads), "--memory-only"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "python": platform.python_version()},
        "batch_size": BATCH,
        "throughput": measure_throughput(args.data, args.none_batches),
        "memory_cache_4_brats": json.loads(child.stdout.strip().splitlines()[-1]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
