"""The AE-FLOW training workflow: MONAI engines, ignite handlers, TensorBoard, checkpoints and resume.

This is the loop the bundles and ``aeflow-cli`` reuse::

    net = AEFlow(backbone="resnet18")
    trainer, evaluator = create_engines(net, train_loader, val_loader, TrainingConfig(output_dir="runs/a"))
    trainer.run()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.handlers import (
    ROCAUC,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from torch.utils.tensorboard import SummaryWriter

from monai_aeflow.config_rules import check_value
from monai_aeflow.device import resolve_device
from monai_aeflow.engines.handlers import (
    BestMetricState,
    ConfigState,
    ImageGridHandler,
    LearningRateLogger,
    ModelExportHandler,
    RandomState,
    ResumableCheckpointSaver,
    ValidationStatsHandler,
)
from monai_aeflow.engines.run_folder import (  # noqa: F401  (re-exported: their home before run_folder.py)
    MODEL_FILE,
    check_output_dir,
    checkpoint_epoch,
    clear_previous_run,
    find_checkpoint,
    open_resume_checkpoint,
    previous_run_files,
    read_training_checkpoint,
)
from monai_aeflow.engines.trainer import AEFlowEvaluator, AEFlowTrainer
from monai_aeflow.errors import AEFlowInputError, CheckpointError
from monai_aeflow.models import spec_of, trainable_parameters
from monai_aeflow.models.aeflow import DEFAULT_RECIPE, recipe_alpha

__all__ = [
    "TrainingConfig",
    "check_optimizer_settings",
    "resolve_device",
    "create_engines",
    "train",
    "find_checkpoint",
    "read_training_checkpoint",
    "open_resume_checkpoint",
    "checkpoint_epoch",
    "check_output_dir",
    "previous_run_files",
    "clear_previous_run",
]


@dataclass
class TrainingConfig:
    """Settings of an AE-FLOW training run (defaults follow the AE-FLOW paper).

    Args:
        output_dir: where checkpoints, ``model.pt`` and TensorBoard logs go.
        max_epochs: epochs (100 in the paper).
        lr: Adam learning rate (2e-4 in the paper).
        weight_decay: Adam weight decay (1e-5 in the paper).
        recipe: AE-FLOW's training recipe, a name of :data:`monai_aeflow.models.aeflow.RECIPES`: ``"balanced"``
            (the default: flow weight 0.02, so that the decoder learns the anatomy) or ``"paper"`` (the paper's
            alpha 0.5). Stored in ``model.pt`` with the other training settings.
        alpha: flow weight of the loss; None (the default): the recipe's (resolved when the config is made).
        beta: flow weight of the image score.
        recon_loss: ``"mse"`` or ``"ssim"``.
        map_kind: pixel map used in validation and stored as the model's default.
        val_interval: validate every this many epochs.
        amp: mixed precision (CUDA only).
        channels_last: channels-last memory format (CUDA only).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        resume: a training checkpoint to resume from: network, optimiser, trainer state (epoch and iteration),
            best validation metric and random generators; training continues up to ``max_epochs``.
        epoch_length: iterations per epoch (default: the loader's length).
        grid_images: rows of the TensorBoard image grid.
        progress: show a progress bar and per-epoch metrics on the console.
        checkpoint_every: save a resumable checkpoint every this many epochs.
        seed: seed of ``torch`` before the run.
        preprocessing: the preprocessing configuration, stored in the model file for inference.
        loss_options: keyword arguments of the model's loss (baselines, e.g. ``{"kl_weight": 0.5}`` for the
            VAE; see :mod:`monai_aeflow.baselines`), stored with the other training settings.
        run_options: the options of the command that started the run (``aeflow-cli train``), stored in the
            checkpoints so that ``--resume`` reuses the same data and settings.
    """

    output_dir: str = "runs/aeflow"
    max_epochs: int = 100
    lr: float = 2e-4
    weight_decay: float = 1e-5
    recipe: str = DEFAULT_RECIPE
    alpha: float | None = None
    beta: float = 0.9
    recon_loss: str = "mse"
    map_kind: str = "residual"
    val_interval: int = 1
    amp: bool = False
    channels_last: bool = False
    device: str = "auto"
    resume: str | None = None
    epoch_length: int | None = None
    grid_images: int = 8
    progress: bool = True
    checkpoint_every: int = 1
    seed: int = 0
    preprocessing: dict[str, Any] = field(default_factory=dict)
    loss_options: dict[str, Any] = field(default_factory=dict)
    run_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_optimizer_settings(self.lr, self.weight_decay)
        self.alpha = recipe_alpha(self.recipe, self.alpha)

    def model_config(self) -> dict[str, Any]:
        """The configuration stored with the trained model (everything but the network's own arguments)."""
        training = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("preprocessing",)}
        return {
            "preprocessing": dict(self.preprocessing),
            "score": {"beta": self.beta, "map_kind": self.map_kind, "ssim_window": 11, "data_range": 1.0},
            "training": training,
        }


def check_optimizer_settings(lr: float, weight_decay: float) -> None:
    """Refuse a learning rate that is not a positive finite number and a negative or non-finite weight decay.

    Args:
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Raises:
        AEFlowInputError: naming the option (``--lr``, ``--weight-decay``) and the value.
    """
    check_value("--lr", lr, 0.0, lo_open=True)
    check_value("--weight-decay", weight_decay, 0.0)


def create_engines(
    network: torch.nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    config: TrainingConfig,
) -> tuple[AEFlowTrainer, AEFlowEvaluator | None]:
    """Build the trainer and the validation evaluator with all handlers attached.

    Handlers: console and TensorBoard losses (``loss`` and every ``loss_*`` term of the model's loss), learning rate,
    validation AUROC (MONAI ``ROCAUC`` on slice labels, the key metric) plus flow-only / recon-only
    AUROC and pixel AUROC, a TensorBoard image grid per validation, a resumable checkpoint
    (``checkpoint_epoch=N.pt``, written atomically: network, optimiser, trainer, best validation metric, random
    generators, configuration) every ``checkpoint_every`` epochs and at the end, and ``model.pt`` (see
    :mod:`monai_aeflow.checkpoint`) whenever the validation AUROC improves, or at the end when there is no
    validation split. With ``config.resume`` the checkpoint is loaded before the run starts. A model fitted in one
    pass (its spec has ``make_fitter``, e.g. PatchCore) runs one epoch that feeds the fitter instead of an
    optimiser, logs the fit's numbers (``fit/*``) and is validated and exported like the others; it writes no
    resumable checkpoints (``config.max_epochs`` and the optimiser settings do not apply).

    Args:
        network: the model (flow and decoder are trained).
        train_loader: loader of healthy images (dicts with ``image``).
        val_loader: loader of labelled images (``image`` and ``label``: lesion mask or image label), or None.
        config: run settings.

    Returns:
        ``(trainer, evaluator)``; call ``trainer.run()``.
    """
    device = resolve_device(config.device)
    # before anything is written
    resume = open_resume_checkpoint(config.resume, config.max_epochs) if config.resume else None
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    network = network.to(device)
    cuda = device.type == "cuda"
    channels_last = config.channels_last and cuda
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    amp = config.amp and cuda
    spec = spec_of(network)
    loss_function = spec.make_loss(dataclasses.asdict(config))
    fitter = None if spec.make_fitter is None else spec.make_fitter(dataclasses.asdict(config))
    if resume is not None and fitter is not None:
        raise AEFlowInputError(
            f"{spec.name} is fitted in one pass over the training slices and writes no checkpoints: there is "
            "nothing to resume; fit it again with --overwrite",
            path=resume[0],
        )
    if resume is not None and hasattr(loss_function, "discriminator_step"):
        raise AEFlowInputError(
            f"{spec.name} cannot be resumed: its checkpoints do not hold the discriminator and its optimiser; "
            "train it again with --overwrite",
            path=resume[0],
        )
    optimizer = None
    if fitter is None:
        optimizer = torch.optim.Adam(trainable_parameters(network), lr=config.lr, weight_decay=config.weight_decay)
    writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
    model_cfg = config.model_config()
    model_path = out_dir / MODEL_FILE

    trainer = AEFlowTrainer(
        device=device,
        max_epochs=config.max_epochs if fitter is None else 1,  # a fit is one pass
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss_function,
        epoch_length=config.epoch_length,
        amp=amp,
        channels_last=channels_last,
        fitter=fitter,
    )

    def _losses(output: Mapping[str, Any]) -> dict[str, float]:
        return {f"train/{k}": float(v) for k, v in output.items() if k.startswith("loss") and v is not None}

    if fitter is not None:

        @trainer.on(Events.EPOCH_COMPLETED)
        def _log_fit(engine: AEFlowTrainer) -> None:
            for key, value in engine.state.metrics.items():
                if key.startswith("fit_"):
                    writer.add_scalar(f"fit/{key[4:]}", value, engine.state.epoch)

    else:
        TensorBoardStatsHandler(summary_writer=writer, output_transform=_losses, epoch_log=False).attach(trainer)
        if config.progress:
            StatsHandler(
                name="monai_aeflow.train", output_transform=from_engine(["loss"], first=True), iteration_log=False
            ).attach(trainer)
        LearningRateLogger(writer, optimizer).attach(trainer)

    evaluator = None
    if val_loader is not None:
        evaluator = AEFlowEvaluator(
            device=device,
            val_data_loader=val_loader,
            network=network,
            beta=config.beta,
            map_kind=config.map_kind,
            amp=amp,
            channels_last=channels_last,
            key_val_metric={"val_auroc": ROCAUC(output_transform=from_engine(["pred", "label"]))},
        )
        ValidationStatsHandler().attach(evaluator)
        TensorBoardStatsHandler(
            summary_writer=writer,
            iteration_log=False,
            output_transform=lambda x: None,
            global_epoch_transform=lambda _: trainer.state.epoch,
        ).attach(evaluator)
        if config.progress:
            StatsHandler(
                name="monai_aeflow.validate",
                iteration_log=False,
                output_transform=lambda x: None,
                global_epoch_transform=lambda _: trainer.state.epoch,
            ).attach(evaluator)
        ImageGridHandler(writer, config.grid_images, global_step_transform=lambda _: trainer.state.epoch).attach(
            evaluator
        )
        ModelExportHandler(network, model_path, model_cfg, trainer=trainer).attach(evaluator)
        ValidationHandler(validator=evaluator, interval=config.val_interval, epoch_level=True).attach(trainer)

        @trainer.on(Events.COMPLETED)
        def _final_export_if_never_validated(engine: AEFlowTrainer) -> None:
            if not model_path.exists():
                ModelExportHandler(network, model_path, model_cfg)._save(engine)

    else:
        ModelExportHandler(network, model_path, model_cfg).attach(trainer, on_improvement=False)

    if fitter is None:  # a one-pass fit has nothing to resume: model.pt is its only file
        config_state = ConfigState({**model_cfg, "model": dict(network.hparams), "model_name": spec.name})
        save_dict: dict[str, Any] = {
            "network": network,
            "optimizer": optimizer,
            "trainer": trainer,
            "config": config_state,
        }
        if evaluator is not None:
            save_dict["evaluator"] = BestMetricState(evaluator)
        save_dict["rng"] = RandomState(getattr(train_loader, "generator", None))
        # attached after the ValidationHandler: a checkpoint holds the validation result of its epoch
        ResumableCheckpointSaver(out_dir, save_dict, save_interval=config.checkpoint_every).attach(trainer)
        if resume is not None:
            _resume(*resume, config, save_dict, train_loader)
    if config.progress:
        from ignite.handlers import ProgressBar

        if fitter is None:
            trainer.progress_bar = ProgressBar(persist=False, desc="train")
            trainer.progress_bar.attach(trainer, output_transform=lambda out: {"loss": float(out["loss"])})
        else:
            trainer.progress_bar = ProgressBar(persist=False, desc="fit")
            trainer.progress_bar.attach(trainer)

    @trainer.on(Events.COMPLETED)
    def _close_writer(_: AEFlowTrainer) -> None:
        writer.flush()
        writer.close()

    trainer.summary_writer = writer
    trainer.model_path = model_path
    return trainer, evaluator


def _resume(
    path: Path, ckpt: Mapping[str, Any], config: TrainingConfig, save_dict: Mapping[str, Any], train_loader: Iterable
) -> None:
    """Load a training checkpoint into the objects of ``save_dict`` before the run starts."""
    network, trainer = save_dict["network"], save_dict["trainer"]
    try:
        network.load_state_dict(ckpt["network"])
        save_dict["optimizer"].load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise CheckpointError(f"the checkpoint does not fit this model ({msg})", path=path) from None
    length = ckpt["trainer"]["epoch_length"]
    if config.epoch_length is None and hasattr(train_loader, "__len__") and len(train_loader) != length:
        raise AEFlowInputError(
            f"the training data differ from the run's: {len(train_loader)} batches per epoch, the checkpoint has "
            f"{length}",
            path=path,
        )
    trainer.load_state_dict({**ckpt["trainer"], "max_epochs": config.max_epochs})
    for name in ("evaluator", "rng"):
        if name in save_dict and isinstance(ckpt.get(name), Mapping):
            save_dict[name].load_state_dict(ckpt[name])
    logging.getLogger("monai_aeflow").info(
        "resuming from %s (epoch %d of %d)", path, checkpoint_epoch(ckpt), config.max_epochs
    )


def train(
    network: torch.nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    config: TrainingConfig,
) -> dict[str, Any]:
    """Train AE-FLOW and return a summary.

    Args:
        network: the model.
        train_loader: loader of healthy images.
        val_loader: loader of labelled validation images, or None.
        config: run settings.

    Returns:
        ``{"model_path", "epochs", "iterations", "seconds", "images_per_second", "best_val_auroc",
        "best_epoch", "metrics"}``.
    """
    trainer, evaluator = create_engines(network, train_loader, val_loader, config)
    counted = {"images": 0}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _count(engine: AEFlowTrainer) -> None:
        counted["images"] += int(engine.state.output["image"].shape[0])

    logging.getLogger("monai_aeflow").debug("training in %s", os.fspath(config.output_dir))
    start = time.perf_counter()
    try:
        trainer.run()
    finally:  # also after Ctrl-C: flush the TensorBoard events, clear the progress bar's line
        trainer.summary_writer.close()
        bar = getattr(getattr(trainer, "progress_bar", None), "pbar", None)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {
        "model_path": str(trainer.model_path),
        "epochs": int(trainer.state.epoch),
        "iterations": int(trainer.state.iteration),
        "seconds": seconds,
        "images_per_second": counted["images"] / max(seconds, 1e-9),
    }
    if evaluator is not None:
        summary["best_val_auroc"] = float(evaluator.state.best_metric)
        summary["best_epoch"] = int(evaluator.state.best_metric_epoch)
        summary["metrics"] = {k: float(v) for k, v in evaluator.state.metrics.items()}
    return summary
