"""Writing one BraTS-sized float32 anomaly map as ``.nii.gz``: ``nibabel.save`` against the project's
:func:`~monai_aeflow.fileio.save_nifti` (ISA-L gzip when installed), both at compression level 1, in the same run;
prints one JSON.

Then the uncompressed NIfTI bytes, nibabel's ``to_bytes()`` against :func:`~monai_aeflow.fileio.nifti_bytes`, alone
and beside a thread that runs Python without pause (as the scoring threads of ``aeflow-cli score`` do beside its
writer threads): nibabel writes slice by slice and hands the GIL back and forth at every numpy call, and each
hand-back waits for the busy thread's switch interval (5 ms).

On the H100 machine the writer threads were the bound of sustained scoring (about 1.2 s of writing per volume and
thread, with 12 decoding workers beside them), so the write time per volume caps the volumes per second.

Usage::

    python benchmarks/bench_write.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_aeflow.fileio import nifti_bytes, save_nifti


def brain_like_map(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A float32 map that is zero outside an ellipsoid 'brain' and gamma-distributed inside (as residual maps are)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid[0] / 0.75) ** 2 + (grid[1] / 0.85) ** 2 + (grid[2] / 0.8) ** 2 <= 1.0
    return (rng.gamma(2.0, 0.05, shape) * inside).astype(np.float32)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def beside_busy_thread(fn, repeats: int) -> float:
    """Best time of ``fn`` while another thread runs a pure-Python loop."""
    import threading

    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    th = threading.Thread(target=spin, daemon=True)
    th.start()
    try:
        return best_of(fn, repeats)
    finally:
        stop.set()
        th.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="240,240,155")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    img = nib.Nifti1Image(brain_like_map(shape), np.eye(4))
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0  # as the scorer writes its maps
    try:
        import isal

        backend = f"isal {isal.__version__}"
    except ImportError:
        backend = "gzip (isal not installed)"
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = Path(tmp) / "nibabel.nii.gz", Path(tmp) / "ours.nii.gz"
        t_ref = best_of(lambda: nib.save(img, ref), args.repeats)
        t_ours = best_of(lambda: save_nifti(img, ours), args.repeats)
        same = np.array_equal(np.asarray(nib.load(ours).dataobj), np.asarray(img.dataobj))
        report = {
            "benchmark": "write",
            "machine": platform.processor() or platform.machine(),
            "shape": list(shape),
            "compressor": backend,
            "nibabel_save_seconds": t_ref,
            "save_nifti_seconds": t_ours,
            "speedup": t_ref / t_ours,
            "nibabel_mb": ref.stat().st_size / 1e6,
            "save_nifti_mb": ours.stat().st_size / 1e6,
            "reads_back_equal": bool(same),
        }
        raw = {
            "nibabel_to_bytes_seconds": best_of(img.to_bytes, args.repeats),
            "nifti_bytes_seconds": best_of(lambda: nifti_bytes(img), args.repeats),
            "nibabel_to_bytes_beside_busy_thread_seconds": beside_busy_thread(img.to_bytes, args.repeats),
            "nifti_bytes_beside_busy_thread_seconds": beside_busy_thread(lambda: nifti_bytes(img), args.repeats),
            "save_nifti_beside_busy_thread_seconds": beside_busy_thread(lambda: save_nifti(img, ours), args.repeats),
            "same_bytes": nifti_bytes(img) == img.to_bytes(),
        }
        raw["speedup_beside_busy_thread"] = (
            raw["nibabel_to_bytes_beside_busy_thread_seconds"] / raw["nifti_bytes_beside_busy_thread_seconds"]
        )
        report["uncompressed_bytes"] = raw
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
