"""Split data lists: a dataset folder or a generated synthetic cohort -> train / validation / test records.

:func:`prepare_data` indexes (or generates), splits by subject and preprocesses the volumes, and extracts the
healthy training slices; ``aeflow-cli train``, ``aeflow-cli compare`` and the demo use it. A real dataset is split
by :func:`~monai_aeflow.data.splits.split_by_subject`; a synthetic cohort by :func:`split_healthy_and_lesioned`,
the one synthetic rule, which the bundles' data lists (:mod:`monai_aeflow.data.bundle_datalists`) use too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_aeflow.config_rules import check_value
from monai_aeflow.data.indexers import index_dataset, with_brats_region
from monai_aeflow.data.io import reraise_input_errors
from monai_aeflow.data.preprocessing import build_volume_preprocessing
from monai_aeflow.data.slices import SliceDataset, make_slice_dataset
from monai_aeflow.data.splits import SPLIT_NAMES, check_disjoint_subjects, read_split_csv, split_by_subject
from monai_aeflow.data.synthetic import generate_cohort
from monai_aeflow.errors import AEFlowInputError

__all__ = [
    "VOLUME_DATASETS",
    "SyntheticCohortConfig",
    "DataConfig",
    "PreparedData",
    "prepare_data",
    "split_cohort",
    "split_healthy_and_lesioned",
]

VOLUME_DATASETS: tuple[str, ...] = ("brats", "ixi", "atlas", "folder")
"""Dataset kinds (see :func:`monai_aeflow.data.indexers.index_dataset`) that train and compare accept."""


@dataclass
class SyntheticCohortConfig:
    """A generated cohort (see :func:`monai_aeflow.data.synthetic.generate_cohort`) and its split.

    The counts are split by :func:`split_healthy_and_lesioned` (seeded by ``DataConfig.split_seed``).

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
        split_seed: seed of the random split (of the dataset, or of the synthetic cohort's healthy and lesioned
            subjects: :func:`split_healthy_and_lesioned`).
        spatial_size: in-plane size after cropping / padding (multiples of 16).
        spacing: resample to this voxel size in mm first (``None``: keep).
        percentiles: intensity clipping percentiles inside the brain.
        min_area_fraction: slices with less brain than this fraction of the largest slice are not used for
            training nor for the slice-level metrics.
        synthetic: the cohort to generate when ``data_dir`` is None.
        synthetic_dir: where to write it (default: ``<output>/data``).
        region: BraTS region of the validation and test labels: ``"wt"`` (whole tumour), ``"tc"`` (tumour
            core) or ``"et"`` (enhancing tumour), see :func:`~monai_aeflow.data.indexers.with_brats_region`;
            training slices stay free of every tumour label whatever the region.
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
    region: str = "wt"

    def __post_init__(self) -> None:
        check_value("--spacing", self.spacing, 0.0, lo_open=True, optional=True)
        for value in self.fractions:
            check_value("--fractions", value, 0.0)

    def preprocessing_config(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~monai_aeflow.data.preprocessing.build_volume_preprocessing` (in models)."""
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


def split_healthy_and_lesioned(
    healthy: Sequence[Mapping[str, Any]],
    lesioned: Sequence[Mapping[str, Any]],
    healthy_weights: Sequence[float],
    lesioned_weights: Sequence[float],
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """The one split rule of synthetic cohorts (``aeflow-cli train`` / ``compare``, the demo and the bundles).

    Healthy subjects go to all three splits, lesioned subjects to validation and test only (training on healthy
    anatomy, as in the IXI -> BraTS protocol). Each group is split by
    :func:`~monai_aeflow.data.splits.split_by_subject` with the same ``seed``: its subject ids are sorted,
    shuffled with ``numpy.random.default_rng(seed)`` and cut by cumulative rounding of the weights, so the result
    depends only on the ids, the weights and the seed (not on the generation order). Counts work as weights:
    ``healthy_weights=(4, 1, 1)`` of six healthy subjects gives exactly 4, 1 and 1.

    Args:
        healthy: records (dicts with ``subject_id``) of healthy subjects.
        lesioned: records of lesioned subjects.
        healthy_weights: train, validation and test weights of the healthy subjects (fractions or counts).
        lesioned_weights: validation and test weights of the lesioned subjects.
        seed: seed of both shuffles.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``: healthy then lesioned records in each split.

    Raises:
        AEFlowInputError: weights that are not three (healthy) and two (lesioned) non-negative numbers.
    """
    if len(healthy_weights) != 3 or len(lesioned_weights) != 2:
        raise AEFlowInputError(
            f"split weights must be three numbers for healthy subjects (train, val, test) and two for lesioned ones "
            f"(val, test), got {list(healthy_weights)} and {list(lesioned_weights)}"
        )
    parts = []
    if healthy:
        parts.append(split_by_subject(healthy, tuple(float(w) for w in healthy_weights), seed))
    if lesioned:
        parts.append(split_by_subject(lesioned, (0.0, *(float(w) for w in lesioned_weights)), seed))
    return {name: [r for p in parts for r in p[name]] for name in SPLIT_NAMES}


def split_cohort(
    cohort: Sequence[Mapping[str, Any]],
    n_train: int,
    n_val_healthy: int,
    n_val_lesion: int,
    n_test_healthy: int | None = None,
    n_test_lesion: int | None = None,
    seed: int = 0,
) -> dict[str, list[Any]]:
    """Split a generated cohort (see :func:`~monai_aeflow.data.synthetic.generate_cohort`) by subject counts.

    The counts are the weights of :func:`split_healthy_and_lesioned` (the one synthetic split rule): healthy
    and lesioned subjects are each shuffled with ``seed`` and cut into these counts.

    Args:
        cohort: the cohort entries (dicts with ``subject_id`` and a ``healthy`` flag).
        n_train: healthy training subjects.
        n_val_healthy: healthy validation subjects.
        n_val_lesion: lesioned validation subjects.
        n_test_healthy: healthy test subjects (default: the remaining healthy ones).
        n_test_lesion: lesioned test subjects (default: the remaining lesioned ones).
        seed: seed of the split.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of the cohort's entries.

    Raises:
        AEFlowInputError: counts that do not add up to the cohort's healthy and lesioned subjects.
    """
    healthy = [c for c in cohort if c["healthy"]]
    lesioned = [c for c in cohort if not c["healthy"]]
    n_test_healthy = len(healthy) - n_train - n_val_healthy if n_test_healthy is None else n_test_healthy
    n_test_lesion = len(lesioned) - n_val_lesion if n_test_lesion is None else n_test_lesion
    counts = (n_train, n_val_healthy, n_test_healthy, n_val_lesion, n_test_lesion)
    if min(counts) < 0 or n_train + n_val_healthy + n_test_healthy != len(healthy):
        raise AEFlowInputError(f"subject counts {counts} do not fit {len(healthy)} healthy subjects")
    if n_val_lesion + n_test_lesion != len(lesioned):
        raise AEFlowInputError(f"subject counts {counts} do not fit {len(lesioned)} lesioned subjects")
    return split_healthy_and_lesioned(
        healthy, lesioned, (n_train, n_val_healthy, n_test_healthy), (n_val_lesion, n_test_lesion), seed
    )


def _synthetic_splits(
    cfg: SyntheticCohortConfig, root: Path, progress: bool, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
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
    splits = split_cohort(
        cohort, cfg.n_train, cfg.n_val_healthy, cfg.n_val_lesion, cfg.n_test_healthy, cfg.n_test_lesion, seed
    )
    return {
        name: [
            {
                "image": c["image"],
                "mask": c["brain_mask"],
                "label": c["label"],
                "subject_id": c["subject_id"],
                "modality": cfg.contrast,
            }
            for c in entries
        ]
        for name, entries in splits.items()
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
        splits = _synthetic_splits(cfg.synthetic, root, progress, cfg.split_seed)
        source = "synthetic"
    else:
        splits = _split_records(cfg, _dataset_records(cfg))
        source = str(cfg.data_dir)
    if cfg.region != "wt":
        if cfg.data_dir is None or cfg.dataset != "brats":
            raise AEFlowInputError(f"region {cfg.region!r} is a BraTS region: it needs --dataset brats and --data")
        # evaluation labels only: training keeps label > 0, so its healthy slices hold no tumour label at all
        splits = {k: v if k == "train" else with_brats_region(v, cfg.region) for k, v in splits.items()}
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
