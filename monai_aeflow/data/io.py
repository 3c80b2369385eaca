"""Loading of brain MRI volumes and 2D images through MONAI readers, with input validation.

NIfTI files (``.nii``, ``.nii.gz``) are read with :class:`monai.data.NibabelReader`, DICOM series
folders and MetaImage/NRRD files with :class:`monai.data.ITKReader`, and PNG/JPEG/BMP/TIFF images with
:class:`monai.data.PILReader`. Volumes are reoriented to RAS, so that the last spatial axis is the
axial (inferior to superior) axis; the affine and the voxel spacing stay in the
:class:`monai.data.MetaTensor` metadata, so that results can be written back in the input's space.

Problems with the user's files (missing file, unreadable or truncated NIfTI, 4D volume, mask whose
shape differs from its image, ...) raise :class:`monai_aeflow.errors.AEFlowInputError` naming the file.
:func:`header_voxels` reads an input's shape from its header alone (to refuse an oversized input before any
allocation) and :func:`check_dicom_series` finds unreadable slice files and non-uniform slice spacing, which
MONAI's ITK reader would silently drop or flatten into a uniform grid.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader, PILReader
from monai.transforms import InvertibleTransform, LoadImage, MapTransform, Orientation

from monai_aeflow.errors import AEFlowInputError

__all__ = [
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "IMAGE_2D_SUFFIXES",
    "DEFAULT_MAX_VOXELS",
    "DicomSeriesInfo",
    "IrregularSeriesError",
    "check_dicom_series",
    "check_voxel_limit",
    "file_kind",
    "header_voxels",
    "is_dicom_series_dir",
    "check_nifti_header",
    "load_image",
    "LoadImageCheckedd",
    "check_same_spatial_shape",
    "source_name",
    "find_input_error",
    "reraise_input_errors",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
"""File name endings read with NiBabel."""

ITK_SUFFIXES: tuple[str, ...] = (".mha", ".mhd", ".nrrd", ".dcm")
"""File name endings read with ITK (besides DICOM series folders)."""

IMAGE_2D_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File name endings of 2D images read with Pillow."""


DEFAULT_MAX_VOXELS: int = 1024**3 // 2
"""Largest input accepted by default (voxels in the header, times channels): 2 GiB as float32, far above any
scan; a header claiming more is refused before anything is allocated."""


class IrregularSeriesError(AEFlowInputError):
    """A DICOM series with unreadable slice files or non-uniform slice spacing."""


def find_input_error(exc: BaseException) -> AEFlowInputError | None:
    """The :class:`AEFlowInputError` behind an exception, if any.

    MONAI's ``Compose`` and datasets wrap exceptions raised by a transform in ``RuntimeError``; this
    walks the chain of causes to find the user-input error.

    Args:
        exc: the exception raised.

    Returns:
        the input error, or ``None``.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, AEFlowInputError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def reraise_input_errors() -> Iterator[None]:
    """Re-raise the :class:`AEFlowInputError` behind a MONAI-wrapped exception, unwrapped.

    Example::

        with reraise_input_errors():
            volume = dataset[0]  # a missing file raises AEFlowInputError, not RuntimeError
    """
    try:
        yield
    except AEFlowInputError:
        raise
    except Exception as exc:
        error = find_input_error(exc)
        if error is None:
            raise
        raise error.with_traceback(None) from None


def _lower_name(path: Path) -> str:
    return path.name.lower()


def is_dicom_series_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that holds DICOM files.

    A folder counts as a DICOM series when it contains at least one file ending in ``.dcm`` or one
    file with the ``DICM`` marker at byte 128 (DICOM files are often stored without an extension).

    Args:
        path: a folder.

    Returns:
        True when the folder holds DICOM files.
    """
    folder = Path(path)
    if not folder.is_dir():
        return False
    checked = 0
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        if entry.suffix.lower() == ".dcm":
            return True
        if checked < 8:  # look at the header of a few files without an extension
            checked += 1
            try:
                with open(entry, "rb") as handle:
                    handle.seek(128)
                    if handle.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def file_kind(path: str | os.PathLike) -> str:
    """Which reader a path needs: ``"nifti"``, ``"dicom"`` (series folder), ``"itk"`` or ``"image2d"``.

    Args:
        path: a file or a DICOM series folder.

    Returns:
        the kind of the input.

    Raises:
        AEFlowInputError: when the path does not exist or its type is not supported.
    """
    p = Path(path)
    if not p.exists():
        raise AEFlowInputError("file not found", path=p)
    if p.is_dir():
        if is_dicom_series_dir(p):
            return "dicom"
        raise AEFlowInputError("is a folder without DICOM files (expected a DICOM series folder)", path=p)
    name = _lower_name(p)
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(IMAGE_2D_SUFFIXES):
        return "image2d"
    raise AEFlowInputError(
        "unsupported file type (expected .nii, .nii.gz, a DICOM series folder, .mha, .nrrd, .png or .jpg)",
        path=p,
    )


def check_nifti_header(path: str | os.PathLike) -> tuple[int, ...]:
    """Read a NIfTI header and check that the file holds one 2D or 3D image.

    Trailing axes of length 1 are accepted (``(X, Y, Z, 1)`` is a 3D volume).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        the shape stored in the header.

    Raises:
        AEFlowInputError: when the header cannot be read or the image has more than three
            non-trivial dimensions (a 4D time series or a multi-volume file).
    """
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises several exception types for broken headers
        raise AEFlowInputError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})", path=path) from exc
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise AEFlowInputError(
            f"is a {len(shape)}D image with shape {shape}; expected one 3D volume per file "
            "(split the 4th axis into separate files first)",
            path=path,
        )
    if any(s == 0 for s in shape):
        raise AEFlowInputError(f"is empty (shape {shape})", path=path)
    return shape


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


def _to_grayscale(image: Any) -> Any:
    """Pillow converter: one grey-level channel (module level so that it pickles)."""
    return image.convert("L") if image.mode not in ("L", "I", "I;16", "F") else image


_LOADERS: dict[tuple[str, bool], LoadImage] = {}


def _loader(kind: str, grayscale: bool) -> LoadImage:
    key = (kind, grayscale)
    if key not in _LOADERS:
        if kind == "nifti":
            reader: Any = NibabelReader()
        elif kind in ("dicom", "itk"):
            reader = ITKReader()
        else:
            reader = PILReader(converter=_to_grayscale) if grayscale else PILReader()
        _LOADERS[key] = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)
    return _LOADERS[key]


_ORIENTATIONS: dict[str, Orientation] = {}


def _orientation(axcodes: str) -> Orientation:
    if axcodes not in _ORIENTATIONS:
        _ORIENTATIONS[axcodes] = Orientation(axcodes=axcodes, labels=None)
    return _ORIENTATIONS[axcodes]


def _load_one(path: str | os.PathLike, orientation: str | None, grayscale: bool) -> MetaTensor:
    kind = file_kind(path)
    if kind == "nifti":
        check_nifti_header(path)
    try:
        image = _loader(kind, grayscale)(str(path))
    except AEFlowInputError:
        raise
    except Exception as exc:
        what = {"nifti": "NIfTI data", "dicom": "DICOM series", "itk": "image", "image2d": "image"}[kind]
        raise AEFlowInputError(
            f"cannot read the {what} (truncated or corrupt file?): {type(exc).__name__}: {exc}", path=path
        ) from exc
    if not isinstance(image, MetaTensor):  # pragma: no cover - LoadImage(image_only=True) returns MetaTensor
        image = MetaTensor(image)
    spatial_dims = image.ndim - 1
    if kind in ("nifti", "dicom", "itk") and image.shape[0] != 1:
        raise AEFlowInputError(
            f"has {image.shape[0]} volumes/channels (shape {tuple(image.shape[1:])}); expected one 3D volume",
            path=path,
        )
    if not torch.isfinite(image).all():
        raise AEFlowInputError("contains NaN or infinite values", path=path)
    if orientation and spatial_dims in (2, 3) and kind != "image2d":
        image = _orientation(orientation[:spatial_dims])(image)
    return image


def load_image(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    orientation: str | None = "RAS",
    spatial_dims: int | None = None,
    grayscale: bool = True,
) -> MetaTensor:
    """Load an image as a channel-first :class:`~monai.data.MetaTensor` through MONAI ``LoadImage``.

    Args:
        path: a NIfTI file, a DICOM series folder, a MetaImage/NRRD file or a 2D image; or a sequence
            of such paths (one per channel, e.g. FLAIR and T1c), which must have the same shape.
        orientation: axis codes that volumes are reoriented to (``"RAS"``: the last axis is axial);
            ``None`` keeps the stored orientation. 2D images keep their pixel order.
        spatial_dims: the number of spatial dimensions the image must have (3 for volumes, 2 for 2D
            images); ``None`` accepts either.
        grayscale: convert colour 2D images to one grey-level channel.

    Returns:
        a float32 tensor of shape ``(C, X, Y[, Z])`` whose metadata hold the affine, the spacing
        (``pixdim``) and the source file (``filename_or_obj``).

    Raises:
        AEFlowInputError: for a missing, unreadable, truncated, 4D, non-finite or wrongly-shaped input.

    Example::

        image = load_image("IXI002-Guys-0828-T1.nii.gz")  # (1, X, Y, Z), RAS
        print(image.pixdim, image.affine)
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise AEFlowInputError("no image path given")
    channels = [_load_one(p, orientation, grayscale) for p in paths]
    for p, image in zip(paths, channels, strict=True):
        if spatial_dims is not None and image.ndim - 1 != spatial_dims:
            raise AEFlowInputError(
                f"has {image.ndim - 1} spatial dimensions (shape {tuple(image.shape[1:])}); expected {spatial_dims}",
                path=p,
            )
        if image.ndim - 1 != channels[0].ndim - 1 or image.shape[1:] != channels[0].shape[1:]:
            raise AEFlowInputError(
                f"shape {tuple(image.shape[1:])} differs from the shape {tuple(channels[0].shape[1:])} of {paths[0]}",
                path=p,
            )
    if len(channels) == 1:
        return channels[0]
    return torch.cat(channels, dim=0)  # MetaTensor: keeps the metadata of the first channel


def source_name(value: Any) -> str:
    """The file a value came from: the ``filename_or_obj`` of a MetaTensor, or the path itself.

    Args:
        value: a MetaTensor, a path or a sequence of paths.

    Returns:
        the file name, or a placeholder for plain arrays.
    """
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", "<tensor>"))
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, Sequence) and value and isinstance(value[0], (str, os.PathLike)):
        return str(value[0])
    return "<array>"


def check_same_spatial_shape(image: Any, other: Any, other_name: str = "mask") -> None:
    """Check that a mask or label has the spatial shape of its image.

    Args:
        image: the image tensor, channel first.
        other: the mask or label tensor, channel first.
        other_name: what ``other`` is, for the message.

    Raises:
        AEFlowInputError: naming the mask file when the spatial shapes differ.
    """
    if tuple(other.shape[1:]) != tuple(image.shape[1:]):
        raise AEFlowInputError(
            f"{other_name} shape {tuple(other.shape[1:])} differs from the image shape "
            f"{tuple(image.shape[1:])} of {source_name(image)}",
            path=source_name(other),
        )


class LoadImageCheckedd(MapTransform, InvertibleTransform):
    """Load the image, brain mask and lesion label of a data dict, reorient them and validate them.

    Each key holding a path (or a sequence of paths, stacked as channels) is replaced by a
    channel-first :class:`~monai.data.MetaTensor` loaded with MONAI ``LoadImage`` and the reader that
    suits the file (see :func:`load_image`). Keys whose value is ``None`` (no mask or no label file)
    stay ``None``; keys that already hold a tensor are left as they are. Masks and labels must have
    the spatial shape of the image.

    Args:
        keys: keys to load, e.g. ``("image", "mask", "label")``.
        image_key: the key of the reference image.
        orientation: axis codes for volumes, ``None`` to keep the stored orientation.
        spatial_dims: required number of spatial dimensions of the image (``None``: any).
        grayscale: convert colour 2D images to one channel.
        allow_missing_keys: do not raise when a key is absent from the data dict.

    Example::

        load = LoadImageCheckedd(("image", "mask", "label"))
        data = load({"image": "BraTS2021_00000_flair.nii.gz", "mask": None,
                     "label": "BraTS2021_00000_seg.nii.gz"})
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "mask", "label"),
        image_key: str = "image",
        orientation: str | None = "RAS",
        spatial_dims: int | None = None,
        grayscale: bool = True,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.orientation = orientation
        self.spatial_dims = spatial_dims
        self.grayscale = grayscale
        self.orienters = {} if orientation is None else {n: Orientation(orientation[:n], labels=None) for n in (2, 3)}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if value is None or isinstance(value, (torch.Tensor, np.ndarray)):
                continue
            if isinstance(value, (str, os.PathLike)) or (
                isinstance(value, Sequence) and all(isinstance(v, (str, os.PathLike)) for v in value)
            ):
                dims = self.spatial_dims if key == self.image_key else None
                loaded = load_image(value, None, dims, self.grayscale)
                name = _lower_name(Path(value if isinstance(value, (str, os.PathLike)) else value[0]))
                if loaded.ndim - 1 in self.orienters and not name.endswith(IMAGE_2D_SUFFIXES):
                    loaded = self.orienters[loaded.ndim - 1](loaded)
                d[key] = loaded
        image = d.get(self.image_key)
        if isinstance(image, torch.Tensor):
            for key in self.key_iterator(d):
                if key != self.image_key and isinstance(d[key], torch.Tensor):
                    check_same_spatial_shape(image, d[key], other_name=str(key))
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the reorientation (the loaded tensors stay tensors)."""
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor) and value.ndim - 1 in self.orienters and value.applied_operations:
                d[key] = self.orienters[value.ndim - 1].inverse(value)
        return d
