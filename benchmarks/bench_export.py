"""Benchmark of ``aeflow-cli export``: CPU slices/s of the exported network against eager PyTorch; prints JSON.

For each backbone, an AE-FLOW model file (random weights, flow initialised from images: speed does not depend on
the weights) is exported with
:func:`monai_aeflow.export.export_model` to ONNX and TorchScript, and the same batches of slices go through

- eager PyTorch: :class:`~monai_aeflow.bundle.AnomalyMapNet` under ``torch.inference_mode``, contiguous and
  channels-last (weights and inputs, as :class:`~monai_aeflow.inference.AnomalyScorer` runs it),
- onnxruntime (``CPUExecutionProvider``, all graph optimisations, ``intra_op_num_threads`` = ``--threads``),
- the TorchScript file (``torch.jit.load``),

in one run, with the same number of threads for all (``torch.set_num_threads``), best of ``--repeats`` interleaved
rounds. Also
reported: export time, file size, and the largest difference of each export from eager PyTorch on these slices.

Usage::

    python benchmarks/bench_export.py                                   # ResNet-18 and Wide-ResNet-50-2, 256 x 256
    python benchmarks/bench_export.py --backbones resnet18 --size 128 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_aeflow.bundle import AnomalyMapNet
from monai_aeflow.checkpoint import save_model
from monai_aeflow.export import ExportError, export_model
from monai_aeflow.models import build_network


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_backbone(backbone: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    torch.manual_seed(0)
    net = build_network("aeflow", backbone=backbone, backbone_weights=None)
    # the flow's ActNorm initialised from images, as training does: an uninitialised flow on random features gives
    # |z'| ~ 1e6 and a saturated decoder, where float32 rounding flips the map (the export's parity check refuses it)
    net.initialize_flow(torch.rand(8, 1, args.size, args.size, generator=torch.Generator().manual_seed(2)))
    model = work / f"{backbone}.pt"
    save_model(net, model, {"preprocessing": {"spatial_size": [args.size, args.size]}})
    eager = AnomalyMapNet(net).eval()
    row: dict[str, Any] = {"backbone": backbone, "size": args.size, "batch_size": args.batch_size}

    exported = {}
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
        start = time.perf_counter()
        meta = export_model(model, work / f"{backbone}{suffix}", fmt)
        exported[fmt] = work / f"{backbone}{suffix}"
        row[f"{fmt}_export_s"] = round(time.perf_counter() - start, 2)
        row[f"{fmt}_file_mb"] = round(exported[fmt].stat().st_size / 2**20, 2)
        row[f"{fmt}_input_shape"] = meta["input"]["shape"]

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(exported["onnx"]), options, providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(exported["torchscript"])).eval()

    gen = torch.Generator().manual_seed(1)
    slices = torch.rand(args.slices, 1, args.size, args.size, generator=gen)
    batches = list(slices.split(args.batch_size))
    outputs: dict[str, list[np.ndarray]] = {}

    def run_eager() -> None:
        with torch.inference_mode():
            outputs["eager"] = [eager(b).numpy() for b in batches]

    eager_cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)  # what the scorer runs

    def run_eager_channels_last() -> None:
        with torch.inference_mode():
            outputs["eager_channels_last"] = [eager_cl(b.contiguous(memory_format=fmt)).numpy() for b in batches]

    def run_onnx() -> None:
        outputs["onnx"] = [session.run(None, {"image": b.numpy()})[0] for b in batches]

    def run_torchscript() -> None:
        with torch.inference_mode():
            outputs["torchscript"] = [scripted(b).numpy() for b in batches]

    fmt = torch.channels_last
    runners = {
        "eager": run_eager,
        "eager_channels_last": run_eager_channels_last,
        "onnx": run_onnx,
        "torchscript": run_torchscript,
    }
    for fn in runners.values():  # warm-up (first-call allocations, oneDNN primitive creation)
        fn()
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(args.repeats):  # interleaved, so that a change of the machine's load hits all alike
        for name, fn in runners.items():
            best[name] = min(best[name], _best_of(fn, 1))
    for name, seconds in best.items():
        row[f"{name}_slices_per_s"] = round(args.slices / seconds, 2)
    for name in ("eager_channels_last", "onnx", "torchscript"):
        diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs[name], outputs["eager"], strict=True))
        row[f"{name}_max_abs_diff"] = diff
        row[f"{name}_speedup_vs_eager"] = round(row[f"{name}_slices_per_s"] / row["eager_slices_per_s"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    parser.add_argument("--size", type=int, default=256, help="slice height and width")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="threads of PyTorch and of onnxruntime")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    report: dict[str, Any] = {
        "benchmark": "bench_export",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "slices": args.slices,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in [b for b in args.backbones.split(",") if b]:
            try:
                report["results"].append(bench_backbone(backbone, args, Path(tmp)))
            except ExportError as err:  # recorded, the other backbones still run
                report["results"].append({"backbone": backbone, "size": args.size, "export_error": str(err)})
            print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
