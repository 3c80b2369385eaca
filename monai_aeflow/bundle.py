"""Glue only the MONAI bundles in ``bundles/`` need: data lists, settings checks, an inference wrapper.

The bundle configurations build the network, the transforms, the engines, the handlers, the scorer and the
evaluation from the package through ``_target_`` references; this module holds the glue between them:

- :func:`prepare_brain_mri_datalist` / :func:`prepare_image_datalist`: generate a synthetic cohort when asked
  to (``generate_synthetic``) and ``dataset_dir`` does not exist yet, otherwise recognise the dataset (BraTS,
  IXI, ATLAS, a generic folder; chest X-ray / OCT class folders, ISIC), check its files
  (:func:`~monai_aeflow.data.checks.check_data_files`) and return the subject-level ``train`` / ``val`` /
  ``test`` lists.
- :func:`check_bundle_settings`, :func:`check_dataset_dir`, :func:`install_error_hook`: the first steps of a
  bundle's ``initialize``: wrong settings, a missing ``dataset_dir`` and unreadable files stop a
  ``python -m monai.bundle run`` with one line (``Error: ...``) and exit code 2.
- :class:`AnomalyMapNet`: one tensor in, the anomaly map out, for ``verify_net_in_out`` and ``ckpt_export``.
- :func:`initialize_flow`: the flow's data initialisation before a distributed run wraps the network.

Moved to their own modules (still importable from here): :func:`~monai_aeflow.data.isic.index_isic`,
:func:`~monai_aeflow.data.synthetic.generate_synthetic_images`,
:func:`~monai_aeflow.data.checks.check_data_files`, the TensorBoard and metrics plumbing of
:mod:`monai_aeflow.engines.metrics` (:func:`summary_writer`, :func:`loss_scalars`, :class:`MetricsWriter`,
:class:`BatchRecorder`, :func:`write_scores_summary`) and
:func:`~monai_aeflow.evaluation.volumes.evaluate_volumes`.

Example::

    lists = prepare_brain_mri_datalist("data/synthetic", generate_synthetic=True)  # generated on first use
    net = AnomalyMapNet(build_bundle_network("aeflow", backbone="resnet18", backbone_weights=None))
    net(torch.rand(1, 1, 64, 64)).shape  # (1, 1, 64, 64)
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_aeflow.data.checks import check_data_files
from monai_aeflow.data.indexers import index_dataset, index_image_folder_2d, make_record
from monai_aeflow.data.io import find_input_error
from monai_aeflow.data.isic import index_isic, is_isic_folder
from monai_aeflow.data.splits import SPLIT_NAMES, read_split_csv, split_by_subject
from monai_aeflow.data.synthetic import SYNTHETIC_IMAGES_INDEX, generate_cohort, generate_synthetic_images
from monai_aeflow.engines.distributed import rank as _rank  # noqa: F401  (the former private name)
from monai_aeflow.engines.distributed import rank0_first as _rank0_first
from monai_aeflow.engines.metrics import (
    BatchRecorder,
    MetricsWriter,
    loss_scalars,
    summary_writer,
    write_scores_summary,
)
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.volumes import evaluate_volumes
from monai_aeflow.models import build_network, get_model_spec, model_name_of

__all__ = [
    "SYNTHETIC_BRAIN_DEFAULTS",
    "SYNTHETIC_IMAGE_DEFAULTS",
    "AnomalyMapNet",
    "BatchRecorder",
    "MetricsWriter",
    "as_flag",
    "build_bundle_network",
    "check_bundle_settings",
    "check_data_files",
    "check_dataset_dir",
    "evaluate_volumes",
    "generate_synthetic_images",
    "index_isic",
    "initialize_flow",
    "install_error_hook",
    "is_synthetic_dataset",
    "loss_scalars",
    "masks_of",
    "prepare_brain_mri_datalist",
    "prepare_image_datalist",
    "summary_writer",
    "write_scores_summary",
]

logger = logging.getLogger("monai_aeflow.bundle")

SYNTHETIC_BRAIN_DEFAULTS: dict[str, Any] = {
    "n_healthy": 10,
    "n_lesion": 8,
    "shape": (64, 64, 40),
    "spacing": (3.0, 3.0, 3.0),
    "seed": 0,
    "contrast": "flair",
}
"""Synthetic brain cohort of the brain MRI bundle (seconds to generate, seconds per epoch on a CPU)."""

SYNTHETIC_IMAGE_DEFAULTS: dict[str, Any] = {
    "n_healthy": 10,
    "n_lesion": 8,
    "shape": (64, 64, 40),
    "spacing": (3.0, 3.0, 3.0),
    "seed": 0,
    "min_lesion_pixels": 12,
    "min_brain_fraction": 0.5,
}
"""Synthetic 2D image folder of the 2D bundle (axial slices of synthetic brains as PNG files)."""

_BRAIN_MARKER = "cohort.csv"  # written last by generate_cohort
_IMAGE_MARKER = SYNTHETIC_IMAGES_INDEX  # written last by generate_synthetic_images
_SYNTHETIC_IMAGE_SUBJECT = r"^(synth-[hl]\d+)_"
_BRAIN_KINDS = ("brats", "ixi", "atlas", "folder")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


# ----------------------------------------------------------------------------------------------------------
# dataset folders and synthetic data
# ----------------------------------------------------------------------------------------------------------


def as_flag(value: Any, key: str = "synthetic") -> bool:
    """A yes/no setting of a bundle: ``True`` / ``False``, or the strings ``"true"`` / ``"false"`` (any case).

    ``python -m monai.bundle run ... --synthetic false`` passes the string ``"false"`` (Fire reads only
    ``True`` / ``False`` as booleans), which Python would take as true; this reads it as the user meant.

    Args:
        value: the setting.
        key: its name, for the message.

    Returns:
        The boolean.

    Raises:
        AEFlowInputError: any other value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise AEFlowInputError(f"{key} must be True or False, got {value!r}")


def is_synthetic_dataset(dataset_dir: str | os.PathLike, synthetic: bool | str = False) -> bool:
    """Whether a bundle's ``dataset_dir`` is (or will become) a synthetic dataset generated by the bundle.

    Args:
        dataset_dir: the bundle's dataset folder.
        synthetic: the bundle's ``synthetic`` setting (generate a synthetic dataset in ``dataset_dir``).

    Returns:
        True when ``synthetic`` is set or the folder holds a synthetic dataset written by the bundle (its
        ``cohort.csv`` / ``synthetic_images.csv`` index).
    """
    if as_flag(synthetic):
        return True
    root = Path(dataset_dir).expanduser()
    return (root / _BRAIN_MARKER).is_file() or (root / _IMAGE_MARKER).is_file()


def _dataset_dir_error(root: Path, problem: str) -> AEFlowInputError:
    err = AEFlowInputError(f"dataset_dir {root} {problem}")
    err.path = str(root)
    return err


def check_dataset_dir(
    dataset_dir: str | os.PathLike,
    synthetic: bool | str = False,
    markers: Sequence[str] = (_BRAIN_MARKER, _IMAGE_MARKER),
) -> None:
    """Check a bundle's ``dataset_dir`` against its ``synthetic`` setting before anything is read or written.

    Without ``synthetic`` the folder must exist and hold files (a missing folder is never silently replaced
    by a synthetic cohort). With ``synthetic`` the folder may be missing or empty (the bundle generates the
    dataset there) or hold a synthetic dataset written by the bundle, but not other files.

    Args:
        dataset_dir: the dataset folder.
        synthetic: whether the bundle generates a synthetic dataset in ``dataset_dir``.
        markers: index files of a complete synthetic dataset.

    Raises:
        AEFlowInputError: one line naming the folder and the problem.
    """
    root = Path(dataset_dir).expanduser()
    generate = as_flag(synthetic)
    if not root.exists():
        if generate:
            return
        raise _dataset_dir_error(root, "does not exist (set synthetic to true to generate a synthetic dataset there)")
    if not root.is_dir():
        raise _dataset_dir_error(root, "is not a folder")
    if not any(root.iterdir()):
        if generate:
            return
        raise _dataset_dir_error(root, "is empty (set synthetic to true to generate a synthetic dataset there)")
    if generate and not any((root / m).is_file() for m in markers) and not _interrupted_generation(root):
        raise _dataset_dir_error(
            root, "holds files but no synthetic dataset of the bundle; set synthetic to false to use them"
        )


def _interrupted_generation(root: Path) -> bool:
    # an interrupted generation leaves subject files but no index (the index is written last)
    started = any(root.glob("synth-*")) or any(root.glob("*/synth-*"))
    return started and not any(root.glob("*.csv"))


def _needs_generation(root: Path, marker: str) -> bool:
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return True
    return not (root / marker).is_file() and _interrupted_generation(root)


def _ensure_dataset(
    root: Path, marker: str, dataset_kind: str, synthetic: bool | str, generate: Callable[[], Any], what: str
) -> None:
    """Check ``root``; with ``synthetic``, generate the dataset when it is not there yet (rank 0 only).

    In a distributed run every rank calls this, so that the decision and the wait are collective.
    """
    check_dataset_dir(root, synthetic, markers=(marker,))
    if not as_flag(synthetic):
        return
    if dataset_kind not in ("auto", "synthetic"):
        raise AEFlowInputError(f"a synthetic dataset cannot be of dataset_kind {dataset_kind!r}; use 'auto'")

    def _make() -> None:
        if _needs_generation(root, marker):
            logger.info("generating a synthetic %s in %s", what, root)
            generate()

    _rank0_first(_make)


# ----------------------------------------------------------------------------------------------------------
# checks: settings, one-line errors
# ----------------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"{value!r} (a string)"
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(float(value))


def _int_rule(minimum: int, what: str) -> Callable[[Any], str | None]:
    return lambda v: None if _is_int(v) and v >= minimum else what


def _number_rule(low: float, high: float, what: str, open_low: bool = False) -> Callable[[Any], str | None]:
    def _rule(v: Any) -> str | None:
        ok = _is_number(v) and (float(v) > low if open_low else float(v) >= low) and float(v) <= high
        return None if ok else what

    return _rule


def _bool_rule(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True or False (capitalised on the command line)"


def _flag_rule(v: Any) -> str | None:
    try:
        as_flag(v)
    except AEFlowInputError:
        return "must be True or False"
    return None


def _image_size_rule(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)
    return None if ok else "must be two positive integers, e.g. [256, 256]"


def _fractions_rule(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) and float(x) >= 0 for x in v)
    ok = ok and sum(float(x) for x in v) > 0
    return None if ok else "must be three non-negative numbers (train, val, test), e.g. [0.6, 0.2, 0.2]"


_SETTING_RULES: dict[str, Callable[[Any], str | None]] = {
    "max_epochs": _int_rule(1, "must be a positive integer"),
    "batch_size": _int_rule(1, "must be a positive integer"),
    "val_interval": _int_rule(1, "must be a positive integer"),
    "num_workers": _int_rule(0, "must be a non-negative integer"),
    "flow_init": _int_rule(0, "must be a non-negative integer"),
    "grid_images": _int_rule(0, "must be a non-negative integer"),
    "n_bootstrap": _int_rule(0, "must be a non-negative integer"),
    "seed": _int_rule(0, "must be a non-negative integer"),
    "learning_rate": _number_rule(0.0, math.inf, "must be a positive number", open_low=True),
    "weight_decay": _number_rule(0.0, math.inf, "must be a non-negative number"),
    "alpha": _number_rule(0.0, 1.0, "must be a number in [0, 1]"),
    "beta": _number_rule(0.0, 1.0, "must be a number in [0, 1]"),
    "image_size": _image_size_rule,
    "split_fractions": _fractions_rule,
    "amp": _bool_rule,
    "overwrite": _bool_rule,
    "grayscale": _bool_rule,
    "synthetic": _flag_rule,
}


def check_bundle_settings(**settings: Any) -> None:
    """Check a bundle's settings (after the command line's overrides) before anything is built or read.

    The bundles call this first in ``initialize``, so that ``--max_epochs abc`` or ``--batch_size '"16"'``
    stops the run at once, with a message naming the key, instead of failing after the data were prepared.
    With ``dataset_dir`` (and ``synthetic``) the dataset folder is checked too (:func:`check_dataset_dir`),
    and an optional ``healthy_dataset_dir`` must exist.

    Args:
        settings: any of ``max_epochs``, ``batch_size``, ``val_interval`` (positive integers),
            ``num_workers``, ``flow_init``, ``grid_images``, ``n_bootstrap``, ``seed`` (non-negative
            integers), ``learning_rate`` (positive), ``weight_decay`` (non-negative), ``alpha``, ``beta``
            (in [0, 1]), ``image_size`` (two positive integers), ``split_fractions`` (three non-negative
            numbers), ``amp``, ``overwrite``, ``grayscale`` (booleans), ``synthetic`` (``True`` / ``False`` /
            ``"true"`` / ``"false"``), ``dataset_dir``, ``healthy_dataset_dir`` (folders).

    Raises:
        AEFlowInputError: the first wrong setting, in one line that starts with its key.
        TypeError: a key this function does not know (a mistake in the configuration, not in the overrides).
    """
    unknown = sorted(set(settings) - set(_SETTING_RULES) - {"dataset_dir", "healthy_dataset_dir"})
    if unknown:
        raise TypeError(f"check_bundle_settings: unknown setting(s) {unknown}")
    for key, rule in _SETTING_RULES.items():
        if key in settings:
            problem = rule(settings[key])
            if problem:
                raise AEFlowInputError(f"{key} {problem}, got {_describe(settings[key])}")
    healthy = settings.get("healthy_dataset_dir")
    if healthy is not None and not Path(str(healthy)).expanduser().is_dir():
        raise AEFlowInputError(f"healthy_dataset_dir {healthy} is not an existing folder")
    if "dataset_dir" in settings:
        check_dataset_dir(str(settings["dataset_dir"]), settings.get("synthetic", False))


def install_error_hook() -> None:
    """Print a user-input error of a bundle run as one line and exit with code 2, without a traceback.

    ``python -m monai.bundle run`` is MONAI's entry point: an exception raised while the configuration is
    evaluated reaches Python's default handler wrapped in ``RuntimeError("Failed to instantiate component
    ...")`` chains (80 lines of traceback). The bundles call this first in ``initialize``; it chains a
    ``sys.excepthook`` that, when an :class:`AEFlowInputError` is behind the exception, prints
    ``Error: <message>`` to stderr, runs the ``atexit`` handlers and exits with code 2 (as ``aeflow-cli``
    does). Other exceptions keep their traceback, and so do input errors when the environment variable
    ``AEFLOW_TRACEBACK`` is set. Calling it again does nothing.
    """
    previous = sys.excepthook
    if getattr(previous, "_aeflow_bundle_hook", False):
        return

    def _hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        error = None if os.environ.get("AEFLOW_TRACEBACK") else find_input_error(exc)
        if error is None:
            previous(exc_type, exc, tb)
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        print(f"Error: {error}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()  # what a normal exit runs (logging shutdown, worker clean-up...)
        os._exit(2)

    _hook._aeflow_bundle_hook = True  # type: ignore[attr-defined]
    sys.excepthook = _hook


# ----------------------------------------------------------------------------------------------------------
# data lists
# ----------------------------------------------------------------------------------------------------------


def _synthetic_brain_records(root: Path) -> list[dict[str, Any]]:
    with open(root / _BRAIN_MARKER, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        make_record(
            root / row["image"],
            row["subject_id"],
            row.get("contrast") or "flair",
            mask=root / row["brain_mask"],
            label=root / row["label"],
            healthy=bool(int(row["healthy"])),
        )
        for row in rows
    ]


def _detect_brain_kind(root: Path, modality: str | None) -> tuple[str, list[dict[str, Any]]]:
    kwargs = {"modality": modality} if modality else {}
    errors = []
    for kind in _BRAIN_KINDS:
        try:
            options = kwargs if kind in ("brats", "ixi", "folder") else {}
            return kind, index_dataset(kind, root, **options)
        except AEFlowInputError as err:
            errors.append(f"{kind}: {err}")
    raise AEFlowInputError("no BraTS, IXI, ATLAS or generic volume folder recognised (" + "; ".join(errors) + ")")


def _index_brain(root: Path, kind: str, modality: str | None) -> tuple[str, list[dict[str, Any]]]:
    if kind == "synthetic" or (kind == "auto" and (root / _BRAIN_MARKER).is_file()):
        return "synthetic", _synthetic_brain_records(root)
    if kind == "auto":
        return _detect_brain_kind(root, modality)
    options = {"modality": modality} if modality and kind in ("brats", "ixi", "folder") else {}
    return kind, index_dataset(kind, root, **options)


def _split_synthetic(
    healthy: Sequence[Mapping[str, Any]], lesioned: Sequence[Mapping[str, Any]], fractions: Sequence[float], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Healthy subjects go to all three splits, lesioned ones to validation and test only (IXI -> BraTS style)."""
    _, f_val, f_test = _fractions(fractions)
    parts = []
    if healthy:
        parts.append(split_by_subject(healthy, fractions, seed))
    if lesioned:
        parts.append(split_by_subject(lesioned, (0.0, f_val, f_test), seed))
    return {name: [r for p in parts for r in p[name]] for name in SPLIT_NAMES}


def _fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise AEFlowInputError(f"split fractions must be three numbers (train, val, test), got {list(fractions)}")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def prepare_brain_mri_datalist(
    dataset_dir: str | os.PathLike,
    dataset_kind: str = "auto",
    modality: str | Sequence[str] | None = None,
    healthy_dataset_dir: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
    generate_synthetic: bool | str = False,
    check_files: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """The subject-level ``train`` / ``val`` / ``test`` volume lists of the brain MRI bundle.

    With ``generate_synthetic``, a synthetic cohort (:func:`generate_cohort`) is written to ``dataset_dir``
    when it does not exist (or is empty), on rank 0 only in a distributed run; without it a missing or empty
    ``dataset_dir`` is an error (:func:`check_dataset_dir`). A real dataset is split by subject and the training
    split keeps its lesioned subjects: the bundle trains on their lesion-free slices, as in the AE-FLOW BraTS
    protocol. In the synthetic cohort healthy subjects are split three ways and lesioned subjects go to
    validation and test only (training on healthy subjects, as in the IXI -> BraTS protocol). With
    ``healthy_dataset_dir`` (e.g. IXI) training uses all of that folder instead, and ``dataset_dir`` is split
    into validation and test only (the IXI -> BraTS protocol).

    Args:
        dataset_dir: BraTS / IXI / ATLAS / generic folder, or where the synthetic cohort goes.
        dataset_kind: ``"auto"`` (recognise the layout), ``"synthetic"``, ``"brats"``, ``"ixi"``, ``"atlas"``
            or ``"folder"``.
        modality: modality for the indexer (``"flair"``, ``"t1"``... BraTS; ``"T1"``, ``"T2"`` IXI);
            ``None``: the indexer's default.
        healthy_dataset_dir: optional folder of healthy subjects used for training only.
        split_file: a CSV of :func:`~monai_aeflow.data.splits.write_split_csv` that fixes the splits
            (relative paths are joined to ``dataset_dir``).
        fractions: subject fractions of train, val and test.
        seed: seed of the split.
        synthetic: settings of the synthetic cohort (see :data:`SYNTHETIC_BRAIN_DEFAULTS`).
        generate_synthetic: generate the synthetic cohort in ``dataset_dir`` when it is not there yet.
        check_files: check every listed image, brain mask and label first (:func:`check_data_files`).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of indexer records (``image``, ``mask``, ``label``,
        ``subject_id``, ``modality``...).

    Raises:
        AEFlowInputError: a missing or empty ``dataset_dir`` (without ``generate_synthetic``), an unrecognised
            folder, an unreadable or truncated file (the first one, by path), or a split without subjects.
    """
    root = Path(dataset_dir).expanduser()
    settings = {**SYNTHETIC_BRAIN_DEFAULTS, **dict(synthetic or {})}
    settings["shape"] = tuple(settings["shape"])
    _ensure_dataset(
        root,
        _BRAIN_MARKER,
        dataset_kind,
        generate_synthetic,
        lambda: generate_cohort(root, **settings),
        "brain MRI cohort",
    )
    if split_file is not None:
        splits = read_split_csv(split_file, root)
        splits = {name: splits.get(name, []) for name in SPLIT_NAMES}
        if check_files:
            check_data_files([r for name in SPLIT_NAMES for r in splits[name]])
        return splits
    kind, records = _index_brain(root, dataset_kind, modality)
    f_train, f_val, f_test = _fractions(fractions)
    if healthy_dataset_dir is not None:
        _, train = _index_brain(Path(healthy_dataset_dir).expanduser(), "auto", modality)
        held_out = split_by_subject(records, (0.0, f_val, f_test), seed)
        splits = {"train": train, "val": held_out["val"], "test": held_out["test"]}
    elif kind == "synthetic":
        healthy = [r for r in records if r.get("healthy")]
        splits = _split_synthetic(healthy, [r for r in records if not r.get("healthy")], fractions, seed)
    else:
        splits = split_by_subject(records, (f_train, f_val, f_test), seed)
    for name in SPLIT_NAMES:
        if not splits[name] and (name != "train" or healthy_dataset_dir is None):
            raise AEFlowInputError(f"the {name} split is empty ({len(records)} subjects); change the split fractions")
    if check_files:
        check_data_files([r for name in SPLIT_NAMES for r in splits[name]])
    logger.info("%s dataset: %s", kind, ", ".join(f"{k} {len(v)} subjects" for k, v in splits.items()))
    return splits


def _clean(record: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``None`` entries a 2D record cannot collate (the mask key stays: the preprocessing fills it)."""
    return {k: v for k, v in record.items() if v is not None or k == "mask"}


def _detect_image_kind(root: Path) -> str:
    if (root / _IMAGE_MARKER).is_file():
        return "synthetic"
    return "isic" if is_isic_folder(root) else "images2d"


def prepare_image_datalist(
    dataset_dir: str | os.PathLike,
    dataset_kind: str = "auto",
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    normal_classes: Sequence[str] | None = None,
    subject_pattern: str | None = None,
    modality: str = "image",
    split_file: str | os.PathLike | None = None,
    synthetic: Mapping[str, Any] | None = None,
    generate_synthetic: bool | str = False,
    check_files: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """The ``train`` / ``val`` / ``test`` image lists of the 2D bundle; ``train`` holds normal images only.

    With ``generate_synthetic``, a synthetic folder (:func:`generate_synthetic_images`) is written to
    ``dataset_dir`` when it does not exist (or is empty); without it a missing or empty ``dataset_dir`` is an
    error (:func:`check_dataset_dir`). Layouts: ``<split>/<CLASS>/*`` (chest X-ray, OCT: the release's own splits are
    kept; a release without ``val`` gets one from its training subjects), ``<class>/*`` (split by subject
    here, stratified by label; in the synthetic folder lesioned subjects go to validation and test only) and
    ISIC (:func:`index_isic`: a CSV with an image column and a ground truth).

    Args:
        dataset_dir: the image folder, or where the synthetic folder goes.
        dataset_kind: ``"auto"``, ``"synthetic"``, ``"images2d"`` or ``"isic"``.
        fractions: subject fractions of train, val and test (when the release has no splits).
        seed: seed of the split.
        normal_classes: class names of normal images (default: the indexer's ``normal``, ``NV``...).
        subject_pattern: regular expression whose first group in a file name is the subject (patient) id.
        modality: modality name stored in the records.
        split_file: a CSV of :func:`~monai_aeflow.data.splits.write_split_csv` that fixes the splits.
        synthetic: settings of the synthetic folder (see :data:`SYNTHETIC_IMAGE_DEFAULTS`).
        generate_synthetic: generate the synthetic folder in ``dataset_dir`` when it is not there yet.
        check_files: check every listed image first (:func:`check_data_files`).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of records with ``image``, an ``int`` ``label``,
        ``mask`` (None), ``subject_id``...

    Raises:
        AEFlowInputError: a missing or empty ``dataset_dir`` (without ``generate_synthetic``), an unrecognised
            folder, an unreadable or truncated image (the first one, by path), or a split without images.
    """
    root = Path(dataset_dir).expanduser()
    settings = {**SYNTHETIC_IMAGE_DEFAULTS, **dict(synthetic or {})}
    _ensure_dataset(
        root,
        _IMAGE_MARKER,
        dataset_kind,
        generate_synthetic,
        lambda: generate_synthetic_images(root, **settings),
        "2D image folder",
    )
    if split_file is not None:
        splits = read_split_csv(split_file, root)
    else:
        kind = _detect_image_kind(root) if dataset_kind == "auto" else dataset_kind
        records: list[dict[str, Any]] = []
        if kind == "isic":
            try:
                records = index_isic(root, **({"normal_classes": normal_classes} if normal_classes else {}))
            except AEFlowInputError:
                if dataset_kind == "isic":
                    raise
                kind = "images2d"  # a CSV with an image column but no ground truth: a class-folder release
        if kind != "isic":
            options: dict[str, Any] = {"modality": "synthetic" if kind == "synthetic" else modality}
            if normal_classes:
                options["normal_classes"] = normal_classes
            pattern = _SYNTHETIC_IMAGE_SUBJECT if kind == "synthetic" and subject_pattern is None else subject_pattern
            records = index_image_folder_2d(root, subject_pattern=pattern, **options)
        f_train, f_val, f_test = _fractions(fractions)
        given = {_SPLIT_ALIASES.get(str(r.get("split") or "").lower()) for r in records} - {None}
        if given:
            splits = {
                name: [r for r in records if _SPLIT_ALIASES.get(str(r.get("split")).lower()) == name]
                for name in SPLIT_NAMES
            }
            if not splits["val"]:
                share = f_val / max(f_train + f_val, 1e-12)
                part = split_by_subject(splits["train"], (1.0 - share, share, 0.0), seed, stratify=True)
                splits["train"], splits["val"] = part["train"], part["val"]
        elif kind == "synthetic":
            lesioned = {r["subject_id"] for r in records if int(r["label"]) > 0}
            healthy = [r for r in records if r["subject_id"] not in lesioned]
            splits = _split_synthetic(healthy, [r for r in records if r["subject_id"] in lesioned], fractions, seed)
        else:
            splits = split_by_subject(records, (f_train, f_val, f_test), seed, stratify=True)
    splits = {name: [_clean(r) for r in splits.get(name, [])] for name in SPLIT_NAMES}
    splits["train"] = [r for r in splits["train"] if int(r.get("label", 0) or 0) == 0]
    for name in SPLIT_NAMES:
        if not splits[name]:
            raise AEFlowInputError(f"the {name} split holds no image; change the split fractions", path=root)
    if check_files:
        check_data_files([r for name in SPLIT_NAMES for r in splits[name]])
    logger.info("2D dataset: %s", ", ".join(f"{k} {len(v)} images" for k, v in splits.items()))
    return splits


def masks_of(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Brain mask of each record's image, keyed by the image path (for ``score_paths(masks=...)``)."""
    return {str(r["image"]): str(r["mask"]) for r in records if r.get("mask") and isinstance(r["image"], str)}


# ----------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------


def build_bundle_network(name: str | None = None, **hparams: Any) -> nn.Module:
    """Build a registered model, leaving out the settings its class does not take.

    The bundles list AE-FLOW's settings (``backbone``, ``flow_blocks``...); with ``model_name`` set to a
    baseline (``"ae"``, ``"vae"``...) the ones that baseline does not accept are dropped (and logged), so
    that selecting a baseline is a single override.

    Args:
        name: registry key (default AE-FLOW).
        hparams: keyword arguments of the network class.

    Returns:
        The network (see :func:`monai_aeflow.models.build_network`).
    """
    spec = get_model_spec(name)
    params = inspect.signature(spec.network_cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        dropped = sorted(k for k in hparams if k not in params)
        if dropped:
            logger.info("%s takes no %s; left out", spec.name, ", ".join(dropped))
        hparams = {k: v for k, v in hparams.items() if k in params}
    return build_network(spec.name, **hparams)


class AnomalyMapNet(nn.Module):
    """A registered model seen as ``image -> anomaly map``: one tensor in, one tensor out.

    MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``, ``SliceInferer``) call a network with one
    tensor and expect one tensor; this wrapper returns the model's pixel anomaly map (the residual
    ``|x - x'|`` by default), computed by the model's own scorer exactly as in validation and inference.
    Its state dict is the wrapped network's, with the same keys as the ``network`` entry of a model file, so
    ``ckpt_export --key_in_ckpt network`` loads ``models/model.pt`` into it.

    Args:
        network: a network of :mod:`monai_aeflow.models` (AE-FLOW or a baseline).
        map_kind: ``"residual"``, ``"flow"`` or ``"ssim"`` (models without a flow: ``residual``, ``ssim``).
        beta: flow weight of the image score (does not change the map).
        model_name: registry key (default: looked up from the network's class).

    Example::

        net = AnomalyMapNet(build_bundle_network(backbone="resnet18", backbone_weights=None)).eval()
        net(torch.rand(2, 1, 64, 64)).shape  # (2, 1, 64, 64)
    """

    def __init__(
        self, network: nn.Module, map_kind: str = "residual", beta: float = 0.9, model_name: str | None = None
    ):
        super().__init__()
        self.network = network
        self.map_kind = map_kind
        self.beta = float(beta)
        self.model_name = model_name or model_name_of(network)
        get_model_spec(self.model_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = get_model_spec(self.model_name)
        return spec.score(self.network, x, beta=self.beta, map_kind=self.map_kind)["anomaly_map"]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def initialize_flow(network: nn.Module, dataset: Sequence[Mapping[str, Any]], n_images: int = 256) -> nn.Module:
    """Initialise the flow's ActNorm layer from training images spread evenly over ``dataset``.

    The trainer does this itself when training starts; a distributed run does it before the network is
    wrapped in ``DistributedDataParallel``, so that every rank starts from the same weights.

    Args:
        network: the model (AE-FLOW; a no-op for models without a data-initialised flow).
        dataset: the training dataset (items with ``image``).
        n_images: images used.

    Returns:
        ``network``.
    """
    flow = getattr(network, "flow", None)
    if flow is None or not getattr(flow, "needs_initialization", False) or len(dataset) == 0:
        return network
    idx = np.unique(np.linspace(0, len(dataset) - 1, min(int(n_images), len(dataset))).round().astype(int))
    device = next(network.parameters()).device
    x = torch.stack([torch.as_tensor(dataset[int(i)]["image"]).as_subclass(torch.Tensor).float() for i in idx])
    network.initialize_flow(x.to(device))
    return network
