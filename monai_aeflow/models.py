"""The registry of anomaly-detection models that share the engine, the scorer, the CLI and the bundles.

A model is described by a :class:`ModelSpec`: the network class (a plain ``nn.Module`` built from keyword
arguments, with an ``hparams`` dict of them and a ``forward`` whose output has an ``x_rec`` reconstruction),
a loss factory (``make_loss(training) -> loss_fn(output, x) -> {"loss": ..., other terms}``) and a batch
scorer (``score(network, x, beta, map_kind) -> {"score", "anomaly_map", "recon", ...}``; higher is more
anomalous). The trainer, :func:`monai_aeflow.inference.score_slices`, the checkpoint loader and
``aeflow-cli`` only talk to models through this interface, so a baseline is added by registering it::

    register_model(ModelSpec(name="ae", network_cls=AutoEncoder, make_loss=..., score=...))
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monai_aeflow.losses import AEFlowLoss
from monai_aeflow.networks.aeflow import AEFlow
from monai_aeflow.scores import anomaly_map, flow_score, recon_score

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ModelSpec",
    "build_network",
    "get_model_spec",
    "model_name_of",
    "register_model",
    "trainable_parameters",
]

DEFAULT_MODEL = "aeflow"

ScoreFn = Callable[..., dict[str, torch.Tensor]]
LossFactory = Callable[[Mapping[str, Any]], nn.Module]


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
        size_multiple: input height and width must be multiples of this (the scorer pads).
        defaults: default keyword arguments of ``network_cls`` used by the CLI and the bundles.
    """

    name: str
    network_cls: type[nn.Module]
    make_loss: LossFactory
    score: ScoreFn
    description: str = ""
    size_multiple: int = 16
    defaults: Mapping[str, Any] | None = None


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model to :data:`MODELS` (replacing one of the same name).

    Args:
        spec: the model description.

    Returns:
        The spec.
    """
    MODELS[spec.name] = spec
    return spec


def get_model_spec(name: str | None) -> ModelSpec:
    """The spec of a registered model.

    Args:
        name: registry key; ``None`` means AE-FLOW.

    Returns:
        The :class:`ModelSpec`.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    _register_builtin()
    key = DEFAULT_MODEL if name is None else str(name).lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[key]


def build_network(name: str | None = None, **hparams: Any) -> nn.Module:
    """Build a registered network from its keyword arguments (merged over the spec's defaults).

    Args:
        name: registry key (default AE-FLOW).
        hparams: keyword arguments of the network class.

    Returns:
        The network.
    """
    spec = get_model_spec(name)
    kwargs = {**dict(spec.defaults or {}), **hparams}
    return spec.network_cls(**kwargs)


def model_name_of(network: nn.Module) -> str:
    """The registry name of a network instance (its class registered under that name).

    Args:
        network: a network built by :func:`build_network` (or wrapped by DDP / ``torch.compile``).

    Returns:
        The registry key.

    Raises:
        ValueError: the class is not registered.
    """
    _register_builtin()
    net = getattr(network, "module", network)
    net = getattr(net, "_orig_mod", net)
    for name, spec in MODELS.items():
        if type(net) is spec.network_cls:
            return name
    raise ValueError(f"{type(net).__name__} is not a registered model")


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser updates (``network.trainable_parameters()`` when defined).

    Args:
        network: the model.

    Returns:
        A list of parameters with ``requires_grad``.
    """
    net = getattr(network, "module", network)
    if hasattr(net, "trainable_parameters"):
        return list(net.trainable_parameters())
    return [p for p in net.parameters() if p.requires_grad]


def aeflow_score(network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual") -> dict:
    """AE-FLOW's scorer: ``beta * S_flow + (1 - beta) * S_recon`` and the chosen pixel map.

    Args:
        network: an :class:`AEFlow`.
        x: (B, C, H, W) images.
        beta: flow weight.
        map_kind: ``residual``, ``flow`` or ``ssim``.

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
        "score": beta * s_flow + (1.0 - beta) * s_recon,
        "score_flow": s_flow,
        "score_recon": s_recon,
        "anomaly_map": anomaly_map(z_prime, x, x_rec, map_kind),
        "recon": x_rec,
    }


def _aeflow_loss(training: Mapping[str, Any]) -> nn.Module:
    return AEFlowLoss(float(training.get("alpha", 0.5)), str(training.get("recon_loss", "mse")))


_BUILTIN_DONE = False


def _register_builtin() -> None:
    """Register AE-FLOW and the baselines on first use (keeps imports light and acyclic)."""
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    register_model(
        ModelSpec(
            name="aeflow",
            network_cls=AEFlow,
            make_loss=_aeflow_loss,
            score=aeflow_score,
            description="AE-FLOW: autoencoder with a normalizing-flow bottleneck (Zhao et al., ICLR 2023)",
            defaults={"in_channels": 1, "backbone": "wide_resnet50_2"},
        )
    )
    if importlib.util.find_spec("monai_aeflow.baselines") is not None:
        from monai_aeflow.baselines import register_baselines

        register_baselines()
