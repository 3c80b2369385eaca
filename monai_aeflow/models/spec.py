"""The :class:`ModelSpec` record: how the shared engine, scorer, CLI and model files talk to one model.

This module imports nothing of :mod:`monai_aeflow.models` so that every model file (``ae.py``, ``vae.py``...)
can build its spec without importing the registry in :mod:`monai_aeflow.models` (no import circle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DEFAULT_SIZE_MULTIPLE", "LossFactory", "ModelSpec", "ScoreFn"]

ScoreFn = Callable[..., dict[str, torch.Tensor]]
"""``score(network, x, beta=..., map_kind=...) -> {"score", "anomaly_map", "recon", ...}``."""

LossFactory = Callable[[Mapping[str, Any]], nn.Module]
"""``make_loss(training) -> loss_fn`` with ``loss_fn(output, x) -> {"loss": ..., other terms}``."""

DEFAULT_SIZE_MULTIPLE = 16
"""Size multiple of a network class that states none (AE-FLOW's encoder has stride 16)."""


@dataclass(frozen=True)
class ModelSpec:
    """How the shared engine trains and scores one kind of model.

    Args:
        name: registry key (``aeflow``, ``ae``, ``vae``...), stored in model files.
        network_cls: the ``nn.Module`` class, built as ``network_cls(**hparams)``.
        make_loss: builds the training loss from the training settings (``alpha``, ``recon_loss``...).
        score: ``score(network, x, beta=..., map_kind=...)`` -> dict with ``score`` (B,), ``anomaly_map``
            (B, 1, H, W), ``recon`` (B, C, H, W) and optional extra per-image terms (``score_flow``...).
        description: one line for ``--help`` and reports.
        size_multiple: input height and width must be multiples of this (the scorer pads). Leave it out:
            it is then taken from the network class (its ``size_multiple`` attribute, else 16), so that the
            spec and the network cannot disagree. For a network whose multiple depends on its keyword
            arguments (the VQ-VAE's ``2 ** len(channels)``), this is the value of the class defaults; use
            :meth:`size_multiple_of` with the built network for the exact value.
        defaults: default keyword arguments of ``network_cls`` used by the CLI and the bundles.
    """

    name: str
    network_cls: type[nn.Module]
    make_loss: LossFactory
    score: ScoreFn
    description: str = ""
    size_multiple: int | None = None
    defaults: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.size_multiple is None:
            multiple = getattr(self.network_cls, "size_multiple", DEFAULT_SIZE_MULTIPLE)
            object.__setattr__(self, "size_multiple", int(multiple))

    def size_multiple_of(self, network: nn.Module) -> int:
        """The size multiple of a built network of this spec (its ``size_multiple`` when it has one).

        Args:
            network: a network of this spec (possibly wrapped by DDP or ``torch.compile``).

        Returns:
            The multiple that input height and width must have.
        """
        net = getattr(network, "module", network)
        net = getattr(net, "_orig_mod", net)
        return int(getattr(net, "size_multiple", self.size_multiple))
