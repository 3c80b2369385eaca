"""DICOM out: the lesion mask as DICOM SEG and the anomaly map as a DICOM Parametric Map, with highdicom.

For an input that is a DICOM series, :func:`dicom_outputs` turns a
:class:`~monai_aeflow.inference.result.ScoreResult` into two DICOM objects that a PACS stores and a DICOM viewer
overlays on the series: a binary Segmentation (segment ``anomaly``, ``Morphologically abnormal structure`` /
``Lesion``) and a float32 Parametric Map with an identity real-world value mapping (stored value = map value).
Both reference every source instance, the source series, its study and its frame of reference, and have one
frame per source slice with that slice's position, orientation and pixel spacing.

The map of the scorer lies on the grid MONAI's ITK reader builds from the series (RAS affine); each source
slice's pixels are located in that grid through their patient coordinates (``ImagePositionPatient``,
``ImageOrientationPatient``, ``PixelSpacing``), so the frames hold exactly the voxels of the NIfTI map.

highdicom 0.22 is the newest release that runs on pydicom 2 (0.23 and later need pydicom 3), which MONAI Label
0.8.5 needs; it is installed with the ``dicom`` extra.
"""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monai_aeflow import __version__
from monai_aeflow.errors import AEFlowInputError

if TYPE_CHECKING:
    import pydicom

    from monai_aeflow.inference.result import ScoreResult

__all__ = [
    "DICOM_OUTPUT_SUFFIXES",
    "build_parametric_map",
    "build_segmentation",
    "dicom_outputs",
    "read_series",
    "require_highdicom",
    "volume_to_frames",
    "write_dicom_outputs",
]

DICOM_OUTPUT_SUFFIXES = {"seg": "_seg.dcm", "pmap": "_pmap.dcm"}
"""File name endings of the DICOM outputs of an input ``NAME``: ``NAME_seg.dcm`` and ``NAME_pmap.dcm``."""

_MANUFACTURER = "monai-aeflow"
_MODEL_NAME = "AE-FLOW anomaly detection"
_GRID_TOLERANCE = 0.05  # voxels: a source pixel must fall on a voxel of the map's grid
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class _NumpyWithFloat_(types.ModuleType):
    """numpy as highdicom 0.22's ``seg`` module expects it: with ``np.float_`` (removed in numpy 2)."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def require_highdicom() -> Any:
    """highdicom, ready for numpy 2 (see below).

    Returns:
        The ``highdicom`` module.

    Raises:
        AEFlowInputError: highdicom is not installed (one line saying how to install it).
    """
    try:
        import highdicom
        import highdicom.seg.sop as seg_sop
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise AEFlowInputError(
            "DICOM outputs need highdicom: pip install 'highdicom==0.22.0' (the dicom extra: pip install "
            "'monai-aeflow[dicom]')"
        ) from err
    # highdicom 0.22 (the last release on pydicom 2) names np.float_ in two dtype checks of its Segmentation;
    # numpy 2 removed it. Give that one module a numpy with the alias, leaving numpy itself untouched.
    if not hasattr(np, "float_") and not hasattr(seg_sop.np, "float_"):
        seg_sop.np = _NumpyWithFloat_("numpy")
    return highdicom


def read_series(folder: str | os.PathLike) -> list[pydicom.Dataset]:
    """Read the image instances of one DICOM series folder, ordered along the slice normal.

    Args:
        folder: the series folder (the files directly in it; files that are not DICOM are skipped).

    Returns:
        The datasets, pixel data included, sorted by position along the normal of their image plane.

    Raises:
        AEFlowInputError: not a folder, no DICOM image in it, several series, or slices without geometry.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(folder)
    if not path.is_dir():
        raise AEFlowInputError("is not a DICOM series folder: DICOM outputs need a DICOM series input", path=path)
    datasets = []
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(file)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            datasets.append(ds)
    if not datasets:
        raise AEFlowInputError("holds no DICOM image with a position: DICOM outputs need a DICOM series", path=path)
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) > 1:
        raise AEFlowInputError(f"holds {len(series)} DICOM series; DICOM outputs need a folder of one", path=path)
    for ds in datasets:
        if "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds or "FrameOfReferenceUID" not in ds:
            raise AEFlowInputError(
                f"slice {ds.get('InstanceNumber', '?')} has no orientation, pixel spacing or frame of reference",
                path=path,
            )
    normal = np.cross(*np.asarray(datasets[0].ImageOrientationPatient, float).reshape(2, 3))
    datasets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    return datasets


def _pixel_ras(ds: pydicom.Dataset, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """RAS coordinates (..., 3) of the pixel centres ``(r, c)`` of one slice."""
    iop = np.asarray(ds.ImageOrientationPatient, float).reshape(2, 3)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    r, c = np.asarray(r, float)[..., None], np.asarray(c, float)[..., None]
    lps = np.asarray(ds.ImagePositionPatient, float) + c * col_spacing * iop[0] + r * row_spacing * iop[1]
    return lps @ _LPS_TO_RAS


def _frame_indices(ds: pydicom.Dataset, inverse: np.ndarray, shape: Sequence[int]) -> tuple[int, ...]:
    """Where slice ``ds`` lies in the grid: ``(axis_r, start_r, step_r, axis_c, start_c, step_c, axis_k, k)``.

    Pixel ``(r, c)`` is the voxel with index ``start_r + step_r * r`` on ``axis_r``, ``start_c + step_c * c`` on
    ``axis_c`` and ``k`` on ``axis_k``; raises :class:`AEFlowInputError` when a pixel is off the grid.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    corners = _pixel_ras(ds, np.array([0, 1, 0]), np.array([0, 0, 1])) @ inverse[:3, :3].T + inverse[:3, 3]
    base, d_row, d_col = corners[0], corners[1] - corners[0], corners[2] - corners[0]
    ib, ir, ic = np.rint(base), np.rint(d_row), np.rint(d_col)
    # the index is affine in (r, c): its largest distance from an integer is at most this bound
    off = float(np.abs(base - ib).max() + (rows - 1) * np.abs(d_row - ir).max() + (cols - 1) * np.abs(d_col - ic).max())
    unit = all(np.abs(v).sum() == 1 for v in (ir, ic)) and int(np.argmax(np.abs(ir))) != int(np.argmax(np.abs(ic)))
    where = f"slice {ds.get('InstanceNumber', '?')} of the series"
    if off > _GRID_TOLERANCE or not unit:
        raise AEFlowInputError(f"the map's grid does not match {where} (off by {off:.3g} voxels or oblique)")
    axis_r, axis_c = int(np.argmax(np.abs(ir))), int(np.argmax(np.abs(ic)))
    axis_k = 3 - axis_r - axis_c
    out = (axis_r, int(ib[axis_r]), int(ir[axis_r]), axis_c, int(ib[axis_c]), int(ic[axis_c]), axis_k, int(ib[axis_k]))
    ends = ((out[1], out[1] + out[2] * (rows - 1), axis_r), (out[4], out[4] + out[5] * (cols - 1), axis_c))
    if not 0 <= out[7] < shape[axis_k] or any(not (0 <= a < shape[x] and 0 <= b < shape[x]) for a, b, x in ends):
        raise AEFlowInputError(f"{where} lies outside the map's grid")
    return out


def volume_to_frames(volume: np.ndarray, affine: np.ndarray, datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The voxels of a volume on the series' grid, as one frame per source slice.

    Args:
        volume: 3D array on the grid of ``affine`` (e.g. the scorer's anomaly map of the series).
        affine: its 4x4 voxel-to-RAS matrix.
        datasets: the source slices (see :func:`read_series`).

    Returns:
        Array ``(len(datasets), Rows, Columns)`` of ``volume``'s dtype: frame ``k`` pixel ``(r, c)`` is the voxel
        at the patient position of pixel ``(r, c)`` of slice ``k``.

    Raises:
        AEFlowInputError: a source pixel does not fall on a voxel of the volume (another grid).
    """
    volume = np.asarray(volume)
    inverse = np.linalg.inv(np.asarray(affine, float))
    frames = []
    for ds in datasets:
        axis_r, start_r, step_r, axis_c, start_c, step_c, axis_k, k = _frame_indices(ds, inverse, volume.shape)
        plane = np.take(volume, k, axis=axis_k)  # the two other axes, in order
        r_index = start_r + step_r * np.arange(int(ds.Rows))
        c_index = start_c + step_c * np.arange(int(ds.Columns))
        if axis_r < axis_c:
            frames.append(plane[np.ix_(r_index, c_index)])
        else:
            frames.append(plane[np.ix_(c_index, r_index)].T)
    return np.stack(frames)


def _identity(kind: str, series_number: int) -> dict[str, Any]:
    hd = require_highdicom()
    return {
        "series_instance_uid": hd.UID(),
        "series_number": int(series_number),
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": _MANUFACTURER,
        "manufacturer_model_name": _MODEL_NAME,
        "software_versions": __version__,
        "device_serial_number": "0",
        "content_description": f"AE-FLOW {kind}",
        "content_creator_name": "AEFLOW^monai-aeflow",
    }


def build_segmentation(
    mask_frames: np.ndarray,
    datasets: Sequence[pydicom.Dataset],
    label: str = "anomaly",
    series_number: int = 901,
    model_name: str = "aeflow",
) -> Any:
    """A binary DICOM Segmentation of the lesion mask over the source series.

    Args:
        mask_frames: ``(frames, rows, cols)`` mask, one frame per source slice (see :func:`volume_to_frames`).
        datasets: the source slices.
        label: the segment's label.
        series_number: the new series' number.
        model_name: the model's name (the algorithm's name in the segment description).

    Returns:
        A ``highdicom.seg.Segmentation`` (every frame kept, empty ones included, so frames match the slices).
    """
    hd = require_highdicom()
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"AE-FLOW ({model_name})", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    return hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=(np.asarray(mask_frames) > 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        omit_empty_frames=False,
        **_identity("lesion mask", series_number),
    )


def build_parametric_map(map_frames: np.ndarray, datasets: Sequence[pydicom.Dataset], series_number: int = 902) -> Any:
    """A float32 DICOM Parametric Map of the anomaly map over the source series.

    Args:
        map_frames: ``(frames, rows, cols)`` anomaly map, one frame per source slice.
        datasets: the source slices.
        series_number: the new series' number.

    Returns:
        A ``highdicom.pm.ParametricMap`` with an identity real-world value mapping (slope 1, intercept 0, no unit).
    """
    hd = require_highdicom()
    from pydicom.sr.codedict import codes

    frames = np.asarray(map_frames, dtype=np.float32)
    lo, hi = (float(frames.min()), float(frames.max())) if frames.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly",
        lut_explanation="AE-FLOW anomaly map, higher is more anomalous",
        unit=codes.UCUM.NoUnits,
        value_range=(lo, hi),
        slope=1,
        intercept=0,
    )
    return hd.pm.ParametricMap(
        source_images=list(datasets),
        pixel_array=frames,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        window_center=(lo + hi) / 2.0,
        window_width=hi - lo,
        **_identity("anomaly map", series_number),
    )


def dicom_outputs(
    result: ScoreResult,
    series: str | os.PathLike | None = None,
    label: str = "anomaly",
    kinds: Sequence[str] = ("seg", "pmap"),
) -> dict[str, Any]:
    """The DICOM SEG (when the result has a lesion mask) and Parametric Map of a scored DICOM series.

    Args:
        result: the scorer's result for a DICOM series folder.
        series: the series folder (default: ``result.source``).
        label: the segment's label.
        kinds: which objects to build: ``"seg"``, ``"pmap"`` or both.

    Returns:
        ``{"pmap": ParametricMap}`` plus ``"seg": Segmentation`` when a threshold gave a lesion mask (of ``kinds``).

    Raises:
        AEFlowInputError: the input is not a DICOM series, or its geometry does not match the result's grid.
    """
    datasets = read_series(series if series is not None else result.source)
    out: dict[str, Any] = {}
    if "pmap" in kinds:
        out["pmap"] = build_parametric_map(volume_to_frames(result.anomaly_map, result.affine, datasets), datasets)
    if "seg" in kinds and result.lesion_mask is not None:
        mask = volume_to_frames(result.lesion_mask, result.affine, datasets)
        model_name = str(result.scores.get("model", {}).get("model_name", "aeflow"))
        out["seg"] = build_segmentation(mask, datasets, label=label, model_name=model_name)
    return out


def write_dicom_outputs(result: ScoreResult, out_dir: str | os.PathLike, name: str | None = None) -> dict[str, Path]:
    """Write ``NAME_seg.dcm`` and ``NAME_pmap.dcm`` of a scored DICOM series into ``out_dir``.

    Meant for a staging folder (see :func:`~monai_aeflow.inference.outputs.write_outputs`, ``extra``): the files
    are written in place.

    Args:
        result: the scorer's result for a DICOM series folder.
        out_dir: the folder to write into.
        name: output name (default: ``result.name``).

    Returns:
        ``{"seg": path, "pmap": path}`` (no ``seg`` without a lesion mask).

    Raises:
        AEFlowInputError: the input is not a DICOM series, or its geometry does not match the result's grid.
    """
    name = name or result.name
    written = {}
    for key, ds in dicom_outputs(result).items():
        path = Path(out_dir) / f"{name}{DICOM_OUTPUT_SUFFIXES[key]}"
        ds.save_as(path)
        written[key] = path
    return written
