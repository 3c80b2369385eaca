"""Glue the MONAI bundles in ``bundles/`` need beyond the package's classes: data lists, an inference wrapper, helpers.

The bundle configurations build the network, the transforms, the engines, the handlers, the scorer and the
evaluation from the package through ``_target_`` references; this module holds the glue between them:

- :func:`prepare_brain_mri_datalist` / :func:`prepare_image_datalist`: generate a synthetic cohort when asked
  to (``generate_synthetic``) and ``dataset_dir`` does not exist yet, otherwise recognise the dataset (BraTS,
  IXI, ATLAS, a generic folder; chest X-ray / OCT class folders, ISIC), check its files
  (:func:`check_data_files`) and return the subject-level ``train`` / ``val`` / ``test`` lists.
- :func:`check_bundle_settings`, :func:`check_dataset_dir`, :func:`install_error_hook`: the first steps of a
  bundle's ``initialize``: wrong settings, a missing ``dataset_dir`` and unreadable files stop a
  ``python -m monai.bundle run`` with one line (``Error: ...``) and exit code 2.
- :class:`AnomalyMapNet`: one tensor in, the anomaly map out, for ``verify_net_in_out`` and ``ckpt_export``.
- :func:`summary_writer`, :func:`loss_scalars`, :class:`MetricsWriter`, :class:`BatchRecorder`: TensorBoard
  and metrics plumbing (file writers only on rank 0 of a distributed run).
- :func:`write_scores_summary` and :func:`evaluate_volumes`: the inference and evaluation steps.

Example::

    lists = prepare_brain_mri_datalist("data/synthetic", generate_synthetic=True)  # generated on first use
    net = AnomalyMapNet(build_bundle_network("aeflow", backbone="resnet18", backbone_weights=None))
    net(torch.rand(1, 1, 64, 64)).shape  # (1, 1, 64, 64)
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import gzip
import inspect
import json
import logging
import math
import os
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from monai_aeflow.data.indexers import index_dataset, index_image_folder_2d, make_record
from monai_aeflow.data.io import IMAGE_2D_SUFFIXES, check_nifti_header, file_kind, find_input_error
from monai_aeflow.data.splits import SPLIT_NAMES, read_split_csv, split_by_subject
from monai_aeflow.data.synthetic import generate_cohort, make_slices
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import atomic_write, atomic_write_json, atomic_write_text
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
_IMAGE_MARKER = "synthetic_images.csv"  # written last by generate_synthetic_images
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
# synthetic data and distributed runs
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


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rank0_first(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on rank 0 while the other ranks of a distributed run wait (a plain call otherwise)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        fn()
        return
    try:
        if dist.get_rank() == 0:
            fn()
    finally:
        dist.barrier()


def generate_synthetic_images(
    out_dir: str | os.PathLike,
    n_healthy: int = 8,
    n_lesion: int = 6,
    shape: Sequence[int] = (64, 64, 40),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    seed: int = 0,
    min_lesion_pixels: int = 12,
    min_brain_fraction: float = 0.5,
) -> list[dict[str, Any]]:
    """Write a 2D image folder (``normal/`` and ``abnormal/`` PNG files) of synthetic axial brain slices.

    Normal images are the slices of healthy synthetic subjects; abnormal images are the slices of lesioned
    subjects that hold at least ``min_lesion_pixels`` lesion pixels. File names start with the subject id
    (``synth-h000_z012.png``, ``synth-l003_z020.png``) so that splits keep the slices of a subject together.
    ``synthetic_images.csv`` (file, subject, label) is written last.

    Args:
        out_dir: the folder to create.
        n_healthy: healthy subjects.
        n_lesion: lesioned subjects.
        shape: volume grid of the synthetic subjects (the image size is ``shape[:2]``).
        spacing: voxel size in mm.
        seed: seed of the cohort.
        min_lesion_pixels: lesion pixels an abnormal slice must hold.
        min_brain_fraction: keep slices whose brain area is at least this fraction of the largest.

    Returns:
        One row per image: ``{"file", "subject_id", "label"}``.
    """
    from PIL import Image

    root = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for lesion, count, prefix, folder in ((False, n_healthy, "h", "normal"), (True, n_lesion, "l", "abnormal")):
        if count <= 0:
            continue
        (root / folder).mkdir(parents=True, exist_ok=True)
        slices = make_slices(
            int(count),
            lesion=lesion,
            seed=seed,
            shape=tuple(shape),
            spacing=tuple(spacing),
            min_brain_fraction=min_brain_fraction,
        )
        lesion_pixels = slices["label"].reshape(slices["label"].shape[0], -1).sum(1)
        for i in range(slices["image"].shape[0]):
            if lesion and lesion_pixels[i] < min_lesion_pixels:
                continue
            subject = f"synth-{prefix}{int(slices['subject_index'][i]):03d}"
            name = f"{subject}_z{int(slices['slice_index'][i]):03d}.png"
            pixels = np.clip(np.rint(slices["image"][i, 0] * 255.0), 0, 255).astype(np.uint8)
            atomic_write(root / folder / name, lambda tmp, p=pixels: Image.fromarray(p).save(tmp, format="PNG"))
            rows.append({"file": f"{folder}/{name}", "subject_id": subject, "label": int(lesion)})

    def _index(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "subject_id", "label"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(root / _IMAGE_MARKER, _index)
    return rows


# ----------------------------------------------------------------------------------------------------------
# checks: settings, data files, one-line errors
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


def _gzip_size_ok(path: Path, expected: int) -> str | None:
    """Compare the gzip trailer (uncompressed size mod 2**32) with ``expected``; decompress only on a mismatch."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() >= 4:
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return None
    # several gzip members (bgzip, pigz -i) have the last member's size in the trailer: count the bytes
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        return f"is truncated or corrupt ({type(exc).__name__}: {exc})"
    if size < expected:
        return f"is truncated: {size} bytes of header and voxels, the header needs {expected}"
    return None


def _check_nifti_file(path: Path) -> None:
    check_nifti_header(path)
    image = nib.load(str(path))
    shape = image.header.get_data_shape()
    expected = int(image.dataobj.offset) + int(np.prod(shape, dtype=np.int64)) * image.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        problem = _gzip_size_ok(path, expected)
    else:
        size = path.stat().st_size
        problem = f"is truncated: {size} bytes, the header needs {expected}" if size < expected else None
    if problem:
        raise AEFlowInputError(problem, path=path)


def _check_image_file(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            name = path.name.lower()
            if name.endswith(".png"):
                image.verify()  # chunk CRCs, without decoding
                return
            if name.endswith((".jpg", ".jpeg")):
                with open(path, "rb") as handle:
                    handle.seek(-2, os.SEEK_END)
                    if handle.read(2) == b"\xff\xd9":  # the end-of-image marker: not truncated
                        return
            image.load()
    except Exception as exc:  # Pillow raises several exception types for broken files
        raise AEFlowInputError(f"not a readable image ({type(exc).__name__}: {exc})", path=path) from exc


def check_data_files(records: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("image", "mask", "label")) -> None:
    """Check the files of a data list cheaply before a dataset loads them, in path order.

    NIfTI files: the header must read and the file must hold the voxels the header announces (the size of an
    uncompressed file; the gzip trailer of a compressed one, decompressing the file only when the trailer
    disagrees). PNG files: chunk checksums; JPEG files: the end-of-image marker (otherwise a full decode);
    other 2D images: a full decode. DICOM and ITK files: they must exist.

    Args:
        records: data-list records.
        keys: the record keys that may hold file paths (other values, e.g. integer labels, are skipped).

    Raises:
        AEFlowInputError: the first unreadable, truncated or missing file, named in one line.
    """
    paths = sorted({str(r[k]) for r in records for k in keys if isinstance(r.get(k), (str, os.PathLike))})
    for name in paths:
        path = Path(name)
        kind = file_kind(path)
        if kind == "nifti":
            _check_nifti_file(path)
        elif kind == "image2d":
            _check_image_file(path)


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


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


_ISIC_IMAGE_COLUMNS = ("image", "image_id", "image_name", "isic_id")
_ISIC_SUBJECT_COLUMNS = ("lesion_id", "patient_id")


def _isic_tables(root: Path) -> list[tuple[Path, list[str], str]]:
    tables = []
    for path in sorted(root.rglob("*.csv")):
        try:
            columns, _ = _csv_rows(path)
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        lowered = [c.lower() for c in columns]
        image_col = next((columns[lowered.index(c)] for c in _ISIC_IMAGE_COLUMNS if c in lowered), None)
        if image_col is not None:
            tables.append((path, columns, image_col))
    return tables


def index_isic(
    root: str | os.PathLike,
    normal_classes: Sequence[str] = ("NV", "nevus", "benign"),
    modality: str = "dermoscopy",
) -> list[dict[str, Any]]:
    """Index an ISIC skin-lesion release: image files plus a ground-truth CSV.

    Recognised ground truths: one-hot class columns (ISIC 2018 / 2019 Task 3: ``image, MEL, NV, ...``; a
    row is normal when a column named in ``normal_classes`` is 1; ISIC 2017: ``image_id, melanoma,
    seborrheic_keratosis``, normal when all are 0), or a ``target`` / ``benign_malignant`` column (ISIC
    2020). A ``lesion_id`` or ``patient_id`` column in any CSV of the folder (e.g. ``HAM10000_metadata.csv``)
    gives the subject, so that images of one lesion stay in one split.

    Args:
        root: the release folder (images anywhere below it).
        normal_classes: class columns (case-insensitive) of normal images.
        modality: modality name stored in each record.

    Returns:
        One record per labelled image with an ``int`` ``"label"`` (0 normal, 1 abnormal) and ``"class_name"``.

    Raises:
        AEFlowInputError: no ground-truth CSV or no listed image found.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise AEFlowInputError("dataset folder not found", path=root_path)
    images = {p.stem: p for p in root_path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_2D_SUFFIXES)}
    subjects: dict[str, str] = {}
    truth: dict[str, tuple[int, str]] = {}
    normal = {c.lower() for c in normal_classes}
    for path, columns, image_col in _isic_tables(root_path):
        _, rows = _csv_rows(path)
        lowered = {c.lower(): c for c in columns}
        subject_col = next((lowered[c] for c in _ISIC_SUBJECT_COLUMNS if c in lowered), None)
        if subject_col is not None:
            subjects.update({r[image_col]: r[subject_col] for r in rows if r.get(subject_col)})
        if "target" in lowered or "benign_malignant" in lowered:
            for r in rows:
                if "target" in lowered and r.get(lowered["target"], "") != "":
                    label = int(float(r[lowered["target"]]))
                else:
                    label = int(r[lowered["benign_malignant"]].lower() == "malignant")
                truth[r[image_col]] = (label, "malignant" if label else "benign")
            continue
        class_cols = [c for c in columns if c not in (image_col, subject_col)]

        def _is_one_hot(rows: list[dict[str, str]], cols: list[str]) -> bool:
            try:
                return all(float(r[c]) in (0.0, 1.0) for r in rows[:50] for c in cols)
            except (TypeError, ValueError):
                return False

        if not class_cols or not rows or not _is_one_hot(rows, class_cols):
            continue
        normal_cols = [c for c in class_cols if c.lower() in normal]
        for r in rows:
            hot = [c for c in class_cols if float(r[c]) == 1.0]
            label = int(not any(c in normal_cols for c in hot)) if normal_cols else int(bool(hot))
            truth[r[image_col]] = (label, hot[0] if hot else "normal")
    if not truth:
        raise AEFlowInputError("no ISIC ground-truth CSV recognised (image column plus class columns)", path=root_path)
    records, missing = [], 0
    for image_id in sorted(truth):
        path = images.get(image_id) or images.get(Path(image_id).stem)
        if path is None:
            missing += 1
            continue
        label, class_name = truth[image_id]
        subject = subjects.get(image_id, image_id)
        records.append(make_record(path, subject, modality, mask=None, label=label, class_name=class_name))
    if missing:
        logger.warning("%d images listed in the ISIC ground truth were not found under %s", missing, root_path)
    if not records:
        raise AEFlowInputError("none of the images listed in the ISIC ground truth was found", path=root_path)
    return records


def _detect_image_kind(root: Path) -> str:
    if (root / _IMAGE_MARKER).is_file():
        return "synthetic"
    return "isic" if _isic_tables(root) else "images2d"


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


# ----------------------------------------------------------------------------------------------------------
# TensorBoard and metrics
# ----------------------------------------------------------------------------------------------------------


class _NullWriter:
    """Stands in for a ``SummaryWriter`` on the ranks that write nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def summary_writer(log_dir: str | os.PathLike) -> Any:
    """A TensorBoard ``SummaryWriter`` on rank 0 (or outside distributed runs), a no-op writer elsewhere.

    Args:
        log_dir: the event-file folder.

    Returns:
        The writer shared by the bundle's TensorBoard handlers.
    """
    if _rank() != 0:
        return _NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def loss_scalars(output: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard scalars of a training iteration: ``train/loss`` and every other ``loss_*`` term.

    Args:
        output: ``engine.state.output`` of :class:`~monai_aeflow.engines.AEFlowTrainer`.

    Returns:
        ``{"train/loss": ..., "train/loss_flow": ..., ...}``.
    """
    return {f"train/{k}": float(v) for k, v in output.items() if str(k).startswith("loss") and v is not None}


def masks_of(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Brain mask of each record's image, keyed by the image path (for ``score_paths(masks=...)``)."""
    return {str(r["image"]): str(r["mask"]) for r in records if r.get("mask") and isinstance(r["image"], str)}


def _item_names(batch: Mapping[str, Any], n: int) -> list[str]:
    if "slice_index" in batch and "subject_id" in batch:
        return [f"{s}:{int(z)}" for s, z in zip(batch["subject_id"], batch["slice_index"], strict=True)]
    meta = getattr(batch.get("image"), "meta", None) or {}
    files = meta.get("filename_or_obj")
    if isinstance(files, (list, tuple)) and len(files) == n:
        return [Path(str(f)).name for f in files]
    return [str(s) for s in batch.get("subject_id", [""] * n)]


class MetricsWriter:
    """Evaluator handler that writes the run's metrics to JSON and the per-image scores to CSV.

    At the end of an evaluation it writes ``engine.state.metrics`` (e.g. MONAI's ``ROCAUC``, the pixel
    AUROC of :class:`~monai_aeflow.engines.ValidationStatsHandler`) together with the AE-FLOW paper's
    image-level metrics of the collected scores (AUROC, AUPRC, and F1, ACC, SEN, SPE at the best-F1
    threshold, with bootstrap intervals resampling subjects: :func:`monai_aeflow.evaluation.classification_metrics`).

    Args:
        path: the JSON file (written atomically; an existing file is replaced).
        scores_csv: optional CSV of ``name, subject_id, label, score`` per image.
        n_bootstrap: bootstrap resamples of the intervals.
        level: name of the unit scored (``"slice"``, ``"image"``), used as the JSON key.
        extra: more JSON-ready entries to store (e.g. the model file).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        scores_csv: str | os.PathLike | None = None,
        n_bootstrap: int = 1000,
        level: str = "image",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.scores_csv = None if scores_csv is None else Path(scores_csv)
        self.n_bootstrap = int(n_bootstrap)
        self.level = level
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.subjects: list[str] = []
        self.names: list[str] = []

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        pred = out["pred"].detach().float().cpu().numpy().ravel()
        batch = engine.state.batch if isinstance(engine.state.batch, Mapping) else {}
        self.scores.append(pred)
        self.labels.append(out["label"].detach().cpu().numpy().ravel())
        self.subjects += [str(s) for s in batch.get("subject_id", [""] * pred.size)]
        self.names += _item_names(batch, pred.size)

    def _write(self, engine: Engine) -> None:
        from monai_aeflow.evaluation import classification_metrics

        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0)
        groups = np.asarray(self.subjects) if len(self.subjects) == scores.size and scores.size else None
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        summary = {
            "metrics": metrics,
            self.level: classification_metrics(scores, labels > 0, groups=groups, n_bootstrap=self.n_bootstrap),
            f"n_{self.level}s": int(scores.size),
            f"n_abnormal_{self.level}s": int((labels > 0).sum()),
            **self.extra,
        }
        atomic_write_json(self.path, summary)
        if self.scores_csv is not None:
            lines = ["name,subject_id,label,score"]
            lines += [
                f"{n},{s},{int(y)},{float(v):.8g}"
                for n, s, y, v in zip(self.names, self.subjects, labels, scores, strict=False)
            ]
            atomic_write_text(self.scores_csv, "\n".join(lines) + "\n")
        engine.state.summary = summary


class BatchRecorder:
    """Trainer handler that records chosen keys of every batch a rank trains on, one JSON file per rank.

    Useful to audit what a (distributed) run saw: with ``keys=("volume_index", "slice_index")`` the slices of
    each rank's shard.

    Args:
        path: file name; ``{rank}`` is replaced by the process rank (e.g. ``seen_rank{rank}.json``).
        keys: batch keys to record (the values are turned into lists).
    """

    def __init__(self, path: str | os.PathLike, keys: Sequence[str] = ("volume_index", "slice_index")) -> None:
        self.path = str(path)
        self.keys = tuple(keys)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.seen: dict[str, list[Any]] = {k: [] for k in self.keys}
        self.epochs: list[int] = []

    def _update(self, engine: Engine) -> None:
        batch = engine.state.batch
        for key in self.keys:
            value = batch[key]
            self.seen[key] += value.tolist() if isinstance(value, torch.Tensor) else list(value)
        self.epochs += [int(engine.state.epoch)] * len(batch[self.keys[0]])

    def _write(self, engine: Engine) -> None:
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        atomic_write_json(
            self.path.format(rank=_rank()), {"rank": _rank(), "world_size": world, "epoch": self.epochs, **self.seen}
        )


# ----------------------------------------------------------------------------------------------------------
# inference and evaluation steps
# ----------------------------------------------------------------------------------------------------------


def write_scores_summary(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, strict: bool = True) -> Path:
    """Write the rows of :func:`monai_aeflow.inference.score_paths` to one JSON file.

    Args:
        rows: one dict per input (``input``, ``name``, ``status``, ``volume_score``, ``outputs``...).
        path: the JSON file.
        strict: raise when an input failed (after writing the file).

    Returns:
        The file written.

    Raises:
        RuntimeError: ``strict`` and at least one input failed (the message lists them).
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    written = atomic_write_json(path, {"n_inputs": len(rows), "n_ok": len(ok), "inputs": list(rows)})
    failed = [f"{r.get('input')}: {r.get('error')}" for r in rows if r.get("status") != "ok"]
    if strict and failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} inputs failed: " + "; ".join(failed[:5]))
    return written


def _single_image(record: Mapping[str, Any]) -> str:
    image = record["image"]
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise AEFlowInputError(
                "multi-channel records cannot be scored from files; stack the channels into one file",
                path=image[0],
            )
        image = image[0]
    return str(image)


def _zero_label(map_path: Path, out: Path) -> Path:
    ref = nib.load(str(map_path))
    img = nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine)
    atomic_write(out, lambda tmp: nib.save(img, tmp))
    return out


def evaluate_volumes(
    model: str | os.PathLike,
    val_records: Sequence[Mapping[str, Any]],
    test_records: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    device: str | torch.device = "auto",
    batch_size: int = 32,
    evaluation: Mapping[str, Any] | None = None,
    metrics_file: str | os.PathLike | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """The brain MRI protocol on whole volumes: score validation and test volumes, then evaluate the maps.

    Every volume is scored on its own grid with :class:`monai_aeflow.inference.AnomalyScorer`; the maps and
    brain masks go to ``<output_dir>/maps/<split>/``. :func:`monai_aeflow.evaluation.evaluate_maps` then
    chooses the threshold on the validation split only and reports pixel Dice (per volume and pooled), pixel
    AUROC / AUPRC over brain voxels, slice- and volume-level metrics and the oracle Dice;
    :func:`~monai_aeflow.evaluation.write_report` writes them to ``<output_dir>/report/``. Healthy volumes
    without a label file get an all-zero label.

    Args:
        model: a model file or bundle folder.
        val_records: labelled validation volumes (``image``, ``label``, ``mask``).
        test_records: test volumes.
        output_dir: where maps and the report go.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        batch_size: slices per forward pass.
        evaluation: settings of :class:`~monai_aeflow.evaluation.EvaluationConfig` (``postprocess`` as a dict).
        metrics_file: a JSON file to add the protocol's metrics to (key ``"volume_protocol"``).
        plots: write the report's PNG plots.

    Returns:
        The JSON part of the result (:func:`~monai_aeflow.evaluation.result_to_json`).
    """
    from monai_aeflow.evaluation import EvaluationConfig, PostprocessConfig, evaluate_maps, result_to_json, write_report
    from monai_aeflow.inference import AnomalyScorer, write_outputs

    settings = dict(evaluation or {})
    if isinstance(settings.get("postprocess"), Mapping):
        settings["postprocess"] = PostprocessConfig(**settings["postprocess"])
    config = EvaluationConfig(**settings)
    scorer = AnomalyScorer(model, device=device, batch_size=batch_size)
    out = Path(output_dir)
    cases: dict[str, list[dict[str, Any]]] = {}
    for split, records in (("val", val_records), ("test", test_records)):
        folder = out / "maps" / split
        cases[split] = []
        for record in records:
            result = scorer.score(_single_image(record), record.get("mask"))
            written = write_outputs(result, folder, overwrite=True, preview=False)
            mask_path = folder / f"{result.name}_brainmask.nii.gz"
            mask_img = nib.Nifti1Image(result.brain_mask.astype(np.uint8), result.affine)
            atomic_write(mask_path, lambda tmp, img=mask_img: nib.save(img, tmp))
            label = record.get("label")
            if label is None:
                label = _zero_label(written["anomaly"], folder / f"{result.name}_zerolabel.nii.gz")
            cases[split].append({"name": result.name, "map": written["anomaly"], "label": label, "mask": mask_path})
    result = evaluate_maps(cases["val"], cases["test"], config)
    write_report(result, out / "report", plots=plots)
    summary = result_to_json(result)
    if metrics_file is not None:
        path = Path(metrics_file)
        current = json.loads(path.read_text()) if path.is_file() else {}
        current["volume_protocol"] = {"metrics": summary["metrics"], "protocol": summary.get("protocol")}
        atomic_write_json(path, current)
    return summary
