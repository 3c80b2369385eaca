"""Sustained end-to-end scoring of many 240 x 240 x 155 volumes from ``.nii.gz`` files on disk; prints one JSON.

What ``aeflow-cli score`` does for a folder of volumes (:func:`monai_aeflow.inference.score_paths`): decoding
and preprocessing in ``--workers`` DataLoader processes, the network, the inverse transforms and the
post-processing (on the scorer's device), and writing in a background thread. Reported: volumes/s over the
whole run (after one warm-up volume), the time split per stage summed over the volumes (decode runs in the
workers, so it overlaps the rest), wall time over network time (the target on CPU: <= 1.3), the peak GPU
memory, and optionally a ``torch.profiler`` summary of one volume (``--profile``) and a :mod:`cProfile` of the scoring
thread's host time with its CPU time per volume (``--host-profile N``). ``--gil-probe`` adds how long a thread that
wakes up every millisecond waits for the GIL during each run against the same probe on an idle process: near the
interpreter's switch interval (5 ms) the GIL is held all the time, so host-side Python bounds the run.

Several scoring / writer thread counts and batch sizes can be run one after the other on the same inputs and model
(``--score-threads 1,2 --write-threads 4,8 --batch-size 32,64``: every combination, one entry of ``runs`` each);
the output files of every run with one batch size must be the same bytes (``outputs_identical_across_runs``;
another batch size may take other kernels). ``--sources`` takes
real ``.nii.gz`` volumes (a glob) to copy instead of generated ones, e.g. the BraTS cases beside the repository.

Usage::

    python benchmarks/bench_volumes.py --device cpu --volumes 10 --backbone resnet18
    python benchmarks/bench_volumes.py --device cuda --volumes 100 --backbone wide_resnet50_2 --workers 8
    python benchmarks/bench_volumes.py --device cuda --volumes 100 --backbone wide_resnet50_2 --workers 12 \
        --sources "../shared/data/brats2015_dev/*/Flair*.nii.gz" --score-threads 1,2 --write-threads 4,8
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from monai_aeflow.checkpoint import save_model
from monai_aeflow.inference import AnomalyScorer, score_paths
from monai_aeflow.networks import AEFlow


def make_inputs(work: Path, n: int, shape: tuple[int, int, int], pattern: str | None = None) -> list[Path]:
    """``n`` copies (distinct files, each decoded on its own) of the volumes matching ``pattern``, or of two
    generated lesioned volumes."""
    if pattern:
        sources = [Path(p) for p in sorted(glob.glob(pattern))]
        if not sources:
            raise SystemExit(f"--sources {pattern}: no file matches")
    else:
        from monai_aeflow.data.synthetic import generate_cohort  # needs torchio, which real sources do not

        cohort = generate_cohort(work / "gen", 0, 2, seed=5, shape=shape, spacing=(1.0, 1.0, 1.0))
        sources = [Path(r["image"]) for r in cohort]
    inputs = []
    for i in range(n):
        dest = work / "inputs" / f"vol{i:04d}.nii.gz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[i % len(sources)], dest)
        inputs.append(dest)
    return inputs


def make_model(work: Path, backbone: str, size: int) -> Path:
    """A random-weight model file (the speed does not depend on the weights), with a threshold so that the
    lesion mask is post-processed too."""
    torch.manual_seed(0)
    net = AEFlow(backbone=backbone, backbone_weights=None).eval()
    net.initialize_flow(torch.rand(4, 1, size, size))
    prep = {"spatial_size": [size, size], "percentiles": [1.0, 99.0], "orientation": "RAS"}
    return save_model(net, work / f"{backbone}.pt", {"preprocessing": prep}, threshold=0.2)


def profile_one(scorer: AnomalyScorer, image: Path) -> dict:
    """Top operators of one volume (self time) and the device's idle share of the wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if scorer.device.type == "cuda" else [])
    data = scorer.preprocess(image)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        scorer.score_preprocessed(data)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize(scorer.device)
    wall = time.perf_counter() - start
    cuda = scorer.device.type == "cuda"
    events = prof.key_averages()

    def self_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total)

    top = sorted(events, key=self_us, reverse=True)[:12]
    busy = sum(self_us(e) for e in events) / 1e6
    return {
        "wall_seconds": wall,
        "device_busy_seconds" if cuda else "cpu_op_seconds": busy,
        "device_idle_fraction": max(0.0, 1.0 - busy / wall) if cuda else None,
        "sync_calls": sum(e.count for e in events if "synchronize" in e.key.lower() or e.key == "aten::item"),
        "host_to_device_copies": sum(e.count for e in events if "Memcpy HtoD" in e.key),
        "top_ops": [{"op": e.key, "self_ms": self_us(e) / 1e3, "calls": e.count} for e in top],
    }


def host_profile(scorer: AnomalyScorer, images: list[Path], top: int = 25) -> dict:
    """Where the scoring thread's host time goes: ``score_preprocessed`` of already decoded volumes, one after
    the other in this thread, under :mod:`cProfile`; per volume the wall time and this thread's CPU time
    (``time.thread_time``: a host-bound scorer spends about its wall time on the CPU), and the functions with the
    most own (``tottime``) and cumulative time."""
    import cProfile
    import pstats

    datas = [scorer.preprocess(p) for p in images]
    scorer.score_preprocessed(datas[0])  # warm-up (allocator, autotuning)
    prof = cProfile.Profile()
    walls, cpus = [], []
    for data in datas:
        w0, c0 = time.perf_counter(), time.thread_time()
        prof.enable()
        scorer.score_preprocessed(data)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize(scorer.device)
        prof.disable()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.thread_time() - c0)
    stats = pstats.Stats(prof)

    def rows(key: str) -> list[dict]:
        stats.sort_stats(key)
        out = []
        for func in stats.fcn_list[:top]:  # type: ignore[attr-defined]
            cc, nc, tt, ct, _ = stats.stats[func]  # type: ignore[attr-defined]
            out.append({"function": f"{Path(func[0]).name}:{func[1]}({func[2]})", "calls": nc,
                        "tottime_s": tt, "cumtime_s": ct})  # fmt: skip
        return out

    n = len(datas)
    return {
        "volumes": n,
        "wall_seconds_per_volume": sum(walls) / n,
        "thread_cpu_seconds_per_volume": sum(cpus) / n,
        "note": "times under cProfile (each Python call costs more than without it)",
        "top_tottime": rows("tottime"),
        "top_cumtime": rows("cumulative"),
    }


class GilProbe:
    """A thread that sleeps ``period`` seconds at a time and records how much later than asked it runs again: the
    wait for the GIL (plus the scheduler's wake-up, which the idle baseline measures)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.lags: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gil-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.period)
            self.lags.append(time.perf_counter() - t0 - self.period)

    def __enter__(self) -> GilProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Mean, median, 95th percentile and maximum lag in milliseconds, and the number of wake-ups."""
        lags = sorted(self.lags) or [0.0]
        n = len(lags)
        return {
            "wakeups": len(self.lags),
            "mean_ms": 1e3 * sum(lags) / n,
            "median_ms": 1e3 * lags[n // 2],
            "p95_ms": 1e3 * lags[min(n - 1, int(0.95 * n))],
            "max_ms": 1e3 * lags[-1],
        }


def idle_gil_lag(seconds: float = 1.0) -> dict:
    """The probe's lag in this process with nothing else running (the scheduler's own wake-up delay)."""
    with GilProbe() as probe:
        time.sleep(seconds)
    return probe.summary()


def _ints(text: str | None) -> list[int | None]:
    return [None] if text is None else [int(v) for v in text.split(",")]


def timed_run(scorer: AnomalyScorer, inputs: list[Path], out: Path, args: argparse.Namespace, workers: int,
              write_threads: int | None, score_threads: int | None, batch_size: int | None = None) -> dict:  # fmt: skip
    """One sustained run over ``inputs``: volumes/s and the time split per stage."""
    device = scorer.device
    scorer.batch_size = batch_size if batch_size is not None else args.default_batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    probe = GilProbe() if args.gil_probe else contextlib.nullcontext()
    start = time.perf_counter()
    with probe:
        rows = score_paths(scorer, inputs, out, preview=args.preview, workers=workers, progress=False,
                           write_threads=write_threads, score_threads=score_threads)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    ok = [r for r in rows if r["status"] == "ok"]
    split = {
        k: sum(r["timing"].get(k, 0.0) for r in ok)
        for k in ("load_seconds", "model_seconds", "postprocess_seconds", "write_seconds")
    }
    run = {
        "score_threads": score_threads,
        "write_threads": write_threads,
        "batch_size": scorer.batch_size,
        "volumes": len(rows),
        "ok": len(ok),
        "errors": sorted({str(r.get("error")) for r in rows if r["status"] != "ok"})[:3],
        "wall_seconds": wall,
        "volumes_per_second": len(ok) / wall,
        "time_split_seconds": {
            "decode (in workers, overlapped)": split["load_seconds"],
            "network": split["model_seconds"],
            "inverse transforms + post-processing": split["postprocess_seconds"],
            "write (background threads)": split["write_seconds"],
        },
        "end_to_end_over_network": wall / max(split["model_seconds"], 1e-9),
        "scored_slices_per_volume": None,
    }
    if ok:
        first = json.loads(Path(ok[0]["outputs"]["scores"]).read_text())
        run["scored_slices_per_volume"] = first["scored_slices"]
    if device.type == "cuda":
        run["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if isinstance(probe, GilProbe):
        run["gil_probe"] = probe.summary()
    digest = hashlib.sha256()  # of every output file: runs with other thread counts must write the same bytes
    hashed = [f for f in sorted(out.rglob("*")) if f.is_file() and not f.name.endswith("_scores.json")]  # timings
    for f in hashed:
        digest.update(f.name.encode() + f.read_bytes())
    run["outputs_sha256"], run["outputs_hashed"] = digest.hexdigest(), len(hashed)
    shutil.rmtree(out, ignore_errors=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: 2 CPU, 8 CUDA)")
    parser.add_argument(
        "--write-threads", default=None, help="writer threads, comma-separated (default: score_paths' for the device)"
    )
    parser.add_argument(
        "--score-threads", default=None, help="scoring threads, comma-separated (default: score_paths' for the device)"
    )
    parser.add_argument("--sources", default=None, help="glob of .nii.gz volumes to copy (default: generated ones)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (AnomalyScorer(compile=))")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode (e.g. reduce-overhead: CUDA graphs); implies --compile"
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="seconds: sys.setswitchinterval for the run (Python's default 0.005; a thread that gives the GIL up "
        "waits up to this long to get it back beside a busy thread)",
    )
    parser.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="add a cProfile of the scoring thread's host time over N decoded volumes (0: none)",
    )
    parser.add_argument("--preview", action="store_true", help="write the PNG previews too")
    parser.add_argument(
        "--batch-size", default=None, help="slices per forward pass, comma-separated (default: the scorer's)"
    )
    parser.add_argument(
        "--gil-probe", action="store_true", help="measure the GIL wait of a thread waking every 1 ms (see GilProbe)"
    )
    parser.add_argument("--amp-dtype", default=None, choices=["bfloat16", "float16", "none"])
    parser.add_argument("--shape", default="240,240,155")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler summary of one volume")
    parser.add_argument("--work", default=None, help="folder for the generated volumes (default: a temporary one)")
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 2)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        inputs = make_inputs(work, args.volumes + 1, shape, args.sources)
        gen_s = time.perf_counter() - t0
        if args.sources:
            import nibabel as nib

            shape = tuple(int(v) for v in nib.load(inputs[0]).shape[:3])
        model = make_model(work, args.backbone, (max(shape[:2]) + 15) // 16 * 16)
        compile_arg = args.compile_mode or args.compile
        batch_sizes = _ints(args.batch_size)
        scorer = AnomalyScorer(
            model, device=device, batch_size=batch_sizes[0], amp_dtype=args.amp_dtype, compile=compile_arg
        )
        args.default_batch_size = None
        t0 = time.perf_counter()
        score_paths(scorer, inputs[:1], work / "warmup", preview=False, workers=0, progress=False)
        warmup_s = time.perf_counter() - t0
        runs = []
        combos = itertools.product(batch_sizes, _ints(args.score_threads), _ints(args.write_threads))
        for i, (b, s, w) in enumerate(combos):
            try:
                runs.append(timed_run(scorer, inputs[1:], work / f"out{i}", args, workers, w, s, b))
            except Exception as exc:  # one failing combination (e.g. CUDA graphs across threads) leaves the others
                runs.append(
                    {"batch_size": b, "score_threads": s, "write_threads": w, "failed": f"{type(exc).__name__}: {exc}"}
                )
        done = [r for r in runs if "failed" not in r]
        report = {
            "benchmark": "volumes",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(),
            "note": "shared machine: other processes may run at the same time",
            "backbone": args.backbone,
            "sources": args.sources or "generated",
            "volume_shape": list(shape),
            "workers": workers,
            "preview": args.preview,
            "compile": compile_arg,
            "switch_interval_seconds": sys.getswitchinterval(),
            "amp_dtype": str(scorer.amp_dtype),
            "postprocess_device": scorer.postprocess_device,
            "generate_seconds": gen_s,
            "warmup_seconds": warmup_s,
            "runs": runs,
        }
        report["outputs_identical_across_runs"] = (
            len({(r["batch_size"], r["outputs_sha256"]) for r in done}) == len({r["batch_size"] for r in done})
            if done
            else None
        )
        if done:
            best = max(done, key=lambda r: r["volumes_per_second"])
            report["best"] = {
                k: best[k] for k in ("batch_size", "score_threads", "write_threads", "volumes_per_second")
            }
        if args.gil_probe:
            report["gil_probe_idle"] = idle_gil_lag()
        if args.profile:
            report["profile_one_volume"] = profile_one(scorer, inputs[0])
        if args.host_profile:
            report["host_profile"] = host_profile(scorer, inputs[1 : 1 + args.host_profile])
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
