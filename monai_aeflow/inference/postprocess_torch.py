"""The volume post-processing in torch, on any device: the GPU twin of :mod:`monai_aeflow.evaluation.postprocess`.

Robust normalisation of the map within the brain, brain-mask erosion per axial slice, median filter (2D
``k x k`` per slice or 3D ``k^3``), binarisation and removal of connected components of ``n`` voxels or fewer,
computed where the tensor lives (the scorer's GPU), so that a volume need not travel to the CPU between the
network and the lesion mask. Each function equals its numpy / scipy counterpart (``numpy.percentile``,
``scipy.ndimage.binary_erosion``, ``median_filter`` with ``mode="reflect"``, ``label``-based component removal):
the tests compare them voxel for voxel.

Connected components use label propagation on the graph of foreground voxels and their neighbours (the
structuring element's offsets): hooking to the largest neighbouring label and pointer jumping, until nothing
changes; the component's label is then the index of its last voxel.

Example::

    processed = postprocess_map_torch(residual.cuda(), brain.cuda(), cfg)
    lesions = segment_torch(processed, threshold, cfg)
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.postprocess import NORMALIZATIONS, RESIDUAL_MODES, PostprocessConfig

__all__ = [
    "normalize_map_torch",
    "lesion_mask_torch",
    "erode_mask_per_slice_torch",
    "median_filter_torch",
    "remove_small_components_torch",
    "postprocess_map_torch",
    "segment_torch",
    "lesion_mask_on",
]

MEDIAN_CHUNK_VALUES = 1 << 26
"""Window values gathered at once by :func:`median_filter_torch` (256 MiB of float32)."""


def _as_volume(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        return x[..., None]
    if x.ndim != 3:
        raise AEFlowInputError(f"expected a 2D image or a 3D volume, got a tensor of shape {tuple(x.shape)}")
    return x


def _offsets(dims: int, connectivity: int) -> list[tuple[int, int, int]]:
    """Neighbour offsets of scipy's structuring element (2D: none along the last, axial, axis)."""
    if dims == 3:
        s = ndimage.generate_binary_structure(3, connectivity)
    else:
        s = np.zeros((3, 3, 3), dtype=bool)
        s[:, :, 1] = ndimage.generate_binary_structure(2, min(connectivity, 2))
    return [tuple(int(v) - 1 for v in o) for o in np.argwhere(s) if tuple(o) != (1, 1, 1)]


def _shifted(x: torch.Tensor, offset: tuple[int, int, int], fill: float | bool) -> torch.Tensor:
    """``out[i] = x[i + offset]``, ``fill`` outside the volume."""
    out = torch.full_like(x, fill)
    dst, src = [], []
    for o, n in zip(offset, x.shape, strict=True):
        dst.append(slice(max(0, -o), n - max(0, o)))
        src.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = x[tuple(src)]
    return out


def erode_mask_per_slice_torch(mask: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Erode a brain mask within each axial slice (3x3 cross, ``iterations`` times, outside counts as 0).

    Args:
        mask: ``(X, Y, Z)`` or ``(X, Y)`` tensor (non-zero = brain).
        iterations: number of erosions; 0 returns the mask.

    Returns:
        The eroded boolean mask on the same device, same shape.
    """
    m = mask.bool()
    if iterations <= 0:
        return m.clone()
    vol = _as_volume(m)
    offsets = _offsets(2, 1)
    for _ in range(iterations):
        out = vol.clone()
        for o in offsets:
            out &= _shifted(vol, o, False)
        vol = out
    return vol.reshape(m.shape)


def _symmetric_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Indices of scipy's ``"reflect"`` padding (edge repeated: d c b a | a b c d | d c b a) by ``r``."""
    return torch.as_tensor(np.pad(np.arange(n), r, mode="symmetric"), device=device)


def median_filter_torch(volume: torch.Tensor, size: int = 5, dims: int = 2) -> torch.Tensor:
    """Median filter, ``size x size`` per axial slice (``dims=2``) or ``size^3`` (``dims=3``), on the tensor's
    device; equal to ``scipy.ndimage.median_filter(volume, size=(k, k, 1) or (k, k, k), mode="reflect")``.

    Args:
        volume: ``(X, Y, Z)`` or ``(X, Y)`` tensor.
        size: odd kernel side ``k``; 0 or 1 returns a copy.
        dims: 2 or 3.

    Returns:
        The filtered tensor, same shape and dtype.
    """
    if size <= 1:
        return volume.clone()
    if dims not in (2, 3):
        raise AEFlowInputError(f"median filter dims must be 2 or 3, got {dims}")
    if size % 2 == 0:
        raise AEFlowInputError(f"median_size must be odd, got {size}")
    vol = _as_volume(volume)
    r = size // 2
    rz = r if dims == 3 else 0
    out = torch.zeros_like(vol)
    nz = torch.nonzero(vol)
    if nz.numel() == 0:
        return out.reshape(volume.shape)
    # outputs further than r from the non-zero bounding box are zero; those within r read inputs within 2r
    lo, hi = nz.min(0).values.tolist(), (nz.max(0).values + 1).tolist()
    out_sl, crop_sl, inner_sl = [], [], []
    for axis, rr in enumerate((r, r, rz)):
        n = vol.shape[axis]
        olo, ohi = max(0, lo[axis] - rr), min(n, hi[axis] + rr)
        clo, chi = max(0, lo[axis] - 2 * rr), min(n, hi[axis] + 2 * rr)
        out_sl.append(slice(olo, ohi))
        crop_sl.append(slice(clo, chi))
        inner_sl.append(slice(olo - clo, ohi - clo))
    filtered = _median_full(vol[tuple(crop_sl)], size, rz)
    out[tuple(out_sl)] = filtered[tuple(inner_sl)]
    return out.reshape(volume.shape)


def _median_full(vol: torch.Tensor, size: int, rz: int) -> torch.Tensor:
    """scipy's ``median_filter(vol, (size, size, 2 rz + 1), mode="reflect")`` of a 3D tensor."""
    r = size // 2
    x, y, z = vol.shape
    dev = vol.device
    padded = vol.index_select(0, _symmetric_index(x, r, dev)).index_select(1, _symmetric_index(y, r, dev))
    if rz:
        padded = padded.index_select(2, _symmetric_index(z, rz, dev))
    # (Z', X', Y') windows over X and Y, then over Z for 3D
    planes = padded.permute(2, 0, 1)
    kz = 2 * rz + 1
    window = size * size * kz
    step = max(1, MEDIAN_CHUNK_VALUES // max(1, window * x * y))
    out = torch.empty((z, x, y), dtype=vol.dtype, device=dev)
    for start in range(0, z, step):
        stop = min(z, start + step)
        chunk = planes[start : stop + 2 * rz]  # the output slices' planes and their Z neighbours
        win = chunk.unfold(1, size, 1).unfold(2, size, 1)  # (n + 2 rz, X, Y, k, k)
        if rz:
            win = win.unfold(0, kz, 1)  # (n, X, Y, k, k, kz)
        values = win.reshape(stop - start, x, y, window)
        out[start:stop] = values.median(dim=-1).values
    return out.permute(1, 2, 0)


def remove_small_components_torch(
    binary: torch.Tensor, max_size: int = 7, dims: int = 2, connectivity: int = 1, check_every: int = 4
) -> torch.Tensor:
    """Remove connected components of ``max_size`` voxels or fewer, on the tensor's device.

    The foreground voxels and their neighbour pairs (the structuring element's offsets) form a graph; every
    voxel starts with its own index as label (a pointer to a voxel of its component); each round the voxel its
    label names takes the largest label of its neighbours' (hooking, ``scatter_reduce``) and every voxel then
    takes the label of the voxel its label names (pointer jumping), until nothing changes: each component
    ends with the index of its last voxel, in a number of rounds that grows with the logarithm of its size
    rather than its diameter, and ``bincount`` gives the sizes.

    Args:
        binary: boolean ``(X, Y, Z)`` or ``(X, Y)`` tensor.
        max_size: components with at most this many voxels are removed; 0 keeps everything.
        dims: 2 for components within each axial slice, 3 for components in the volume.
        connectivity: 1 (face neighbours) up to the number of dimensions (all neighbours).
        check_every: propagation rounds between the convergence checks (each check synchronises a GPU).

    Returns:
        The cleaned boolean tensor, same shape.
    """
    b = binary.bool()
    if max_size <= 0:
        return b.clone()
    vol = _as_volume(b)
    dev = vol.device
    fg = torch.nonzero(vol.reshape(-1)).squeeze(1)
    n_fg = int(fg.numel())
    if n_fg == 0:
        return b.clone()
    lookup = torch.full((vol.numel(),), -1, dtype=torch.int64, device=dev)
    lookup[fg] = torch.arange(n_fg, device=dev)
    shape = torch.as_tensor(vol.shape, device=dev)
    coords = torch.stack(torch.unravel_index(fg, tuple(vol.shape)), dim=1)
    strides = torch.as_tensor([vol.shape[1] * vol.shape[2], vol.shape[2], 1], device=dev)
    src, dst = [], []
    for o in _offsets(dims, connectivity):
        c = coords + torch.as_tensor(o, device=dev)
        inside = ((c >= 0) & (c < shape)).all(1)
        nbr = torch.where(inside, lookup[(c.clamp_min(0) * strides).sum(1).clamp_max(vol.numel() - 1)], -1)
        linked = nbr >= 0
        src.append(torch.nonzero(linked).squeeze(1))
        dst.append(nbr[linked])
    src_t, dst_t = torch.cat(src), torch.cat(dst)
    labels = torch.arange(n_fg, device=dev)
    while True:
        before = labels
        for _ in range(check_every):
            # hook the root named by each voxel's label to its neighbour's label (the larger wins), then jump
            labels = labels.scatter_reduce(0, labels[src_t], labels[dst_t], reduce="amax")
            labels = labels[labels[labels]]  # a label names a voxel of the same component whose label is >= it
        if torch.equal(labels, before):
            break
    keep = torch.bincount(labels, minlength=n_fg)[labels] > max_size
    out = torch.zeros(vol.numel(), dtype=torch.bool, device=dev)
    out[fg] = keep
    return out.reshape(b.shape)


def _percentiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """``numpy.percentile`` (linear interpolation) of a 1D tensor, by one sort (no size limit, unlike
    ``torch.quantile``); the results stay on the device as 0-d float64 tensors."""
    v = values.double().sort().values
    n = v.numel()
    out = []
    for q in qs:
        pos = q / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


def normalize_map_torch(amap: torch.Tensor, brain_mask: torch.Tensor | None, mode: str = "robust") -> torch.Tensor:
    """:func:`monai_aeflow.evaluation.postprocess.normalize_map` on the tensor's device: ``(m - median) / IQR``
    over the brain voxels (the standard deviation, then 1, when the spread is degenerate); the statistics stay on
    the device (selecting the brain voxels is the one wait for the host).

    Args:
        amap: the map, ``(X, Y, Z)`` or ``(X, Y)``.
        brain_mask: mask of the same shape, or ``None`` (the whole map; also when the mask is empty).
        mode: ``"robust"`` or ``"none"``.

    Returns:
        The float32 map, same shape and device.
    """
    m = amap.float()
    if mode == "none":
        return m
    if mode not in NORMALIZATIONS:
        raise AEFlowInputError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    values = m.flatten()
    if brain_mask is not None:
        if tuple(brain_mask.shape) != tuple(m.shape):
            raise AEFlowInputError(
                f"brain mask shape {tuple(brain_mask.shape)} differs from the map shape {tuple(m.shape)}"
            )
        inside = m[brain_mask.to(m.device).bool()]
        values = inside if inside.numel() else values
    if values.numel() == 0:
        return m
    q25, med, q75 = _percentiles(values, (25.0, 50.0, 75.0))
    scale = q75 - q25
    std = values.double().std(unbiased=False) if values.numel() > 1 else torch.zeros_like(scale)
    scale = torch.where(scale > 1e-12, scale, torch.where(std > 1e-12, std, torch.ones_like(scale)))
    return (m - med.float()) / scale.float()


def postprocess_map_torch(
    residual: torch.Tensor, brain_mask: torch.Tensor | None, config: PostprocessConfig
) -> torch.Tensor:
    """The continuous anomaly map: normalisation, residual mode, eroded brain mask, median filter (see
    :func:`monai_aeflow.evaluation.postprocess.postprocess_map`), on the tensor's device.

    Args:
        residual: signed or non-negative residual, ``(X, Y, Z)`` or ``(X, Y)``.
        brain_mask: brain mask of the same shape, or ``None``.
        config: post-processing parameters.

    Returns:
        A non-negative float32 map of the same shape.
    """
    r = normalize_map_torch(residual, brain_mask, config.normalize)
    if config.residual == "positive":
        r = r.clamp_min(0.0)
    elif config.residual == "absolute":
        r = r.abs()
    else:
        raise AEFlowInputError(f"residual mode must be one of {RESIDUAL_MODES}, got {config.residual!r}")
    if brain_mask is not None:
        if tuple(brain_mask.shape) != tuple(r.shape):
            raise AEFlowInputError(
                f"brain mask shape {tuple(brain_mask.shape)} differs from the map shape {tuple(r.shape)}"
            )
        r = r * erode_mask_per_slice_torch(brain_mask.to(r.device), config.erosion_iterations)
    return median_filter_torch(r, config.median_size, config.median_dims)


def segment_torch(score: torch.Tensor, threshold: float, config: PostprocessConfig) -> torch.Tensor:
    """Binarise a post-processed map (``score > threshold``) and remove small connected components.

    Args:
        score: the map returned by :func:`postprocess_map_torch`.
        threshold: the binarisation threshold.
        config: post-processing parameters.

    Returns:
        The boolean lesion mask on the same device.
    """
    return remove_small_components_torch(
        score > threshold, config.min_component_size, config.effective_component_dims, config.component_connectivity
    )


def lesion_mask_torch(
    anomaly_map: torch.Tensor, brain: torch.Tensor, threshold: float, config: PostprocessConfig
) -> torch.Tensor:
    """The post-processed binary lesion mask of a map, on the map's device (no copy to the host).

    Args:
        anomaly_map: the map on the input's grid.
        brain: the brain mask, same shape.
        threshold: the binarisation threshold.
        config: post-processing parameters.

    Returns:
        The uint8 lesion mask, same shape and device.
    """
    brain = torch.as_tensor(brain).to(anomaly_map.device, non_blocking=True)
    return segment_torch(postprocess_map_torch(anomaly_map, brain, config), threshold, config).to(torch.uint8)


def lesion_mask_on(
    anomaly_map: np.ndarray, brain: np.ndarray, threshold: float, config: PostprocessConfig, device: torch.device | str
) -> np.ndarray:
    """The post-processed binary lesion mask of a map, computed with scipy on the CPU or in torch elsewhere.

    Args:
        anomaly_map: the map on the input's grid.
        brain: the brain mask, same shape.
        threshold: the binarisation threshold.
        config: post-processing parameters.
        device: ``"cpu"`` for :mod:`monai_aeflow.evaluation.postprocess` (scipy), any other device (or
            ``"torch-cpu"`` to run the torch path on the CPU) for this module's functions there.

    Returns:
        The uint8 lesion mask, same shape.
    """
    if str(device) == "cpu":
        from monai_aeflow.evaluation.postprocess import postprocess_map, segment

        return segment(postprocess_map(anomaly_map, brain, config), threshold, config).astype(np.uint8)
    dev = torch.device("cpu" if str(device) == "torch-cpu" else device)
    amap = torch.as_tensor(anomaly_map).to(dev, non_blocking=True)
    return lesion_mask_torch(amap, torch.as_tensor(brain), threshold, config).cpu().numpy()
