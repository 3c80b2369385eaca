"""Reading anomaly maps, labels and brain masks for evaluation, and writing results atomically.

Folders of NIfTI files are matched by file name (``case01.nii.gz`` in the map, label and mask folders;
``.nii`` and ``.nii.gz`` are interchangeable). Arrays are brought to RAS axis order with the label's
orientation, so that the last axis is axial, after checking that map, label and mask share the same voxel
grid. Any problem with the user's files raises :class:`~monai_aeflow.errors.AEFlowInputError`. Labels are
binarised as ``label > 0`` (BraTS' 0/1/2/4 become lesion / no lesion); a label with other values than 0 and 1
gives a :class:`LabelValuesWarning` naming the file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import atomic_write, atomic_write_json, atomic_write_text, to_jsonable

__all__ = [
    "CASE_KEYS",
    "LabelValuesWarning",
    "check_label_values",
    "case_name",
    "find_cases",
    "load_array",
    "load_case",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "to_jsonable",
]

CASE_KEYS: tuple[str, ...] = ("map", "label", "mask", "image", "reconstruction")
"""Keys of a case mapping: an anomaly ``map`` (or ``image`` and ``reconstruction``), ``label``, ``mask``."""

_SUFFIXES = (".nii.gz", ".nii")


class LabelValuesWarning(UserWarning):
    """A lesion label holds values other than 0 and 1; it is binarised as ``label > 0``."""


def check_label_values(label: np.ndarray, source: str) -> None:
    """Warn (:class:`LabelValuesWarning`) when a label has values other than 0 and 1.

    Multi-class labels (BraTS: 0 background, 1 necrosis, 2 oedema, 4 enhancing tumour) are evaluated as
    ``label > 0``; the warning says so, naming the file, so that a wrong label file does not pass unnoticed.

    Args:
        label: the label array as stored.
        source: the file (or case) named in the message.
    """
    if label.dtype == bool:
        return
    other = (label != 0) & (label != 1)
    if not other.any():
        return
    values = np.unique(label)
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
    warnings.warn(
        f"{source}: label has values other than 0 and 1 ({shown}); evaluated as label > 0",
        LabelValuesWarning,
        stacklevel=3,
    )


def case_name(path: str | os.PathLike) -> str:
    """The file name without its ``.nii`` / ``.nii.gz`` ending (the key used to match files)."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


SCORE_MAP_SUFFIX = "_anomaly"
"""Name ending of the maps written by ``aeflow-cli score`` (``case01_anomaly.nii.gz`` matches ``case01``)."""


def _score_output_maps(files: dict[str, Path]) -> dict[str, Path]:
    """In a folder written by ``aeflow-cli score``, keep the ``*_anomaly`` maps keyed by the input's name."""
    maps = {k[: -len(SCORE_MAP_SUFFIX)]: p for k, p in files.items() if k.endswith(SCORE_MAP_SUFFIX)}
    return maps or files


def _nifti_files(folder: str | os.PathLike, what: str) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.exists():
        raise AEFlowInputError(f"{what} folder not found", path=folder)
    if not folder.is_dir():
        raise AEFlowInputError(f"{what} folder expected, found a file", path=folder)
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.lower().endswith(_SUFFIXES) and not p.name.startswith("."):
            key = case_name(p)
            if key in files:
                raise AEFlowInputError(f"two files for case {key!r} ({files[key].name}, {p.name})", path=folder)
            files[key] = p
    return files


def find_cases(
    maps_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    reconstructions_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Match anomaly maps with their labels (and brain masks, images, reconstructions) by file name.

    Args:
        maps_dir: folder of anomaly-map NIfTIs; an ``aeflow-cli score`` output folder works as it is (its
            ``NAME_anomaly.nii.gz`` maps match ``NAME.nii.gz`` labels; its lesion masks are ignored).
        labels_dir: folder of lesion labels with the same file names (all-zero labels for healthy volumes).
        masks_dir: folder of brain masks with the same file names; ``None``: the whole volume is brain.
        images_dir: optional folder of the input images (only used for figures).
        reconstructions_dir: optional folder of reconstructions (only used for figures).

    Returns:
        One case dict per map, sorted by name: ``{"name", "map", "label", "mask"?, "image"?, ...}`` of paths.

    Raises:
        AEFlowInputError: a missing or empty folder, or files that do not match one to one.
    """
    maps = _score_output_maps(_nifti_files(maps_dir, "anomaly-map"))
    if not maps:
        raise AEFlowInputError("no NIfTI files (.nii, .nii.gz) in the anomaly-map folder", path=maps_dir)
    required = {"label": (labels_dir, "label")}
    if masks_dir is not None:
        required["mask"] = (masks_dir, "brain-mask")
    optional = {"image": images_dir, "reconstruction": reconstructions_dir}
    found: dict[str, dict[str, Path]] = {}
    for key, (folder, what) in required.items():
        files = _nifti_files(folder, what)
        missing = sorted(set(maps) - set(files))
        extra = sorted(set(files) - set(maps))
        if missing:
            raise AEFlowInputError(
                f"no {what} for {len(missing)} map(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                path=folder,
            )
        if extra:
            raise AEFlowInputError(
                f"{len(extra)} {what} file(s) without a map: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}",
                path=folder,
            )
        found[key] = files
    for key, folder in optional.items():
        if folder is None:
            continue
        files = _nifti_files(folder, key)
        missing = sorted(set(maps) - set(files))
        if missing:
            raise AEFlowInputError(f"no {key} for map(s): {', '.join(missing[:5])}", path=folder)
        found[key] = files
    cases = []
    for name in sorted(maps):
        case: dict[str, Any] = {"name": name, "map": maps[name]}
        for key, files in found.items():
            case[key] = files[name]
        cases.append(case)
    return cases


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise AEFlowInputError("file not found", path=path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises many kinds of errors on bad files
        raise AEFlowInputError(f"unreadable NIfTI file ({err.__class__.__name__}: {err})", path=path) from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise AEFlowInputError(f"expected a 2D or 3D image, got shape {data.shape}", path=path)
    return data, np.asarray(img.affine, dtype=np.float64)


def load_array(value: Any, name: str = "array") -> tuple[np.ndarray, np.ndarray | None, Path | None]:
    """Read one case entry: a NIfTI path or an array.

    Args:
        value: a path (``str`` / ``PathLike``) or an array-like (numpy, torch).
        name: what it is, for error messages.

    Returns:
        ``(data, affine or None, path or None)``.
    """
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        data, affine = _read_nifti(path)
        return data, affine, path
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    data = np.asarray(value)
    if data.ndim not in (2, 3):
        raise AEFlowInputError(f"{name}: expected a 2D or 3D array, got shape {data.shape}")
    return data, None, None


def load_case(
    case: Mapping[str, Any],
    check_affine: bool = True,
    reorient: bool = True,
    warn_labels: bool = True,
    label_values: Sequence[int] | None = None,
) -> dict[str, np.ndarray | str | None]:
    """Load a case into arrays: the signed or non-negative residual, label, brain mask, image, reconstruction.

    The residual is ``case["map"]`` when given, else ``case["image"] - case["reconstruction"]``. Labels are
    ``label > 0``, brain masks ``mask > 0.5`` (a missing mask means the whole volume). NIfTI inputs are
    reordered to RAS axes with the label's orientation (all entries must share the label's voxel grid).

    Args:
        case: mapping with ``"map"`` (or ``"image"`` and ``"reconstruction"``), ``"label"``, optional
            ``"mask"`` and ``"name"``; values are NIfTI paths or arrays.
        check_affine: raise when NIfTI affines of the entries differ (different voxel grids).
        reorient: bring NIfTI inputs to RAS axis order.
        warn_labels: warn when the label has values other than 0 and 1 (see :func:`check_label_values`).
        label_values: the label values that are lesion (e.g. a BraTS region: ``(1, 3, 4)``, the tumour core of
            2013-2015 labels); ``None``: ``label > 0``. The case's own ``"region_labels"`` wins when it has one.

    Returns:
        ``{"name", "residual", "label", "mask", "image", "reconstruction"}`` (``image`` and
        ``reconstruction`` may be ``None``).

    Raises:
        AEFlowInputError: a missing entry, unreadable file, or shapes / grids that do not agree.
    """
    if "label" not in case or case["label"] is None:
        raise AEFlowInputError(f"case {case.get('name', '?')!r} has no label")
    has_map = case.get("map") is not None
    if not has_map and (case.get("image") is None or case.get("reconstruction") is None):
        raise AEFlowInputError(f"case {case.get('name', '?')!r} needs a 'map' or an 'image' and a 'reconstruction'")
    loaded: dict[str, tuple[np.ndarray, np.ndarray | None, Path | None]] = {}
    for key in CASE_KEYS:
        if case.get(key) is not None:
            loaded[key] = load_array(case[key], key)
    label_data, label_affine, label_path = loaded["label"]
    ref_name = label_path or "label"
    for key, (data, affine, path) in loaded.items():
        if data.shape != label_data.shape:
            raise AEFlowInputError(
                f"{key} shape {tuple(data.shape)} differs from the label shape {tuple(label_data.shape)} ({ref_name})",
                path=path,
            )
        if check_affine and affine is not None and label_affine is not None:
            if not np.allclose(affine, label_affine, atol=1e-3, rtol=1e-4):
                raise AEFlowInputError(
                    f"{key} affine differs from the label's ({ref_name}): not on the same voxel grid",
                    path=path,
                )
    ornt = None
    if reorient and label_affine is not None and label_data.ndim == 3:
        ornt = nib.orientations.io_orientation(label_affine)

    def arr(key: str, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | None:
        if key not in loaded:
            return None
        data = convert(loaded[key][0])
        if ornt is not None:
            data = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
        return data

    def to_float(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float32)

    out: dict[str, Any] = {"name": str(case.get("name") or (case_name(label_path) if label_path else "case"))}
    values = case.get("region_labels", label_values)
    if values is not None:  # a region of a multi-class label: no warning, the values are chosen
        out["label"] = arr("label", lambda a: np.isin(a, np.asarray(list(values), dtype=a.dtype)))
    else:
        if warn_labels:
            check_label_values(label_data, str(label_path) if label_path else f"case {out['name']!r}")
        out["label"] = arr("label", lambda a: a > 0)
    out["mask"] = arr("mask", lambda a: a > 0.5)
    out["image"] = arr("image", to_float)
    out["reconstruction"] = arr("reconstruction", to_float)
    if has_map:
        out["residual"] = arr("map", to_float)
    else:
        out["residual"] = out["image"] - out["reconstruction"]
    if not np.all(np.isfinite(out["residual"])):
        map_path = loaded["map"][2] if has_map else None
        raise AEFlowInputError(f"case {out['name']!r}: the anomaly map has NaN or infinite values", path=map_path)
    return out
