"""Benchmark of ``aeflow-cli score``'s inference path; prints one JSON document.

Measured in the same run, so that the ratios hold on a shared, noisy machine:

1. slices/s of the batched scorer (:func:`monai_aeflow.inference.score_slices`) against a per-slice loop calling
   the same model, for the light (ResNet-18) and the paper's (Wide-ResNet-50-2) backbone;
2. the model's achieved FLOP/s (FLOPs counted by ``torch.utils.flop_counter``) against the machine's measured
   ``torch.matmul`` peak (on CUDA bfloat16 at 8192^3, the scorer's autocast dtype; on CPU float32 at 2048^3),
   the peak GPU memory per backbone and size, and with ``--profile`` a ``torch.profiler`` summary of one
   batched run (top operators, device idle share, synchronisations, host-to-device copies);
3. end-to-end :class:`~monai_aeflow.inference.AnomalyScorer` time for one 240 x 240 x 155 volume (loading,
   preprocessing, model, inverse transforms, post-processing, writing) against the model-only time, and the
   peak resident memory;
4. on CUDA: volumes/s for 240 x 240 x 155 volumes with the paper's backbone and AMP.

Usage::

    python benchmarks/bench_score.py                  # CPU
    python benchmarks/bench_score.py --device cuda --sizes 128,256 --slices 128 --profile   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from monai_aeflow.checkpoint import save_model
from monai_aeflow.data.synthetic import generate_cohort
from monai_aeflow.inference import AnomalyScorer, default_batch_size, score_slices, write_outputs
from monai_aeflow.networks import AEFlow


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(device: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul: bfloat16 at 8192^3 on CUDA (the scorer's autocast), float32 at 2048^3
    on CPU."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    seconds = _best_of(lambda: torch.matmul(a, b), repeats, device)
    return 2.0 * n**3 / seconds


def model_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (matmuls and convolutions, as counted by PyTorch)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return int(counter.get_total_flops())


def profile_summary(fn, device: torch.device, top: int = 12) -> dict:
    """``torch.profiler`` of one call: top operators by self time, device idle share, syncs and copies."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()

    def self_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total)

    busy = sum(self_us(e) for e in events) / 1e6
    host = sorted(events, key=lambda e: float(e.self_cpu_time_total), reverse=True)[:top]
    return {
        "wall_seconds": wall,
        "busy_seconds": busy,
        "host_self_seconds": sum(float(e.self_cpu_time_total) for e in events) / 1e6,
        "top_host_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in host],
        "device_idle_fraction": max(0.0, 1.0 - busy / wall) if cuda else None,
        "sync_or_item_calls": sum(e.count for e in events if "synchronize" in e.key.lower() or e.key == "aten::item"),
        "host_to_device_copies": sum(e.count for e in events if "HtoD" in e.key),
        "device_to_host_copies": sum(e.count for e in events if "DtoH" in e.key),
        "top_ops": [
            {"op": e.key, "self_ms": self_us(e) / 1e3, "calls": e.count}
            for e in sorted(events, key=self_us, reverse=True)[:top]
        ],
    }


def bench_backbone(
    backbone: str,
    device: torch.device,
    size: int,
    n_slices: int,
    repeats: int,
    peak: float,
    profile: bool = False,
    batch_size: int | None = None,
    compile_mode: str | None = None,
) -> dict:
    """Slices/s of the batched scorer against a per-slice loop of the same model and against the same batches
    each waited for (one call, hence one host synchronisation, per batch: the scorer before its copies were made
    asynchronous)."""
    # channels-last weights, as AnomalyScorer prepares the network
    net = AEFlow(backbone=backbone, backbone_weights=None).to(device).eval().to(memory_format=torch.channels_last)
    compile_seconds = None
    if compile_mode:
        net = torch.compile(net, mode=compile_mode)
    images = torch.rand(n_slices, 1, size, size)
    batch = batch_size or default_batch_size(device, size, size)

    def batched() -> None:
        score_slices(net, images, batch_size=batch)  # bfloat16 autocast on CUDA (the default)

    def per_batch_sync() -> None:
        for i in range(0, n_slices, batch):
            score_slices(net, images[i : i + batch], batch_size=batch)

    def loop() -> None:
        for i in range(n_slices):
            score_slices(net, images[i : i + 1], batch_size=1)

    start = time.perf_counter()
    batched()  # warm-up (and the compilation)
    _sync(device)
    if compile_mode:
        compile_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_batched = _best_of(batched, repeats, device)
    t_sync = _best_of(per_batch_sync, repeats, device)
    t_loop = _best_of(loop, 1, device) if not compile_mode else None  # a compiled batch-1 graph would be extra
    flops = model_flops(getattr(net, "_orig_mod", net), images[:1].to(device)) * n_slices
    extra = {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}
    if profile:
        extra["profile"] = profile_summary(batched, device)
    return {
        "backbone": backbone,
        "slice_size": size,
        "slices": n_slices,
        "batch_size": batch,
        "compile": compile_mode,
        "compile_seconds": compile_seconds,
        "batched_slices_per_s": n_slices / t_batched,
        "per_batch_sync_slices_per_s": n_slices / t_sync,
        "batched_over_per_batch_sync": t_sync / t_batched,
        "loop_slices_per_s": None if t_loop is None else n_slices / t_loop,
        "batched_over_loop": None if t_loop is None else t_loop / t_batched,
        "model_gflop_per_slice": flops / n_slices / 1e9,
        "achieved_gflop_per_s": flops / t_batched / 1e9,
        "matmul_peak_gflop_per_s": peak / 1e9,
        "fraction_of_matmul_peak": flops / t_batched / peak,
        **extra,
    }


def bench_end_to_end(backbone: str, device: torch.device, work: Path) -> dict:
    """One 240 x 240 x 155 volume through the whole scorer, against the model alone on its slices."""
    cohort = generate_cohort(work / "data", 0, 1, seed=3, shape=(240, 240, 155), spacing=(1.0, 1.0, 1.0))
    model_file = work / f"{backbone}.pt"
    save_model(
        AEFlow(backbone=backbone, backbone_weights=None),
        model_file,
        {"preprocessing": {"spatial_size": [240, 240], "percentiles": [1.0, 99.0], "orientation": "RAS"}},
        threshold=0.2,
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scorer = AnomalyScorer(model_file, device=device)
    image = cohort[0]["image"]
    scorer.score(image)  # warm-up (allocations, cuDNN autotuning)
    start = time.perf_counter()
    result = scorer.score(image)
    write_outputs(result, work / "out", overwrite=True)
    _sync(device)
    total = time.perf_counter() - start
    timing = result.scores["timing"]
    out = {
        "backbone": backbone,
        "volume_shape": [240, 240, 155],
        "scored_slices": result.scores["scored_slices"],
        "end_to_end_seconds": total,
        "model_seconds": timing["model_seconds"],
        "postprocess_seconds": timing["postprocess_seconds"],
        "overhead_seconds": total - timing["model_seconds"],
        "overhead_fraction": (total - timing["model_seconds"]) / total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
    }
    if device.type == "cuda":
        n = 5
        start = time.perf_counter()
        for _ in range(n):
            scorer.score(image)
        _sync(device)
        out["volumes_per_second"] = n / (time.perf_counter() - start)
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="64,128,240", help="slice sizes of the throughput test (BraTS: 240)")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of each batched run")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the one-volume end-to-end test")
    parser.add_argument("--batch-sizes", default="", help="further batch sizes measured at the largest size")
    parser.add_argument(
        "--compile", default="", help="torch.compile mode(s) measured at the largest size, e.g. default,max-autotune"
    )
    parser.add_argument(
        "--e2e-backbone", default=None, help="backbone of the end-to-end test (default: resnet18 on CPU)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    report = {
        "benchmark": "score",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    peak = matmul_peak(device)
    report["matmul_peak"] = {
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "n": 8192 if device.type == "cuda" else 2048,
        "gflop_per_s": peak / 1e9,
    }
    report["throughput"] = [
        bench_backbone(b, device, int(size), args.slices, args.repeats, peak, args.profile)
        for b in args.backbones.split(",")
        for size in args.sizes.split(",")
    ]
    largest = max(int(v) for v in args.sizes.split(","))
    for b in args.backbones.split(","):
        for bs in filter(None, args.batch_sizes.split(",")):
            report["throughput"].append(
                bench_backbone(b, device, largest, args.slices, args.repeats, peak, False, int(bs))
            )
        for mode in filter(None, args.compile.split(",")):
            try:
                report["throughput"].append(
                    bench_backbone(b, device, largest, args.slices, args.repeats, peak, compile_mode=mode)
                )
            except Exception as err:  # a compiler missing on the machine: recorded, the rest still runs
                report["throughput"].append({"backbone": b, "compile": mode, "error": f"{type(err).__name__}: {err}"})
    if not args.no_end_to_end:
        e2e = args.e2e_backbone or ("wide_resnet50_2" if device.type == "cuda" else "resnet18")
        with tempfile.TemporaryDirectory() as tmp:
            report["end_to_end"] = bench_end_to_end(e2e, device, Path(tmp))
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
