"""PatchCore: its one-pass fit (memory bank of healthy patch features, greedy k-center coreset), its score and spec.

The network is :class:`monai_aeflow.networks.patchcore.PatchCore`. Nothing is trained by gradients: the engine
runs :class:`PatchCoreFitter` over the healthy training images once (see
:attr:`~monai_aeflow.models.spec.ModelSpec.make_fitter`); its options come from the training settings'
``loss_options`` (``aeflow-cli train --model patchcore --loss-arg coreset_fraction=0.01``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models.common import NothingToTrain, loss_options
from monai_aeflow.models.spec import ModelSpec
from monai_aeflow.networks.patchcore import PatchCore

__all__ = [
    "FIT_OPTIONS",
    "SPEC",
    "PatchCoreFitter",
    "greedy_coreset",
    "make_fitter",
    "make_loss",
    "patchcore_score",
    "random_projection",
]

FIT_OPTIONS: dict[str, Any] = {"coreset_fraction": 0.1, "projection_dim": 128, "seed": 0}
"""Options of the fit and their defaults: the fraction of patch features kept in the memory bank (the paper
reports 1 % to 25 %; 10 % as in anomalib), the dimension of the random projection used to select them (the
paper's Johnson-Lindenstrauss projection; None or 0: select on the features themselves) and the seed of the
projection and of the first coreset element."""


def random_projection(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian random projection to ``dim`` dimensions (entries N(0, 1/dim)): distances are kept approximately.

    Args:
        features: (N, D) features.
        dim: target dimension.
        seed: seed of the projection matrix (drawn on the CPU, so the same on every device).

    Returns:
        (N, dim) float32 projected features.
    """
    gen = torch.Generator().manual_seed(int(seed))
    matrix = torch.randn(features.shape[1], int(dim), generator=gen) / float(dim) ** 0.5
    return features.float() @ matrix.to(features.device)


def greedy_coreset(
    features: torch.Tensor, k: int, projection_dim: int | None = 128, seed: int = 0, start: int | None = None
) -> torch.Tensor:
    """Greedy k-center coreset (PatchCore's Algorithm 1): each step adds the feature farthest from those chosen.

    With ``projection_dim`` smaller than the feature dimension, the selection runs on a
    :func:`random_projection` of the features, as in the paper.

    Args:
        features: (N, D) features.
        k: coreset size (clipped to N).
        projection_dim: dimension of the projection used for the selection (None or 0: no projection).
        seed: seed of the projection and of the first element.
        start: index of the first element (default: drawn with ``seed``).

    Returns:
        (k,) int64 indices into ``features``, in selection order.
    """
    n = features.shape[0]
    k = max(1, min(int(k), n))
    feats = features.float()
    if projection_dim and projection_dim < feats.shape[1]:
        feats = random_projection(feats, projection_dim, seed)
    if start is None:
        start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(int(seed))))
    squared = feats.pow(2).sum(1)

    def _distances_to(i: int) -> torch.Tensor:
        # squared Euclidean distances of every feature to feature i with one matrix-vector product (the
        # selection is bound by reading the features once per step)
        return torch.addmv(squared, feats, feats[i], alpha=-2.0).add_(squared[i])

    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = start
    min_dist = _distances_to(start)
    for step in range(1, k):
        nxt = int(min_dist.argmax())
        chosen[step] = nxt
        torch.minimum(min_dist, _distances_to(nxt), out=min_dist)
    return chosen.to(features.device)


class PatchCoreFitter:
    """Collects the patch features of healthy images, then keeps a greedy coreset of them as the memory bank.

    Args:
        coreset_fraction: fraction of the collected patch features kept (0 < f <= 1).
        projection_dim: dimension of the random projection for the coreset selection (None or 0: none).
        seed: seed of the projection and of the first coreset element.
    """

    def __init__(self, coreset_fraction: float = 0.1, projection_dim: int | None = 128, seed: int = 0) -> None:
        if not 0.0 < float(coreset_fraction) <= 1.0:
            raise AEFlowInputError(f"coreset_fraction must be in (0, 1], got {coreset_fraction!r}")
        if projection_dim is not None and int(projection_dim) < 0:
            raise AEFlowInputError(f"projection_dim must be >= 0 or null, got {projection_dim!r}")
        self.coreset_fraction = float(coreset_fraction)
        self.projection_dim = None if not projection_dim else int(projection_dim)
        self.seed = int(seed)
        self.features: list[torch.Tensor] = []

    def update(self, network: nn.Module, x: torch.Tensor) -> None:
        """Add the patch features of a batch of healthy images.

        Args:
            network: the :class:`PatchCore` being fitted.
            x: (B, C, H, W) healthy images.
        """
        net = getattr(network, "module", network)
        with torch.no_grad():
            feats = net.embed(x)
        self.features.append(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))

    def finish(self, network: nn.Module) -> dict[str, float]:
        """Select the coreset and store it as the network's memory bank.

        Args:
            network: the :class:`PatchCore` being fitted.

        Returns:
            ``{"patch_features", "bank_size"}``.

        Raises:
            AEFlowInputError: no image was seen.
        """
        if not self.features:
            raise AEFlowInputError("patchcore saw no training image: the memory bank would be empty")
        feats = torch.cat(self.features)
        self.features = []
        n = feats.shape[0]
        k = max(1, round(self.coreset_fraction * n))
        if k < n:
            feats = feats[greedy_coreset(feats, k, self.projection_dim, self.seed)]
        getattr(network, "module", network).set_memory_bank(feats)
        return {"patch_features": float(n), "bank_size": float(k)}


def make_fitter(training: Mapping[str, Any]) -> PatchCoreFitter:
    """PatchCore's fitter from the training settings.

    Args:
        training: ``loss_options`` may set :data:`FIT_OPTIONS` (unknown keys are refused).

    Returns:
        A :class:`PatchCoreFitter`.
    """
    return PatchCoreFitter(**loss_options(training, FIT_OPTIONS, "patchcore"))


def make_loss(training: Mapping[str, Any]) -> nn.Module:
    """PatchCore's "loss", which refuses gradient training.

    Args:
        training: ignored.

    Returns:
        A :class:`~monai_aeflow.models.common.NothingToTrain`.
    """
    return NothingToTrain(
        "patchcore has nothing to train with a loss: it is fitted in one pass over healthy images "
        "(monai_aeflow.models.patchcore.PatchCoreFitter; the engine does it)"
    )


def patchcore_score(
    network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual"
) -> dict[str, torch.Tensor]:
    """PatchCore's scores: the nearest-neighbour distance map and the largest patch distance.

    Args:
        network: a fitted :class:`PatchCore`.
        x: (B, C, H, W) images in [0, 1].
        beta: unused.
        map_kind: ignored (one map).

    Returns:
        ``{"score", "anomaly_map", "recon"}`` (``recon`` is the input: nothing is reconstructed).
    """
    out = network(x)
    return {"score": out.score.float(), "anomaly_map": out.anomaly_map.float(), "recon": x.float()}


SPEC = ModelSpec(
    name="patchcore",
    network_cls=PatchCore,
    make_loss=make_loss,
    score=patchcore_score,
    description="PatchCore: coreset memory bank of pretrained patch features; nearest-neighbour distance",
    defaults={"in_channels": 1},
    make_fitter=make_fitter,
)
"""PatchCore in the registry."""
