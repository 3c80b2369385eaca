"""Axial slice sampling of preprocessed brain volumes, on top of MONAI's caching datasets.

AE-FLOW is a 2D model: it trains on axial slices. :class:`SliceDataset` expands a sequence of
preprocessed volume dicts (a MONAI ``CacheDataset``, ``PersistentDataset``, ``Dataset`` or a list)
into slice dicts. Only slices whose brain area is at least ``min_area_fraction`` of the largest
brain area of the volume are kept; in training mode (``healthy_only=True``) only slices without any
lesion voxel are kept, as in the AE-FLOW BraTS protocol (healthy slices of tumour patients) and the
IXI -> BraTS/ATLAS protocol (all slices of healthy subjects).

With :func:`make_slice_dataset` the volume-level loading and preprocessing runs once per volume
(in memory with ``CacheDataset``, or on disk with ``PersistentDataset``), so that later epochs do not
re-read or re-preprocess volumes.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset

from monai_aeflow.data.io import reraise_input_errors
from monai_aeflow.data.preprocessing import build_volume_preprocessing
from monai_aeflow.errors import AEFlowInputError

__all__ = [
    "DEFAULT_MIN_AREA_FRACTION",
    "select_slices",
    "extract_slice",
    "SliceDataset",
    "make_slice_dataset",
]

DEFAULT_MIN_AREA_FRACTION = 0.2
"""Default fraction of the largest axial brain area that a kept slice must reach."""


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def select_slices(
    mask: Any,
    label: Any | None = None,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    healthy_only: bool = False,
) -> np.ndarray:
    """Indices of the axial slices (last axis) to keep.

    A slice is kept when its brain area is positive and at least ``min_area_fraction`` times the
    largest brain area of the volume; with ``healthy_only`` it must also hold no label voxel.

    Args:
        mask: brain mask ``(X, Y, Z)`` or channel-first ``(1, X, Y, Z)``.
        label: lesion label of the same shape, or ``None`` (no lesion).
        min_area_fraction: fraction in [0, 1] of the largest brain area.
        healthy_only: keep only slices without lesion voxels.

    Returns:
        sorted int64 slice indices.

    Raises:
        AEFlowInputError: for a fraction outside [0, 1] or a label whose shape differs from the mask.
    """
    if not 0.0 <= min_area_fraction <= 1.0:
        raise AEFlowInputError(f"min_area_fraction must be in [0, 1], got {min_area_fraction}")
    brain = _numpy(mask) > 0
    depth = brain.shape[-1]
    area = brain.reshape(-1, depth).sum(axis=0)
    keep = (area > 0) & (area >= min_area_fraction * area.max())
    if healthy_only and label is not None:
        lesion = _numpy(label) > 0
        if lesion.shape[-1] != depth or lesion.size != brain.size:
            raise AEFlowInputError(f"label shape {lesion.shape} differs from the mask shape {brain.shape}")
        keep &= ~lesion.reshape(-1, depth).any(axis=0)
    return np.flatnonzero(keep).astype(np.int64)


def _plain(value: Any) -> torch.Tensor:
    tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return tensor


def extract_slice(volume: Mapping[str, Any], index: int, volume_index: int = -1) -> dict[str, Any]:
    """One axial slice of a preprocessed volume dict, as a 2D data dict.

    Args:
        volume: dict with a channel-first ``"image"`` ``(C, X, Y, Z)``, ``"mask"`` and ``"label"``
            (``None``: no lesion), ``"subject_id"`` and ``"modality"``.
        index: axial slice index (last axis).
        volume_index: position of the volume in its dataset, stored as ``"volume_index"``.

    Returns:
        ``{"image": float32 (C, X, Y), "mask": float32 (1, X, Y), "label": float32 (1, X, Y),
        "slice_label": 0/1 (lesion in the slice), "subject_id", "modality", "slice_index",
        "volume_index"}``; tensors are plain, contiguous copies (they do not keep the volume alive).
    """
    image = _plain(volume["image"])[..., index].float().clone()
    mask_value = volume.get("mask")
    mask = (
        torch.ones((1, *image.shape[1:]), dtype=torch.float32)
        if mask_value is None
        else (_plain(mask_value)[..., index] > 0).float()
    )
    label_value = volume.get("label")
    label = (
        torch.zeros((1, *image.shape[1:]), dtype=torch.float32)
        if label_value is None
        else (_plain(label_value)[..., index] > 0).float()
    )
    return {
        "image": image,
        "mask": mask,
        "label": label,
        "slice_label": int(bool(label.any())),
        "subject_id": volume.get("subject_id"),
        "modality": volume.get("modality"),
        "slice_index": int(index),
        "volume_index": int(volume_index),
    }


class SliceDataset(torch.utils.data.Dataset):
    """Axial slices of a sequence of preprocessed volumes.

    The slice index is built once, at construction, by visiting every volume (with a caching volume
    dataset this is when the cache fills). Slices are then read from the volumes on demand; the last
    ``volume_cache_size`` volumes fetched are kept, so that consecutive slices of one volume do not
    fetch it again from a disk cache or a non-caching dataset.

    Args:
        volumes: preprocessed volume dicts (see :func:`extract_slice`), e.g. a MONAI ``CacheDataset``
            built with :func:`~monai_aeflow.data.preprocessing.build_volume_preprocessing`.
        min_area_fraction: keep slices whose brain area is at least this fraction of the largest.
        healthy_only: keep only slices without lesion voxels (training).
        transform: optional callable applied to each slice dict (e.g. MONAI 2D augmentations).
        volume_cache_size: number of recently fetched volumes kept by this dataset (0: none). Not
            needed for an in-memory ``CacheDataset`` built with ``copy_cache=False``.

    Example::

        volumes = CacheDataset(index_brats(root), build_volume_preprocessing(), copy_cache=False)
        train = SliceDataset(volumes, healthy_only=True)
        loader = DataLoader(train, batch_size=16, shuffle=True)
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
        healthy_only: bool = False,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        volume_cache_size: int = 1,
    ) -> None:
        self.volumes = volumes
        self.min_area_fraction = min_area_fraction
        self.healthy_only = healthy_only
        self.transform = transform
        self.volume_cache_size = max(int(volume_cache_size), 0)
        self._recent: OrderedDict[int, Mapping[str, Any]] = OrderedDict()
        volume_ids, slice_ids = [], []
        for v in range(len(volumes)):
            volume = self.volume(v)
            if volume.get("mask") is None:
                raise AEFlowInputError(
                    f"volume {v} ({volume.get('subject_id')}) has no brain mask; preprocess it with "
                    "build_volume_preprocessing (BrainMaskd)"
                )
            kept = select_slices(volume["mask"], volume.get("label"), min_area_fraction, healthy_only)
            volume_ids.append(np.full(len(kept), v, dtype=np.int64))
            slice_ids.append(kept)
        self._volume_index = np.concatenate(volume_ids) if volume_ids else np.zeros(0, np.int64)
        self._slice_index = np.concatenate(slice_ids) if slice_ids else np.zeros(0, np.int64)

    def volume(self, index: int) -> Mapping[str, Any]:
        """The preprocessed volume dict at ``index`` (through the small recent-volume cache)."""
        if index in self._recent:
            self._recent.move_to_end(index)
            return self._recent[index]
        with reraise_input_errors():  # MONAI datasets wrap transform errors in RuntimeError
            volume = self.volumes[index]
        if self.volume_cache_size:
            self._recent[index] = volume
            while len(self._recent) > self.volume_cache_size:
                self._recent.popitem(last=False)
        return volume

    @property
    def index(self) -> list[tuple[int, int]]:
        """``(volume index, slice index)`` of every slice, in dataset order."""
        return list(zip(self._volume_index.tolist(), self._slice_index.tolist(), strict=True))

    def slices_per_volume(self) -> list[list[int]]:
        """The kept slice indices of each volume."""
        return [self._slice_index[self._volume_index == v].tolist() for v in range(len(self.volumes))]

    def __len__(self) -> int:
        return int(self._slice_index.size)

    def __getitem__(self, i: int) -> Any:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"slice {i} out of range for {len(self)} slices")
        v = int(self._volume_index[i])
        item = extract_slice(self.volume(v), int(self._slice_index[i]), volume_index=v)
        return self.transform(item) if self.transform is not None else item


def make_slice_dataset(
    records: Sequence[Mapping[str, Any]],
    preprocessing: Callable[[Any], Any] | None = None,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    healthy_only: bool = False,
    transform: Callable[[dict[str, Any]], Any] | None = None,
    num_workers: int | None = 1,
    progress: bool = False,
) -> SliceDataset:
    """Slice dataset over indexed volumes, with the volume preprocessing cached.

    Args:
        records: volume records of an indexer (``image``, ``mask``, ``label``, ``subject_id``, ...).
        preprocessing: volume preprocessing (default :func:`build_volume_preprocessing`).
        cache: ``"memory"`` (MONAI ``CacheDataset``: preprocess once, keep the volumes in RAM),
            ``"disk"`` (MONAI ``PersistentDataset`` in ``cache_dir``: preprocess once, reload from disk)
            or ``"none"`` (re-read and re-preprocess a volume whenever it is needed).
        cache_dir: folder of the disk cache (required for ``"disk"``).
        min_area_fraction: see :class:`SliceDataset`.
        healthy_only: see :class:`SliceDataset`.
        transform: per-slice transform (augmentation).
        num_workers: threads that fill the in-memory cache.
        progress: show the cache-filling progress bar.

    Returns:
        the slice dataset; its ``volumes`` attribute is the underlying MONAI dataset.

    Raises:
        AEFlowInputError: for an unknown cache mode or a disk cache without folder.

    Example::

        train = make_slice_dataset(splits["train"], healthy_only=True)
        test = make_slice_dataset(splits["test"])
    """
    preprocess = preprocessing if preprocessing is not None else build_volume_preprocessing()
    data = [dict(r) for r in records]
    volumes: Sequence[Mapping[str, Any]]
    if cache == "memory":
        with reraise_input_errors():
            volumes = CacheDataset(
                data, preprocess, copy_cache=False, num_workers=num_workers, progress=progress, runtime_cache=False
            )
    elif cache == "disk":
        if cache_dir is None:
            raise AEFlowInputError("cache='disk' needs a cache_dir")
        volumes = PersistentDataset(data, preprocess, cache_dir=cache_dir)
    elif cache == "none":
        volumes = Dataset(data, preprocess)
    else:
        raise AEFlowInputError(f"cache must be 'memory', 'disk' or 'none', not {cache!r}")
    return SliceDataset(volumes, min_area_fraction, healthy_only, transform)
