"""A post-processed case kept in a compact form for repeated thresholding.

Evaluating a split thresholds the same maps many times (threshold search, sweeps, oracle, figures). A
:class:`PreparedCase` keeps only what these need: the post-processed scores and labels of the voxels that can
matter (brain voxels, lesion voxels and non-zero scores, about 5 bytes each), their positions as packed bit
masks in a bounding box, and the slice- and volume-level scores. Everything else is zero and normal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.postprocess import (
    PostprocessConfig,
    component_opening,
    postprocess_map,
    remove_small_components,
)

__all__ = ["PreparedCase", "prepare_case"]


def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.ravel())


def _unpack(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.unpackbits(bits, count=int(np.prod(shape))).view(bool).reshape(shape)


@dataclass
class PreparedCase:
    """One post-processed case.

    Attributes:
        name: case name.
        shape: shape of the (3D) volume.
        box: bounding box of the stored voxels, one ``(start, stop)`` per axis.
        brain_bits: packed brain mask inside the box.
        extra_bits: packed mask of the stored voxels outside the brain (lesion or non-zero score).
        scores: post-processed scores of the brain voxels (box order) followed by the extra voxels.
        labels: lesion flags, same order.
        n_brain: number of brain voxels.
        slice_index: axial slices used for slice-level metrics.
        slice_scores: mean post-processed score over the brain voxels of each of these slices.
        slice_labels: whether each of these slices contains lesion voxels.
        volume_score: mean post-processed score over the brain.
        show_slice: the axial slice with the largest lesion area (largest brain area without lesion).
        source: the case mapping it came from (to reload images for figures).
    """

    name: str
    shape: tuple[int, ...]
    box: tuple[tuple[int, int], ...]
    brain_bits: np.ndarray
    extra_bits: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    n_brain: int
    slice_index: np.ndarray
    slice_scores: np.ndarray
    slice_labels: np.ndarray
    volume_score: float
    show_slice: int
    source: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def box_shape(self) -> tuple[int, ...]:
        """Shape of the bounding box."""
        return tuple(b - a for a, b in self.box)

    @property
    def box_slices(self) -> tuple[slice, ...]:
        """The bounding box as slices of the volume."""
        return tuple(slice(a, b) for a, b in self.box)

    @property
    def n_lesion(self) -> int:
        """Number of lesion voxels in the volume."""
        return int(np.count_nonzero(self.labels))

    @property
    def volume_label(self) -> bool:
        """Whether the volume contains lesion voxels."""
        return self.n_lesion > 0

    def brain_scores(self) -> np.ndarray:
        """Post-processed scores of the brain voxels (for pixel AUROC / AUPRC)."""
        return self.scores[: self.n_brain]

    def brain_labels(self) -> np.ndarray:
        """Lesion flags of the brain voxels."""
        return self.labels[: self.n_brain]

    def max_score(self) -> float:
        """Largest post-processed score (0 for an empty case)."""
        return float(self.scores.max()) if self.scores.size else 0.0

    def _masks(self) -> tuple[np.ndarray, np.ndarray]:
        shape = self.box_shape
        return _unpack(self.brain_bits, shape), _unpack(self.extra_bits, shape)

    def predict(self, threshold: float, config: PostprocessConfig) -> np.ndarray:
        """Binarised (``score > threshold``) and cleaned prediction of each stored voxel.

        Args:
            threshold: the threshold (>= 0: voxels not stored have score 0 and stay negative).
            config: post-processing parameters (component removal).

        Returns:
            Booleans in the order of :attr:`scores`.
        """
        pred = self.scores > threshold
        if config.min_component_size <= 0 or not pred.any():
            return pred
        brain, extra = self._masks()
        box = np.zeros(self.box_shape, dtype=bool)
        box[brain] = pred[: self.n_brain]
        box[extra] = pred[self.n_brain :]
        box = remove_small_components(
            box, config.min_component_size, config.effective_component_dims, config.component_connectivity
        )
        return np.concatenate([box[brain], box[extra]])

    def opened_scores(self, config: PostprocessConfig) -> np.ndarray:
        """Scores whose exceedance sets are the cleaned predictions at every threshold.

        ``opened_scores(config) > t`` equals :meth:`predict` ``(t, config)`` for every ``t >= 0`` (see
        :func:`~monai_aeflow.evaluation.postprocess.component_opening`).

        Args:
            config: post-processing parameters (component removal).

        Returns:
            float32 values in the order of :attr:`scores`.
        """
        if config.min_component_size <= 0 or not self.scores.any():
            return self.scores.copy()
        brain, extra = self._masks()
        box = np.zeros(self.box_shape, dtype=np.float32)
        box[brain] = self.scores[: self.n_brain]
        box[extra] = self.scores[self.n_brain :]
        box = component_opening(
            box, config.min_component_size, config.effective_component_dims, config.component_connectivity
        )
        return np.concatenate([box[brain], box[extra]])

    def counts_at(self, threshold: float, config: PostprocessConfig) -> tuple[int, int, int]:
        """True positives, false positives and false negatives of the full pipeline at a threshold.

        Args:
            threshold: binarisation threshold (``score > threshold``).
            config: post-processing parameters (component removal).

        Returns:
            ``(tp, fp, fn)`` over the whole volume.
        """
        pred = self.predict(threshold, config)
        tp = int(np.count_nonzero(pred & self.labels))
        fp = int(np.count_nonzero(pred)) - tp
        return tp, fp, self.n_lesion - tp

    def _to_volume(self, values: np.ndarray, dtype: Any) -> np.ndarray:
        vol = np.zeros(self.shape, dtype=dtype)
        brain, extra = self._masks()
        box = np.zeros(self.box_shape, dtype=dtype)
        box[brain] = values[: self.n_brain]
        box[extra] = values[self.n_brain :]
        vol[self.box_slices] = box
        return vol

    def score_volume(self) -> np.ndarray:
        """The post-processed map as a full volume."""
        return self._to_volume(self.scores, np.float32)

    def label_volume(self) -> np.ndarray:
        """The lesion label as a full boolean volume."""
        return self._to_volume(self.labels, bool)

    def brain_volume(self) -> np.ndarray:
        """The brain mask as a full boolean volume."""
        vol = np.zeros(self.shape, dtype=bool)
        vol[self.box_slices] = self._masks()[0]
        return vol

    def prediction_volume(self, threshold: float, config: PostprocessConfig) -> np.ndarray:
        """The final binary segmentation at a threshold, as a full volume."""
        pred = self.predict(threshold, config)
        return self._to_volume(pred, bool)


def prepare_case(
    arrays: Mapping[str, Any],
    config: PostprocessConfig,
    slice_min_brain_fraction: float = 0.0,
    source: Mapping[str, Any] | None = None,
) -> PreparedCase:
    """Post-process a loaded case and keep its compact form.

    Args:
        arrays: ``{"name", "residual", "label", "mask"}`` as returned by
            :func:`~monai_aeflow.evaluation.io.load_case` (``mask`` may be ``None``: whole volume).
        config: post-processing parameters.
        slice_min_brain_fraction: axial slices whose brain area is below this fraction of the largest brain
            area are left out of slice-level metrics (slices without brain always are).
        source: the original case mapping, kept for figures.

    Returns:
        The :class:`PreparedCase`.
    """
    name = str(arrays.get("name", "case"))
    residual = np.asarray(arrays["residual"])
    label = np.asarray(arrays["label"], dtype=bool)
    mask = arrays.get("mask")
    mask = np.ones(label.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if residual.ndim == 2:
        residual, label, mask = residual[..., None], label[..., None], mask[..., None]
    if not (residual.shape == label.shape == mask.shape):
        raise AEFlowInputError(
            f"case {name!r}: map {residual.shape}, label {label.shape} and mask {mask.shape} differ in shape"
        )
    if not mask.any():
        mask_file = dict(source or {}).get("mask")
        raise AEFlowInputError(f"case {name!r}: the brain mask is empty", path=mask_file)
    score = postprocess_map(residual, mask, config)

    support = mask | label | (score != 0)
    nz = np.nonzero(support)
    box = tuple((int(i.min()), int(i.max()) + 1) for i in nz)
    sl = tuple(slice(a, b) for a, b in box)
    brain_box = mask[sl]
    extra_box = support[sl] & ~brain_box
    s_box = score[sl]
    l_box = label[sl]
    scores = np.concatenate([s_box[brain_box], s_box[extra_box]]).astype(np.float32)
    labels = np.concatenate([l_box[brain_box], l_box[extra_box]])

    area = mask.sum(axis=(0, 1))
    sums = np.where(mask, score, 0).sum(axis=(0, 1), dtype=np.float64)
    keep = (area > 0) & (area >= slice_min_brain_fraction * area.max())
    slice_index = np.flatnonzero(keep)
    slice_scores = sums[keep] / area[keep]
    lesion_area = label.sum(axis=(0, 1))
    slice_labels = lesion_area[keep] > 0
    show = int(np.argmax(lesion_area)) if lesion_area.any() else int(np.argmax(area))
    return PreparedCase(
        name=name,
        shape=tuple(score.shape),
        box=box,
        brain_bits=_pack(brain_box),
        extra_bits=_pack(extra_box),
        scores=scores,
        labels=labels,
        n_brain=int(np.count_nonzero(brain_box)),
        slice_index=slice_index,
        slice_scores=slice_scores,
        slice_labels=slice_labels,
        volume_score=float(sums.sum() / area.sum()),
        show_slice=show,
        source=source,
    )
