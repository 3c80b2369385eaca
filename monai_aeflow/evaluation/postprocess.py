"""Post-processing of residual (anomaly-map) volumes before they are binarised.

The brain MRI protocol of the project: optionally standardise the map within the brain of each scan (a robust
z-score, so that one threshold means the same on scans of other contrast and noise levels), keep the positive or
absolute part, multiply it by the brain mask eroded slice by slice, median filter it (2D ``k x k`` per axial
slice or 3D ``k x k x k``), binarise it with a threshold and remove the connected components of ``n`` voxels or
fewer.
Volumes are ``(X, Y, Z)`` arrays whose last axis is axial; 2D images ``(X, Y)`` are treated as one slice.

Example::

    cfg = PostprocessConfig(residual="absolute", median_size=5, median_dims=2, min_component_size=7)
    score = postprocess_map(residual_volume, brain_mask, cfg)   # continuous map
    lesions = segment(score, threshold=0.1, config=cfg)         # binary mask
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from monai_aeflow.errors import AEFlowInputError

__all__ = [
    "RESIDUAL_MODES",
    "NORMALIZATIONS",
    "PostprocessConfig",
    "robust_scale",
    "normalize_map",
    "apply_residual_mode",
    "erode_mask_per_slice",
    "median_filter",
    "binarize",
    "remove_small_components",
    "component_opening",
    "postprocess_map",
    "segment",
]

RESIDUAL_MODES: tuple[str, ...] = ("positive", "absolute")
"""``positive``: ``max(r, 0)`` (hyper-intense lesions); ``absolute``: ``|r|`` (hypo- and hyper-intense)."""

NORMALIZATIONS: tuple[str, ...] = ("none", "robust")
"""``none``: the raw map (the default; also for protocols stored before the option existed); ``robust``:
``(m - median) / IQR`` of the map over the brain of the same scan."""


@dataclass(frozen=True)
class PostprocessConfig:
    """Parameters of the post-processing of residual volumes.

    Args:
        normalize: ``"none"`` (default) keeps the raw map; ``"robust"`` first standardises the map of each scan
            (volume or 2D image) with the median and interquartile range of its brain voxels,
            ``(m - median) / IQR``, so that the validation threshold transfers to scans whose maps are on another
            scale (other scanner, contrast or noise). On the BraTS dev protocol it lifted the intensity baseline
            and AE-FLOW on FLAIR at 2 mm but not in every setting (docs/studies.md): an option, not the default. See
            :func:`normalize_map`.
        residual: ``"positive"`` keeps ``max(r, 0)``, ``"absolute"`` keeps ``|r|`` of the signed residual
            ``r = x - x'`` (a map that is already non-negative is unchanged by either). After ``robust``
            normalisation, ``positive`` keeps what lies above the scan's median and ``absolute`` the deviation
            from it either way (bright and dark lesions of a non-negative map).
        erosion_iterations: iterations of a 3x3 cross erosion of the brain mask, per axial slice
            (0: the mask is used as it is).
        median_size: side ``k`` of the median filter (1 or 0: no filtering).
        median_dims: 2 for a ``k x k`` filter per axial slice, 3 for a ``k x k x k`` filter.
        min_component_size: connected components of this many voxels or fewer are removed after
            binarisation (0: none removed).
        component_dims: 2 for components within each axial slice, 3 for components in the volume;
            ``None`` follows ``median_dims``.
        component_connectivity: 1 (faces: 4-/6-neighbourhood) up to the number of dimensions (8-/26-).
    """

    residual: str = "absolute"
    normalize: str = "none"
    erosion_iterations: int = 3
    median_size: int = 5
    median_dims: int = 2
    min_component_size: int = 7
    component_dims: int | None = None
    component_connectivity: int = 1

    def __post_init__(self) -> None:
        if self.residual not in RESIDUAL_MODES:
            raise AEFlowInputError(f"residual must be one of {RESIDUAL_MODES}, got {self.residual!r}")
        if self.normalize not in NORMALIZATIONS:
            raise AEFlowInputError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.median_dims not in (2, 3):
            raise AEFlowInputError(f"median_dims must be 2 or 3, got {self.median_dims}")
        if self.component_dims not in (None, 2, 3):
            raise AEFlowInputError(f"component_dims must be 2, 3 or None, got {self.component_dims}")
        if self.median_size < 0 or self.erosion_iterations < 0 or self.min_component_size < 0:
            raise AEFlowInputError("median_size, erosion_iterations and min_component_size must be >= 0")
        if self.median_size > 1 and self.median_size % 2 == 0:
            raise AEFlowInputError(f"median_size must be odd, got {self.median_size}")
        if self.component_connectivity not in (1, 2, 3):
            raise AEFlowInputError(f"component_connectivity must be 1, 2 or 3, got {self.component_connectivity}")

    @property
    def effective_component_dims(self) -> int:
        """The dimensionality of connected components (``component_dims`` or ``median_dims``)."""
        return self.median_dims if self.component_dims is None else self.component_dims

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-ready dict (with the resolved component dimensionality)."""
        out = asdict(self)
        out["component_dims"] = self.effective_component_dims
        return out


def _as_volume(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3:
        raise AEFlowInputError(f"expected a 2D image or a 3D volume, got an array of shape {array.shape}")
    return array


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    """The centre and scale of :func:`normalize_map`: the median and the interquartile range of ``values``.

    A degenerate spread falls back to the standard deviation, then to 1 (a constant map stays finite).

    Args:
        values: the map's values over the brain (any shape; flattened).

    Returns:
        ``(median, scale)``, with ``scale > 0``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0, 1.0
    q25, med, q75 = np.percentile(v, [25.0, 50.0, 75.0])
    scale = float(q75 - q25)
    if not scale > 1e-12:
        scale = float(v.std())
    return float(med), scale if scale > 1e-12 else 1.0


def normalize_map(amap: np.ndarray, brain_mask: np.ndarray | None, mode: str = "robust") -> np.ndarray:
    """Standardise an anomaly map within the brain of its own scan: ``(m - median) / IQR``.

    The statistics are those of the brain voxels (the whole map without a mask, or when the mask is empty):
    per volume for a 3D map, per image for a 2D one. Lesions are a minority of the brain, so the median and the
    interquartile range describe the scan's healthy tissue, and a threshold in these units carries over between
    scans whose raw maps differ in level and spread.

    Args:
        amap: the map, ``(X, Y, Z)`` or ``(X, Y)``.
        brain_mask: boolean mask of the same shape, or ``None``.
        mode: ``"robust"`` or ``"none"`` (the map unchanged, as float32).

    Returns:
        The float32 map, same shape.
    """
    m = np.asarray(amap, dtype=np.float32)
    if mode == "none":
        return m
    if mode != "robust":
        raise AEFlowInputError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    values = m
    if brain_mask is not None:
        mask = np.asarray(brain_mask, dtype=bool)
        if mask.shape != m.shape:
            raise AEFlowInputError(f"brain mask shape {mask.shape} differs from the map shape {m.shape}")
        if mask.any():
            values = m[mask]
    centre, scale = robust_scale(values)
    return ((m - np.float32(centre)) / np.float32(scale)).astype(np.float32)


def apply_residual_mode(residual: np.ndarray, mode: str = "absolute") -> np.ndarray:
    """Keep the positive part or the absolute value of a signed residual.

    Args:
        residual: the residual ``x - x'`` (any shape).
        mode: ``"positive"`` or ``"absolute"``.

    Returns:
        A non-negative float32 array of the same shape.
    """
    r = np.asarray(residual, dtype=np.float32)
    if mode == "positive":
        return np.maximum(r, 0.0)
    if mode == "absolute":
        return np.abs(r)
    raise AEFlowInputError(f"residual mode must be one of {RESIDUAL_MODES}, got {mode!r}")


def _slice_structure(dims: int, connectivity: int) -> np.ndarray:
    """A 3D structuring element; for ``dims == 2`` it has no neighbours along the last (axial) axis."""
    if dims == 3:
        return ndimage.generate_binary_structure(3, connectivity)
    s2 = ndimage.generate_binary_structure(2, min(connectivity, 2))
    s = np.zeros((3, 3, 3), dtype=bool)
    s[:, :, 1] = s2
    return s


def erode_mask_per_slice(mask: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Erode a brain mask within each axial slice (3x3 cross, ``iterations`` times).

    Args:
        mask: boolean ``(X, Y, Z)`` volume or ``(X, Y)`` image.
        iterations: number of erosions; 0 returns the mask unchanged.

    Returns:
        The eroded boolean mask, same shape as ``mask``.
    """
    m = np.asarray(mask, dtype=bool)
    if iterations <= 0 or not m.any():
        return m.copy()
    vol = _as_volume(m)
    out = ndimage.binary_erosion(vol, structure=_slice_structure(2, 1), iterations=iterations, border_value=0)
    return out.reshape(m.shape)


def median_filter(volume: np.ndarray, size: int = 5, dims: int = 2, mode: str = "reflect") -> np.ndarray:
    """Median filter, ``size x size`` per axial slice (``dims=2``) or ``size^3`` (``dims=3``).

    Identical to ``scipy.ndimage.median_filter(volume, size=(k, k, 1) or (k, k, k), mode=mode)``, computed
    only on the bounding box of the non-zero voxels (plus a margin): a residual multiplied by a brain mask
    is zero on most of the volume, where the filtered value is zero as well.

    Args:
        volume: ``(X, Y, Z)`` or ``(X, Y)`` array.
        size: kernel side ``k``; 0 or 1 returns a copy.
        dims: 2 or 3.
        mode: boundary mode passed to :func:`scipy.ndimage.median_filter`.

    Returns:
        The filtered array (float32 for float inputs), same shape as ``volume``.
    """
    arr = np.asarray(volume)
    if size <= 1:
        return arr.copy()
    if dims not in (2, 3):
        raise AEFlowInputError(f"median filter dims must be 2 or 3, got {dims}")
    vol = _as_volume(arr)
    ksize = (size, size, size if dims == 3 else 1)
    out = np.zeros_like(vol)
    if not vol.any():
        return out.reshape(arr.shape)
    nz_box = _bounding_box(vol != 0)
    # Outputs further than r from the non-zero bounding box are zero; those within r read inputs within 2r.
    out_sl, crop_sl, inner_sl = [], [], []
    for axis, k in enumerate(ksize):
        r = k // 2
        n = vol.shape[axis]
        lo, hi = nz_box[axis].start, nz_box[axis].stop
        olo, ohi = max(0, lo - r), min(n, hi + r)
        clo, chi = max(0, lo - 2 * r), min(n, hi + 2 * r)
        out_sl.append(slice(olo, ohi))
        crop_sl.append(slice(clo, chi))
        inner_sl.append(slice(olo - clo, ohi - clo))
    filtered = ndimage.median_filter(vol[tuple(crop_sl)], size=ksize, mode=mode)
    out[tuple(out_sl)] = filtered[tuple(inner_sl)]
    return out.reshape(arr.shape)


def _bounding_box(vol: np.ndarray) -> tuple[slice, ...]:
    """Slices of the bounding box of the non-zero voxels of a non-empty 3D array."""
    box = []
    for axis in range(vol.ndim):
        others = tuple(a for a in range(vol.ndim) if a != axis)
        idx = np.flatnonzero(np.any(vol, axis=others))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def binarize(score: np.ndarray, threshold: float) -> np.ndarray:
    """Voxels whose score exceeds the threshold (``score > threshold``).

    Args:
        score: the continuous map.
        threshold: the binarisation threshold.

    Returns:
        A boolean array of the same shape.
    """
    return np.asarray(score) > threshold


def remove_small_components(binary: np.ndarray, max_size: int = 7, dims: int = 2, connectivity: int = 1) -> np.ndarray:
    """Remove connected components of ``max_size`` voxels or fewer.

    Args:
        binary: boolean ``(X, Y, Z)`` or ``(X, Y)`` array.
        max_size: components with at most this many voxels are removed; 0 keeps everything.
        dims: 2 for components within each axial slice, 3 for components in the volume.
        connectivity: 1 (face neighbours) up to the number of dimensions (all neighbours).

    Returns:
        The cleaned boolean array, same shape as ``binary``.
    """
    b = np.asarray(binary, dtype=bool)
    if max_size <= 0 or not b.any():
        return b.copy()
    vol = _as_volume(b)
    # Label only the bounding box of the foreground: cheap at high thresholds.
    box = _bounding_box(vol)
    sub = vol[box]
    labels, n = ndimage.label(sub, structure=_slice_structure(dims, connectivity))
    fg = labels[sub]  # component of each foreground voxel (the foreground is usually sparse)
    keep = np.bincount(fg, minlength=n + 1) > max_size
    kept = np.zeros_like(sub)
    kept[sub] = keep[fg]
    out = np.zeros_like(vol)
    out[box] = kept
    return out.reshape(b.shape)


def component_opening(score: np.ndarray, max_size: int = 7, dims: int = 2, connectivity: int = 1) -> np.ndarray:
    """The map whose level sets are the cleaned binarisations of ``score`` at every threshold.

    An area opening (scikit-image :func:`~skimage.morphology.area_opening` with an area of ``max_size + 1``,
    per axial slice for ``dims=2``): for every threshold ``t >= 0``,
    ``component_opening(score) > t`` equals ``remove_small_components(score > t, max_size, dims, connectivity)``
    for a non-negative ``score``. One opening thus gives the cleaned segmentation at all thresholds at once,
    which makes the exact Dice-maximising threshold cheap to find.

    Args:
        score: non-negative ``(X, Y, Z)`` or ``(X, Y)`` map.
        max_size: components with at most this many voxels are removed; 0 returns a copy.
        dims: 2 for components within each axial slice, 3 for components in the volume.
        connectivity: 1 (face neighbours) up to the number of dimensions (all neighbours).

    Returns:
        The opened map (float32), same shape as ``score``, ``0 <= opened <= score``.
    """
    from skimage.morphology import area_opening

    s = np.asarray(score, dtype=np.float32)
    if max_size <= 0 or not s.any():
        return s.copy()
    if dims not in (2, 3):
        raise AEFlowInputError(f"component dims must be 2 or 3, got {dims}")
    vol = _as_volume(s)
    out = np.zeros_like(vol)
    box = _bounding_box(vol != 0)
    sub = vol[box]

    def opening(a: np.ndarray, conn: int) -> np.ndarray:
        # a zero border (never > t >= 0, so components are unchanged): scikit-image needs >= 3 voxels per axis
        inner = tuple(slice(1, -1) for _ in a.shape)
        return area_opening(np.pad(a, 1), area_threshold=max_size + 1, connectivity=conn)[inner]

    if dims == 3:
        out[box] = opening(sub, min(connectivity, 3))
    else:
        opened = np.zeros_like(sub)
        for k in range(sub.shape[2]):
            plane = sub[:, :, k]
            if plane.any():
                pb = _bounding_box(plane != 0)  # components never reach beyond the plane's non-zero box
                opened[:, :, k][pb] = opening(plane[pb], min(connectivity, 2))
        out[box] = opened
    return out.reshape(s.shape)


def postprocess_map(residual: np.ndarray, brain_mask: np.ndarray | None, config: PostprocessConfig) -> np.ndarray:
    """The continuous anomaly map: normalisation within the brain, residual mode, eroded brain mask, median filter.

    Args:
        residual: signed or non-negative residual, ``(X, Y, Z)`` or ``(X, Y)``.
        brain_mask: boolean brain mask of the same shape, or ``None`` for the whole image.
        config: post-processing parameters.

    Returns:
        A non-negative float32 map of the same shape.
    """
    r = apply_residual_mode(normalize_map(residual, brain_mask, config.normalize), config.residual)
    if brain_mask is not None:
        mask = np.asarray(brain_mask, dtype=bool)
        if mask.shape != r.shape:
            raise AEFlowInputError(f"brain mask shape {mask.shape} differs from the map shape {r.shape}")
        r = r * erode_mask_per_slice(mask, config.erosion_iterations)
    return median_filter(r, config.median_size, config.median_dims)


def segment(score: np.ndarray, threshold: float, config: PostprocessConfig) -> np.ndarray:
    """Binarise a post-processed map and remove small connected components.

    Args:
        score: the map returned by :func:`postprocess_map`.
        threshold: voxels with ``score > threshold`` are foreground.
        config: post-processing parameters (component size, dimensionality and connectivity).

    Returns:
        The boolean lesion mask.
    """
    return remove_small_components(
        binarize(score, threshold),
        config.min_component_size,
        config.effective_component_dims,
        config.component_connectivity,
    )
