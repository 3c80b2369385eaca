"""TensorBoard and metrics plumbing of ignite runs: writers, loss scalars, metrics / scores / batch recorders.

File writers act on rank 0 of a distributed run only (:func:`summary_writer`); :class:`BatchRecorder` writes
one file per rank. The bundles reference these through ``_target_`` / ``$`` expressions.

Example::

    writer = summary_writer("runs/eval")  # a SummaryWriter on rank 0, a no-op writer elsewhere
    MetricsWriter("metrics.json", scores_csv="scores.csv").attach(evaluator)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_aeflow.engines.distributed import rank as _rank
from monai_aeflow.fileio import atomic_write_json, atomic_write_text
from monai_aeflow.inference.outputs import write_scores_summary  # its home; kept importable here

__all__ = [
    "BatchRecorder",
    "MetricsWriter",
    "ReconstructionQuality",
    "loss_scalars",
    "summary_writer",
    "write_scores_summary",
]


class _NullWriter:
    """Stands in for a ``SummaryWriter`` on the ranks that write nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def summary_writer(log_dir: str | os.PathLike) -> Any:
    """A TensorBoard ``SummaryWriter`` on rank 0 (or outside distributed runs), a no-op writer elsewhere.

    Args:
        log_dir: the event-file folder.

    Returns:
        The writer shared by the bundle's TensorBoard handlers.
    """
    if _rank() != 0:
        return _NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


class ReconstructionQuality:
    """Mean PSNR, SSIM and MSE of reconstructions of images in [0, 1] (MONAI ``PSNRMetric`` and ``SSIMMetric``).

    Both metrics use a fixed data range of 1 (the images are scaled to [0, 1]); SSIM has MONAI's default
    11-pixel Gaussian window. Feed batches with :meth:`update`, read the means with :meth:`compute`.

    Example::

        quality = ReconstructionQuality()
        quality.update(images, reconstructions)   # (N, C, H, W) tensors
        quality.compute()                          # {"psnr": ..., "ssim": ..., "mse": ..., "n_images": N}
    """

    def __init__(self) -> None:
        from monai.metrics import PSNRMetric, SSIMMetric

        self.psnr = PSNRMetric(max_val=1.0, reduction="mean")
        self.ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="mean")
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self.psnr.reset()
        self.ssim.reset()
        self.sq_err = 0.0
        self.n_images = 0
        self.n_values = 0

    def update(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Add a batch.

        Args:
            images: ``(N, C, H, W)`` images in [0, 1].
            reconstructions: their reconstructions, same shape.
        """
        x = images.detach().float().cpu()
        y = reconstructions.detach().float().cpu()
        if x.shape != y.shape:
            raise ValueError(f"images {tuple(x.shape)} and reconstructions {tuple(y.shape)} differ in shape")
        if x.shape[0] == 0:
            return
        self.psnr(y, x)
        self.ssim(y, x)
        self.sq_err += float(((x - y) ** 2).sum())
        self.n_images += int(x.shape[0])
        self.n_values += int(x.numel())

    def compute(self) -> dict[str, float]:
        """``{"psnr", "ssim", "mse", "n_images"}`` over every image so far (empty dict when none)."""
        if not self.n_images:
            return {}
        return {
            "psnr": float(self.psnr.aggregate()),
            "ssim": float(self.ssim.aggregate()),
            "mse": self.sq_err / self.n_values,
            "n_images": self.n_images,
        }


def loss_scalars(output: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard scalars of a training iteration: ``train/loss`` and every other ``loss_*`` term.

    Args:
        output: ``engine.state.output`` of :class:`~monai_aeflow.engines.AEFlowTrainer`.

    Returns:
        ``{"train/loss": ..., "train/loss_flow": ..., ...}``.
    """
    return {f"train/{k}": float(v) for k, v in output.items() if str(k).startswith("loss") and v is not None}


def _item_names(batch: Mapping[str, Any], n: int) -> list[str]:
    if "slice_index" in batch and "subject_id" in batch:
        return [f"{s}:{int(z)}" for s, z in zip(batch["subject_id"], batch["slice_index"], strict=True)]
    meta = getattr(batch.get("image"), "meta", None) or {}
    files = meta.get("filename_or_obj")
    if isinstance(files, (list, tuple)) and len(files) == n:
        return [Path(str(f)).name for f in files]
    return [str(s) for s in batch.get("subject_id", [""] * n)]


class MetricsWriter:
    """Evaluator handler that writes the run's metrics to JSON and the per-image scores to CSV.

    At the end of an evaluation it writes ``engine.state.metrics`` (e.g. MONAI's ``ROCAUC``, the pixel
    AUROC of :class:`~monai_aeflow.engines.ValidationStatsHandler`) together with the AE-FLOW paper's
    image-level metrics of the collected scores (AUROC, AUPRC, and F1, ACC, SEN, SPE at the best-F1
    threshold, with bootstrap intervals resampling subjects: :func:`monai_aeflow.evaluation.classification_metrics`).

    Args:
        path: the JSON file (written atomically; an existing file is replaced).
        scores_csv: optional CSV of ``name, subject_id, label, score`` per image.
        n_bootstrap: bootstrap resamples of the intervals.
        level: name of the unit scored (``"slice"``, ``"image"``), used as the JSON key.
        extra: more JSON-ready entries to store (e.g. the model file).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        scores_csv: str | os.PathLike | None = None,
        n_bootstrap: int = 1000,
        level: str = "image",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.scores_csv = None if scores_csv is None else Path(scores_csv)
        self.n_bootstrap = int(n_bootstrap)
        self.level = level
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.subjects: list[str] = []
        self.names: list[str] = []

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        pred = out["pred"].detach().float().cpu().numpy().ravel()
        batch = engine.state.batch if isinstance(engine.state.batch, Mapping) else {}
        self.scores.append(pred)
        self.labels.append(out["label"].detach().cpu().numpy().ravel())
        self.subjects += [str(s) for s in batch.get("subject_id", [""] * pred.size)]
        self.names += _item_names(batch, pred.size)

    def _write(self, engine: Engine) -> None:
        from monai_aeflow.evaluation import classification_metrics

        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0)
        groups = np.asarray(self.subjects) if len(self.subjects) == scores.size and scores.size else None
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        summary = {
            "metrics": metrics,
            self.level: classification_metrics(scores, labels > 0, groups=groups, n_bootstrap=self.n_bootstrap),
            f"n_{self.level}s": int(scores.size),
            f"n_abnormal_{self.level}s": int((labels > 0).sum()),
            **self.extra,
        }
        atomic_write_json(self.path, summary)
        if self.scores_csv is not None:
            lines = ["name,subject_id,label,score"]
            lines += [
                f"{n},{s},{int(y)},{float(v):.8g}"
                for n, s, y, v in zip(self.names, self.subjects, labels, scores, strict=False)
            ]
            atomic_write_text(self.scores_csv, "\n".join(lines) + "\n")
        engine.state.summary = summary


class BatchRecorder:
    """Trainer handler that records chosen keys of every batch a rank trains on, one JSON file per rank.

    Useful to audit what a (distributed) run saw: with ``keys=("volume_index", "slice_index")`` the slices of
    each rank's shard.

    Args:
        path: file name; ``{rank}`` is replaced by the process rank (e.g. ``seen_rank{rank}.json``).
        keys: batch keys to record (the values are turned into lists).
    """

    def __init__(self, path: str | os.PathLike, keys: Sequence[str] = ("volume_index", "slice_index")) -> None:
        self.path = str(path)
        self.keys = tuple(keys)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.seen: dict[str, list[Any]] = {k: [] for k in self.keys}
        self.epochs: list[int] = []

    def _update(self, engine: Engine) -> None:
        batch = engine.state.batch
        for key in self.keys:
            value = batch[key]
            self.seen[key] += value.tolist() if isinstance(value, torch.Tensor) else list(value)
        self.epochs += [int(engine.state.epoch)] * len(batch[self.keys[0]])

    def _write(self, engine: Engine) -> None:
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        atomic_write_json(
            self.path.format(rank=_rank()), {"rank": _rank(), "world_size": world, "epoch": self.epochs, **self.seen}
        )
