"""Train, score and evaluate registered models on one dataset with one protocol, and tabulate the results.

This is the library side of ``aeflow-cli compare``: every model (AE-FLOW and the baselines of the registry
:mod:`monai_aeflow.models`) goes through the same data pipeline (:func:`monai_aeflow.data.datalists.prepare_data`:
indexer, subject split, volume preprocessing, healthy training slices), the same builder
(:func:`monai_aeflow.models.build_model`), the same engine (:func:`monai_aeflow.engines.run.train_model`), the
same slice-by-slice scoring and evaluation protocol (:func:`monai_aeflow.evaluation.scoring.evaluate_model`:
threshold chosen on the validation split, Dice, pixel / slice / volume AUROC and AUPRC on the test split).
This module holds the comparison itself: :class:`CompareConfig`, :func:`run_comparison` and the tables. The
names that lived here before (``DataConfig``, ``prepare_data``, ``build_model``, ``run_training``,
``evaluate_model``...) are re-exported from their modules.

Example::

    cfg = CompareConfig(output_dir="runs/compare", models=["intensity", "ae", "vae", "aeflow"])
    result = run_comparison(cfg)            # synthetic cohort by default
    print(result["markdown"])               # also in runs/compare/comparison.md and comparison.csv
                                            # comparison.png: the metrics as bars, every model's map of one slice
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_aeflow.checkpoint import load_model
from monai_aeflow.compare_figure import gallery_entry, gallery_slice, save_comparison_figure
from monai_aeflow.compare_tables import _fmt, comparison_row, comparison_table, failed_row, write_comparison
from monai_aeflow.data.datalists import (  # noqa: F401  (private names re-exported: their home before datalists)
    VOLUME_DATASETS,
    DataConfig,
    PreparedData,
    SyntheticCohortConfig,
    _dataset_records,
    _preprocess_volumes,
    _split_records,
    _synthetic_splits,
    prepare_data,
)
from monai_aeflow.engines.run import parse_assignments, run_training, train_model
from monai_aeflow.engines.workflow import (
    check_optimizer_settings,
    check_output_dir,
    clear_previous_run,
    previous_run_files,
    resolve_device,
)
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.checkpoint import save_reconstruction_quality
from monai_aeflow.evaluation.pipeline import EvaluationConfig, result_to_json
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.evaluation.scoring import _plain, evaluate_model, score_cases  # noqa: F401
from monai_aeflow.fileio import atomic_write_json, to_jsonable
from monai_aeflow.models import (
    BUILTIN_MODELS,
    MODELS,
    build_model,
    check_model_args,
    count_parameters,
    describe_encoder_weights,
    get_model_spec,
)

_check_model_args = check_model_args  # its name before it moved to monai_aeflow.models

__all__ = [
    "DEFAULT_MODELS",
    "VOLUME_DATASETS",
    "SyntheticCohortConfig",
    "DataConfig",
    "PreparedData",
    "CompareConfig",
    "prepare_data",
    "build_model",
    "count_parameters",
    "parse_assignments",
    "run_training",
    "train_model",
    "score_cases",
    "evaluate_model",
    "run_comparison",
    "comparison_table",
    "write_comparison",
]

logger = logging.getLogger("monai_aeflow.compare")


DEFAULT_MODELS: tuple[str, ...] = BUILTIN_MODELS
"""Models of a default comparison: the registry's built-in models in table order (intensity first, AE-FLOW last)."""


@dataclass
class CompareConfig:
    """Settings of a comparison run.

    Args:
        output_dir: where models, tables and the JSON result go.
        models: registry names, in table order.
        data: data settings.
        epochs: training epochs of every model.
        batch_size: slices per batch.
        lr: Adam learning rate of every model.
        weight_decay: Adam weight decay.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seed of each model's initialisation and training.
        backbone: ResNet of AE-FLOW and the flow-only model.
        backbone_weights: ``"auto"`` (ImageNet when available, else random), ``"imagenet"``, ``"none"`` or a
            local state-dict file.
        model_args: per-model network arguments, e.g. ``{"vae": {"latent_dim": 64}}``.
        loss_options: per-model loss options, e.g. ``{"vqgan": {"adv_weight": 0.1}}``.
        map_kind: pixel map of the models (``residual`` or ``ssim``; models with one map ignore it).
        beta: flow weight of AE-FLOW's image score.
        postprocess: post-processing of the evaluation protocol.
        threshold_method: ``"sweep"`` (the exact maximiser of the validation Dice), ``"greedy"`` (the seed
            thesis' interval search) or ``"fpr"``; the test Dice at the sweep and at the greedy thresholds are
            both reported whatever the choice.
        n_bootstrap: bootstrap resamples of the confidence intervals.
        n_thresholds: threshold grid of the sweeps.
        progress: progress bars and training logs.
        overwrite: replace the results and models of a previous comparison in ``output_dir`` (by default a
            folder that holds them is refused).
    """

    output_dir: str = "aeflow_compare"
    models: Sequence[str] = DEFAULT_MODELS
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    device: str = "auto"
    seed: int = 0
    backbone: str = "resnet18"
    backbone_weights: str = "auto"
    model_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    loss_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    map_kind: str = "residual"
    beta: float = 0.9
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    threshold_method: str = "sweep"
    n_bootstrap: int = 200
    n_thresholds: int = 4096
    progress: bool = False
    overwrite: bool = False


def _protocol_notes(cfg: CompareConfig, data: PreparedData, device: str, weights: Sequence[str]) -> str:
    pp = cfg.postprocess
    split = {k: [str(r["subject_id"]) for r in v] for k, v in data.splits.items()}
    return "\n".join(
        [
            f"- data: {data.source}"
            + (f" (labels: BraTS region {cfg.data.region})" if cfg.data.region != "wt" else "")
            + f"; train {split['train']} (healthy slices only, {len(data.train)} slices), "
            f"threshold on {split['val']}, test on {split['test']}",
            f"- preprocessing: {data.preprocessing}; slices with >= {cfg.data.min_area_fraction:g} of the largest "
            "brain area for training and slice-level metrics",
            f"- training: {cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr:g}, seed {cfg.seed}, "
            f"device {device}" + (f"; encoder {'; '.join(sorted(set(weights)))}" if weights else ""),
            f"- post-processing: {pp.residual} residual, brain mask eroded {pp.erosion_iterations}x, "
            f"{pp.median_size}x{pp.median_size} median ({pp.median_dims}D), components <= {pp.min_component_size} "
            f"voxels removed; threshold: {cfg.threshold_method} on the validation split (DICE_T (sweep / greedy "
            "thr.): test Dice at the exact validation-Dice maximum / at the seed thesis' greedy search); val "
            "PSNR / SSIM: reconstructions of the healthy validation slices (n/a: the model does not reconstruct)",
            "- DICE_T: pooled test Dice; DICE_S: mean ± std per test volume with lesions; pixel AUROC/AUPRC over "
            "brain voxels; slice AUROC (map): mean post-processed map per slice; slice AUROC (score): the model's "
            "own image score (reconstruction error, negative ELBO, flow likelihood, max intensity); oracle: best "
            "Dice on test (upper bound, not a validated result); n/a: undefined (e.g. one test volume)",
        ]
    )


def _check_comparison_dir(out: Path, overwrite: bool) -> None:
    """Refuse (before any data preparation) an output folder that cannot be written or holds a comparison."""
    check_output_dir(out, overwrite=True)
    if overwrite or not out.is_dir():
        return
    names = ("comparison.json", "comparison.md", "comparison.csv", "comparison.png")
    previous = [out / n for n in names if (out / n).is_file()]
    models = out / "models"
    if models.is_dir():
        previous += [p for d in sorted(models.iterdir()) if d.is_dir() for p in previous_run_files(d)]
    if previous:
        shown = ", ".join(str(p.relative_to(out)) for p in previous[:3]) + (", ..." if len(previous) > 3 else "")
        raise AEFlowInputError(
            f"the output folder holds a previous comparison ({shown}); give --overwrite to replace it or another --out",
            path=out,
        )


def run_comparison(cfg: CompareConfig, say: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Train, score and evaluate every model of ``cfg.models`` on the same data and protocol.

    Writes ``<output_dir>/models/<name>/`` (model file, checkpoints, TensorBoard logs), ``comparison.md``,
    ``comparison.csv``, ``comparison.json`` (rows, full metrics and protocol of each model) and ``comparison.png``
    (:mod:`monai_aeflow.compare_figure`: the headline metrics as bars and every model's map of the test slice
    with the largest lesion, at its validated threshold). A folder that
    already holds a comparison is refused unless ``cfg.overwrite``, before any data are prepared.

    Args:
        cfg: the comparison settings.
        say: where progress messages go.

    A model that fails (in training, scoring or evaluation) gets a row with its error and NaN metrics; the
    other models still run and the tables are written; ``failed`` names the failed models and their errors.

    Returns:
        ``{"rows", "results", "markdown", "paths", "data", "failed"}``.
    """
    get_model_spec(None)  # registers the built-in models
    names = [str(n).strip().lower() for n in cfg.models]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise AEFlowInputError(
            f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(sorted(MODELS))}"
        )
    if len(set(names)) != len(names):
        raise AEFlowInputError(f"a model is listed twice: {', '.join(names)}")
    for name in set(cfg.model_args) | set(cfg.loss_options):
        if name not in names:
            raise AEFlowInputError(f"options given for {name!r}, which is not compared")
    for name in names:
        check_model_args(name, cfg.model_args.get(name))
    check_optimizer_settings(cfg.lr, cfg.weight_decay)
    out = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    _check_comparison_dir(out, cfg.overwrite)
    say(f"preparing data ({'synthetic cohort' if cfg.data.data_dir is None else cfg.data.data_dir})")
    data = prepare_data(cfg.data, out, progress=cfg.progress)
    say(f"  {len(data.train)} healthy training slices, {len(data.val)} validation and {len(data.test)} test volumes")
    eval_cfg = EvaluationConfig(
        postprocess=cfg.postprocess,
        threshold_method=cfg.threshold_method,
        n_bootstrap=cfg.n_bootstrap,
        n_thresholds=cfg.n_thresholds,
        seed=cfg.seed,
        report_methods=("sweep", "greedy"),
    )
    rows, results, failed, galleries = [], {}, {}, {}
    where = gallery_slice(data.test)  # the test slice every model's map is drawn on
    for name in names:
        try:
            row, results[name] = _compare_one(name, cfg, data, device, eval_cfg, out, say, where)
            galleries[name] = results[name].pop("gallery", None)
        except Exception as err:  # one failing model must not lose the others' results
            logger.debug("model %s failed", name, exc_info=True)
            row = failed_row(name, err)
            failed[name] = row["error"]
            results[name] = {"error": row["error"]}
            say(f"[{name}] failed: {row['error']}")
        rows.append(row)
    weights = [describe_encoder_weights(r["info"].get("encoder_weights")) for r in results.values() if "info" in r]
    weights = [w for w in weights if w]
    notes = _protocol_notes(cfg, data, str(device), weights)
    paths = write_comparison(rows, out, notes)
    split = {k: [str(r["subject_id"]) for r in v] for k, v in data.splits.items()}
    summary = {
        "rows": rows,
        "results": results,
        "data": {"source": data.source, "splits": split, "train_slices": len(data.train), **data.preprocessing},
        "config": _config_dict(cfg),
        "failed": failed,
    }
    paths["json"] = atomic_write_json(out / "comparison.json", to_jsonable(summary))
    image = truth = None
    if where is not None:
        vol, z = data.test[where[0]], where[1]
        image, truth = _plain(vol["image"])[0].numpy()[..., z], _plain(vol["label"])[0].numpy()[..., z] > 0
    paths["figure"], _ = save_comparison_figure(out / "comparison.png", rows, image, truth, galleries)
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    summary["markdown"] = comparison_table(rows)
    return summary


def _compare_one(
    name: str,
    cfg: CompareConfig,
    data: PreparedData,
    device: Any,
    eval_cfg: EvaluationConfig,
    out: Path,
    say: Callable[[str], None],
    gallery_at: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, train, score and evaluate one model: its table row and its result entry (with ``gallery``, its map of
    the test slice ``gallery_at`` = (volume, slice), for the figure)."""
    torch.manual_seed(cfg.seed)
    net, info = build_model(
        name,
        data.in_channels,
        data.image_size,
        cfg.backbone,
        cfg.backbone_weights,
        cfg.model_args.get(name),
        say=say,
    )
    params = count_parameters(net)
    say(f"[{name}] {params['trainable']:,} trainable parameters; training {cfg.epochs} epochs on {device}")
    if cfg.overwrite:
        clear_previous_run(out / "models" / name)
    summary = train_model(
        net,
        data.train,
        out / "models" / name,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        device=str(device),
        seed=cfg.seed,
        loss_options=cfg.loss_options.get(name),
        preprocessing=data.preprocessing,
        progress=cfg.progress,
        beta=cfg.beta,
        map_kind=cfg.map_kind,
    )
    model, _ = load_model(summary["model_path"], device)
    t0 = time.perf_counter()
    result = evaluate_model(
        model,
        data.val,
        data.test,
        eval_cfg,
        batch_size=cfg.batch_size * 2,
        beta=cfg.beta,
        map_kind=cfg.map_kind,
        min_area_fraction=cfg.data.min_area_fraction,
    )
    score_seconds = time.perf_counter() - t0
    info.update(
        params=params,
        train_seconds=float(summary["seconds"]),
        epochs=int(summary["epochs"]),
        score_seconds=score_seconds,
        model_path=summary["model_path"],
        description=get_model_spec(name).description,
    )
    row = comparison_row(name, info, result)
    say(
        f"[{name}] trained in {row['train_seconds']:.1f} s; DICE_T {_fmt(row['dice_pooled'])}, pixel AUROC "
        f"{_fmt(row['pixel_auroc'])}, slice AUROC (score) {_fmt(row['slice_auroc_score'])}"
    )
    entry = {"info": info, "evaluation": result_to_json(result)}
    if gallery_at is not None:
        vol = data.test[gallery_at[0]]
        entry["gallery"] = gallery_entry(
            model, vol, gallery_at[1], row["threshold"], cfg.postprocess, cfg.batch_size * 2, cfg.beta, cfg.map_kind
        )
    if result.get("reconstruction"):
        entry["reconstruction"] = result["reconstruction"]
        save_reconstruction_quality(summary["model_path"], result["reconstruction"])  # into the training record
    return row, entry


def _config_dict(cfg: CompareConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["postprocess"] = cfg.postprocess.to_dict()
    out["models"] = list(cfg.models)
    return out
