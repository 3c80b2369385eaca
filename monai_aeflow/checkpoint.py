"""Saving and loading trained AE-FLOW models as plain state-dict files.

A model file is a dict of tensors, strings and numbers saved with ``torch.save`` and always read back with
``torch.load(..., weights_only=True)``, so a crafted file cannot execute code when it is opened::

    {"format": "monai-aeflow/1",
     "config": {"model": {...network kwargs...}, "model_name": "aeflow", "preprocessing": {...},
                "score": {...}, "training": {...},
                "encoder_weights": {"backbone", "source", "file", "sha256"}},  # models with an encoder
     "network": state_dict,
     "threshold": float | None,
     "threshold_protocol": {...}}

Training checkpoints written by the engine (``network``, ``optimizer``, ``trainer``, ``config``) load too.
Every stored setting is validated when the file is read (:mod:`monai_aeflow.model_config`), so a value of the
wrong type or range is refused with one line naming the file and the key, before any network is built.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from monai_aeflow.errors import CheckpointError
from monai_aeflow.fileio import atomic_write
from monai_aeflow.model_config import validate_model_config
from monai_aeflow.models import build_network, encoder_weights_of, get_model_spec, model_name_of

__all__ = ["FORMAT", "atomic_torch_save", "save_model", "read_checkpoint", "load_model", "stored_encoder_weights"]

FORMAT = "monai-aeflow/1"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the destination folder, then rename it into place.

    Args:
        obj: what to save.
        path: destination file.

    Returns:
        The destination path.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_model(
    network: torch.nn.Module,
    path: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    threshold: float | None = None,
    threshold_protocol: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-contained model file (weights of encoder, flow and decoder plus the configuration).

    Args:
        network: the trained model.
        path: destination ``.pt`` file (written atomically).
        config: preprocessing, score and training settings to store next to ``network.hparams``.
        threshold: a binarisation threshold of the anomaly map chosen on validation data, if any.
        threshold_protocol: how the threshold was chosen.

    Returns:
        The path written.
    """
    cfg = dict(config or {})
    cfg["model"] = dict(network.hparams)
    cfg["model_name"] = model_name_of(network)
    record = encoder_weights_of(network)
    if record is not None:
        cfg["encoder_weights"] = record
    record = {
        "format": FORMAT,
        "config": cfg,
        "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "threshold": None if threshold is None else float(threshold),
        "threshold_protocol": dict(threshold_protocol or {}),
    }
    return atomic_torch_save(record, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a model file or training checkpoint safely (``weights_only=True``) and check its contents.

    Args:
        path: the ``.pt`` file.

    Returns:
        The checkpoint dict, with at least ``"network"`` and ``"config"`` (containing ``"model"``).

    Raises:
        CheckpointError: missing file, a pickle that is not a plain state dict, a file of another model, or a
            stored setting of the wrong type or range (see :func:`~monai_aeflow.model_config.validate_model_config`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint not found", path=path)
    if path.is_dir():
        raise CheckpointError("is a folder, expected a checkpoint file (.pt)", path=path)
    with open(path, "rb") as f:
        head = f.read(2)
    if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (or, long ago, a pickle)
        raise CheckpointError(
            "is not a PyTorch file (neither a zip archive nor a pickle); expected a model file written by "
            "aeflow-cli train",
            path=path,
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            "not a plain state-dict checkpoint (it contains pickled objects, refused for safety)", path=path
        ) from err
    except Exception as err:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"unreadable checkpoint ({err.__class__.__name__})", path=path) from err
    if not isinstance(ckpt, Mapping) or "network" not in ckpt:
        raise CheckpointError("not a monai-aeflow checkpoint (no 'network' state dict)", path=path)
    cfg = ckpt.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise CheckpointError("not a monai-aeflow checkpoint (no model configuration stored)", path=path)
    fmt = ckpt.get("format", FORMAT)
    if fmt != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {fmt!r} (expected {FORMAT!r})", path=path)
    validate_model_config(ckpt, path)
    return dict(ckpt)


def stored_encoder_weights(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The encoder weights a model was trained with, as stored in its file's configuration.

    Model files written before the record existed name only the backbone (and, from ``aeflow-cli train``, the
    weights option used); their ``file`` and ``sha256`` are None.

    Args:
        config: a model file's ``config``.

    Returns:
        ``{"backbone", "source", "file", "sha256"}``, or None for a model without an encoder.
    """
    if isinstance(config.get("encoder_weights"), Mapping):
        return dict(config["encoder_weights"])
    model = config.get("model") or {}
    if "backbone" not in model:
        return None
    run_options = dict(config.get("training") or {}).get("run_options") or {}
    used = run_options.get("backbone_weights_used") if isinstance(run_options, Mapping) else None
    source = f"{used} (recorded before SHA-256s were stored)" if used else "not recorded"
    return {"backbone": model["backbone"], "source": source, "file": None, "sha256": None}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the registered model (AE-FLOW or a baseline) stored in a checkpoint and load its weights.

    Args:
        path: a model file or a training checkpoint.
        device: where to put the model.

    Returns:
        The model in ``eval()`` mode and the checkpoint dict (configuration, threshold, ...).

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also when the weights do not fit the stored architecture.
    """
    ckpt = read_checkpoint(path)
    hparams = dict(ckpt["config"]["model"])
    name = ckpt["config"].get("model_name", "aeflow")
    try:
        spec = get_model_spec(name)
        if "backbone_weights" in inspect.signature(spec.network_cls).parameters:
            hparams["backbone_weights"] = None  # the checkpoint holds the weights; never download
        net = build_network(name, **hparams)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"invalid model configuration in checkpoint: {err}", path=path) from err
    state = ckpt["network"]
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match a {name} model ({hparams.get('backbone', 'default')}) "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)",
            path=path,
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise CheckpointError(f"weights do not match the stored architecture (shape of {bad[0]})", path=path)
    net.load_state_dict(state)
    record = stored_encoder_weights(ckpt["config"])
    for module in net.modules():
        if record is not None and hasattr(module, "weights_record"):
            module.weights_record = record  # what the stored weights came from, kept when the model is saved again
    return net.to(device).eval(), ckpt
