"""MONAI dictionary transforms for the brain MRI protocol.

Each transform does one job and works on the data dicts of :mod:`monai_aeflow.data.indexers`
(keys ``"image"``, ``"mask"``, ``"label"``, ...). A ``None`` value (no brain mask or no lesion label
file) is passed through untouched. :mod:`monai_aeflow.data.preprocessing` composes them; the volume pipeline
(:func:`~monai_aeflow.data.preprocessing.build_volume_preprocessing`) is:

1. :class:`~monai_aeflow.data.io.LoadImageCheckedd`: load, validate, reorient to RAS;
2. :class:`BrainMaskd`: brain mask from the mask file or from the nonzero voxels, optionally eroded;
3. :class:`ResampleToSpacingd` (optional): resample to 1 mm;
4. :class:`~monai_aeflow.data.smoothing.CurvatureFlowd` (optional): edge-preserving smoothing with itk;
5. :class:`ScaleIntensityInMaskd`: clip at the 1st/99th percentile inside the brain, scale to [0, 1];
6. :class:`CropOrPadInPlaned`: crop/pad the axial plane to a fixed size divisible by 16;
7. :class:`BinarizeLabeld` and :class:`CastMasksd`: binary uint8 lesion label and brain mask.

Spatial steps are invertible (``monai.transforms.Invertd``), so that maps computed on the
preprocessed volume can be written back in the input's space.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Crop,
    InvertibleTransform,
    MapTransform,
    Resized,
    Spacingd,
    SpatialPad,
)
from monai.utils import convert_to_dst_type, ensure_tuple
from scipy import ndimage

from monai_aeflow.data.io import check_same_spatial_shape, source_name
from monai_aeflow.errors import AEFlowInputError

__all__ = [
    "BrainMaskd",
    "ScaleIntensityInMaskd",
    "ResampleToSpacingd",
    "CropOrPadInPlaned",
    "ResizeImaged",
    "BinarizeLabeld",
    "CastMasksd",
    "percentile_scale",
]

_MOVED = {
    "PreprocessingCompose": "preprocessing",
    "build_volume_preprocessing": "preprocessing",
    "build_image_preprocessing": "preprocessing",
    "CurvatureFlowd": "smoothing",
}


def __getattr__(name: str) -> Any:
    """Names moved to :mod:`monai_aeflow.data.preprocessing` and :mod:`monai_aeflow.data.smoothing` keep this path."""
    if name in _MOVED:
        return getattr(importlib.import_module(f"monai_aeflow.data.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _present(transform: MapTransform, data: Mapping[Hashable, Any]) -> Iterator[Hashable]:
    """Keys of ``transform`` that are in ``data`` and not ``None``."""
    for key in transform.key_iterator(data):
        if data[key] is not None:
            yield key


def _as_meta(array: Any, like: torch.Tensor, dtype: Any = None) -> torch.Tensor:
    """``array`` as the type of ``like`` (a MetaTensor keeps ``like``'s metadata)."""
    out, *_ = convert_to_dst_type(array, like, dtype=dtype)
    return out


class BrainMaskd(MapTransform):
    """Put a binary brain mask in ``data[mask_key]``.

    When ``data[mask_key]`` holds a loaded mask it is thresholded (``> threshold``); when it is
    ``None`` the mask is the set of voxels different from the background value in any channel of the
    image (the nonzero voxels of a skull-stripped volume). The mask can be eroded by a number of
    iterations of the 6-connected (3D) / 4-connected (2D) structuring element.

    Args:
        image_key: key of the channel-first image.
        mask_key: key of the mask (a tensor, or ``None``).
        threshold: a loaded mask is ``mask > threshold`` (probabilistic masks: 0.5).
        background: intensity outside the brain when the mask comes from the image: a number;
            ``"min"`` (the image minimum, for volumes whose background was shifted by z-scoring);
            ``"auto"`` (0 or the minimum, whichever more voxels have: 0 for raw and skull-stripped
            volumes, the shifted value for z-scored ones); or ``None`` (every voxel, for images
            without a brain, e.g. chest X-rays).
        erosion_iterations: binary erosion steps applied to the mask (0: none).
        allow_missing_keys: do not raise when ``image_key`` is absent.

    Raises:
        AEFlowInputError: when the mask has another shape than the image or holds no brain voxel.

    Example::

        d = BrainMaskd()({"image": image, "mask": None})  # nonzero voxels of the image
    """

    def __init__(
        self,
        image_key: str = "image",
        mask_key: str = "mask",
        threshold: float = 0.5,
        background: float | str | None = "auto",
        erosion_iterations: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__([image_key], allow_missing_keys)
        if isinstance(background, str) and background not in ("min", "auto"):
            raise AEFlowInputError(f"background must be a number, 'min', 'auto' or None, not {background!r}")
        if erosion_iterations < 0:
            raise AEFlowInputError(f"erosion_iterations must be >= 0, not {erosion_iterations}")
        self.image_key = image_key
        self.mask_key = mask_key
        self.threshold = threshold
        self.background = background
        self.erosion_iterations = erosion_iterations

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(self.image_key)
        image = d[self.image_key]
        given = d.get(self.mask_key)
        if given is not None:
            check_same_spatial_shape(image, given, other_name="mask")
            mask = torch.as_tensor(given).detach().cpu() > self.threshold
            mask = mask.any(dim=0, keepdim=True)
            source = f"mask {source_name(given)}"
        elif self.background is None:
            mask = torch.ones((1, *image.shape[1:]), dtype=torch.bool)
            source = "image"
        else:
            values = torch.as_tensor(image).detach().cpu()
            if self.background == "min":
                bg = values.min()
            elif self.background == "auto":
                lowest = values.min()
                bg = lowest if int((values == lowest).sum()) > int((values == 0).sum()) else values.new_zeros(())
            else:
                bg = torch.as_tensor(float(self.background), dtype=values.dtype)
            mask = (values != bg).any(dim=0, keepdim=True)
            source = "nonzero voxels of the image"
        if self.erosion_iterations > 0:
            structure = ndimage.generate_binary_structure(mask.ndim - 1, 1)
            eroded = ndimage.binary_erosion(mask[0].numpy(), structure=structure, iterations=self.erosion_iterations)
            mask = torch.from_numpy(eroded)[None]
        if not bool(mask.any()):
            raise AEFlowInputError(f"no brain voxels (brain mask from {source} is empty)", path=source_name(image))
        d[self.mask_key] = _as_meta(mask.to(torch.uint8), image, dtype=torch.uint8)
        return d


def percentile_scale(
    image: np.ndarray, mask: np.ndarray | None = None, lower: float = 1.0, upper: float = 99.0
) -> np.ndarray:
    """Clip one channel at percentiles of the voxels inside ``mask`` and scale it to [0, 1].

    Voxels outside the mask are set to 0.

    Args:
        image: one channel, any shape.
        mask: boolean array of the same shape (``None``: all voxels).
        lower: lower percentile (0 to 100).
        upper: upper percentile (0 to 100), greater than ``lower``.

    Returns:
        a float32 array in [0, 1].

    Raises:
        AEFlowInputError: when the image is constant inside the mask.
    """
    values = image[mask] if mask is not None else image.ravel()
    lo, hi = np.percentile(values, [lower, upper])
    if not hi > lo:
        raise AEFlowInputError(f"image is constant inside the brain mask (percentiles {lower}/{upper} are both {lo:g})")
    scaled = np.clip((image.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    if mask is not None:
        scaled[~mask] = 0.0
    return scaled


class ScaleIntensityInMaskd(MapTransform):
    """Clip each channel at the ``lower``/``upper`` percentiles of the brain voxels and scale to [0, 1].

    Percentiles are computed inside ``data[mask_key]`` only, so that raw int16 volumes (background 0)
    and z-scored volumes (background at a negative value) come out alike, with the tissue contrast
    kept (the mapping is monotonic inside the brain). Voxels outside the brain are set to 0.

    Args:
        keys: image keys to scale.
        mask_key: key of the brain mask (``None`` value or absent key: whole image).
        lower: lower percentile.
        upper: upper percentile.
        allow_missing_keys: do not raise when a key is absent.

    Example::

        d = ScaleIntensityInMaskd("image", lower=1, upper=99)(d)
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "mask",
        lower: float = 1.0,
        upper: float = 99.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise AEFlowInputError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.mask_key = mask_key
        self.lower = lower
        self.upper = upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask_value = d.get(self.mask_key) if self.mask_key is not None else None
        for key in _present(self, d):
            image = d[key]
            array = torch.as_tensor(image).detach().cpu().numpy()
            mask = None
            if mask_value is not None:
                check_same_spatial_shape(image, mask_value, other_name="mask")
                mask = torch.as_tensor(mask_value).detach().cpu().numpy()[0] > 0
            try:
                scaled = np.stack([percentile_scale(c, mask, self.lower, self.upper) for c in array])
            except AEFlowInputError as exc:
                raise AEFlowInputError(str(exc), path=source_name(image)) from None
            d[key] = _as_meta(scaled, image, dtype=torch.float32)
        return d


class _MonaiMasksd:
    """Mixin for a MONAI dictionary transform whose ``image_key`` is interpolated and other keys are masks.

    Values that :meth:`_applies` rejects (``None``: no label file) pass through untouched, and the mask keys
    keep their dtype (MONAI returns float32). Place it before the MONAI class in the bases.
    """

    image_key: str

    def _applies(self, value: Any) -> bool:
        return value is not None

    def key_iterator(self, data: Mapping[Hashable, Any], *extra_iterables: Any) -> Iterator[Any]:
        for item in super().key_iterator(data, *extra_iterables):  # type: ignore[misc]
            if self._applies(data[item[0] if extra_iterables else item]):
                yield item

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        dtypes = {key: data[key].dtype for key in self.key_iterator(data) if key != self.image_key}
        d = super().__call__(data, lazy=lazy)  # type: ignore[misc]
        for key, dtype in dtypes.items():
            d[key] = d[key].to(dtype)
        return d


def _modes(keys: KeysCollection, image_key: str, image: Any, other: Any) -> tuple[Any, ...]:
    """One value per key: ``image`` for ``image_key``, ``other`` for the masks."""
    return tuple(image if key == image_key else other for key in ensure_tuple(keys))


class ResampleToSpacingd(_MonaiMasksd, Spacingd):
    """MONAI ``Spacingd`` resampling the image (trilinear) and its mask and label (nearest) to a voxel spacing.

    Unlike plain ``Spacingd``, ``None`` values pass through and masks keep their dtype. Invertible.

    Args:
        keys: keys to resample.
        pixdim: target spacing in mm (default 1 mm isotropic).
        image_key: the key resampled with interpolation; other keys use nearest neighbour.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "mask", "label"),
        pixdim: Sequence[float] | float = 1.0,
        image_key: str = "image",
        allow_missing_keys: bool = True,
    ) -> None:
        modes = _modes(keys, image_key, "bilinear", "nearest")
        super().__init__(keys, pixdim, mode=modes, padding_mode="zeros", allow_missing_keys=allow_missing_keys)
        self.image_key = image_key


class CropOrPadInPlaned(MapTransform, InvertibleTransform):
    """Crop and pad the axial plane (first two spatial axes) to a fixed size, keeping every slice.

    The crop window is centred on the brain mask (``source_key``), so that an off-centre brain is
    not cut; the axial axis is not changed, so slice ``k`` of the output is slice ``k`` of the input.
    Both sizes must be divisible by 16 (the encoder's stride). 2D images are cropped/padded the same
    way.

    Args:
        keys: keys to crop/pad.
        spatial_size: in-plane output size ``(X, Y)``.
        source_key: key of the mask the window is centred on (``None``: centre of the image).
        allow_missing_keys: do not raise when a key is absent.

    Raises:
        AEFlowInputError: when a size is not a positive multiple of 16.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "mask", "label"),
        spatial_size: Sequence[int] | int = (256, 256),
        source_key: str | None = "mask",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        size = (int(spatial_size),) * 2 if isinstance(spatial_size, int) else tuple(int(s) for s in spatial_size)
        if len(size) != 2 or any(s <= 0 or s % 16 for s in size):
            raise AEFlowInputError(f"in-plane size must be two positive multiples of 16, got {spatial_size}")
        self.spatial_size = size
        self.source_key = source_key
        self.cropper = Crop()
        self.padders = {2: SpatialPad(size), 3: SpatialPad((*size, -1))}

    def _window(self, shape: Sequence[int], source: torch.Tensor | None, name: str) -> list[slice]:
        spatial = list(shape)
        slices = [slice(0, s) for s in spatial]
        for axis in range(2):
            size, length = self.spatial_size[axis], spatial[axis]
            if length <= size:
                continue
            if source is not None and bool(source.any()):
                other = tuple(a for a in range(source.ndim) if a != axis)
                nonzero = torch.nonzero(source.any(dim=other)).flatten() if other else torch.nonzero(source)
                first, last = int(nonzero[0]), int(nonzero[-1]) + 1
                if last - first > size:
                    warnings.warn(
                        f"{name}: the brain extends over {last - first} voxels along axis {axis}, more than "
                        f"the crop size {size}; resample to 1 mm or choose a larger size",
                        stacklevel=3,
                    )
                centre = (first + last) // 2
            else:
                centre = length // 2
            start = min(max(centre - size // 2, 0), length - size)
            slices[axis] = slice(start, start + size)
        return slices

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(_present(self, d))
        if not keys:
            return d
        reference = d[keys[0]]
        source = None
        if self.source_key is not None and d.get(self.source_key) is not None:
            source = torch.as_tensor(d[self.source_key])[0] > 0
        slices = self._window(reference.shape[1:], source, source_name(reference))
        for key in keys:
            value = d[key]
            check_same_spatial_shape(reference, value, other_name=str(key))
            cropped = self.cropper(value, slices)
            d[key] = self.padders[value.ndim - 1](cropped)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in _present(self, d):
            value = self.padders[d[key].ndim - 1].inverse(d[key])
            d[key] = self.cropper.inverse(value)
        return d


class ResizeImaged(_MonaiMasksd, Resized):
    """MONAI ``Resized`` for 2D images (and their masks) to a fixed size, as for chest X-ray and OCT releases.

    The image is resized with anti-aliased bilinear interpolation and clamped to [0, 1], other keys with
    nearest neighbour keeping their dtype; values that are not tensors (an integer image-level label, ``None``)
    pass through. Invertible.

    Args:
        keys: keys to resize.
        spatial_size: output size, each a multiple of 16.
        image_key: the key resized with interpolation.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "mask"),
        spatial_size: Sequence[int] | int = (256, 256),
        image_key: str = "image",
        allow_missing_keys: bool = True,
    ) -> None:
        size = (int(spatial_size),) * 2 if isinstance(spatial_size, int) else tuple(int(s) for s in spatial_size)
        if len(size) != 2 or any(s <= 0 or s % 16 for s in size):
            raise AEFlowInputError(f"image size must be two positive multiples of 16, got {spatial_size}")
        modes, anti_aliasing = _modes(keys, image_key, "bilinear", "nearest"), _modes(keys, image_key, True, False)
        super().__init__(keys, size, mode=modes, anti_aliasing=anti_aliasing, allow_missing_keys=allow_missing_keys)
        self.image_key = image_key

    def _applies(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor)

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = super().__call__(data, lazy=lazy)
        if self.image_key in self.keys and isinstance(d.get(self.image_key), torch.Tensor):
            d[self.image_key] = d[self.image_key].clamp_(0.0, 1.0)
        return d


class BinarizeLabeld(MapTransform):
    """Turn a lesion label map into a binary uint8 mask: lesion = ``label > threshold``.

    BraTS labels 1, 2, 3 (or 4) all become 1. Integer image-level labels are left as they are. A data dict
    with ``"region_labels"`` (a list of label values, e.g. a BraTS region from
    :func:`~monai_aeflow.data.indexers.with_brats_region`; not ``"label_..."``: MONAI takes such keys for meta
    dicts) makes only those values lesion.

    Args:
        keys: label keys.
        threshold: values above it are lesion.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection = "label", threshold: float = 0.0, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in _present(self, d):
            if isinstance(d[key], torch.Tensor):
                values = d.get("region_labels")
                if values is not None:  # a region: only these label values are lesion
                    lesion = torch.isin(d[key], torch.as_tensor(list(values), dtype=d[key].dtype))
                else:
                    lesion = d[key] > self.threshold
                d[key] = _as_meta(lesion, d[key], dtype=torch.uint8)
        return d


class CastMasksd(MapTransform):
    """Store masks as uint8 (0/1) to keep cached volumes small.

    Args:
        keys: mask keys.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection = ("mask", "label"), allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in _present(self, d):
            if isinstance(d[key], torch.Tensor):
                d[key] = _as_meta(d[key] > 0.5, d[key], dtype=torch.uint8)
        return d
