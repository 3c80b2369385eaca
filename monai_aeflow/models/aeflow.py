"""AE-FLOW (Zhao et al., ICLR 2023): its loss factory, its score and pixel map, and its :class:`ModelSpec`.

The loss is :class:`monai_aeflow.losses.AEFlowLoss` and the score terms come from :mod:`monai_aeflow.scores`;
the network is :class:`monai_aeflow.networks.aeflow.AEFlow`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_aeflow.losses import AEFlowLoss
from monai_aeflow.models.common import loss_options
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.aeflow import AEFlow
from monai_aeflow.scores import DEFAULT_MAP_KIND, anomaly_map, combined_score, flow_score, recon_score

__all__ = ["DEFAULT_RECIPE", "RECIPES", "SPEC", "aeflow_score", "make_loss", "recipe_alpha"]

RECIPES: dict[str, dict[str, Any]] = {
    "balanced": {
        "alpha": 0.02,
        "description": "flow weight 0.02: the per-dimension NLL (about 2.5 nats) no longer outweighs the MSE (about "
        "0.01) by two orders of magnitude, so the flow's output stays decodable while the flow still learns the "
        "features' density (the default; measured in benchmarks/bench_recipe.py)",
    },
    "paper": {
        "alpha": 0.5,
        "description": "the paper's joint loss, alpha 0.5 (the per-dimension NLL outweighs the MSE and the decoder "
        "learns little more than the mean image)",
    },
}
"""AE-FLOW's named training recipes: the loss settings each one gives (``alpha``, the flow weight)."""

DEFAULT_RECIPE = "balanced"
"""The recipe used when none is named."""


def aeflow_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = DEFAULT_MAP_KIND
) -> dict[str, torch.Tensor]:
    """AE-FLOW's scorer: ``beta * S_flow + (1 - beta) * S_recon`` and the chosen pixel map.

    Args:
        network: an :class:`AEFlow`.
        x: (B, C, H, W) images.
        beta: flow weight.
        map_kind: ``residual`` (the paper's ``|x - x'|``, default), ``product`` (``|x - x'|`` times the flow's
            per-location NLL, measured on the BraTS dev protocol), ``flow`` or ``ssim``.

    Returns:
        ``score``, ``score_flow``, ``score_recon``, ``anomaly_map`` and ``recon``.
    """
    out = network(x)
    x = x.float()
    x_rec = out.x_rec.float()
    z_prime = out.z_prime.float()
    s_flow = flow_score(z_prime)
    s_recon = recon_score(x, x_rec)
    return {
        "score": combined_score(s_flow, s_recon, beta),
        "score_flow": s_flow,
        "score_recon": s_recon,
        "anomaly_map": anomaly_map(z_prime, x, x_rec, map_kind),
        "recon": x_rec,
    }


def recipe_alpha(recipe: str | None = None, alpha: float | None = None) -> float:
    """The flow weight of a training run: ``alpha`` when given, else the recipe's.

    Args:
        recipe: a name of :data:`RECIPES` (None: :data:`DEFAULT_RECIPE`).
        alpha: an explicit flow weight that overrides the recipe's, or None.

    Returns:
        The flow weight ``alpha`` of :class:`AEFlowLoss`.

    Raises:
        ValueError: an unknown recipe name.
    """
    name = DEFAULT_RECIPE if recipe is None else str(recipe)
    if name not in RECIPES:
        raise ValueError(f"unknown AE-FLOW training recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return float(RECIPES[name]["alpha"] if alpha is None else alpha)


def make_loss(training: Mapping[str, Any]) -> nn.Module:
    """AE-FLOW's loss from the training settings.

    Args:
        training: ``recipe`` (a name of :data:`RECIPES`, default :data:`DEFAULT_RECIPE`), ``alpha`` (flow weight;
            None or absent: the recipe's) and ``recon_loss`` (``mse`` or ``ssim``); ``loss_options`` must be empty.

    Returns:
        An :class:`AEFlowLoss`.
    """
    loss_options(training, {}, "aeflow")  # its settings are recipe, alpha and recon_loss: no loss options
    alpha = recipe_alpha(training.get("recipe"), training.get("alpha"))
    return AEFlowLoss(alpha, str(training.get("recon_loss", "mse")))


SPEC = ModelSpec(
    name="aeflow",
    network_cls=AEFlow,
    make_loss=make_loss,
    score=aeflow_score,
    description="AE-FLOW: autoencoder with a normalizing-flow bottleneck (Zhao et al., ICLR 2023)",
    defaults={"in_channels": 1, "backbone": "wide_resnet50_2"},
)
"""AE-FLOW in the registry."""
