r"""Benchmark: AE-FLOW against the literature baselines on the same data and protocol.

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

With ``--folds`` the ``brats_*`` settings follow the rotated dev protocol of ``bench_maps.py``: cases sorted by
name; fold ``k`` tests on case ``k``, chooses the threshold on case ``(k + 1) % 4`` and trains on the healthy
slices of the other two. FLAIR is scored against the whole tumour, T1c against the tumour core
(``--t1c-region``). One comparison runs per (setting, fold, encoder) in ``<out>/<setting>/fold<k>/<run>/``:
the models with an encoder (``--encoders NAME:WEIGHTS,...``) once per encoder, with rows named e.g.
``aeflow (efficientnet_lite0, ImageNet)``, the others once per fold. Folds run in turn for every setting (fold 0
of each setting, then fold 1...); after every fold the per-fold and mean tables (test Dice at the validated
threshold, pixel AUROC, slice AUROC of the image score, oracle Dice, validation Dice and the test Dice of each
fold) are printed as JSON and written to ``<out>/rotated.md`` and ``<out>/rotated.json``; ``--max-minutes``
stops after the fold that passes the limit (the tables say how many folds the means cover).

Run::

    python benchmarks/bench_baselines.py --threads 1                  # defaults (about 15 minutes on 2 cores)
    python benchmarks/bench_baselines.py --quick                      # smoke test (a few minutes)
    python benchmarks/bench_baselines.py --settings synthetic --models intensity,vae,aeflow

    # the rotated dev-protocol table of every model (FLAIR whole tumour, T1c tumour core); 32 minutes on 2 shared cores
    python benchmarks/bench_baselines.py --settings brats_flair,brats_t1c --folds 0,1,2,3 \
        --models intensity,ae,dae,patchcore,flowonly,aeflow --encoders efficientnet_lite0:auto,resnet18:none \
        --brats-epochs 5 --batch-size 8 --lr 2e-4 --max-minutes 55 --threads 2 --out bench_baselines_rotated
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_aeflow.compare import DEFAULT_MODELS, CompareConfig, DataConfig, SyntheticCohortConfig, run_comparison
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.fileio import atomic_write_json, atomic_write_text, to_jsonable

BRATS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2015_dev"

ENCODER_MODELS = ("patchcore", "flowonly", "aeflow")
"""Models of the registry whose network takes an encoder (``backbone`` / ``backbone_weights``)."""

BACKBONES = ("wide_resnet50_2", "resnet18", "efficientnet_lite0")
WEIGHTS = ("auto", "imagenet", "none")
REGION_NAMES = {"wt": "whole tumour", "tc": "tumour core", "et": "enhancing tumour"}

METRICS: tuple[tuple[str, str], ...] = (
    # (key of the rotated table, Markdown header)
    ("dice", "test Dice (val. thr.)"),
    ("pixel_auroc", "pixel AUROC"),
    ("slice_auroc_score", "slice AUROC (score)"),
    ("oracle_dice", "oracle Dice"),
    ("val_dice", "val Dice"),
)


def parse_folds(text: str) -> list[int]:
    """``"0,1,2,3"`` -> ``[0, 1, 2, 3]`` (folds of the four-case rotation, each at most once)."""
    try:
        folds = [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"folds must be integers 0-3, got {text!r}") from None
    if not folds or any(f not in range(4) for f in folds) or len(set(folds)) != len(folds):
        raise argparse.ArgumentTypeError(f"folds must be distinct integers 0-3, got {text!r}")
    return folds


def parse_encoders(text: str) -> list[tuple[str, str]]:
    """``"efficientnet_lite0:auto,resnet18:none"`` -> ``[(backbone, weights), ...]`` (weights default ``auto``)."""
    out: list[tuple[str, str]] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, weights = item.partition(":")
        weights = weights or "auto"
        if name not in BACKBONES or weights not in WEIGHTS:
            raise argparse.ArgumentTypeError(
                f"encoder {item!r}: expected NAME:WEIGHTS with NAME in {', '.join(BACKBONES)} and WEIGHTS in "
                f"{', '.join(WEIGHTS)}"
            )
        if (name, weights) in out:
            raise argparse.ArgumentTypeError(f"encoder {item!r} is listed twice")
        out.append((name, weights))
    if not out:
        raise argparse.ArgumentTypeError("no encoder given")
    return out


def rotation(cases: Sequence[str], fold: int) -> dict[str, list[str]]:
    """The subjects of one fold of the dev protocol: test on case ``fold``, threshold on case ``(fold + 1) % 4``,
    train on the other two (cases sorted by name)."""
    cases = sorted(cases)
    if len(cases) != 4:
        raise ValueError(f"the rotation needs four cases, got {len(cases)}")
    test, val = cases[fold], cases[(fold + 1) % 4]
    return {"train": [c for c in cases if c not in (test, val)], "val": [val], "test": [test]}


def _config(
    args: argparse.Namespace,
    setting: str,
    out: Path,
    models: Sequence[str] | None = None,
    subjects: Mapping[str, list[str]] | None = None,
    region: str = "wt",
    backbone: tuple[str, str] | None = None,
) -> CompareConfig:
    common = {
        "output_dir": str(out / setting) if subjects is None else str(out),
        "models": list(models or args.models.split(",")),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": args.device,
        "seed": args.seed,
        "backbone": backbone[0] if backbone else "resnet18",
        "backbone_weights": backbone[1] if backbone else args.backbone_weights,
        "n_bootstrap": args.bootstrap,
        "loss_options": {"vqgan": {"disc_channels": args.disc_channels}} if "vqgan" in args.models else {},
        "overwrite": args.overwrite,
    }
    if setting == "synthetic":
        shape = (64, 64, 32) if args.quick else (64, 64, 40)
        data = DataConfig(synthetic=SyntheticCohortConfig(n_train=2 if args.quick else 4, shape=shape))
        postprocess = PostprocessConfig(residual="positive", normalize=args.normalize)  # hyper-intense lesions
        return CompareConfig(data=data, epochs=args.synthetic_epochs, postprocess=postprocess, **common)
    modality = setting.split("_", 1)[1]
    if subjects is None:
        cases = _cases(args.brats)
        subjects = {"train": cases[:2], "val": [cases[2]], "test": [cases[3]]}
    data = DataConfig(
        data_dir=str(args.brats),
        dataset="brats",
        modality=modality,
        subjects=dict(subjects),
        spacing=3.0 if args.quick else 2.0,
        spatial_size=(80, 80) if args.quick else (128, 128),
        region=region,
    )
    residual = "positive" if modality == "flair" else "absolute"
    postprocess = PostprocessConfig(residual=residual, normalize=args.normalize)
    return CompareConfig(data=data, epochs=args.brats_epochs, postprocess=postprocess, **common)


def _cases(folder: str | Path) -> list[str]:
    cases = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
    if len(cases) != 4:
        raise SystemExit(f"{folder}: need four BraTS cases, found {len(cases)}")
    return cases


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def _compare(cfg: CompareConfig) -> dict[str, Any]:
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON (download messages, logs)
        return run_comparison(cfg, say=lambda msg: print(msg, file=sys.stderr))


# --------------------------------------------------------------------------------------------------------
# rotated dev protocol
# --------------------------------------------------------------------------------------------------------


def encoder_label(record: Mapping[str, Any] | None, asked: tuple[str, str]) -> str:
    """``"efficientnet_lite0, ImageNet"`` / ``"resnet18, random"``: the encoder a model used (its weights record
    when there is one, else the one asked for)."""
    if record:
        source = str(record.get("source") or "")
        random = source in ("", "none", "random") or source.startswith("random")
        return f"{record.get('backbone') or asked[0]}, {'random' if random else 'ImageNet'}"
    return f"{asked[0]}, {'random' if asked[1] == 'none' else 'ImageNet'}"


def fold_rows(result: Mapping[str, Any], encoder: tuple[str, str] | None) -> dict[str, dict[str, float]]:
    """The metrics of the rotated table for every model of one :func:`run_comparison` result, keyed by row
    name (``aeflow (efficientnet_lite0, ImageNet)`` for a model with an encoder)."""
    rows: dict[str, dict[str, float]] = {}
    for row in result["rows"]:
        name = row["model"]
        entry = result["results"].get(name, {})
        metrics = entry.get("evaluation", {}).get("metrics", {})
        val = metrics.get("thresholds", {}).get("sweep", {}).get("validation_dice_pooled", {}).get("value")
        key = name
        if encoder is not None:
            key = f"{name} ({encoder_label(entry.get('info', {}).get('encoder_weights'), encoder)})"
        rows[key] = {
            "dice": float(row["dice_pooled"]),
            "pixel_auroc": float(row["pixel_auroc"]),
            "slice_auroc_score": float(row["slice_auroc_score"]),
            "oracle_dice": float(row["oracle_dice_pooled"]),
            "val_dice": float("nan") if val is None else float(val),
            "train_seconds": float(row["train_seconds"]),
        }
        if row.get("error"):
            rows[key]["error"] = row["error"]
    return rows


def mean_over_folds(per_fold: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation (over folds) of every metric of every row; a row missing or failed in a fold
    counts NaN there (so its mean is NaN)."""
    keys: list[str] = []
    for rows in per_fold.values():
        keys += [k for k in rows if k not in keys]
    mean: dict[str, dict[str, Any]] = {}
    for key in keys:
        entry: dict[str, Any] = {}
        for metric, _ in METRICS:
            values = np.array([float(per_fold[f].get(key, {}).get(metric, float("nan"))) for f in per_fold])
            entry[metric] = float(values.mean())
            entry[f"{metric}_std"] = float(values.std())
        entry["dice_per_fold"] = {f: float(per_fold[f].get(key, {}).get("dice", float("nan"))) for f in per_fold}
        mean[key] = entry
    return mean


def _cell(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def rotated_markdown(tables: Mapping[str, Mapping[str, Any]], folds_planned: int) -> str:
    """One mean table (with the test Dice of every fold) and the per-fold tables for every setting."""
    parts = []
    for setting, res in tables.items():
        folds = list(res["per_fold"])
        done = f"mean over {len(folds)} of {folds_planned} folds" + (f" ({res['stopped']})" if "stopped" in res else "")
        parts.append(f"## {res['title']}: {done}\n")
        header = ["model", *[h for _, h in METRICS], *[f"Dice {f}" for f in folds]]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, m in res["mean"].items():
            cells = [key] + [
                _cell(m[metric])
                + (
                    f" ± {m[metric + '_std']:.3f}"
                    if metric == "dice" and math.isfinite(m[metric]) and len(folds) > 1
                    else ""
                )
                for metric, _ in METRICS
            ]
            cells += [_cell(m["dice_per_fold"][f]) for f in folds]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
        for fold in folds:
            parts.append(
                f"### {setting} {fold}: test {res['splits'][fold]['test'][0]}, threshold on "
                f"{res['splits'][fold]['val'][0]}, train on {', '.join(res['splits'][fold]['train'])}\n"
            )
            header = ["model", *[h for _, h in METRICS], "train s"]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for key, m in res["per_fold"][fold].items():
                cells = [key] + [_cell(m[metric]) for metric, _ in METRICS] + [f"{m['train_seconds']:.0f}"]
                if m.get("error"):
                    cells[0] += f" (failed: {m['error']})"
                lines.append("| " + " | ".join(cells) + " |")
            parts.append("\n".join(lines) + "\n")
    return "# Rotated BraTS dev protocol\n\n" + "\n".join(parts)


def run_rotated(args: argparse.Namespace, settings: Sequence[str], out: Path) -> dict[str, Any]:
    """The rotated dev protocol of the ``brats_*`` settings; tables written after every fold."""
    t_start = time.perf_counter()
    deadline = t_start + 60.0 * args.max_minutes if args.max_minutes else math.inf
    cases = _cases(args.brats)
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    plain = [m for m in models if m not in ENCODER_MODELS]
    with_encoder = [m for m in models if m in ENCODER_MODELS]
    encoders = args.encoders or [("resnet18", args.backbone_weights)]
    report: dict[str, Any] = {"machine": _machine(), "folds_planned": len(args.folds), "settings": {}}
    for setting in settings:
        modality = setting.split("_", 1)[1]
        region = args.t1c_region if modality == "t1c" else "wt"
        report["settings"][setting] = {
            "title": f"{modality.upper() if modality != 't1c' else 'T1c'}, {REGION_NAMES[region]} ({region})",
            "region": region,
            "splits": {},
            "per_fold": {},
            "mean": {},
            "fold_seconds": {},
            "runs": {},
        }
    for i, k in enumerate(args.folds):
        fold = f"fold{k}"
        for setting in settings:
            res = report["settings"][setting]
            t_fold = time.perf_counter()
            subjects = rotation(cases, k)
            runs: list[tuple[str, list[str], tuple[str, str] | None]] = []
            if plain:
                runs.append(("plain", plain, None))
            for enc in encoders if with_encoder else []:
                runs.append((f"{enc[0]}_{enc[1]}", with_encoder, enc))
            rows: dict[str, dict[str, float]] = {}
            for run_name, run_models, enc in runs:
                print(f"[{setting} {fold}] {run_name}: {', '.join(run_models)}", file=sys.stderr)
                cfg = _config(args, setting, out / setting / fold / run_name, run_models, subjects, res["region"], enc)
                result = _compare(cfg)
                rows.update(fold_rows(result, enc if len(encoders) > 1 or args.encoders else None))
                res["runs"][f"{fold}/{run_name}"] = result["paths"]
            order = [m for m in models]  # table order: the asked models, each encoder's row after the other
            res["per_fold"][fold] = {
                key: rows[key] for name in order for key in rows if key == name or key.startswith(f"{name} (")
            }
            res["splits"][fold] = subjects
            res["mean"] = mean_over_folds(res["per_fold"])
            res["fold_seconds"][fold] = time.perf_counter() - t_fold
        report["wall_seconds"] = time.perf_counter() - t_start
        if time.perf_counter() > deadline and i != len(args.folds) - 1:
            for setting in settings:
                report["settings"][setting]["stopped"] = f"time limit after {i + 1} of {len(args.folds)} folds"
        report["markdown"] = rotated_markdown(report["settings"], len(args.folds))
        atomic_write_json(out / "rotated.json", to_jsonable(report))
        atomic_write_text(out / "rotated.md", report["markdown"])
        print(json.dumps(to_jsonable(report), indent=2), flush=True)
        if "stopped" in report["settings"][settings[0]]:
            break
    return report


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
    parser.add_argument(
        "--folds", type=parse_folds, default=None, help="rotated dev protocol of the brats settings, e.g. 0,1,2,3"
    )
    parser.add_argument(
        "--encoders",
        type=parse_encoders,
        default=None,
        help="with --folds: one row per encoder for the models that have one, e.g. "
        "efficientnet_lite0:auto,resnet18:none (default: resnet18 with --backbone-weights)",
    )
    parser.add_argument(
        "--t1c-region",
        choices=sorted(REGION_NAMES),
        default=None,
        help="BraTS region of the T1c labels (default: tc with --folds, wt without); FLAIR: whole tumour",
    )
    parser.add_argument("--max-minutes", type=float, default=None, help="with --folds: stop after the fold past it")
    parser.add_argument("--normalize", choices=("none", "robust"), default="none", help="per-scan map normalisation")
    parser.add_argument("--overwrite", action="store_true", help="replace the comparisons of a previous run")
    args = parser.parse_args()
    if args.folds is None and (args.encoders or args.max_minutes is not None):
        parser.error("--encoders and --max-minutes need --folds")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.synthetic_epochs = args.brats_epochs = 2
        args.bootstrap = 20
    out = Path(args.out)
    settings = [s for s in args.settings.split(",") if s]
    if not Path(args.brats).is_dir():
        settings = [s for s in settings if not s.startswith("brats")]
    if args.folds is not None:
        args.t1c_region = args.t1c_region or "tc"
        rotated = [s for s in settings if s.startswith("brats_")]
        if not rotated:
            parser.error(f"--folds needs a brats_* setting and the BraTS cases in {args.brats}")
        run_rotated(args, rotated, out)
        return
    report: dict = {"machine": _machine(), "settings": {}}
    for setting in settings:
        region = (args.t1c_region or "wt") if setting == "brats_t1c" else "wt"
        cfg = _config(args, setting, out, region=region)
        t0 = time.perf_counter()
        result = _compare(cfg)
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
