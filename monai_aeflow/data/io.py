"""Loading of brain MRI volumes and 2D images through MONAI readers, with input validation.

NIfTI files (``.nii``, ``.nii.gz``) are read with :class:`monai.data.NibabelReader`, DICOM series
folders and MetaImage/NRRD files with :class:`monai.data.ITKReader`, and PNG/JPEG/BMP/TIFF images with
:class:`monai.data.PILReader`. Volumes are reoriented to RAS, so that the last spatial axis is the
axial (inferior to superior) axis; the affine and the voxel spacing stay in the
:class:`monai.data.MetaTensor` metadata, so that results can be written back in the input's space.

Problems with the user's files (missing file, unreadable or truncated NIfTI, 4D volume, mask whose
shape differs from its image, ...) raise :class:`monai_aeflow.errors.AEFlowInputError` naming the file.
Checks that run before loading (header-only sizes, DICOM series integrity) are in :mod:`monai_aeflow.data.checks`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
    "file_kind",
    "is_dicom_series_dir",
    "check_nifti_header",
    "load_image",
    "LoadImageCheckedd",
    "check_same_grid",
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


GRID_TOLERANCE_MM = 0.01
"""Largest difference between the affines of an image and its mask or label (mm, or the direction cosines
scaled by the spacing) that still counts as one grid."""


def check_same_grid(image: Any, other: Any, other_name: str = "mask") -> None:
    """Check that a mask or label of the image's shape also lies on its grid (the same affine).

    A mask of the right shape but another affine (shifted, flipped, another spacing) would be applied voxel for
    voxel to the wrong anatomy.

    Args:
        image: the image MetaTensor, channel first.
        other: the mask or label MetaTensor.
        other_name: what ``other`` is, for the message.

    Raises:
        AEFlowInputError: naming the mask file when the affines differ by more than :data:`GRID_TOLERANCE_MM`.
    """
    a, b = getattr(image, "affine", None), getattr(other, "affine", None)
    if a is None or b is None:
        return
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return
    diff = float(np.abs(a - b).max())
    if diff > GRID_TOLERANCE_MM:
        shift = float(np.linalg.norm(a[:-1, -1] - b[:-1, -1]))
        raise AEFlowInputError(
            f"{other_name} has the shape of {source_name(image)} but not its grid: the affines differ by up to "
            f"{diff:.3g} (origins {shift:.3g} mm apart); resample it onto the image",
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
                    check_same_grid(image, d[key], other_name=str(key))
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the reorientation (the loaded tensors stay tensors)."""
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor) and value.ndim - 1 in self.orienters and value.applied_operations:
                d[key] = self.orienters[value.ndim - 1].inverse(value)
        return d
