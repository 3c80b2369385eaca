"""The standard preprocessing pipelines: the transforms of :mod:`monai_aeflow.data.transforms`, composed.

- :func:`build_volume_preprocessing`: brain MRI volumes, from indexer data dicts to [0, 1] volumes (invertible
  spatial steps, so that maps go back to the input's space);
- :func:`build_image_preprocessing`: 2D images (chest X-ray, OCT, ISIC) to [0, 1] images of a fixed size.

Model files store the keyword arguments of these builders, and the scorer rebuilds the pipeline from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.transforms import Compose

from monai_aeflow.data.io import LoadImageCheckedd, reraise_input_errors
from monai_aeflow.data.smoothing import CurvatureFlowd
from monai_aeflow.data.transforms import (
    BinarizeLabeld,
    BrainMaskd,
    CastMasksd,
    CropOrPadInPlaned,
    ResampleToSpacingd,
    ResizeImaged,
    ScaleIntensityInMaskd,
)

__all__ = ["PreprocessingCompose", "build_image_preprocessing", "build_volume_preprocessing"]


class PreprocessingCompose(Compose):
    """A MONAI ``Compose`` that lets :class:`~monai_aeflow.errors.AEFlowInputError` through unwrapped.

    MONAI wraps any exception raised inside a ``Compose`` in ``RuntimeError("applying transform
    ...")``; this subclass re-raises the user-input error itself, so that callers (and the command
    line) can report "file: problem" without a traceback.
    """

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        with reraise_input_errors():
            return super().__call__(input_, *args, **kwargs)


def build_volume_preprocessing(
    spatial_size: Sequence[int] | int = (256, 256),
    percentiles: tuple[float, float] = (1.0, 99.0),
    mask_threshold: float = 0.5,
    background: float | str | None = "auto",
    mask_erosion: int = 0,
    spacing: Sequence[float] | float | None = None,
    smoothing: bool = False,
    smoothing_iterations: int = 5,
    orientation: str = "RAS",
    image_key: str = "image",
    mask_key: str = "mask",
    label_key: str = "label",
) -> PreprocessingCompose:
    """The standard preprocessing of brain MRI volumes, from indexer data dicts to [0, 1] volumes.

    Args:
        spatial_size: in-plane size after crop/pad (multiples of 16).
        percentiles: clipping percentiles inside the brain mask.
        mask_threshold: threshold of a loaded (possibly probabilistic) brain mask.
        background: intensity outside the brain when there is no mask file (see :class:`BrainMaskd`).
        mask_erosion: erosion iterations of the brain mask.
        spacing: voxel spacing to resample to (e.g. ``1.0``), ``None`` to keep the input's.
        smoothing: apply CurvatureFlow smoothing.
        smoothing_iterations: CurvatureFlow iterations.
        orientation: axis codes (``"RAS"``: axial slices are the last axis).
        image_key: key of the image path(s).
        mask_key: key of the brain mask path (or ``None``).
        label_key: key of the lesion label path (or ``None``).

    Returns:
        a :class:`PreprocessingCompose` whose output dicts hold a float32 image ``(C, X, Y, Z)`` in
        [0, 1], a uint8 brain mask ``(1, X, Y, Z)`` and a uint8 binary lesion label (or ``None``), all
        MetaTensors.

    Example::

        preprocess = build_volume_preprocessing(spacing=1.0)
        volume = preprocess(index_brats("/data/BraTS2021", modality="flair")[0])
    """
    keys = (image_key, mask_key, label_key)
    transforms: list[Any] = [
        LoadImageCheckedd(keys, image_key=image_key, orientation=orientation, spatial_dims=3),
        BrainMaskd(image_key, mask_key, mask_threshold, background, mask_erosion),
        BinarizeLabeld(label_key),
    ]
    if spacing is not None:
        transforms.append(ResampleToSpacingd(keys, pixdim=spacing, image_key=image_key))
    if smoothing:
        transforms.append(CurvatureFlowd(image_key, iterations=smoothing_iterations))
    transforms += [
        ScaleIntensityInMaskd(image_key, mask_key, *percentiles),
        CropOrPadInPlaned(keys, spatial_size, source_key=mask_key),
        CastMasksd((mask_key, label_key)),
    ]
    return PreprocessingCompose(transforms)


def build_image_preprocessing(
    spatial_size: Sequence[int] | int = (256, 256),
    percentiles: tuple[float, float] = (1.0, 99.0),
    grayscale: bool = True,
    image_key: str = "image",
    mask_key: str = "mask",
) -> PreprocessingCompose:
    """The standard preprocessing of 2D images (chest X-ray, OCT): [0, 1] intensities, fixed size.

    Args:
        spatial_size: output size (multiples of 16).
        percentiles: clipping percentiles over the whole image (or inside the mask, if given).
        grayscale: convert colour images to one channel.
        image_key: key of the image path.
        mask_key: key of an optional mask path; a whole-image mask is made when it is ``None``.

    Returns:
        a :class:`PreprocessingCompose` whose output dicts hold a float32 image ``(C, H, W)`` in [0, 1] and a uint8 mask
        ``(1, H, W)``; an integer ``label`` passes through.
    """
    keys = (image_key, mask_key)
    return PreprocessingCompose(
        [
            LoadImageCheckedd(keys, image_key=image_key, spatial_dims=2, grayscale=grayscale),
            BrainMaskd(image_key, mask_key, background=None),
            ScaleIntensityInMaskd(image_key, mask_key, *percentiles),
            ResizeImaged(keys, spatial_size, image_key=image_key),
            CastMasksd(mask_key),
        ]
    )
