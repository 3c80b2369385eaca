"""The :class:`ModelSpec` record: how the shared engine, scorer, CLI and model files talk to one model.

This module imports nothing of :mod:`monai_aeflow.models` so that every model file (``ae.py``, ``vae.py``...)
can build its spec without importing the registry in :mod:`monai_aeflow.models` (no import circle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["DEFAULT_SIZE_MULTIPLE", "Fitter", "FitterFactory", "LossFactory", "ModelSpec", "ScoreFn"]

ScoreFn = Callable[..., dict[str, torch.Tensor]]
"""``score(network, x, beta=..., map_kind=...) -> {"score", "anomaly_map", "recon", ...}``."""

LossFactory = Callable[[Mapping[str, Any]], nn.Module]
"""``make_loss(training) -> loss_fn`` with ``loss_fn(output, x) -> {"loss": ..., other terms}``."""


class Fitter(Protocol):
    """Fits a model in one pass over healthy images, without gradients (PatchCore's memory bank).

    The engine calls :meth:`update` once per batch of healthy training images (on the training device, under
    ``torch.no_grad``) and :meth:`finish` once at the end of the pass.
    """

    def update(self, network: nn.Module, x: torch.Tensor) -> None:
        """Take in one batch (B, C, H, W) of healthy images."""

    def finish(self, network: nn.Module) -> dict[str, float]:
        """Complete the fit (set the network's state); return numbers worth logging."""


FitterFactory = Callable[[Mapping[str, Any]], Fitter]
"""``make_fitter(training) -> fitter`` (see :class:`Fitter`); ``training`` as for :data:`LossFactory`."""

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
        make_fitter: for a model fitted in one pass without gradients (PatchCore), builds its :class:`Fitter`
            from the training settings; the engine then runs one pass over the healthy training images instead
            of an optimiser loop (``make_loss`` is not used). None (the default): a model trained by its loss.
    """

    name: str
    network_cls: type[nn.Module]
    make_loss: LossFactory
    score: ScoreFn
    description: str = ""
    size_multiple: int | None = None
    defaults: Mapping[str, Any] | None = None
    make_fitter: FitterFactory | None = None

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

    def fit(
        self, network: nn.Module, batches: Iterable[torch.Tensor], training: Mapping[str, Any] | None = None
    ) -> dict[str, float]:
        """Fit a one-pass model (one with ``make_fitter``) on batches of healthy images, outside the engine.

        Args:
            network: a network of this spec.
            batches: (B, C, H, W) healthy images, on the network's device.
            training: training settings (``loss_options`` holds the fitter's options).

        Returns:
            The fitter's summary.

        Raises:
            ValueError: the model is trained by a loss, not fitted.
        """
        if self.make_fitter is None:
            raise ValueError(f"{self.name} is trained with its loss; it has no one-pass fit")
        fitter = self.make_fitter(dict(training or {}))
        with torch.no_grad():
            for x in batches:
                fitter.update(network, x)
            return fitter.finish(network)
