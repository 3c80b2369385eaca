"""Pictures for people: panels of input / reconstruction / anomaly map / ground truth."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from monai_aeflow.fileio import atomic_write  # noqa: E402

__all__ = ["save_slice_panel", "most_anomalous_slices"]


def most_anomalous_slices(slice_scores: np.ndarray, n: int = 4) -> list[int]:
    """Indices of the ``n`` highest finite slice scores, in slice order."""
    scores = np.asarray(slice_scores, dtype=float)
    valid = np.flatnonzero(np.isfinite(scores))
    top = valid[np.argsort(scores[valid])[::-1][:n]]
    return sorted(int(i) for i in top)


def save_slice_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    slices: Sequence[int],
    reconstruction: np.ndarray | None = None,
    anomaly_map: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    slice_scores: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG grid: one row per axial slice; columns input, reconstruction, anomaly map, ground truth.

    Volumes are (X, Y, Z) in RAS; slices are shown with anterior up and the patient's right on the left
    of the picture (radiological convention). Missing columns are left out. Written atomically.

    Args:
        path: the PNG to write.
        image: the input volume.
        slices: axial slice indices to show.
        reconstruction: the reconstruction volume.
        anomaly_map: the anomaly-map volume (one colour scale for all rows).
        truth: a ground-truth lesion mask, drawn as a contour on the input and as its own column.
        slice_scores: per-slice scores written in the row titles.
        title: figure title.

    Returns:
        The path written.
    """
    cols: list[tuple[str, np.ndarray, dict]] = [("input", image, {"cmap": "gray", "vmin": 0, "vmax": 1})]
    if reconstruction is not None:
        cols.append(("reconstruction", reconstruction, {"cmap": "gray", "vmin": 0, "vmax": 1}))
    if anomaly_map is not None:
        sel = anomaly_map[..., list(slices)]
        vmax = float(np.percentile(sel, 99.9)) if sel.size else 1.0
        cols.append(("anomaly map", anomaly_map, {"cmap": "inferno", "vmin": 0, "vmax": max(vmax, 1e-6)}))
    if truth is not None:
        cols.append(("ground truth", truth, {"cmap": "gray", "vmin": 0, "vmax": 1}))
    rows = list(slices)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.6 * len(rows)), squeeze=False)
    for r, z in enumerate(rows):
        for c, (name, vol, kw) in enumerate(cols):
            ax = axes[r, c]
            # RAS (x: left->right of patient, y: posterior->anterior): transpose and flip for display
            ax.imshow(np.flipud(vol[..., z].T), interpolation="nearest", **kw)
            if c == 0 and truth is not None and truth[..., z].any():
                ax.contour(np.flipud(truth[..., z].T), levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                label = f"slice {z}"
                if slice_scores is not None and np.isfinite(slice_scores[z]):
                    label += f"\nscore {slice_scores[z]:.4f}"
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        path = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90))
    finally:
        plt.close(fig)
    return path
