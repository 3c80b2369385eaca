"""Benchmark: AE-FLOW against the literature baselines on the same data and protocol.

Runs :func:`monai_aeflow.compare.run_comparison` (what ``aeflow-cli compare`` runs) and prints one JSON object
with the comparison table (Markdown) and rows of each setting:

- ``synthetic``: a generated FLAIR-like cohort (4 healthy training subjects; threshold on 1 healthy and 2
  lesioned subjects; test on 1 healthy and 2 lesioned subjects; 64 x 64 x 40 voxels of 3 mm; positive
  residual);
- ``brats_flair`` and ``brats_t1c`` (when the BraTS 2013/2015 cases are present): healthy slices of the first
  two cases (sorted by name) for training, the third for the threshold, the fourth for the test; volumes
  resampled to 2 mm and cropped / padded to 128 x 128 in-plane. FLAIR uses the positive residual (tumours
  and oedema are hyper-intense), T1c the absolute residual (enhancing rim bright, necrosis dark).

Every model gets the same epochs, batch size and learning rate; the intensity baseline (nothing trained) is
the first row. Tables also go to ``<out>/<setting>/comparison.{md,csv,json}``.

Run::

    python benchmarks/bench_baselines.py --threads 1                  # defaults (about 15 minutes on 2 cores)
    python benchmarks/bench_baselines.py --quick                      # smoke test (a few minutes)
    python benchmarks/bench_baselines.py --settings synthetic --models intensity,vae,aeflow
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from monai_aeflow.compare import DEFAULT_MODELS, CompareConfig, DataConfig, SyntheticCohortConfig, run_comparison
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.fileio import to_jsonable

BRATS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2015_dev"


def _config(args: argparse.Namespace, setting: str, out: Path) -> CompareConfig:
    common = {
        "output_dir": str(out / setting),
        "models": args.models.split(","),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": args.device,
        "seed": args.seed,
        "backbone": "resnet18",
        "backbone_weights": args.backbone_weights,
        "n_bootstrap": args.bootstrap,
        "loss_options": {"vqgan": {"disc_channels": args.disc_channels}} if "vqgan" in args.models else {},
    }
    if setting == "synthetic":
        shape = (64, 64, 32) if args.quick else (64, 64, 40)
        data = DataConfig(synthetic=SyntheticCohortConfig(n_train=2 if args.quick else 4, shape=shape))
        postprocess = PostprocessConfig(residual="positive")  # FLAIR-like: hyper-intense lesions
        return CompareConfig(data=data, epochs=args.synthetic_epochs, postprocess=postprocess, **common)
    modality = setting.split("_", 1)[1]
    cases = sorted(p.name for p in Path(args.brats).iterdir() if p.is_dir())
    if len(cases) < 4:
        raise SystemExit(f"{args.brats}: need four BraTS cases, found {len(cases)}")
    data = DataConfig(
        data_dir=str(args.brats),
        dataset="brats",
        modality=modality,
        subjects={"train": cases[:2], "val": [cases[2]], "test": [cases[3]]},
        spacing=3.0 if args.quick else 2.0,
        spatial_size=(80, 80) if args.quick else (128, 128),
    )
    postprocess = PostprocessConfig(residual="positive" if modality == "flair" else "absolute")
    return CompareConfig(data=data, epochs=args.brats_epochs, postprocess=postprocess, **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated models, in table order")
    parser.add_argument("--settings", default="synthetic,brats_flair,brats_t1c", help="which comparisons to run")
    parser.add_argument("--brats", default=str(BRATS_DIR), help="folder of the four BraTS cases")
    parser.add_argument("--out", default="bench_baselines_out", help="output folder")
    parser.add_argument("--synthetic-epochs", type=int, default=10)
    parser.add_argument("--brats-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--disc-channels", type=int, default=32, help="VQ-GAN discriminator width")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--backbone-weights", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smaller data and 2 epochs (smoke test)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.synthetic_epochs = args.brats_epochs = 2
        args.bootstrap = 20
    out = Path(args.out)
    settings = [s for s in args.settings.split(",") if s]
    if not Path(args.brats).is_dir():
        settings = [s for s in settings if not s.startswith("brats")]
    report: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "settings": {},
    }
    for setting in settings:
        cfg = _config(args, setting, out)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON (download messages, logs)
            result = run_comparison(cfg, say=lambda msg: print(msg, file=sys.stderr))
        report["settings"][setting] = {
            "wall_seconds": time.perf_counter() - t0,
            "data": result["data"],
            "markdown": result["markdown"],
            "rows": result["rows"],
            "paths": result["paths"],
        }
    print(json.dumps(to_jsonable(report), indent=2))


if __name__ == "__main__":
    main()
