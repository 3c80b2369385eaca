"""Train one registered model on prepared data: what ``aeflow-cli train`` runs (and ``compare`` per model).

:func:`run_training` prepares the data (:func:`monai_aeflow.data.datalists.prepare_data`), builds the model
(:func:`monai_aeflow.models.build_model`) and trains it with :func:`train_model` (the shared engine,
:func:`monai_aeflow.engines.train`); :func:`parse_assignments` reads ``KEY=VALUE`` command-line options.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from torch import nn

from monai_aeflow.checkpoint import save_model
from monai_aeflow.data.datalists import DataConfig, prepare_data
from monai_aeflow.data.slices import SliceDataset
from monai_aeflow.engines.run_folder import remove_unused_folders
from monai_aeflow.engines.workflow import (
    MODEL_FILE,
    TrainingConfig,
    check_optimizer_settings,
    check_output_dir,
    clear_previous_run,
    open_resume_checkpoint,
    resolve_device,
    train,
)
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models import build_model, check_model_args, count_parameters, spec_of, trainable_parameters

__all__ = ["train_model", "parse_assignments", "run_training"]

logger = logging.getLogger("monai_aeflow.engines.run")


def train_model(
    network: nn.Module,
    train_dataset: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    epochs: int = 5,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    device: str = "auto",
    seed: int = 0,
    loss_options: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    val_dataset: Sequence[Mapping[str, Any]] | None = None,
    progress: bool = False,
    **training: Any,
) -> dict[str, Any]:
    """Train a registered model with the shared engine and write ``<output_dir>/model.pt``.

    A model without trainable parameters (the intensity baseline) is saved as it is; one fitted in one pass
    (PatchCore) goes through the engine's fit.

    Args:
        network: the model.
        train_dataset: healthy training slices (dicts with ``image``).
        output_dir: run folder (model, checkpoints, TensorBoard logs).
        epochs: training epochs.
        batch_size: slices per batch.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seed of shuffling and training.
        loss_options: options of the model's loss.
        preprocessing: preprocessing configuration stored in the model file.
        val_dataset: labelled validation slices; when given the model with the best validation slice AUROC is
            kept, otherwise the last one.
        progress: progress bar and per-epoch logs.
        training: further :class:`~monai_aeflow.engines.TrainingConfig` fields (``alpha``, ``beta``, ...).

    Returns:
        The engine's summary (``model_path``, ``epochs``, ``iterations``, ``seconds``, ...).
    """
    out = Path(output_dir)
    cfg = TrainingConfig(
        output_dir=str(out),
        max_epochs=int(epochs),
        lr=float(lr),
        weight_decay=float(weight_decay),
        device=str(device),
        seed=int(seed),
        progress=progress,
        preprocessing=dict(preprocessing or {}),
        loss_options=dict(loss_options or {}),
        **training,
    )
    if not trainable_parameters(network) and spec_of(network).make_fitter is None:
        out.mkdir(parents=True, exist_ok=True)
        path = save_model(network, out / MODEL_FILE, config=cfg.model_config())
        return {"model_path": str(path), "epochs": 0, "iterations": 0, "seconds": 0.0, "images_per_second": 0.0}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(Dataset(list(train_dataset)), batch_size=batch_size, shuffle=True, generator=gen)
    val_loader = None
    if val_dataset is not None and len(val_dataset):
        val_loader = DataLoader(Dataset(list(val_dataset)), batch_size=batch_size * 2)
    return train(network, train_loader, val_loader, cfg)


def parse_assignments(items: Sequence[str], nested: bool = False) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` command-line assignments (values as JSON when they parse, else strings).

    Args:
        items: the assignments, e.g. ``["latent_dim=64", "channels=[16,32,64]"]``.
        nested: keys are ``MODEL.KEY`` (``"vae.latent_dim=64"``) and the result is ``{model: {key: value}}``.

    Returns:
        The parsed dict.

    Raises:
        AEFlowInputError: an item without ``=`` (or without ``MODEL.`` when nested).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise AEFlowInputError(f"expected KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if nested:
            model, dot, sub = key.partition(".")
            if not dot or not model or not sub:
                raise AEFlowInputError(f"expected MODEL.KEY=VALUE (e.g. vae.latent_dim=64), got {item!r}")
            out.setdefault(model.lower(), {})[sub] = value
        else:
            out[key] = value
    return out


def run_training(
    name: str,
    data: DataConfig,
    output_dir: str | Path,
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    device: str = "auto",
    seed: int = 0,
    backbone: str = "efficientnet_lite0",
    backbone_weights: str | None = "auto",
    model_args: Mapping[str, Any] | None = None,
    loss_options: Mapping[str, Any] | None = None,
    validate: bool = True,
    progress: bool = False,
    say: Callable[[str], None] = logger.info,
    resume: str | Path | None = None,
    overwrite: bool = False,
    **training: Any,
) -> dict[str, Any]:
    """Prepare the data, build one registered model and train it (what ``aeflow-cli train`` runs).

    Before the data are prepared, the output folder is checked: it must be writable and, unless ``overwrite``
    or ``resume``, hold no previous run (``model.pt``, checkpoints); ``resume`` is read and checked too. With
    ``overwrite`` the previous run's model, checkpoints and TensorBoard events are removed just before training.

    Args:
        name: registry key (``aeflow``, ``ae``, ``vae``, ...).
        data: data settings.
        output_dir: run folder (``model.pt``, checkpoints, TensorBoard logs; a synthetic cohort in ``data/``).
        epochs: training epochs.
        batch_size: slices per batch.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seed of initialisation and training.
        backbone: encoder of the AE-FLOW family (``efficientnet_lite0``: pretrained offline; ``resnet18``,
            ``wide_resnet50_2``: ImageNet weights downloaded or from a local file).
        backbone_weights: see :func:`build_model` (``"auto"`` never gives a random encoder).
        model_args: further network arguments.
        loss_options: options of the model's loss.
        validate: keep the model with the best slice AUROC on the validation split (when it has slices).
        progress: progress bars and per-epoch logs.
        say: where progress messages go.
        resume: a training checkpoint or a run folder (its latest checkpoint) to continue; the other arguments
            must describe the same run (same data, model and settings; ``epochs`` may be larger).
        overwrite: replace a previous run in ``output_dir``.
        training: further :class:`~monai_aeflow.engines.TrainingConfig` fields (``alpha``, ``beta``...).

    Returns:
        The engine's summary plus ``model``, ``hparams``, ``parameters``, ``backbone_weights``, ``encoder_weights``
        (the record of the exact weights, also stored in ``model.pt``), ``splits`` and ``train_slices``.
    """
    # fail before the data are prepared
    check_model_args(name, model_args)
    check_optimizer_settings(lr, weight_decay)
    device_used = resolve_device(device)
    run_options = dict(training.pop("run_options", None) or {})
    if resume is not None:
        if overwrite:
            raise AEFlowInputError("give either --resume (continue a run) or --overwrite (replace it), not both")
        resume, ckpt = open_resume_checkpoint(resume, epochs)
        same_folder = Path(output_dir).resolve() == resume.parent.resolve()
        check_output_dir(output_dir, existing_run_ok=same_folder)
        stored = ckpt["config"].get("training", {}).get("run_options") or {}
        weights_used = stored.get("backbone_weights_used", "checkpoint")
        backbone_weights = None  # the checkpoint holds the encoder's weights: never download them again
        # the encoder the run was built with ("auto" may have switched it), and the record of its weights
        backbone = dict(ckpt["config"].get("model") or {}).get("backbone", backbone)
        record = stored.get("encoder_weights")
    else:
        check_output_dir(output_dir, overwrite=overwrite)
    created = [p for p in (Path(output_dir), Path(output_dir) / "data") if not p.exists()]
    try:
        prepared = prepare_data(data, output_dir, progress=progress, need_evaluation=False)
        torch.manual_seed(seed)
        net, info = build_model(
            name, prepared.in_channels, prepared.image_size, backbone, backbone_weights, model_args, say=say
        )
        if resume is not None:
            info["backbone_weights"] = weights_used
            if isinstance(record, Mapping):
                info["encoder_weights"] = dict(record)
                for module in net.modules():
                    if hasattr(module, "weights_record"):
                        module.weights_record = dict(record)
        run_options["backbone_weights_used"] = info["backbone_weights"]
        run_options["encoder_weights"] = info["encoder_weights"]
        params = count_parameters(net)
        val = None
        if validate and prepared.val:
            val = SliceDataset(prepared.val, min_area_fraction=data.min_area_fraction, healthy_only=False)
        if spec_of(net).make_fitter is not None:  # PatchCore: one pass, no optimiser
            say(f"fitting {info['name']} in one pass over {len(prepared.train)} healthy slices on {device_used}")
        else:
            say(
                f"training {info['name']} ({params['trainable']:,} trainable parameters) on {len(prepared.train)} "
                f"healthy slices for {epochs} epochs on {device_used}"
            )
        if overwrite and resume is None:
            clear_previous_run(output_dir)
        summary = train_model(
            net,
            prepared.train,
            output_dir,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            device=str(device_used),
            seed=seed,
            loss_options=loss_options,
            preprocessing=prepared.preprocessing,
            val_dataset=val,
            progress=progress,
            resume=None if resume is None else str(resume),
            run_options=run_options,
            **training,
        )
        summary.update(
            model=info["name"],
            hparams=info["hparams"],
            parameters=params,
            backbone_weights=info["backbone_weights"],
            encoder_weights=info["encoder_weights"],
            splits={k: [str(r["subject_id"]) for r in v] for k, v in prepared.splits.items()},
            train_slices=len(prepared.train),
            source=prepared.source,
        )
        return summary
    except AEFlowInputError:  # a user mistake found after the data were prepared: leave nothing behind
        remove_unused_folders(output_dir, created)
        raise
