"""Intensity baseline: nothing to train; the median-filtered image is the map and its maximum the score.

The network is :class:`monai_aeflow.networks.intensity.IntensityBaseline`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_aeflow.models.common import NothingToTrain
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.intensity import IntensityBaseline

__all__ = ["SPEC", "NothingToTrain", "intensity_score", "make_loss"]


def intensity_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Intensity baseline: the map is the median-filtered image, the image score its maximum.

    Args:
        network: an :class:`IntensityBaseline`.
        x: (B, C, H, W) images in [0, 1] (skull-stripped: the brightest tissue is then the lesion on FLAIR).
        beta: unused.
        map_kind: ignored (one map).

    Returns:
        ``{"score", "anomaly_map", "recon"}`` (``recon`` is the input).
    """
    out = network(x)
    amap = out.anomaly_map.float()
    return {"score": amap.flatten(1).amax(1), "anomaly_map": amap, "recon": x.float()}


def make_loss(training: Mapping[str, Any]) -> nn.Module:
    """The intensity baseline's "loss", which refuses to train.

    Args:
        training: ignored.

    Returns:
        A :class:`NothingToTrain`.
    """
    return NothingToTrain("the intensity baseline has nothing to train; save it as it is (aeflow-cli train does)")


SPEC = ModelSpec(
    name="intensity",
    network_cls=IntensityBaseline,
    make_loss=make_loss,
    score=intensity_score,
    description="intensity threshold: the median-filtered image as the anomaly map (nothing trained)",
    defaults={"in_channels": 1, "median_size": 5},
)
"""The intensity baseline in the registry."""
