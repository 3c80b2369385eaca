"""The figure of a model comparison (``comparison.png``): what a reader looks at before the tables.

Top: the headline metrics of every model as bars (test Dice at the validated threshold, pixel, slice and volume
AUROC). Bottom: one test slice, the one with the most lesion voxels in the test split, as every model maps it:
the post-processed map of the evaluation protocol divided by the model's validated threshold (1 = the threshold,
so the models share one colour scale), its lesion mask at that threshold (cyan) and the ground truth (lime).

:func:`gallery_slice` chooses the slice, :func:`gallery_entry` computes one model's map and mask on it exactly as
the evaluation does (:func:`~monai_aeflow.evaluation.scoring.score_cases`, ``load_case``, ``postprocess_map``,
``segment``), and :func:`save_comparison_figure` draws the figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_aeflow.evaluation.io import load_case
from monai_aeflow.evaluation.postprocess import PostprocessConfig, postprocess_map, segment
from monai_aeflow.evaluation.scoring import _plain, score_cases
from monai_aeflow.fileio import atomic_write

__all__ = ["HEADLINE_METRICS", "gallery_slice", "gallery_entry", "save_comparison_figure"]

HEADLINE_METRICS: tuple[tuple[str, str], ...] = (
    ("dice_pooled", "DICE_T"),
    ("pixel_auroc", "pixel AUROC"),
    ("slice_auroc_score", "slice AUROC (score)"),
    ("volume_auroc", "volume AUROC"),
)
"""Row columns drawn as bars, with their labels."""


def gallery_slice(volumes: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
    """The test volume and axial slice with the most lesion voxels.

    Args:
        volumes: preprocessed test volumes (``label`` (1, X, Y, Z)).

    Returns:
        ``(volume index, slice index)``, or None when no volume has a lesion.
    """
    best, where = 0, None
    for i, vol in enumerate(volumes):
        if vol.get("label") is None:
            continue
        label = _plain(vol["label"])[0].numpy() > 0
        area = label.reshape(-1, label.shape[-1]).sum(0)
        if area.size and int(area.max()) > best:
            best, where = int(area.max()), (i, int(area.argmax()))
    return where


def gallery_entry(
    network: torch.nn.Module,
    volume: Mapping[str, Any],
    z: int,
    threshold: float,
    postprocess: PostprocessConfig,
    batch_size: int = 32,
    beta: float = 0.9,
    map_kind: str = "residual",
) -> dict[str, Any]:
    """One model's post-processed map and lesion mask on slice ``z`` of a test volume, as the evaluation makes them.

    Args:
        network: the trained model.
        volume: the preprocessed test volume.
        z: the axial slice.
        threshold: the model's validated threshold.
        postprocess: the evaluation's post-processing.
        batch_size: slices per forward pass.
        beta: flow weight of AE-FLOW's score.
        map_kind: pixel map kind.

    Returns:
        ``{"map": (X, Y) post-processed map, "mask": (X, Y) bool lesion mask, "threshold": float}``.
    """
    cases, _ = score_cases(network, [volume], batch_size, beta, map_kind, 0.0)
    arrays = load_case(cases[0])
    score = postprocess_map(arrays["residual"], arrays["mask"], postprocess)
    lesion = segment(score, threshold, postprocess)
    return {"map": score[..., z].astype(np.float32), "mask": lesion[..., z].astype(bool), "threshold": threshold}


def _display(slice_2d: np.ndarray) -> np.ndarray:
    """RAS (X, Y) to the radiological view: anterior up, the patient's right on the left of the picture."""
    return np.flipud(np.asarray(slice_2d).T)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else float("nan")


def save_comparison_figure(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    image: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    galleries: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "Model comparison",
) -> tuple[Path, dict[str, Any]]:
    """Draw the comparison figure: headline metrics as bars, and every model's map of one test slice.

    Args:
        path: the PNG to write (atomically).
        rows: the table rows (``model``, the :data:`HEADLINE_METRICS` columns, ``error`` for a failed model).
        image: the gallery slice's input, (X, Y) in [0, 1]; None draws the bars only.
        truth: its ground-truth lesion mask, (X, Y).
        galleries: per model name, :func:`gallery_entry` (a model without one is drawn as failed).
        title: the figure title.

    Returns:
        The path written, and what was drawn: ``bars`` (``{model: {column: value}}``, NaN for a failed model)
        and ``slice_dice`` (``{model: Dice of its mask against the truth on the gallery slice}``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [str(r["model"]) for r in rows]
    bars = {
        str(r["model"]): {
            col: float(r.get(col, math.nan)) if not r.get("error") else math.nan for col, _ in HEADLINE_METRICS
        }
        for r in rows
    }
    gallery = image is not None and truth is not None
    ncols = max(2, len(models) + 1) if gallery else 1
    fig = plt.figure(figsize=(max(8.0, 2.4 * ncols), 7.2 if gallery else 3.6))
    grid = fig.add_gridspec(2 if gallery else 1, ncols, height_ratios=[1.0, 1.2] if gallery else [1.0])
    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / max(1, len(HEADLINE_METRICS))
    x = np.arange(len(models))
    for k, (col, label) in enumerate(HEADLINE_METRICS):
        values = [bars[m][col] for m in models]
        pos = x + (k - (len(HEADLINE_METRICS) - 1) / 2) * width
        drawn = ax.bar(pos, [v if math.isfinite(v) else 0.0 for v in values], width, label=label)
        for rect, v in zip(drawn, values, strict=True):
            text = f"{v:.2f}" if math.isfinite(v) else "n/a"
            ax.annotate(text, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom",
                        fontsize=6, rotation=90, xytext=(0, 1), textcoords="offset points")  # fmt: skip
    ax.set_xticks(
        x, [m + (" (failed)" if any(r["model"] == m and r.get("error") for r in rows) else "") for m in models]
    )
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("test split")
    ax.legend(fontsize=7, ncols=len(HEADLINE_METRICS), loc="upper center")
    ax.set_title(title, fontsize=10)
    slice_dice: dict[str, float] = {}
    if gallery:
        truth = np.asarray(truth, dtype=bool)
        ax0 = fig.add_subplot(grid[1, 0])
        ax0.imshow(_display(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if truth.any():
            ax0.contour(_display(truth), levels=[0.5], colors="lime", linewidths=0.8)
        ax0.set_title("input, ground truth", fontsize=8)
        shown = None
        for c, name in enumerate(models, start=1):
            axc = fig.add_subplot(grid[1, c])
            entry = (galleries or {}).get(name)
            axc.set_xticks([])
            axc.set_yticks([])
            if entry is None:
                axc.text(0.5, 0.5, "failed", ha="center", va="center", transform=axc.transAxes)
                axc.set_title(name, fontsize=8)
                continue
            t = float(entry["threshold"])
            scaled = np.asarray(entry["map"], dtype=np.float32) / t if t > 0 else np.asarray(entry["map"])
            shown = axc.imshow(_display(scaled), cmap="inferno", vmin=0, vmax=2, interpolation="nearest")
            if truth.any():
                axc.contour(_display(truth), levels=[0.5], colors="lime", linewidths=0.8)
            if np.asarray(entry["mask"]).any():
                axc.contour(_display(entry["mask"]), levels=[0.5], colors="cyan", linewidths=0.8)
            slice_dice[name] = _dice(np.asarray(entry["mask"], dtype=bool), truth)
            axc.set_title(f"{name}\nslice Dice {slice_dice[name]:.2f}", fontsize=8)
        ax0.set_xticks([])
        ax0.set_yticks([])
        if shown is not None:
            bar = fig.colorbar(shown, ax=fig.axes[-1], fraction=0.046, pad=0.04)
            bar.set_label("map / threshold", fontsize=7)
    fig.tight_layout()
    try:
        written = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)
    return written, {"bars": bars, "slice_dice": slice_dice}
