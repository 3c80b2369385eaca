"""MONAI ``SupervisedTrainer`` / ``SupervisedEvaluator`` subclasses for every registered model.

:class:`AEFlowTrainer` and :class:`AEFlowEvaluator` train and validate any model of :mod:`monai_aeflow.models`
(AE-FLOW and the baselines); :data:`AnomalyTrainer` and :data:`AnomalyEvaluator` are model-neutral names of the
same classes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.optim import Optimizer

from monai_aeflow.models import Fitter, spec_of
from monai_aeflow.models.aeflow import make_loss

__all__ = ["AEFlowTrainer", "AEFlowEvaluator", "AnomalyTrainer", "AnomalyEvaluator", "slice_labels", "OUTPUT_KEYS"]

# keys of engine.state.output besides MONAI's image / label / pred / loss
OUTPUT_KEYS = ("loss_flow", "loss_recon", "recon", "anomaly_map", "score_flow", "score_recon", "pixel_label")


def slice_labels(label: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """Image-level labels (1 = abnormal) from a batch's ``label`` entry.

    Args:
        label: a lesion mask (B, 1, H, W) (a slice is abnormal when any voxel is > 0), image-level labels
            (B,) or (B, 1), or None (all normal).
        batch_size: B.
        device: device of the result.

    Returns:
        A float tensor of 0/1, shape (B,).
    """
    if label is None:
        return torch.zeros(batch_size, device=device)
    label = torch.as_tensor(label, device=device)
    if label.ndim >= 3:
        return (label.flatten(1) > 0).any(1).float()
    return (label.reshape(batch_size, -1)[:, 0] > 0).float()


class _NoInterruptLog(logging.Filter):
    """Drops ignite's "Engine run is terminating due to exception" record when the exception is a Ctrl-C."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and isinstance(sys.exc_info()[1], KeyboardInterrupt))


class _QuietInterrupt:
    """Lets a KeyboardInterrupt (Ctrl-C) leave ``Engine.run`` without logging a traceback.

    Ignite logs an error and fires ``EXCEPTION_RAISED`` for every exception, and MONAI's ``StatsHandler`` logs
    the traceback there (``CheckpointSaver`` would also write a checkpoint from the middle of an epoch). A
    KeyboardInterrupt skips those handlers and propagates to the caller, which reports it in one line.
    """

    def _quiet_interrupts(self) -> None:
        if not any(isinstance(f, _NoInterruptLog) for f in self.logger.filters):
            self.logger.addFilter(_NoInterruptLog())

    def _handle_exception(self, e: BaseException) -> None:
        if isinstance(e, KeyboardInterrupt):
            raise e
        super()._handle_exception(e)  # type: ignore[misc]


def _to_device(x: Any, device: torch.device, non_blocking: bool, memory_format: torch.memory_format) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x
        x = x.to(device=device, non_blocking=non_blocking, dtype=torch.float32)
        return x.contiguous(memory_format=memory_format) if x.ndim == 4 else x
    return x


class AEFlowTrainer(_QuietInterrupt, SupervisedTrainer):
    """Trains a registered model (AE-FLOW: its flow and decoder) on healthy images.

    Each iteration reads ``batch["image"]`` (B, C, H, W) in [0, 1], runs the network, and minimises the loss
    (:class:`AEFlowLoss` for AE-FLOW; any callable ``loss(output, x) -> {"loss": ..., other terms}``).
    ``engine.state.output`` holds ``image``, ``pred`` (the reconstruction ``output.x_rec``), ``loss`` and
    every other term of the loss dict (``loss_flow``, ``loss_recon``, ``loss_kl``...); it is not decollated,
    so ``from_engine(["loss"])`` gives a scalar. A loss with a ``discriminator_step(output, x)`` method (an
    adversarial baseline) has it called after each generator step; a loss with a ``corrupt(x, mask)`` method (a
    denoising model) has the network see ``corrupt(x, batch["mask"])`` while the loss compares its output with
    the clean ``x``. With a ``fitter`` (a model fitted in one pass without gradients, such as PatchCore; see
    :class:`~monai_aeflow.models.spec.Fitter`) each iteration hands the batch to ``fitter.update`` instead,
    nothing is optimised, and ``fitter.finish`` runs at the end of the epoch (before validation), its numbers in
    ``engine.state.metrics`` as ``fit_*``; ``engine.state.output`` then holds only ``image``. A
    KeyboardInterrupt (Ctrl-C) propagates without a logged traceback and without ``EXCEPTION_RAISED`` handlers.
    Every other argument is MONAI's ``SupervisedTrainer``'s (handlers, AMP, epoch length, ...).

    Args:
        device: where to train.
        max_epochs: number of epochs.
        train_data_loader: loader of healthy images.
        network: the model (see :mod:`monai_aeflow.models`).
        optimizer: optimiser over :func:`monai_aeflow.models.trainable_parameters`.
        loss_function: the model's loss (default: AE-FLOW's :class:`~monai_aeflow.losses.AEFlowLoss` of the default
            training recipe, MSE).
        channels_last: use the channels-last memory format (faster convolutions on CUDA).
        flow_init_images: healthy images used to initialise the flow's ActNorm layer when training starts
            (skipped when the model is already initialised, e.g. loaded or resumed).
        fitter: fit the model in one pass with this :class:`~monai_aeflow.models.spec.Fitter` instead of
            optimising a loss (``optimizer`` may then be None; run one epoch).
        kwargs: passed to ``SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: Optimizer | None,
        loss_function: Callable | None = None,
        channels_last: bool = False,
        flow_init_images: int = 256,
        fitter: Fitter | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("amp_kwargs", {"dtype": torch.bfloat16})  # float16 overflows in the flow
        # handlers given here (a bundle's validation) are attached after the fit's end-of-epoch step
        deferred_handlers = kwargs.pop("train_handlers", None) if fitter is not None else None
        super().__init__(
            device=torch.device(device),
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function if loss_function is not None else make_loss({}),
            **kwargs,
        )
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.flow_init_images = flow_init_images
        self.fitter = fitter
        self.add_event_handler(Events.STARTED, self._initialize_flow)
        if fitter is not None:  # registered first: the fit is complete before any validation handler runs
            self.add_event_handler(Events.EPOCH_COMPLETED, self._finish_fit)
        if deferred_handlers:
            self._register_handlers(deferred_handlers)
        self._quiet_interrupts()

    def _finish_fit(self, engine: AEFlowTrainer) -> None:
        """Complete a one-pass fit (PatchCore's coreset) and record its numbers as ``fit_*`` metrics."""
        with torch.no_grad():
            summary = engine.fitter.finish(engine.network)
        engine.state.metrics.update({f"fit_{k}": float(v) for k, v in (summary or {}).items()})

    def _initialize_flow(self, engine: AEFlowTrainer) -> None:
        """Data-dependent initialisation of the flow's ActNorm layer from up to ``flow_init_images`` images."""
        net = engine.network
        flow = getattr(net, "flow", None)
        if flow is None or not getattr(flow, "needs_initialization", False):
            return
        images, count = [], 0
        for batch in engine.data_loader:
            x = _to_device(batch[Keys.IMAGE], engine.state.device, engine.non_blocking, engine.memory_format)
            images.append(x)
            count += x.shape[0]
            if count >= engine.flow_init_images:
                break
        if images:
            with torch.no_grad():
                net.initialize_flow(torch.cat(images)[: engine.flow_init_images])

    def _iteration(self, engine: AEFlowTrainer, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        x = _to_device(batchdata[Keys.IMAGE], engine.state.device, engine.non_blocking, engine.memory_format)
        engine.state.output = {Keys.IMAGE: x}
        if engine.fitter is not None:
            engine.network.eval()
            with torch.no_grad():
                engine.fitter.update(engine.network, x)
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return engine.state.output
        corrupt = getattr(engine.loss_function, "corrupt", None)
        x_in = x
        if corrupt is not None:
            mask = batchdata.get("mask")
            mask = None if mask is None else _to_device(mask, x.device, engine.non_blocking, engine.memory_format)
            x_in = corrupt(x, mask)

        def _compute() -> None:
            out = engine.network(x_in)
            engine.state.output[Keys.PRED] = out.x_rec
            engine.state.output["_forward"] = out
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(out, x)
            for key, value in losses.items():
                engine.state.output[Keys.LOSS if key == "loss" else key] = value
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                _compute()
            engine.scaler.scale(engine.state.output[Keys.LOSS]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            _compute()
            engine.state.output[Keys.LOSS].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        out = engine.state.output.pop("_forward")
        discriminator_step = getattr(engine.loss_function, "discriminator_step", None)
        if discriminator_step is not None:
            extra = discriminator_step(out, x)
            engine.state.output.update(extra or {})
        engine.state.output[Keys.LOSS] = engine.state.output[Keys.LOSS].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class AEFlowEvaluator(_QuietInterrupt, SupervisedEvaluator):
    """Scores a labelled validation split with the model's image score and anomaly map.

    ``engine.state.output`` holds ``image``, ``pred`` (image score, (B,)), ``label`` (0/1 per image, taken
    from a lesion mask or an image-level label), ``recon``, ``anomaly_map``, the model's extra score terms
    (``score_flow`` and ``score_recon`` for AE-FLOW) and ``pixel_label`` (the lesion mask when the batch
    has one). Attach MONAI's
    ``ROCAUC`` handler with ``output_transform=from_engine(["pred", "label"])`` for slice-level AUROC.

    Args:
        device: where to evaluate.
        val_data_loader: loader of labelled images.
        network: a registered model (see :mod:`monai_aeflow.models`).
        beta: weight of the flow score.
        map_kind: ``"residual"``, ``"flow"`` or ``"ssim"``.
        channels_last: use the channels-last memory format.
        kwargs: passed to ``SupervisedEvaluator`` (``key_val_metric``, ``val_handlers``, ``amp``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: torch.nn.Module,
        beta: float = 0.9,
        map_kind: str = "residual",
        channels_last: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("amp_kwargs", {"dtype": torch.bfloat16})  # float16 overflows in the flow
        super().__init__(device=torch.device(device), val_data_loader=val_data_loader, network=network, **kwargs)
        self.beta = beta
        self.map_kind = map_kind
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model_spec = spec_of(network)
        self._quiet_interrupts()

    def _iteration(self, engine: AEFlowEvaluator, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        x = _to_device(batchdata[Keys.IMAGE], engine.state.device, engine.non_blocking, engine.memory_format)
        raw_label = batchdata.get(Keys.LABEL)
        y = slice_labels(raw_label, x.shape[0], x.device)
        score = engine.model_spec.score
        with engine.mode(engine.network):
            if engine.amp:
                with torch.autocast("cuda", **engine.amp_kwargs):
                    scores = score(engine.network, x, beta=engine.beta, map_kind=engine.map_kind)
            else:
                scores = score(engine.network, x, beta=engine.beta, map_kind=engine.map_kind)
        pixel_label = None
        if isinstance(raw_label, torch.Tensor) and raw_label.ndim >= 3:
            pixel_label = _to_device(raw_label, x.device, engine.non_blocking, torch.contiguous_format)
        extra = {k: v.float() for k, v in scores.items() if k not in ("score", "recon", "anomaly_map")}
        engine.state.output = {
            Keys.IMAGE: x,
            Keys.LABEL: y,
            Keys.PRED: scores["score"].float(),
            "recon": scores["recon"].float(),
            "anomaly_map": scores["anomaly_map"].float(),
            "pixel_label": pixel_label,
            **extra,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


AnomalyTrainer = AEFlowTrainer
"""Model-neutral name of :class:`AEFlowTrainer` (the same class: it trains every registered model)."""

AnomalyEvaluator = AEFlowEvaluator
"""Model-neutral name of :class:`AEFlowEvaluator` (the same class: it validates every registered model)."""
