"""Ignite handlers used by the AE-FLOW training workflow."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from sklearn.metrics import roc_auc_score

from monai_aeflow.checkpoint import atomic_torch_save, save_model
from monai_aeflow.engines.metrics import ReconstructionQuality

__all__ = [
    "BestMetricState",
    "ConfigState",
    "RandomState",
    "ResumableCheckpointSaver",
    "ValidationStatsHandler",
    "ImageGridHandler",
    "LearningRateLogger",
    "ModelExportHandler",
]


class ConfigState:
    """Holds a JSON-like configuration so that ignite's ``Checkpoint`` stores it next to the weights.

    Args:
        config: the configuration (strings, numbers, lists, dicts, None).
    """

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config: dict[str, Any] = dict(config or {})

    def state_dict(self) -> dict[str, Any]:
        return dict(self.config)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.config = dict(state)


class BestMetricState:
    """Makes an evaluator's best key metric (value and epoch) part of a checkpoint, so that a resumed run
    keeps the best model of the epochs before the interruption instead of replacing it with the next one.

    Args:
        evaluator: a MONAI evaluator (its ``state.best_metric`` and ``state.best_metric_epoch``).
    """

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


class RandomState:
    """torch's random generators (CPU, CUDA) and the data loader's shuffling generator, as checkpoint state.

    Restored at resume, the epochs after the checkpoint draw the same batches and random numbers as in a run
    that was never interrupted.

    Args:
        generator: the ``torch.Generator`` of the training loader's sampler, if it has one.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        cuda = list(state.get("cuda") or [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        if self.generator is not None and state.get("loader") is not None:
            self.generator.set_state(state["loader"])


class ResumableCheckpointSaver:
    """Writes resumable training checkpoints atomically (temporary file, then rename).

    ``checkpoint_epoch=N.pt`` every ``save_interval`` epochs (the previous epoch and final checkpoints are
    removed once it is written) and ``checkpoint_final_iteration=N.pt`` when training completes. Each holds
    the ``state_dict()`` of every object of ``save_dict``: plain tensors, numbers and strings, readable with
    ``torch.load(..., weights_only=True)``. A run killed while a checkpoint is written keeps the previous one
    intact, never a truncated file under a checkpoint's name. MONAI's ``CheckpointSaver`` writes in place.

    Args:
        save_dir: the run folder.
        save_dict: objects with ``state_dict()`` (network, optimiser, trainer, ...).
        save_interval: save every this many epochs.
    """

    EPOCH_GLOB = "checkpoint_epoch=*.pt"
    FINAL_GLOB = "checkpoint_final_iteration=*.pt"

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, Any], save_interval: int = 1) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = max(int(save_interval), 1)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self._save_epoch)
        engine.add_event_handler(Events.COMPLETED, self._save_final)

    def state(self) -> dict[str, Any]:
        """The checkpoint content: ``{name: obj.state_dict()}``."""
        return {name: obj.state_dict() for name, obj in self.save_dict.items()}

    def _save(self, name: str, stale: tuple[str, ...]) -> Path:
        path = atomic_torch_save(self.state(), self.save_dir / name)
        for pattern in stale:
            for old in self.save_dir.glob(pattern):
                if old.name != path.name:
                    old.unlink(missing_ok=True)
        return path

    def _save_epoch(self, engine: Engine) -> None:
        self._save(f"checkpoint_epoch={engine.state.epoch}.pt", (self.EPOCH_GLOB, self.FINAL_GLOB))

    def _save_final(self, engine: Engine) -> None:
        self._save(f"checkpoint_final_iteration={engine.state.iteration}.pt", (self.FINAL_GLOB,))


class ValidationStatsHandler:
    """Accumulates validation outputs and adds pixel AUROC and score calibration to the engine's metrics.

    After each evaluation, ``engine.state.metrics`` gains ``val_pixel_auroc`` (over brain pixels when the
    batch has a ``mask``, over all pixels otherwise; only when lesion masks are present), ``val_psnr`` and
    ``val_ssim`` (reconstruction quality on the normal images, MONAI ``PSNRMetric`` / ``SSIMMetric`` with a
    data range of 1; only for networks that reconstruct: nothing for the intensity, flow-only and PatchCore
    models), and ``engine.state.score_calibration`` holds the mean and std of the flow and reconstruction
    scores on the normal images (for the optional calibrated score). The metrics go to TensorBoard with the
    evaluator's other metrics and into the model file's training record.

    Args:
        max_pixels: pixels kept for the AUROC (a uniform random subset beyond that, seeded).
    """

    def __init__(self, max_pixels: int = 2_000_000) -> None:
        self.max_pixels = max_pixels

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._compute)

    def _reset(self, engine: Engine) -> None:
        self.maps: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []
        self.flow: list[np.ndarray] = []
        self.recon: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        network = getattr(engine, "network", None)
        network = getattr(network, "module", network)  # DistributedDataParallel
        self.quality = ReconstructionQuality() if getattr(network, "reconstructs", True) else None

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        if out.get("score_flow") is not None and out.get("score_recon") is not None:
            self.flow.append(out["score_flow"].detach().float().cpu().numpy())
            self.recon.append(out["score_recon"].detach().float().cpu().numpy())
        self.labels.append(out["label"].detach().cpu().numpy())
        if self.quality is not None and isinstance(out.get("recon"), torch.Tensor):
            normal = out["label"].detach().reshape(-1).cpu() == 0
            if normal.any() and out["recon"].shape == out["image"].shape:
                self.quality.update(
                    out["image"][normal.to(out["image"].device)], out["recon"][normal.to(out["recon"].device)]
                )
        if out.get("pixel_label") is not None:
            amap = out["anomaly_map"].detach().float().cpu().numpy()
            truth = (out["pixel_label"].detach().cpu().numpy() > 0).any(1, keepdims=True)
            mask = engine.state.batch.get("mask") if isinstance(engine.state.batch, Mapping) else None
            if isinstance(mask, torch.Tensor) and mask.shape[-2:] == amap.shape[-2:]:
                keep = mask.detach().cpu().numpy().reshape(amap.shape[0], -1, *amap.shape[-2:])[:, :1] > 0
            else:
                keep = np.ones_like(truth)
            self.maps.append(amap[keep])
            self.truth.append(truth[keep])

    def _compute(self, engine: Engine) -> None:
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0)
        flow = np.concatenate(self.flow) if self.flow else np.zeros(0)
        recon = np.concatenate(self.recon) if self.recon else np.zeros(0)
        normal = labels == 0
        if flow.size == labels.size and normal.sum() >= 2:
            engine.state.score_calibration = {
                "flow_mean": float(flow[normal].mean()),
                "flow_std": float(flow[normal].std()),
                "recon_mean": float(recon[normal].mean()),
                "recon_std": float(recon[normal].std()),
            }
        if flow.size == labels.size and len(np.unique(labels)) == 2:
            engine.state.metrics["val_auroc_flow"] = float(roc_auc_score(labels, flow))
            engine.state.metrics["val_auroc_recon"] = float(roc_auc_score(labels, recon))
        quality = self.quality.compute() if self.quality is not None else {}
        if quality:
            engine.state.metrics["val_psnr"] = quality["psnr"]
            engine.state.metrics["val_ssim"] = quality["ssim"]
        if self.maps:
            scores = np.concatenate(self.maps)
            truth = np.concatenate(self.truth)
            if scores.size > self.max_pixels:
                idx = np.random.default_rng(0).choice(scores.size, self.max_pixels, replace=False)
                scores, truth = scores[idx], truth[idx]
            if truth.any() and not truth.all():
                engine.state.metrics["val_pixel_auroc"] = float(roc_auc_score(truth, scores))


def _normalise(img: torch.Tensor) -> torch.Tensor:
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)


class ImageGridHandler:
    """Writes a TensorBoard image grid (input / reconstruction / anomaly map / ground truth) per validation.

    Rows are up to ``max_images`` validation images, abnormal ones first; the anomaly-map column is scaled
    to [0, 1] over the grid.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        max_images: rows of the grid.
        tag: TensorBoard tag.
        global_step_transform: maps the evaluator to the step (the trainer's epoch by default).
    """

    def __init__(
        self,
        summary_writer: Any,
        max_images: int = 8,
        tag: str = "val/input_recon_map_truth",
        global_step_transform: Callable[[Engine], int] | None = None,
    ) -> None:
        self.writer = summary_writer
        self.max_images = max_images
        self.tag = tag
        self.global_step_transform = global_step_transform or (lambda e: e.state.epoch)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.abnormal: list[torch.Tensor] = []
        self.normal: list[torch.Tensor] = []

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        n = self.max_images
        if len(self.abnormal) >= n and len(self.normal) >= n:
            return
        x = out["image"].detach().float().cpu().mean(1, keepdim=True)
        rec = out["recon"].detach().float().cpu().mean(1, keepdim=True)
        amap = out["anomaly_map"].detach().float().cpu()
        truth = out.get("pixel_label")
        truth = torch.zeros_like(x) if truth is None else (truth.detach().float().cpu() > 0).any(1, True).float()
        for i in range(x.shape[0]):
            row = torch.stack([x[i], rec[i], amap[i], truth[i]])  # (4, 1, H, W)
            target = self.abnormal if out["label"][i] > 0 else self.normal
            if len(target) < n:
                target.append(row)

    def _write(self, engine: Engine) -> None:
        rows = (self.abnormal + self.normal)[: self.max_images]
        if not rows:
            return
        grid = torch.stack(rows)  # (R, 4, 1, H, W)
        grid[:, 2] = _normalise(grid[:, 2])
        grid = grid.clamp(0, 1)
        r, c, _, h, w = grid.shape
        image = grid.permute(2, 0, 3, 1, 4).reshape(1, r * h, c * w)
        self.writer.add_image(self.tag, image, self.global_step_transform(engine), dataformats="CHW")
        self.writer.flush()


class LearningRateLogger:
    """Writes the optimiser's learning rate to TensorBoard at the end of each epoch.

    Args:
        summary_writer: a ``SummaryWriter``.
        optimizer: the optimiser.
        tag: TensorBoard tag.
    """

    def __init__(self, summary_writer: Any, optimizer: torch.optim.Optimizer, tag: str = "train/lr") -> None:
        self.writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        self.writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.epoch)


class ModelExportHandler:
    """Writes a self-contained model file (:func:`monai_aeflow.checkpoint.save_model`).

    Attached to the evaluator it saves the network whenever the key validation metric improves, or at every
    validation while that metric is undefined (the stored configuration then records the epoch, the metrics
    and the score calibration); attached to
    the trainer it saves at the end of training.

    Args:
        network: the model.
        path: the model file to write.
        config: preprocessing / score / training configuration to store.
        trainer: the trainer (for the epoch number) when attached to an evaluator.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        path: str | os.PathLike,
        config: Mapping[str, Any],
        trainer: Engine | None = None,
    ) -> None:
        self.network = network
        self.path = Path(path)
        self.config = config
        self.trainer = trainer

    def attach(self, engine: Engine, on_improvement: bool = True) -> None:
        if on_improvement:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_validation)
        else:
            engine.add_event_handler(Events.COMPLETED, self._save)

    def _on_validation(self, engine: Engine) -> None:
        epoch = self.trainer.state.epoch if self.trainer is not None else engine.state.epoch
        key = getattr(engine.state, "key_metric_name", None)
        value = engine.state.metrics.get(key) if key else None
        # A key metric that is undefined (e.g. AUROC of a validation split without lesions) ranks nothing: the
        # latest model is kept instead of the first epoch's forever.
        undefined = isinstance(value, float) and not np.isfinite(value)
        if undefined or engine.state.best_metric_epoch in (-1, epoch) or not self.path.exists():
            self._save(engine, epoch)

    def _save(self, engine: Engine, epoch: int | None = None) -> None:
        cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.config.items()}
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        score = dict(cfg.get("score", {}))
        calibration = getattr(engine.state, "score_calibration", None)
        if calibration is not None:
            score["calibration"] = calibration
        cfg["score"] = score
        training = dict(cfg.get("training", {}))
        training.update({"epoch": int(epoch if epoch is not None else engine.state.epoch), "metrics": metrics})
        cfg["training"] = training
        save_model(self.network, self.path, cfg)
