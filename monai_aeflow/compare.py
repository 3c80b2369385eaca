"""Train, score and evaluate registered models on one dataset with one protocol, and tabulate the results.

This is the library side of ``aeflow-cli train`` and ``aeflow-cli compare``: every model (AE-FLOW and the
baselines of :mod:`monai_aeflow.baselines`) goes through the same data pipeline (indexer, subject split,
volume preprocessing, healthy training slices), the same engine (:func:`monai_aeflow.engines.train`), the
same slice-by-slice inference (:func:`monai_aeflow.inference.score_volume`) and the same evaluation protocol
(:func:`monai_aeflow.evaluation.evaluate_maps`: threshold chosen on the validation split, Dice, pixel / slice
/ volume AUROC and AUPRC on the test split).

Example::

    cfg = CompareConfig(output_dir="runs/compare", models=["intensity", "ae", "vae", "aeflow"])
    result = run_comparison(cfg)            # synthetic cohort by default
    print(result["markdown"])               # also in runs/compare/comparison.md and comparison.csv
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from torch import nn

from monai_aeflow.checkpoint import load_model, save_model
from monai_aeflow.data.indexers import index_dataset
from monai_aeflow.data.io import reraise_input_errors
from monai_aeflow.data.slices import SliceDataset, make_slice_dataset, select_slices
from monai_aeflow.data.splits import check_disjoint_subjects, read_split_csv, split_by_subject
from monai_aeflow.data.synthetic import generate_cohort
from monai_aeflow.data.transforms import build_volume_preprocessing
from monai_aeflow.engines.workflow import (
    MODEL_FILE,
    TrainingConfig,
    check_output_dir,
    clear_previous_run,
    open_resume_checkpoint,
    previous_run_files,
    resolve_device,
    train,
)
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.pipeline import EvaluationConfig, evaluate_maps, result_to_json
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.fileio import atomic_write_json, atomic_write_text, to_jsonable
from monai_aeflow.inference.volume import score_volume
from monai_aeflow.models import MODELS, build_network, get_model_spec, trainable_parameters

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

DEFAULT_MODELS: tuple[str, ...] = ("intensity", "ae", "vae", "pchvae", "vqvae", "vqgan", "flowonly", "aeflow")
"""Models of a default comparison: the intensity baseline first, AE-FLOW last."""

VOLUME_DATASETS: tuple[str, ...] = ("brats", "ixi", "atlas", "folder")
"""Dataset kinds (see :func:`monai_aeflow.data.indexers.index_dataset`) that train and compare accept."""


@dataclass
@dataclass
class SyntheticCohortConfig:
    """A generated cohort (see :func:`monai_aeflow.data.synthetic.generate_cohort`) and its split.

    Args:
        n_train: healthy training subjects.
        n_val_healthy: healthy validation subjects.
        n_val_lesion: lesioned validation subjects (the threshold is chosen on the validation split).
        n_test_healthy: healthy test subjects.
        n_test_lesion: lesioned test subjects.
        shape: volume shape (in-plane sizes multiples of 16).
        spacing: voxel size in mm.
        contrast: ``"flair"`` (hyper-intense lesions) or ``"t1"`` (hypo-intense).
        seed: cohort seed.
    """

    n_train: int = 4
    n_val_healthy: int = 1
    n_val_lesion: int = 2
    n_test_healthy: int = 1
    n_test_lesion: int = 2
    shape: tuple[int, int, int] = (64, 64, 40)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    contrast: str = "flair"
    seed: int = 0


@dataclass
class DataConfig:
    """Where the volumes come from, how subjects are split and how volumes are preprocessed.

    Args:
        data_dir: dataset folder; ``None`` generates a synthetic cohort (``synthetic``) in ``synthetic_dir``.
        dataset: indexer kind, one of :data:`VOLUME_DATASETS`.
        modality: modality (or list of modalities) for indexers that take one (BraTS: ``flair``, ``t1c``...).
        subjects: explicit split as ``{"train": [ids], "val": [ids], "test": [ids]}``; wins over the rest.
        split_file: a split CSV (see :func:`monai_aeflow.data.splits.write_split_csv`).
        fractions: subject fractions of train, validation and test for a random split.
        split_seed: seed of the random split.
        spatial_size: in-plane size after cropping / padding (multiples of 16).
        spacing: resample to this voxel size in mm first (``None``: keep).
        percentiles: intensity clipping percentiles inside the brain.
        min_area_fraction: slices with less brain than this fraction of the largest slice are not used for
            training nor for the slice-level metrics.
        synthetic: the cohort to generate when ``data_dir`` is None.
        synthetic_dir: where to write it (default: ``<output>/data``).
    """

    data_dir: str | None = None
    dataset: str = "brats"
    modality: str | list[str] | None = "flair"
    subjects: dict[str, list[str]] | None = None
    split_file: str | None = None
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 0
    spatial_size: tuple[int, int] = (128, 128)
    spacing: float | None = None
    percentiles: tuple[float, float] = (1.0, 99.0)
    min_area_fraction: float = 0.2
    synthetic: SyntheticCohortConfig = field(default_factory=SyntheticCohortConfig)
    synthetic_dir: str | None = None

    def preprocessing_config(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~monai_aeflow.data.transforms.build_volume_preprocessing` (stored in models)."""
        if self.data_dir is None:
            size = [int(s) for s in self.synthetic.shape[:2]]
            spacing = None
        else:
            size = [int(s) for s in self.spatial_size]
            spacing = self.spacing
        return {"spatial_size": size, "percentiles": list(self.percentiles), "spacing": spacing, "orientation": "RAS"}


@dataclass
class PreparedData:
    """Preprocessed splits.

    Attributes:
        splits: the records of each split (``train``, ``val``, ``test``).
        train: healthy training slices.
        val: preprocessed validation volumes (dicts with ``image``, ``mask``, ``label``, ``subject_id``).
        test: preprocessed test volumes.
        in_channels: image channels.
        image_size: in-plane size (H, W) of the slices.
        preprocessing: the preprocessing configuration (stored in model files).
        source: ``"synthetic"`` or the dataset folder.
    """

    splits: dict[str, list[dict[str, Any]]]
    train: SliceDataset
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    in_channels: int
    image_size: tuple[int, int]
    preprocessing: dict[str, Any]
    source: str


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
        threshold_method: ``"greedy"`` (Dice search on validation) or ``"fpr"``.
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
    threshold_method: str = "greedy"
    n_bootstrap: int = 200
    n_thresholds: int = 4096
    progress: bool = False
    overwrite: bool = False


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------


def _synthetic_splits(cfg: SyntheticCohortConfig, root: Path, progress: bool) -> dict[str, list[dict[str, Any]]]:
    if any(int(s) % 16 for s in cfg.shape[:2]):
        raise AEFlowInputError(f"synthetic in-plane shape {tuple(cfg.shape[:2])} must be multiples of 16")
    n_healthy = cfg.n_train + cfg.n_val_healthy + cfg.n_test_healthy
    n_lesion = cfg.n_val_lesion + cfg.n_test_lesion
    cohort = generate_cohort(
        root,
        n_healthy,
        n_lesion,
        seed=cfg.seed,
        shape=tuple(cfg.shape),
        spacing=tuple(cfg.spacing),
        contrast=cfg.contrast,
        progress=progress,
    )
    records = [
        {
            "image": c["image"],
            "mask": c["brain_mask"],
            "label": c["label"],
            "subject_id": c["subject_id"],
            "modality": cfg.contrast,
        }
        for c in cohort
    ]
    healthy = [r for r, c in zip(records, cohort, strict=True) if c["healthy"]]
    lesioned = [r for r, c in zip(records, cohort, strict=True) if not c["healthy"]]
    a, b = cfg.n_train, cfg.n_train + cfg.n_val_healthy
    return {
        "train": healthy[:a],
        "val": healthy[a:b] + lesioned[: cfg.n_val_lesion],
        "test": healthy[b:] + lesioned[cfg.n_val_lesion :],
    }


def _dataset_records(cfg: DataConfig) -> list[dict[str, Any]]:
    if cfg.dataset not in VOLUME_DATASETS:
        kinds = ", ".join(VOLUME_DATASETS)
        raise AEFlowInputError(f"dataset kind must be one of {kinds} (volumes), not {cfg.dataset!r}")
    from monai_aeflow.data.indexers import INDEXERS

    kwargs: dict[str, Any] = {}
    if cfg.modality is not None and "modality" in inspect.signature(INDEXERS[cfg.dataset]).parameters:
        kwargs["modality"] = cfg.modality
    return index_dataset(cfg.dataset, cfg.data_dir, **kwargs)


def _split_records(cfg: DataConfig, records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    if cfg.subjects is not None:
        known = {str(r["subject_id"]) for r in records}
        wanted = {k: [str(s) for s in v] for k, v in cfg.subjects.items()}
        unknown = sorted({s for v in wanted.values() for s in v} - known)
        if unknown:
            raise AEFlowInputError(f"subjects not in the dataset: {', '.join(unknown)}", path=cfg.data_dir)
        bad = sorted(set(wanted) - {"train", "val", "test"})
        if bad:
            raise AEFlowInputError(f"split names must be train, val and test, not {', '.join(bad)}")
        splits = {name: [r for r in records if str(r["subject_id"]) in wanted.get(name, [])] for name in wanted}
        splits = {name: splits.get(name, []) for name in ("train", "val", "test")}
    elif cfg.split_file is not None:
        splits = read_split_csv(cfg.split_file)
    else:
        splits = split_by_subject(records, cfg.fractions, seed=cfg.split_seed)
    check_disjoint_subjects(splits)
    return splits


def _preprocess_volumes(records: Sequence[Mapping[str, Any]], preprocess: Callable[[dict], dict]) -> list[dict]:
    out = []
    for record in records:
        with reraise_input_errors():
            volume = preprocess(dict(record))
        volume["subject_id"] = record.get("subject_id")
        out.append(volume)
    return out


def prepare_data(
    cfg: DataConfig, output_dir: str | Path, progress: bool = False, need_evaluation: bool = True
) -> PreparedData:
    """Index (or generate), split and preprocess the volumes; extract the healthy training slices.

    Args:
        cfg: the data settings.
        output_dir: run folder (the synthetic cohort goes to ``<output_dir>/data`` by default).
        progress: show progress bars.
        need_evaluation: require a validation split with lesions and a test split.

    Returns:
        The :class:`PreparedData`.

    Raises:
        AEFlowInputError: unreadable data, an empty split, or no healthy training slice.
    """
    if cfg.data_dir is None:
        root = Path(cfg.synthetic_dir) if cfg.synthetic_dir else Path(output_dir) / "data"
        splits = _synthetic_splits(cfg.synthetic, root, progress)
        source = "synthetic"
    else:
        splits = _split_records(cfg, _dataset_records(cfg))
        source = str(cfg.data_dir)
    if not splits["train"]:
        raise AEFlowInputError("the training split is empty (check the split or the subject fractions)")
    if need_evaluation and (not splits["val"] or not splits["test"]):
        raise AEFlowInputError(
            "the validation and test splits must not be empty (the threshold is chosen on validation, metrics "
            f"are measured on test); got {len(splits['val'])} validation and {len(splits['test'])} test subjects"
        )
    pre_cfg = cfg.preprocessing_config()
    if any(int(s) % 16 for s in pre_cfg["spatial_size"]):
        raise AEFlowInputError(f"spatial size {tuple(pre_cfg['spatial_size'])} must be multiples of 16")
    preprocess = build_volume_preprocessing(
        spatial_size=pre_cfg["spatial_size"], percentiles=tuple(cfg.percentiles), spacing=pre_cfg["spacing"]
    )
    train_ds = make_slice_dataset(
        splits["train"],
        preprocess,
        min_area_fraction=cfg.min_area_fraction,
        healthy_only=True,
        num_workers=1,
        progress=progress,
    )
    if len(train_ds) == 0:
        raise AEFlowInputError("no healthy training slice (every slice of the training subjects holds a lesion)")
    val = _preprocess_volumes(splits["val"], preprocess)
    test = _preprocess_volumes(splits["test"], preprocess)
    if need_evaluation and not any(bool(torch.as_tensor(v["label"]).any()) for v in val if v.get("label") is not None):
        raise AEFlowInputError("the validation split has no lesion voxels: the Dice threshold cannot be chosen on it")
    first = train_ds[0]["image"]
    return PreparedData(
        splits=splits,
        train=train_ds,
        val=val,
        test=test,
        in_channels=int(first.shape[0]),
        image_size=(int(first.shape[1]), int(first.shape[2])),
        preprocessing=pre_cfg,
        source=source,
    )


# --------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------


def count_parameters(network: nn.Module) -> dict[str, int]:
    """Parameter counts of a network.

    Args:
        network: the model.

    Returns:
        ``{"trainable": ..., "total": ...}`` (trainable: what the optimiser updates).
    """
    return {
        "trainable": int(sum(p.numel() for p in trainable_parameters(network))),
        "total": int(sum(p.numel() for p in network.parameters())),
    }


def _check_model_args(name: str, overrides: Mapping[str, Any] | None) -> Any:
    """The model's spec; raise when the name is unknown or the network takes no such arguments."""
    try:
        spec = get_model_spec(name)
    except ValueError as err:
        raise AEFlowInputError(str(err)) from None
    params = inspect.signature(spec.network_cls).parameters
    unknown = sorted(set(overrides or {}) - set(params))
    if unknown:
        raise AEFlowInputError(
            f"model {spec.name!r} takes no argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(params))}"
        )
    return spec


def build_model(
    name: str,
    in_channels: int = 1,
    image_size: Sequence[int] | None = None,
    backbone: str = "resnet18",
    backbone_weights: str | None = "auto",
    overrides: Mapping[str, Any] | None = None,
    say: Callable[[str], None] = logger.warning,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a registered model for the data: channels, image size and backbone where the class takes them.

    Args:
        name: registry key.
        in_channels: image channels.
        image_size: (H, W) of the slices (for models with a fixed input size, e.g. the dense VAE).
        backbone: ResNet of the AE-FLOW family.
        backbone_weights: ``"auto"`` (ImageNet if it can be loaded, else random with a warning), ``"imagenet"``,
            ``"none"`` / None (random) or a local state-dict path.
        overrides: further network arguments (unknown ones are refused).
        say: where the warning about random weights goes.

    Returns:
        The network and ``{"name", "hparams", "backbone_weights"}`` (what was used).

    Raises:
        AEFlowInputError: unknown model, an argument the network does not take, or invalid values.
    """
    spec = _check_model_args(name, overrides)
    params = inspect.signature(spec.network_cls).parameters
    kwargs: dict[str, Any] = {}
    if "in_channels" in params:
        kwargs["in_channels"] = int(in_channels)
    if "image_size" in params and image_size is not None:
        kwargs["image_size"] = [int(s) for s in image_size]
    if "backbone" in params:
        kwargs["backbone"] = backbone
    kwargs.update(overrides or {})
    weights_used = None
    if "backbone_weights" in params:
        wanted = kwargs.pop("backbone_weights", backbone_weights)
        wanted = None if wanted in (None, "none", "random") else wanted
        if wanted == "auto":
            try:
                net = build_network(spec.name, backbone_weights="imagenet", **kwargs)
                return net, {"name": spec.name, "hparams": dict(net.hparams), "backbone_weights": "imagenet"}
            except AEFlowInputError as err:
                reason = str(err).split(". ")[0].split(" (")[0]
                say(f"warning: ImageNet weights unavailable ({reason}); {spec.name} uses a random encoder")
                wanted = None
        kwargs["backbone_weights"] = wanted
        weights_used = "random" if wanted is None else str(wanted)
    try:
        net = build_network(spec.name, **kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, AEFlowInputError):
            raise
        raise AEFlowInputError(f"cannot build {spec.name!r}: {err}") from None
    return net, {"name": spec.name, "hparams": dict(net.hparams), "backbone_weights": weights_used}


def train_model(
    network: nn.Module,
    train_dataset: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    epochs: int = 5,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    device: str = "auto",
    seed: int = 0,
    loss_options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    val_dataset: Sequence[Mapping[str, Any]] | None = None,
    progress: bool = False,
    **training: Any,
) -> dict[str, Any]:
    """Train a registered model with the shared engine and write ``<output_dir>/model.pt``.

    A model without trainable parameters (the intensity baseline) is saved as it is.

    Args:
        network: the model.
        train_dataset: healthy training slices (dicts with ``image``).
        output_dir: run folder (model, checkpoints, TensorBoard logs).
        epochs: training epochs.
        batch_size: slices per batch.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seed of shuffling and training.
        loss_options: options of the model's loss.
        preprocessing: preprocessing configuration stored in the model file.
        val_dataset: labelled validation slices; when given the model with the best validation slice AUROC is
            kept, otherwise the last one.
        progress: progress bar and per-epoch logs.
        training: further :class:`~monai_aeflow.engines.TrainingConfig` fields (``alpha``, ``beta``, ...).

    Returns:
        The engine's summary (``model_path``, ``epochs``, ``iterations``, ``seconds``, ...).
    """
    out = Path(output_dir)
    cfg = TrainingConfig(
        output_dir=str(out),
        max_epochs=int(epochs),
        lr=float(lr),
        weight_decay=float(weight_decay),
        device=str(device),
        seed=int(seed),
        progress=progress,
        preprocessing=dict(preprocessing or {}),
        loss_options=dict(loss_options or {}),
        **training,
    )
    if not trainable_parameters(network):
        out.mkdir(parents=True, exist_ok=True)
        path = save_model(network, out / MODEL_FILE, config=cfg.model_config())
        return {"model_path": str(path), "epochs": 0, "iterations": 0, "seconds": 0.0, "images_per_second": 0.0}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(Dataset(list(train_dataset)), batch_size=batch_size, shuffle=True, generator=gen)
    val_loader = None
    if val_dataset is not None and len(val_dataset):
        val_loader = DataLoader(Dataset(list(val_dataset)), batch_size=batch_size * 2)
    return train(network, train_loader, val_loader, cfg)


def parse_assignments(items: Sequence[str], nested: bool = False) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` command-line assignments (values as JSON when they parse, else strings).

    Args:
        items: the assignments, e.g. ``["latent_dim=64", "channels=[16,32,64]"]``.
        nested: keys are ``MODEL.KEY`` (``"vae.latent_dim=64"``) and the result is ``{model: {key: value}}``.

    Returns:
        The parsed dict.

    Raises:
        AEFlowInputError: an item without ``=`` (or without ``MODEL.`` when nested).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise AEFlowInputError(f"expected KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if nested:
            model, dot, sub = key.partition(".")
            if not dot or not model or not sub:
                raise AEFlowInputError(f"expected MODEL.KEY=VALUE (e.g. vae.latent_dim=64), got {item!r}")
            out.setdefault(model.lower(), {})[sub] = value
        else:
            out[key] = value
    return out


def run_training(
    name: str,
    data: DataConfig,
    output_dir: str | Path,
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    device: str = "auto",
    seed: int = 0,
    backbone: str = "resnet18",
    backbone_weights: str | None = "auto",
    model_args: Mapping[str, Any] | None = None,
    loss_options: Mapping[str, Any] | None = None,
    validate: bool = True,
    progress: bool = False,
    say: Callable[[str], None] = logger.info,
    resume: str | Path | None = None,
    overwrite: bool = False,
    **training: Any,
) -> dict[str, Any]:
    """Prepare the data, build one registered model and train it (what ``aeflow-cli train`` runs).

    Before the data are prepared, the output folder is checked: it must be writable and, unless ``overwrite``
    or ``resume``, hold no previous run (``model.pt``, checkpoints); ``resume`` is read and checked too. With
    ``overwrite`` the previous run's model, checkpoints and TensorBoard events are removed just before training.

    Args:
        name: registry key (``aeflow``, ``ae``, ``vae``, ...).
        data: data settings.
        output_dir: run folder (``model.pt``, checkpoints, TensorBoard logs; a synthetic cohort in ``data/``).
        epochs: training epochs.
        batch_size: slices per batch.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seed of initialisation and training.
        backbone: ResNet of the AE-FLOW family.
        backbone_weights: see :func:`build_model`.
        model_args: further network arguments.
        loss_options: options of the model's loss.
        validate: keep the model with the best slice AUROC on the validation split (when it has slices).
        progress: progress bars and per-epoch logs.
        say: where progress messages go.
        resume: a training checkpoint or a run folder (its latest checkpoint) to continue; the other arguments
            must describe the same run (same data, model and settings; ``epochs`` may be larger).
        overwrite: replace a previous run in ``output_dir``.
        training: further :class:`~monai_aeflow.engines.TrainingConfig` fields (``alpha``, ``beta``...).

    Returns:
        The engine's summary plus ``model``, ``hparams``, ``parameters``, ``backbone_weights``, ``splits`` and
        ``train_slices``.
    """
    # fail before the data are prepared
    _check_model_args(name, model_args)
    device_used = resolve_device(device)
    run_options = dict(training.pop("run_options", None) or {})
    if resume is not None:
        if overwrite:
            raise AEFlowInputError("give either --resume (continue a run) or --overwrite (replace it), not both")
        resume, ckpt = open_resume_checkpoint(resume, epochs)
        same_folder = Path(output_dir).resolve() == resume.parent.resolve()
        check_output_dir(output_dir, existing_run_ok=same_folder)
        stored = ckpt["config"].get("training", {}).get("run_options") or {}
        weights_used = stored.get("backbone_weights_used", "checkpoint")
        backbone_weights = None  # the checkpoint holds the encoder's weights: never download them again
    else:
        check_output_dir(output_dir, overwrite=overwrite)
    prepared = prepare_data(data, output_dir, progress=progress, need_evaluation=False)
    torch.manual_seed(seed)
    net, info = build_model(
        name, prepared.in_channels, prepared.image_size, backbone, backbone_weights, model_args, say=say
    )
    if resume is not None:
        info["backbone_weights"] = weights_used
    run_options["backbone_weights_used"] = info["backbone_weights"]
    params = count_parameters(net)
    val = None
    if validate and prepared.val:
        val = SliceDataset(prepared.val, min_area_fraction=data.min_area_fraction, healthy_only=False)
    say(
        f"training {info['name']} ({params['trainable']:,} trainable parameters) on {len(prepared.train)} healthy "
        f"slices for {epochs} epochs on {device_used}"
    )
    if overwrite and resume is None:
        clear_previous_run(output_dir)
    summary = train_model(
        net,
        prepared.train,
        output_dir,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        device=str(device_used),
        seed=seed,
        loss_options=loss_options,
        preprocessing=prepared.preprocessing,
        val_dataset=val,
        progress=progress,
        resume=None if resume is None else str(resume),
        run_options=run_options,
        **training,
    )
    summary.update(
        model=info["name"],
        hparams=info["hparams"],
        parameters=params,
        backbone_weights=info["backbone_weights"],
        splits={k: [str(r["subject_id"]) for r in v] for k, v in prepared.splits.items()},
        train_slices=len(prepared.train),
        source=prepared.source,
    )
    return summary


# --------------------------------------------------------------------------------------------------------
# scoring and evaluation
# --------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> torch.Tensor:
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def score_cases(
    network: nn.Module,
    volumes: Sequence[Mapping[str, Any]],
    batch_size: int = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    min_area_fraction: float = 0.2,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Score the brain slices of preprocessed volumes and build evaluation cases.

    A model that reconstructs (``network.reconstructs`` is not False) with the residual map gives its input and
    reconstruction, so that the protocol's ``positive`` / ``absolute`` residual mode applies; other models give
    their anomaly map.

    Args:
        network: a registered model in ``eval()`` mode.
        volumes: preprocessed volume dicts (``image`` (C, X, Y, Z), ``mask``, ``label``, ``subject_id``).
        batch_size: slices per forward pass.
        beta: flow weight of AE-FLOW's score.
        map_kind: pixel map kind.
        min_area_fraction: slices with at least this fraction of the largest brain area get an image-level
            score (slices without brain are never scored).

    Returns:
        The cases for :func:`~monai_aeflow.evaluation.evaluate_maps` and the image-level ``{"scores", "labels"}``
        of the scored slices (the model's own score of each slice; abnormal when it holds lesion voxels).
    """
    reconstructs = getattr(network, "reconstructs", True) and map_kind == "residual"
    cases, scores, labels = [], [], []
    for i, vol in enumerate(volumes):
        image = _plain(vol["image"]).float()
        mask = _plain(vol["mask"])[0].numpy() > 0
        label_value = vol.get("label")
        label = np.zeros(mask.shape, bool) if label_value is None else _plain(label_value)[0].numpy() > 0
        brain_slices = select_slices(mask, None, 0.0)
        result = score_volume(network, image, slices=brain_slices, batch_size=batch_size, beta=beta, map_kind=map_kind)
        case: dict[str, Any] = {"name": str(vol.get("subject_id") or f"case{i:03d}"), "label": label, "mask": mask}
        if reconstructs:
            case["image"] = image.mean(0).numpy()
            case["reconstruction"] = result.reconstruction
        else:
            case["map"] = result.anomaly_map
        cases.append(case)
        keep = select_slices(mask, None, min_area_fraction)
        scores.append(result.slice_scores[keep])
        labels.append(label[..., keep].reshape(-1, len(keep)).any(0))
    image_scores = {"scores": np.concatenate(scores), "labels": np.concatenate(labels)}
    return cases, image_scores


def evaluate_model(
    network: nn.Module,
    val_volumes: Sequence[Mapping[str, Any]],
    test_volumes: Sequence[Mapping[str, Any]],
    config: EvaluationConfig | None = None,
    batch_size: int = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    min_area_fraction: float = 0.2,
) -> dict[str, Any]:
    """Score the validation and test volumes and run the evaluation protocol.

    Args:
        network: a registered model.
        val_volumes: preprocessed validation volumes (the threshold is chosen on them).
        test_volumes: preprocessed test volumes.
        config: evaluation settings (its ``slice_min_brain_fraction`` is set to ``min_area_fraction``).
        batch_size: slices per forward pass.
        beta: flow weight of AE-FLOW's score.
        map_kind: pixel map kind.
        min_area_fraction: slices used for slice-level metrics.

    Returns:
        The result of :func:`~monai_aeflow.evaluation.evaluate_maps`; ``metrics["image"]`` holds the slice-level
        metrics of the model's own image score.
    """
    config = dataclasses.replace(config or EvaluationConfig(), slice_min_brain_fraction=min_area_fraction)
    network.eval()
    val_cases, _ = score_cases(network, val_volumes, batch_size, beta, map_kind, min_area_fraction)
    test_cases, image_scores = score_cases(network, test_volumes, batch_size, beta, map_kind, min_area_fraction)
    return evaluate_maps(val_cases, test_cases, config, image_scores=image_scores)


# --------------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------------

_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    # (column, metrics level, metric name, Markdown header)
    ("dice_pooled", "pixel", "dice_pooled", "DICE_T"),
    ("dice_mean", "pixel", "dice_mean", "DICE_S"),
    ("dice_std", "pixel", "dice_std", "DICE_S std"),
    ("pixel_auroc", "pixel", "auroc", "pixel AUROC"),
    ("pixel_auprc", "pixel", "auprc", "pixel AUPRC"),
    ("slice_auroc_map", "slice", "auroc", "slice AUROC (map)"),
    ("slice_auprc_map", "slice", "auprc", "slice AUPRC (map)"),
    ("slice_auroc_score", "image", "auroc", "slice AUROC (score)"),
    ("slice_auprc_score", "image", "auprc", "slice AUPRC (score)"),
    ("slice_f1_score", "image", "f1", "slice F1 (score)"),
    ("volume_auroc", "volume", "auroc", "volume AUROC"),
    ("oracle_dice_pooled", "oracle", "dice_pooled", "oracle DICE_T"),
)


def _row(name: str, info: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    m = result["metrics"]
    row: dict[str, Any] = {
        "model": name,
        "params_trainable": info["params"]["trainable"],
        "params_total": info["params"]["total"],
        "train_seconds": info["train_seconds"],
        "epochs": info["epochs"],
        "score_seconds": info["score_seconds"],
        "threshold": float(result["protocol"]["threshold"]["value"]),
    }
    for col, level, metric, _ in _COLUMNS:
        value = m.get(level, {}).get(metric) or {}
        row[col] = float(value.get("value", float("nan")))
        if math.isfinite(value.get("ci_low", float("nan"))):
            row[f"{col}_ci_low"] = float(value["ci_low"])
            row[f"{col}_ci_high"] = float(value["ci_high"])
    return row


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table of a comparison (one row per model).

    Args:
        rows: rows of :func:`run_comparison`.

    Returns:
        The table (GitHub Markdown).
    """
    header = ["model", "params (trainable)", "train s", *[h for *_, h in _COLUMNS if h != "DICE_S std"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], f"{r['params_trainable']:,}", f"{r['train_seconds']:.1f}"]
        for col, _, _, h in _COLUMNS:
            if h == "DICE_S std":
                continue
            cell = _fmt(r[col])
            if col == "dice_mean" and math.isfinite(r["dice_std"]):
                cell += f" ± {r['dice_std']:.3f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(rows: Sequence[Mapping[str, Any]], output_dir: str | Path, notes: str = "") -> dict[str, Path]:
    """Write ``comparison.md`` (table and protocol notes) and ``comparison.csv`` (every column, with CIs).

    Args:
        rows: rows of :func:`run_comparison`.
        output_dir: destination folder.
        notes: Markdown text appended under the table.

    Returns:
        ``{"markdown": path, "csv": path}``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = "# Model comparison\n\n" + comparison_table(rows) + "\n" + (f"\n{notes}\n" if notes else "")
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return {
        "markdown": atomic_write_text(out / "comparison.md", md),
        "csv": atomic_write_text(out / "comparison.csv", buf.getvalue()),
    }


def _protocol_notes(cfg: CompareConfig, data: PreparedData, device: str, weights: Sequence[str]) -> str:
    pp = cfg.postprocess
    split = {k: [str(r["subject_id"]) for r in v] for k, v in data.splits.items()}
    return "\n".join(
        [
            f"- data: {data.source}; train {split['train']} (healthy slices only, {len(data.train)} slices), "
            f"threshold on {split['val']}, test on {split['test']}",
            f"- preprocessing: {data.preprocessing}; slices with >= {cfg.data.min_area_fraction:g} of the largest "
            "brain area for training and slice-level metrics",
            f"- training: {cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr:g}, seed {cfg.seed}, "
            f"device {device}"
            + (f"; backbone {cfg.backbone} ({', '.join(sorted(set(weights)))} weights)" if weights else ""),
            f"- post-processing: {pp.residual} residual, brain mask eroded {pp.erosion_iterations}x, "
            f"{pp.median_size}x{pp.median_size} median ({pp.median_dims}D), components <= {pp.min_component_size} "
            f"voxels removed; threshold: {cfg.threshold_method} on the validation split",
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
    previous = [out / n for n in ("comparison.json", "comparison.md", "comparison.csv") if (out / n).is_file()]
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
    ``comparison.csv`` and ``comparison.json`` (rows, full metrics and protocol of each model). A folder that
    already holds a comparison is refused unless ``cfg.overwrite``, before any data are prepared.

    Args:
        cfg: the comparison settings.
        say: where progress messages go.

    Returns:
        ``{"rows", "results", "markdown", "paths", "data"}``.
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
        _check_model_args(name, cfg.model_args.get(name))
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
    )
    rows, results = [], {}
    for name in names:
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
        row = _row(name, info, result)
        rows.append(row)
        results[name] = {"info": info, "evaluation": result_to_json(result)}
        say(
            f"[{name}] trained in {row['train_seconds']:.1f} s; DICE_T {_fmt(row['dice_pooled'])}, pixel AUROC "
            f"{_fmt(row['pixel_auroc'])}, slice AUROC (score) {_fmt(row['slice_auroc_score'])}"
        )
    weights = [r["info"]["backbone_weights"] for r in results.values() if r["info"]["backbone_weights"]]
    notes = _protocol_notes(cfg, data, str(device), weights)
    paths = write_comparison(rows, out, notes)
    split = {k: [str(r["subject_id"]) for r in v] for k, v in data.splits.items()}
    summary = {
        "rows": rows,
        "results": results,
        "data": {"source": data.source, "splits": split, "train_slices": len(data.train), **data.preprocessing},
        "config": _config_dict(cfg),
    }
    paths["json"] = atomic_write_json(out / "comparison.json", to_jsonable(summary))
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    summary["markdown"] = comparison_table(rows)
    return summary


def _config_dict(cfg: CompareConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["postprocess"] = cfg.postprocess.to_dict()
    out["models"] = list(cfg.models)
    return out
