"""Cheap checks of input files before anything loads them.

- :func:`check_data_files`: the files of a data list (NIfTI sizes, PNG checksums, JPEG ends);
- :func:`header_voxels` / :func:`check_voxel_limit`: an input's shape from its header alone, to refuse an oversized
  input before any allocation;
- :func:`check_dicom_series`: unreadable slice files and non-uniform slice spacing of a DICOM series, which MONAI's
  ITK reader would silently drop or flatten into a uniform grid.

Example::

    check_data_files(records)  # raises AEFlowInputError naming the first unreadable or truncated file
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_aeflow.data.io import check_nifti_header, file_kind
from monai_aeflow.errors import AEFlowInputError

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "DicomSeriesInfo",
    "IrregularSeriesError",
    "check_data_files",
    "check_dicom_series",
    "check_voxel_limit",
    "header_voxels",
]

DEFAULT_MAX_VOXELS: int = 1024**3 // 2
"""Largest input accepted by default (voxels in the header, times channels): 2 GiB as float32, far above any
scan; a header claiming more is refused before anything is allocated."""


class IrregularSeriesError(AEFlowInputError):
    """A DICOM series with unreadable slice files or non-uniform slice spacing."""


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


def _dicom_candidates(folder: Path) -> list[Path]:
    """The files of a series folder that claim to be DICOM: ``.dcm`` files and files with the ``DICM`` marker."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if entry.suffix.lower() == ".dcm":
            found.append(entry)
            continue
        try:
            with open(entry, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    found.append(entry)
        except OSError:
            continue
    return found


def _fmt_mm(value: float) -> str:
    return f"{value:.4g}"


@dataclass
class DicomSeriesInfo:
    """What :func:`check_dicom_series` found in a series folder.

    Attributes:
        folder: the series folder.
        files: the slice files (``.dcm`` or with the ``DICM`` marker), in name order.
        shape: ``(columns, rows, files)``, the array shape MONAI's ITK reader gives a complete series.
        spacing: the median distance between neighbouring slices along the slice normal (mm), or None.
        problems: one line per problem (unreadable slice file, non-uniform spacing, ...); empty when regular.
    """

    folder: str
    files: list[str]
    shape: tuple[int, int, int]
    spacing: float | None = None
    problems: list[str] = field(default_factory=list)


def _read_slice(path: Path) -> tuple[Any | None, str | None]:
    """A slice file's dataset (pixel data checked against its header), or the reason it is unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), force=True)
    except Exception as exc:  # pydicom raises many types for damaged files
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}".rstrip(": ")
    if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
        return None, "no pixel data" if len(ds) else "no DICOM data elements; truncated or not DICOM"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        expected = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1) or 1) * frames
        expected *= max(1, int(getattr(ds, "BitsAllocated", 16) or 16) // 8)
        got = len(ds.PixelData)
        if got < expected:
            return None, f"pixel data truncated: {got} of {expected} bytes"
    return ds, None


def check_dicom_series(folder: str | os.PathLike) -> DicomSeriesInfo:
    """Check a DICOM series folder for unreadable slice files and non-uniform slice spacing.

    MONAI's :class:`~monai.data.ITKReader` (GDCM) silently skips a slice file it cannot read and stacks the
    rest at one spacing, so a corrupt, truncated or missing slice shifts every later slice of the map. Here
    every slice file is read with pydicom (its pixel data checked against ``Rows`` x ``Columns`` x bits), the
    slices are ordered by ``ImagePositionPatient`` along the slice normal (from ``ImageOrientationPatient``)
    and the distances between neighbours must agree within 2 % (or 0.01 mm); a gap in ``InstanceNumber`` is
    named as a hint. Without positions, ``InstanceNumber`` gaps count as missing slices.

    Args:
        folder: a DICOM series folder.

    Returns:
        A :class:`DicomSeriesInfo`; its ``problems`` are empty for a regular series.

    Raises:
        AEFlowInputError: the folder holds no DICOM file.
    """
    folder = Path(folder)
    files = _dicom_candidates(folder)
    if not files:
        raise AEFlowInputError("holds no DICOM file", path=folder)
    problems: list[str] = []
    slices = []
    for path in files:
        ds, why = _read_slice(path)
        if ds is None:
            problems.append(f"slice file {path.name} unreadable ({why})")
        else:
            slices.append((path, ds))
    sizes = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in slices)
    rows, cols = sizes.most_common(1)[0][0] if sizes else (0, 0)
    for path, ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            problems.append(f"slice file {path.name} is {ds.Rows} x {ds.Columns} pixels, the others {rows} x {cols}")
    series_uids = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series_uids) > 1:
        problems.append(f"holds {len(series_uids)} series (SeriesInstanceUID differs); expected one")
    spacing = None
    instances = [getattr(ds, "InstanceNumber", None) for _, ds in slices]
    geometry = [
        (path, getattr(ds, "ImagePositionPatient", None), getattr(ds, "ImageOrientationPatient", None))
        for path, ds in slices
    ]
    if len(slices) > 1 and all(pos is not None and ori is not None and len(ori) == 6 for _, pos, ori in geometry):
        orientations = np.array([[float(v) for v in ori] for _, _, ori in geometry])
        if np.abs(orientations - orientations[0]).max() > 1e-3:
            problems.append("slice orientations (ImageOrientationPatient) differ")
        normal = np.cross(orientations[0, :3], orientations[0, 3:])
        depth = np.array([float(np.dot(normal, [float(v) for v in pos])) for _, pos, _ in geometry])
        order = np.argsort(depth, kind="stable")
        ordered = [geometry[i][0] for i in order]
        gaps = np.diff(depth[order])
        spacing = float(np.median(gaps))
        tolerance = max(0.02 * abs(spacing), 0.01)
        if gaps.min() < 0.01:
            i = int(np.argmin(gaps))
            problems.append(f"slice files {ordered[i].name} and {ordered[i + 1].name} are at the same position")
        elif np.abs(gaps - spacing).max() > tolerance:
            i = int(np.argmax(np.abs(gaps - spacing)))
            hint = ""
            numbers = [instances[j] for j in order]
            if all(n is not None for n in numbers) and abs(int(numbers[i + 1]) - int(numbers[i])) > 1:
                hint = f"; instance numbers skip from {numbers[i]} to {numbers[i + 1]}"
            problems.append(
                f"slice spacing not uniform: {_fmt_mm(spacing)} to {_fmt_mm(float(gaps[i]))} mm between slices "
                f"{i + 1} and {i + 2} ({ordered[i].name} and {ordered[i + 1].name}{hint})"
            )
    elif len(slices) > 1 and all(n is not None for n in instances):
        numbers = sorted(int(n) for n in instances)
        steps = np.diff(numbers)
        if steps.size and (steps.min() == 0 or (steps != np.median(steps)).any()):
            i = int(np.argmax(steps != np.median(steps))) if steps.min() else int(np.argmin(steps))
            problems.append(f"instance numbers not regular (from {numbers[i]} to {numbers[i + 1]}; slice missing?)")
    return DicomSeriesInfo(str(folder), [str(f) for f in files], (cols, rows, len(files)), spacing, problems)


def header_voxels(path: str | os.PathLike) -> tuple[tuple[int, ...], int]:
    """An input's shape and voxel count (times channels) from its header only, without reading the data.

    NIfTI headers are read with NiBabel, MetaImage / NRRD / single DICOM files with ITK's image IO
    (``ReadImageInformation``), 2D images with Pillow (which decodes lazily); a DICOM series counts
    rows x columns of its first readable slice file times the number of slice files.

    Args:
        path: a NIfTI, MetaImage, NRRD or DICOM file, a DICOM series folder or a 2D image.

    Returns:
        The spatial shape in MONAI's array order and the number of values the image holds.

    Raises:
        AEFlowInputError: a missing, unsupported or unreadable file.
    """
    kind = file_kind(path)
    if kind == "nifti":
        shape = check_nifti_header(path)
        return shape, int(np.prod(shape, dtype=np.int64))
    if kind == "dicom":
        import pydicom

        files = _dicom_candidates(Path(path))
        for candidate in files:
            try:
                ds = pydicom.dcmread(str(candidate), stop_before_pixels=True, force=True)
                rows, cols = int(ds.Rows), int(ds.Columns)
            except Exception:  # try the next slice; an unreadable one is reported by check_dicom_series
                continue
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            shape = (cols, rows, len(files) * frames)
            return shape, int(np.prod(shape, dtype=np.int64)) * int(getattr(ds, "SamplesPerPixel", 1) or 1)
        raise AEFlowInputError("holds no readable DICOM file", path=path)
    if kind == "itk":
        import itk

        io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            raise AEFlowInputError("cannot read the image header (unknown or corrupt file)", path=path)
        try:
            io.SetFileName(str(path))
            io.ReadImageInformation()
        except Exception as exc:  # ITK raises RuntimeError with a multi-line message
            raise AEFlowInputError(f"cannot read the image header ({type(exc).__name__})", path=path) from None
        shape = tuple(int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions()))
        return shape, int(np.prod(shape, dtype=np.int64)) * int(io.GetNumberOfComponents())
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            bands = len(img.getbands())
    except Exception as exc:  # Pillow raises several types (and DecompressionBombError) for bad files
        raise AEFlowInputError(f"cannot read the image header ({type(exc).__name__}: {exc})", path=path) from None
    return (width, height), width * height * bands


def check_voxel_limit(path: str | os.PathLike, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> tuple[int, ...]:
    """Refuse an input whose header implies more than ``max_voxels`` values, before anything is loaded.

    Args:
        path: an input (see :func:`header_voxels`).
        max_voxels: the limit (``None``: no limit, only the header is checked).

    Returns:
        The spatial shape from the header.

    Raises:
        AEFlowInputError: the header cannot be read or the image is too large.
    """
    shape, voxels = header_voxels(path)
    if max_voxels is not None and voxels > max_voxels:
        channels = voxels // max(1, int(np.prod(shape, dtype=np.int64)))
        extra = f" with {channels} channels" if channels > 1 else ""
        raise AEFlowInputError(
            f"header shape {' x '.join(map(str, shape))}{extra} is {voxels} voxels, more than the limit of "
            f"{max_voxels} (a corrupt header? raise the limit with --max-voxels)",
            path=path,
        )
    return shape
