"""Score preprocessed volumes with a trained model and run the evaluation protocol on them.

:func:`score_cases` turns a network's slice-by-slice scores (:func:`monai_aeflow.inference.score_volume`) into
evaluation cases; :func:`evaluate_model` chooses the threshold on the validation volumes and measures the test
volumes (:func:`monai_aeflow.evaluation.evaluate_maps`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_aeflow.data.slices import select_slices
from monai_aeflow.evaluation.pipeline import EvaluationConfig, evaluate_maps
from monai_aeflow.inference.volume import score_volume

__all__ = ["score_cases", "evaluate_model", "reconstruction_quality"]


def _plain(value: Any) -> torch.Tensor:
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def score_cases(
    network: nn.Module,
    volumes: Sequence[Mapping[str, Any]],
    batch_size: int = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    min_area_fraction: float = 0.2,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Score the brain slices of preprocessed volumes and build evaluation cases.

    A model that reconstructs (``network.reconstructs`` is not False) with the residual map gives its input and
    reconstruction, so that the protocol's ``positive`` / ``absolute`` residual mode applies; other models give
    their anomaly map.

    Args:
        network: a registered model in ``eval()`` mode.
        volumes: preprocessed volume dicts (``image`` (C, X, Y, Z), ``mask``, ``label``, ``subject_id``).
        batch_size: slices per forward pass.
        beta: flow weight of AE-FLOW's score.
        map_kind: pixel map kind.
        min_area_fraction: slices with at least this fraction of the largest brain area get an image-level
            score (slices without brain are never scored).

    Returns:
        The cases for :func:`~monai_aeflow.evaluation.evaluate_maps` and the image-level ``{"scores", "labels"}``
        of the scored slices (the model's own score of each slice; abnormal when it holds lesion voxels).
    """
    reconstructs = getattr(network, "reconstructs", True) and map_kind == "residual"
    cases, scores, labels = [], [], []
    for i, vol in enumerate(volumes):
        image = _plain(vol["image"]).float()
        mask = _plain(vol["mask"])[0].numpy() > 0
        label_value = vol.get("label")
        label = np.zeros(mask.shape, bool) if label_value is None else _plain(label_value)[0].numpy() > 0
        brain_slices = select_slices(mask, None, 0.0)
        result = score_volume(network, image, slices=brain_slices, batch_size=batch_size, beta=beta, map_kind=map_kind)
        case: dict[str, Any] = {"name": str(vol.get("subject_id") or f"case{i:03d}"), "label": label, "mask": mask}
        if reconstructs:
            case["image"] = image.mean(0).numpy()
            case["reconstruction"] = result.reconstruction
        else:
            case["map"] = result.anomaly_map
        cases.append(case)
        keep = select_slices(mask, None, min_area_fraction)
        scores.append(result.slice_scores[keep])
        labels.append(label[..., keep].reshape(-1, len(keep)).any(0))
    image_scores = {"scores": np.concatenate(scores), "labels": np.concatenate(labels)}
    return cases, image_scores


def reconstruction_quality(
    cases: Sequence[Mapping[str, Any]], min_area_fraction: float = 0.2
) -> dict[str, float | int | str]:
    """PSNR, SSIM and MSE of the reconstructions of the healthy brain slices of scored cases.

    Healthy slices are the axial slices without lesion voxels whose brain area is at least ``min_area_fraction``
    of the largest (as for the slice-level metrics); the metrics are MONAI's ``PSNRMetric`` and
    ``SSIMMetric`` with a data range of 1 over whole slices (see
    :class:`~monai_aeflow.engines.metrics.ReconstructionQuality`).

    Args:
        cases: cases of :func:`score_cases` (those of a reconstructing model hold ``image`` and
            ``reconstruction``).
        min_area_fraction: brain-area fraction of the slices used.

    Returns:
        ``{"psnr", "ssim", "mse", "n_images", "slices"}``; empty when the model does not reconstruct or no
        slice is healthy.
    """
    from monai_aeflow.engines.metrics import ReconstructionQuality

    quality = ReconstructionQuality()
    for case in cases:
        if "reconstruction" not in case or case.get("image") is None:
            return {}
        keep = select_slices(np.asarray(case["mask"], bool), np.asarray(case["label"], bool), min_area_fraction, True)
        if keep.size == 0:
            continue
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(case["image"])[..., keep], -1, 0)))[:, None]
        y = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(case["reconstruction"])[..., keep], -1, 0)))
        quality.update(x.float(), y[:, None].float())
    result: dict[str, Any] = dict(quality.compute())
    if result:
        result["slices"] = "healthy brain slices of the validation volumes (no lesion voxel), whole slices, range 1"
    return result


def evaluate_model(
    network: nn.Module,
    val_volumes: Sequence[Mapping[str, Any]],
    test_volumes: Sequence[Mapping[str, Any]],
    config: EvaluationConfig | None = None,
    batch_size: int = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
    min_area_fraction: float = 0.2,
) -> dict[str, Any]:
    """Score the validation and test volumes and run the evaluation protocol.

    Args:
        network: a registered model.
        val_volumes: preprocessed validation volumes (the threshold is chosen on them).
        test_volumes: preprocessed test volumes.
        config: evaluation settings (its ``slice_min_brain_fraction`` is set to ``min_area_fraction``).
        batch_size: slices per forward pass.
        beta: flow weight of AE-FLOW's score.
        map_kind: pixel map kind.
        min_area_fraction: slices used for slice-level metrics.

    Returns:
        The result of :func:`~monai_aeflow.evaluation.evaluate_maps`; ``metrics["image"]`` holds the slice-level
        metrics of the model's own image score, and ``reconstruction`` the PSNR / SSIM of the healthy validation
        slices (see :func:`reconstruction_quality`; empty for a model that does not reconstruct).
    """
    config = dataclasses.replace(config or EvaluationConfig(), slice_min_brain_fraction=min_area_fraction)
    network.eval()
    val_cases, _ = score_cases(network, val_volumes, batch_size, beta, map_kind, min_area_fraction)
    test_cases, image_scores = score_cases(network, test_volumes, batch_size, beta, map_kind, min_area_fraction)
    result = evaluate_maps(val_cases, test_cases, config, image_scores=image_scores)
    result["reconstruction"] = reconstruction_quality(val_cases, min_area_fraction)
    return result
