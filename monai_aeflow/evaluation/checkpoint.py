"""Storing a validated threshold in a model file, so that scoring binarises maps with it.

The model file is the project's plain dict (``format``, ``config``, ``network``, ``threshold``,
``threshold_protocol``) read with ``torch.load(..., weights_only=True)``; it is rewritten atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monai_aeflow.errors import CheckpointError
from monai_aeflow.evaluation.io import to_jsonable

__all__ = ["threshold_protocol", "check_checkpoint", "save_threshold"]


def threshold_protocol(result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an evaluation protocol to store next to a threshold.

    Args:
        result: the output of :func:`~monai_aeflow.evaluation.pipeline.evaluate_maps`.

    Returns:
        ``{"method", "source", "postprocessing", "validation_dice_pooled", ...}`` (plain JSON types; the
        search trace and case names are left out).
    """
    info = {k: v for k, v in result["protocol"]["threshold"].items() if k not in ("trace", "validation_cases")}
    info["postprocessing"] = dict(result["protocol"]["postprocessing"])
    info["binarisation"] = "score > threshold after the post-processing"
    info["n_validation_volumes"] = result["protocol"]["splits"]["validation"]["n_volumes"]
    info["test_dice_pooled"] = result["metrics"]["pixel"]["dice_pooled"]["value"]
    info["evaluation_format"] = result.get("format")
    return info


def check_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a model file safely and check that it can hold a threshold.

    Args:
        path: the ``.pt`` file.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: missing, unreadable, unsafe or foreign file.
    """
    from monai_aeflow.checkpoint import read_checkpoint

    return read_checkpoint(path)


def save_threshold(
    checkpoint_path: str | os.PathLike, threshold: float, protocol: Mapping[str, Any] | None = None
) -> Path:
    """Store a threshold and its protocol in a model file (rewritten atomically).

    Args:
        checkpoint_path: the model file (``torch.save`` dict with ``format``, ``config``, ``network``, ...).
        threshold: the binarisation threshold of post-processed anomaly maps.
        protocol: how it was chosen (plain JSON-like values; non-finite floats become ``None``).

    Returns:
        The path written.

    Raises:
        CheckpointError: the file is not a readable monai-aeflow checkpoint, or the threshold is not finite.
    """
    from monai_aeflow.checkpoint import atomic_torch_save

    if threshold is None or not np.isfinite(float(threshold)):
        raise CheckpointError(f"cannot store a non-finite threshold ({threshold})", path=checkpoint_path)
    ckpt = check_checkpoint(checkpoint_path)
    ckpt["threshold"] = float(threshold)
    # Round-trip through JSON: only types that torch.load(weights_only=True) accepts remain.
    ckpt["threshold_protocol"] = json.loads(json.dumps(to_jsonable(dict(protocol or {}))))
    return atomic_torch_save(ckpt, checkpoint_path)


def save_reconstruction_quality(checkpoint_path: str | os.PathLike, quality: Mapping[str, Any]) -> Path:
    """Store the healthy-validation reconstruction quality in a model file's training record.

    ``config["training"]["metrics"]`` gains ``val_psnr`` and ``val_ssim`` (as written by the training
    workflow's validation) and ``config["training"]["reconstruction"]`` the full record; the file is rewritten
    atomically.

    Args:
        checkpoint_path: the model file.
        quality: ``{"psnr", "ssim", "mse", "n_images", ...}`` (plain numbers and strings).

    Returns:
        The path written.

    Raises:
        CheckpointError: the file is not a readable monai-aeflow checkpoint.
    """
    from monai_aeflow.checkpoint import atomic_torch_save

    ckpt = check_checkpoint(checkpoint_path)
    config = dict(ckpt.get("config") or {})
    training = dict(config.get("training") or {})
    metrics = dict(training.get("metrics") or {})
    metrics.update(val_psnr=float(quality["psnr"]), val_ssim=float(quality["ssim"]))
    training["metrics"] = metrics
    training["reconstruction"] = json.loads(json.dumps(to_jsonable(dict(quality))))
    config["training"] = training
    ckpt["config"] = config
    return atomic_torch_save(ckpt, checkpoint_path)
