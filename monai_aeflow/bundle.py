"""Glue only the MONAI bundles in ``bundles/`` need: settings checks, an inference wrapper (and the data lists).

The bundle configurations build the network, the transforms, the engines, the handlers, the scorer and the
evaluation from the package through ``_target_`` references; this module holds the glue between them:

- :func:`check_bundle_settings`, :func:`install_error_hook`: the first steps of a bundle's ``initialize``: wrong
  settings, a missing ``dataset_dir`` and unreadable files stop a ``python -m monai.bundle run`` with one line
  (``Error: ...``) and exit code 2.
- :class:`AnomalyMapNet`: one tensor in, the anomaly map out, for ``verify_net_in_out`` and ``ckpt_export``.
- :func:`initialize_flow`: the flow's data initialisation before a distributed run wraps the network.

Moved to their own modules (still importable from here): the data lists of
:mod:`monai_aeflow.data.bundle_datalists` (:func:`prepare_brain_mri_datalist`, :func:`prepare_image_datalist`,
:func:`check_dataset_dir`, :func:`is_synthetic_dataset`, :func:`as_flag`, :func:`masks_of`, the synthetic
defaults), :func:`~monai_aeflow.data.isic.index_isic`,
:func:`~monai_aeflow.data.synthetic.generate_synthetic_images`,
:func:`~monai_aeflow.data.checks.check_data_files`, the TensorBoard and metrics plumbing of
:mod:`monai_aeflow.engines.metrics` (:func:`summary_writer`, :func:`loss_scalars`, :class:`MetricsWriter`,
:class:`BatchRecorder`, :func:`write_scores_summary`) and
:func:`~monai_aeflow.evaluation.volumes.evaluate_volumes`.

Example::

    lists = prepare_brain_mri_datalist("data/synthetic", generate_synthetic=True)  # generated on first use
    net = AnomalyMapNet(build_bundle_network("aeflow", backbone="resnet18", backbone_weights=None))
    net(torch.rand(1, 1, 64, 64)).shape  # (1, 1, 64, 64)
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_aeflow.bundle_settings import check_bundle_settings
from monai_aeflow.checkpoint import load_model
from monai_aeflow.data.bundle_datalists import (  # noqa: F401  (private names: their home before the move)
    _BRAIN_KINDS,
    _BRAIN_MARKER,
    _IMAGE_MARKER,
    _SPLIT_ALIASES,
    _SYNTHETIC_IMAGE_SUBJECT,
    SYNTHETIC_BRAIN_DEFAULTS,
    SYNTHETIC_IMAGE_DEFAULTS,
    _clean,
    _dataset_dir_error,
    _detect_brain_kind,
    _detect_image_kind,
    _ensure_dataset,
    _fractions,
    _index_brain,
    _interrupted_generation,
    _needs_generation,
    _split_synthetic,
    _synthetic_brain_records,
    as_flag,
    check_dataset_dir,
    is_synthetic_dataset,
    masks_of,
    prepare_brain_mri_datalist,
    prepare_image_datalist,
)
from monai_aeflow.data.checks import check_data_files
from monai_aeflow.data.io import find_input_error
from monai_aeflow.data.isic import index_isic
from monai_aeflow.data.synthetic import generate_synthetic_images
from monai_aeflow.engines.distributed import rank as _rank  # noqa: F401  (the former private name)
from monai_aeflow.engines.distributed import rank0_first as _rank0_first  # noqa: F401  (the former private name)
from monai_aeflow.engines.metrics import (
    BatchRecorder,
    MetricsWriter,
    loss_scalars,
    summary_writer,
    write_scores_summary,
)
from monai_aeflow.evaluation.volumes import evaluate_volumes
from monai_aeflow.models import build_network, get_model_spec, spec_of

__all__ = [
    "SYNTHETIC_BRAIN_DEFAULTS",
    "SYNTHETIC_IMAGE_DEFAULTS",
    "AnomalyMapNet",
    "BatchRecorder",
    "MetricsWriter",
    "as_flag",
    "build_bundle_network",
    "check_bundle_settings",
    "check_data_files",
    "check_dataset_dir",
    "evaluate_volumes",
    "generate_synthetic_images",
    "index_isic",
    "initialize_flow",
    "install_error_hook",
    "is_synthetic_dataset",
    "loss_scalars",
    "masks_of",
    "prepare_brain_mri_datalist",
    "prepare_image_datalist",
    "summary_writer",
    "write_scores_summary",
]

logger = logging.getLogger("monai_aeflow.bundle")

# ----------------------------------------------------------------------------------------------------------
# checks: settings, one-line errors
# ----------------------------------------------------------------------------------------------------------


def install_error_hook() -> None:
    """Print a user-input error of a bundle run as one line and exit with code 2, without a traceback.

    ``python -m monai.bundle run`` is MONAI's entry point: an exception raised while the configuration is
    evaluated reaches Python's default handler wrapped in ``RuntimeError("Failed to instantiate component
    ...")`` chains (80 lines of traceback). The bundles call this first in ``initialize``; it chains a
    ``sys.excepthook`` that, when an :class:`AEFlowInputError` is behind the exception, prints
    ``Error: <message>`` to stderr, runs the ``atexit`` handlers and exits with code 2 (as ``aeflow-cli``
    does). Other exceptions keep their traceback, and so do input errors when the environment variable
    ``AEFLOW_TRACEBACK`` is set. Calling it again does nothing.
    """
    previous = sys.excepthook
    if getattr(previous, "_aeflow_bundle_hook", False):
        return

    def _hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        error = None if os.environ.get("AEFLOW_TRACEBACK") else find_input_error(exc)
        if error is None:
            previous(exc_type, exc, tb)
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        print(f"Error: {error}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()  # what a normal exit runs (logging shutdown, worker clean-up...)
        os._exit(2)

    _hook._aeflow_bundle_hook = True  # type: ignore[attr-defined]
    sys.excepthook = _hook


# ----------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------


def build_bundle_network(name: str | None = None, model_file: str | None = None, **hparams: Any) -> nn.Module:
    """Build a registered model, leaving out the settings its class does not take.

    The bundles list AE-FLOW's settings (``backbone``, ``flow_blocks``...); with ``model_name`` set to a
    baseline (``"ae"``, ``"vae"``...) the ones that baseline does not accept are dropped (and logged), so
    that selecting a baseline is a single override.

    Args:
        name: registry key (default AE-FLOW).
        model_file: when it names an existing model file, the network stored there (its model, settings such as
            PatchCore's fitted memory-bank size, and weights; :func:`~monai_aeflow.checkpoint.load_model`) is
            returned instead, whatever ``name`` and ``hparams`` say.
        hparams: keyword arguments of the network class.

    Returns:
        The network (see :func:`monai_aeflow.models.build_network`).
    """
    if model_file is not None and Path(str(model_file)).is_file():
        return load_model(model_file)[0]
    spec = get_model_spec(name)
    weights = hparams.get("backbone_weights")
    if isinstance(weights, str) and weights.lower() in ("none", "null", "random"):
        hparams = {**hparams, "backbone_weights": None}  # ``--backbone_weights none`` (MONAI drops a None override)
    params = inspect.signature(spec.network_cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        dropped = sorted(k for k in hparams if k not in params)
        if dropped:
            logger.info("%s takes no %s; left out", spec.name, ", ".join(dropped))
        hparams = {k: v for k, v in hparams.items() if k in params}
    return build_network(spec.name, **hparams)


class AnomalyMapNet(nn.Module):
    """A registered model seen as ``image -> anomaly map``: one tensor in, one tensor out.

    MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``, ``SliceInferer``) call a network with one
    tensor and expect one tensor; this wrapper returns the model's pixel anomaly map (the residual
    ``|x - x'|`` by default), computed by the model's own scorer exactly as in validation and inference.
    Its state dict is the wrapped network's, with the same keys as the ``network`` entry of a model file, so
    ``ckpt_export --key_in_ckpt network`` loads ``models/model.pt`` into it.

    Args:
        network: a network of :mod:`monai_aeflow.models` (AE-FLOW or a baseline).
        map_kind: ``"residual"``, ``"flow"`` or ``"ssim"`` (models without a flow: ``residual``, ``ssim``).
        beta: flow weight of the image score (does not change the map).
        model_name: registry key (default: looked up from the network's class).

    Example::

        net = AnomalyMapNet(build_bundle_network(backbone="resnet18", backbone_weights=None)).eval()
        net(torch.rand(2, 1, 64, 64)).shape  # (2, 1, 64, 64)
    """

    def __init__(
        self, network: nn.Module, map_kind: str = "residual", beta: float = 0.9, model_name: str | None = None
    ):
        super().__init__()
        self.network = network
        self.map_kind = map_kind
        self.beta = float(beta)
        self.spec = get_model_spec(model_name) if model_name else spec_of(network)
        self.model_name = self.spec.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.score(self.network, x, beta=self.beta, map_kind=self.map_kind)["anomaly_map"]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def initialize_flow(network: nn.Module, dataset: Sequence[Mapping[str, Any]], n_images: int = 256) -> nn.Module:
    """Initialise the flow's ActNorm layer from training images spread evenly over ``dataset``.

    The trainer does this itself when training starts; a distributed run does it before the network is
    wrapped in ``DistributedDataParallel``, so that every rank starts from the same weights.

    Args:
        network: the model (AE-FLOW; a no-op for models without a data-initialised flow).
        dataset: the training dataset (items with ``image``).
        n_images: images used.

    Returns:
        ``network``.
    """
    flow = getattr(network, "flow", None)
    if flow is None or not getattr(flow, "needs_initialization", False) or len(dataset) == 0:
        return network
    idx = np.unique(np.linspace(0, len(dataset) - 1, min(int(n_images), len(dataset))).round().astype(int))
    device = next(network.parameters()).device
    x = torch.stack([torch.as_tensor(dataset[int(i)]["image"]).as_subclass(torch.Tensor).float() for i in idx])
    network.initialize_flow(x.to(device))
    return network
