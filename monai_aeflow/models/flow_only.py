"""Flow-only AE-FLOW (alpha = beta = 1, FastFlow-style): its likelihood loss and score, and its spec.

The network is :class:`monai_aeflow.networks.flow_only.FlowOnlyAEFlow`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_aeflow.losses import flow_nll_per_dim
from monai_aeflow.models.common import likelihood_map, loss_options
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.aeflow import AEFlowOutput
from monai_aeflow.networks.flow_only import FlowOnlyAEFlow
from monai_aeflow.scores import flow_score

__all__ = ["SPEC", "FlowOnlyLoss", "flow_only_score", "likelihood_map", "make_loss"]


class FlowOnlyLoss(nn.Module):
    """Per-dimension negative log-likelihood of the flow (AE-FLOW's loss with alpha = 1).

    Returns (from ``forward``):
        ``{"loss", "loss_flow"}``.
    """

    def forward(self, output: AEFlowOutput, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of one batch.

        Args:
            output: the network's output (``z_prime`` and ``log_det``).
            x: the input images (unused).

        Returns:
            ``{"loss", "loss_flow"}``.
        """
        loss = flow_nll_per_dim(output.z_prime, output.log_det).mean()
        return {"loss": loss, "loss_flow": loss.detach()}


def flow_only_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """Likelihood scorer of :class:`FlowOnlyAEFlow`: AE-FLOW's flow score with beta = 1.

    The image score is ``S_flow = -exp(mean_d log N(z'_d; 0, 1))``; the pixel map is :func:`likelihood_map`
    for every ``map_kind`` (the model has no reconstruction to take a residual of).

    Args:
        network: the flow-only model.
        x: (B, C, H, W) images.
        beta: unused (always 1).
        map_kind: ignored (see above).

    Returns:
        ``{"score", "score_flow", "anomaly_map", "recon"}`` (``recon`` is the input).
    """
    out: AEFlowOutput = network(x)
    s_flow = flow_score(out.z_prime)
    return {
        "score": s_flow,
        "score_flow": s_flow,
        "anomaly_map": likelihood_map(out.z_prime, tuple(x.shape[-2:])),
        "recon": x.float(),
    }


def make_loss(training: Mapping[str, Any]) -> nn.Module:
    """The flow-only model's loss (it takes no loss options).

    Args:
        training: the training settings (``loss_options`` must be empty).

    Returns:
        A :class:`FlowOnlyLoss`.
    """
    loss_options(training, {}, "flowonly")
    return FlowOnlyLoss()


SPEC = ModelSpec(
    name="flowonly",
    network_cls=FlowOnlyAEFlow,
    make_loss=make_loss,
    score=flow_only_score,
    description="flow-only AE-FLOW (alpha = beta = 1): FastFlow-style likelihood model",
    defaults={"in_channels": 1, "backbone": "wide_resnet50_2"},
)
"""The flow-only model in the registry."""
