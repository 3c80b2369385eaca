"""Training throughput of a bundle's trainer against the package's engine called directly, same data and settings.

Both sides train the same network (identical initial weights) on the same cached slice datasets with the same
batch size, learning rate and validation every epoch; the bundle side is ``train#trainer`` of
``configs/train.json`` parsed by MONAI's ``ConfigWorkflow`` (all of its handlers attached), the engine side is
:func:`monai_aeflow.engines.create_engines` (no progress bar). The two trainers take turns one epoch at a time
(ignite resumes a run whose ``max_epochs`` was raised), the first side alternating, so that the load of a
shared machine affects both alike; slices/s = training images / seconds of the epochs (validation, TensorBoard
and checkpoints included on both sides). Prints one JSON object: the rates of every repeat and ``ratio``, the
median over repeats of bundle rate / engine rate.

Run: ``python benchmarks/bench_bundle.py [--bundle aeflow_brain_mri] [--epochs 2] [--repeats 3] [--device cpu] [--amp]``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader

from monai_aeflow.engines import TrainingConfig, create_engines

ROOT = Path(__file__).resolve().parents[1]


class _Side:
    """One trainer run an epoch at a time, with its training images and seconds counted."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.images = 0
        self.seconds = 0.0
        trainer.state.max_epochs = 0

        @trainer.on(Events.ITERATION_COMPLETED)
        def _count(engine: Any) -> None:
            self.images += int(engine.state.output["image"].shape[0])

    def epoch(self) -> None:
        self.trainer.state.max_epochs += 1
        start = time.perf_counter()
        self.trainer.run()
        self.seconds += time.perf_counter() - start

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="aeflow_brain_mri", choices=["aeflow_brain_mri", "aeflow_2d_images"])
    parser.add_argument("--dataset-dir", default=None, help="dataset folder (default: a synthetic one in a temp dir)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # per-iteration StatsHandler lines; the JSON is the output
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = ROOT / "bundles" / args.bundle
    work = Path(tempfile.mkdtemp(prefix="bench_bundle_"))
    dataset_dir = args.dataset_dir or str(work / "data")
    overrides = {
        "dataset_dir": dataset_dir,
        "synthetic": args.dataset_dir is None,  # generate the cohort in the temp dir, never in a given folder
        "max_epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": f"$torch.device('{args.device}')",
        "amp": args.amp,
    }
    results: dict[str, list[dict[str, float]]] = {"bundle": [], "engine": []}
    train_slices = 0
    for repeat in range(args.repeats):
        wf = ConfigWorkflow(
            config_file=str(bundle / "configs" / "train.json"),
            meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type="train",
            bundle_root=str(work / f"bundle{repeat}"),
            **overrides,
        )
        wf.initialize()
        cfg = wf.parser
        trainer = cfg.get_parsed_content("train#trainer")
        train_ds = cfg.get_parsed_content("train#dataset")
        val_ds = cfg.get_parsed_content("validate#dataset")
        train_slices = len(train_ds)
        engine_net = copy.deepcopy(cfg.get_parsed_content("network_def"))
        tcfg = TrainingConfig(
            output_dir=str(work / f"engine{repeat}"),
            max_epochs=args.epochs,
            lr=float(cfg.get_parsed_content("learning_rate")),
            weight_decay=float(cfg.get_parsed_content("weight_decay")),
            alpha=float(cfg.get_parsed_content("alpha")),
            beta=float(cfg.get_parsed_content("beta")),
            amp=args.amp,
            device=args.device,
            progress=False,
            seed=repeat,
            preprocessing=dict(cfg.get_parsed_content("preprocessing_config")),
        )
        gen = torch.Generator().manual_seed(repeat)
        train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=gen)
        val_loader = DataLoader(val_ds, batch_size=args.batch_size * 2)
        engine_trainer, _ = create_engines(engine_net, train_loader, val_loader, tcfg)
        sides = {"bundle": _Side(trainer), "engine": _Side(engine_trainer)}
        for epoch in range(args.epochs):
            order = ("bundle", "engine") if (repeat + epoch) % 2 == 0 else ("engine", "bundle")
            for side in order:
                sides[side].epoch()
        for side, run in sides.items():
            results[side].append({"slices_per_s": run.rate, "images": run.images, "seconds": run.seconds})
        wf.finalize()
    bundle_rate = statistics.median(r["slices_per_s"] for r in results["bundle"])
    engine_rate = statistics.median(r["slices_per_s"] for r in results["engine"])
    ratios = [b["slices_per_s"] / e["slices_per_s"] for b, e in zip(results["bundle"], results["engine"], strict=True)]
    print(
        json.dumps(
            {
                "bundle": args.bundle,
                "device": args.device,
                "amp": args.amp,
                "torch_threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "python": sys.version.split()[0],
                "train_slices": train_slices,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "bundle_slices_per_s": [round(r["slices_per_s"], 2) for r in results["bundle"]],
                "engine_slices_per_s": [round(r["slices_per_s"], 2) for r in results["engine"]],
                "bundle_median_slices_per_s": round(bundle_rate, 2),
                "engine_median_slices_per_s": round(engine_rate, 2),
                "ratio_per_repeat": [round(r, 3) for r in ratios],
                "ratio": round(statistics.median(ratios), 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
