"""Reports of an evaluation: JSON and CSV of every metric with its protocol, and PNG plots.

Files written by :func:`write_report` (each atomically):

- ``metrics.json``: format, protocol (splits, threshold and its source, post-processing), metrics, cases.
- ``metrics.csv``: one row per metric with its confidence interval and the protocol columns.
- ``cases.csv``: per test volume counts, Dice and volume score.
- ``dice_vs_threshold.csv``: pooled and mean per-volume Dice on a threshold grid, per split.
- ``roc_pr.png``, ``score_distributions.png``, ``dice_vs_threshold.png``, ``cases.png``.

Plots use matplotlib's object-oriented API (Agg canvas), so no global backend is changed. A folder that already
holds a report is replaced only when asked (``overwrite``; :func:`check_report_folder` checks it up front);
the files of the replaced report that the new one does not write (plots, with ``plots=False``) are removed.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monai_aeflow.evaluation.io import atomic_write, atomic_write_json, atomic_write_text
from monai_aeflow.evaluation.pipeline import result_to_json
from monai_aeflow.fileio import blocking_ancestor, make_folder

__all__ = [
    "REPORT_FILES",
    "check_report_folder",
    "metrics_rows",
    "write_report",
    "plot_roc_pr",
    "plot_score_distributions",
    "plot_dice_vs_threshold",
    "plot_cases",
]

REPORT_FILES: tuple[str, ...] = (
    "metrics.json",
    "metrics.csv",
    "cases.csv",
    "dice_vs_threshold.csv",
    "roc_pr.png",
    "score_distributions.png",
    "dice_vs_threshold.png",
    "cases.png",
)
"""The files of a report; a folder holding any of them holds a report."""


def check_report_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Check, before any work, that a report can be written to a folder.

    A missing folder, an empty one or one without report files is fine; a folder holding a report is refused
    unless ``overwrite``.

    Args:
        output_dir: the report folder.
        overwrite: allow replacing an existing report.

    Returns:
        The report files already in the folder (replaced when ``overwrite``).

    Raises:
        AEFlowInputError: the path is a file, cannot be created, or holds a report and ``overwrite`` is False.
    """
    from monai_aeflow.errors import AEFlowInputError

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise AEFlowInputError("output folder expected, found a file", path=out)
    blocked = blocking_ancestor(out)
    if blocked is not None:
        why = "is a file" if blocked[1] == "file" else "is not writable"
        raise AEFlowInputError(f"output folder cannot be created: {blocked[0]} {why}", path=out)
    existing = [out / name for name in REPORT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise AEFlowInputError(
            f"already holds a report ({len(existing)} report files, e.g. {existing[0].name}); "
            "replace it with --overwrite or choose another output folder",
            path=out,
        )
    return existing


_CSV_COLUMNS = (
    "level",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "split",
    "threshold_source",
    "threshold",
    "normalize",
    "residual",
    "erosion_iterations",
    "median_size",
    "median_dims",
    "min_component_size",
    "component_dims",
    "n_bootstrap",
)


def _threshold_source(info: Mapping[str, Any]) -> str:
    method = info.get("method", "?")
    if method == "sweep":
        return "exact Dice maximum on the validation split"
    if method == "greedy":
        return "greedy Dice search on the validation split"
    if method == "fpr":
        return f"false-positive rate {info.get('target_fpr')} on the validation split"
    return "fixed (given by the user)"


def metrics_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten the metrics of a result into CSV rows with the protocol columns.

    Args:
        result: the output of :func:`~monai_aeflow.evaluation.pipeline.evaluate_maps`.

    Returns:
        One dict per metric, keys as in the CSV header.
    """
    protocol = result["protocol"]
    pp = protocol["postprocessing"]
    info = protocol["threshold"]
    common = {k: pp.get(k) for k in ("normalize", "residual", "erosion_iterations", "median_size", "median_dims")}
    common.update(
        min_component_size=pp.get("min_component_size"),
        component_dims=pp.get("component_dims"),
        n_bootstrap=protocol["bootstrap"]["n_bootstrap"],
        split="test",
    )
    rows = []
    levels = [(k, v) for k, v in result["metrics"].items() if k != "thresholds"]
    # Test Dice at the thresholds of other validated methods: one level per method ("threshold_greedy", ...).
    for method, metrics in result["metrics"].get("thresholds", {}).items():
        if method != info.get("method"):
            levels.append((f"threshold_{method}", metrics))
    for level, metrics in levels:
        if level.startswith("threshold_"):
            source, thr = _threshold_source({"method": level[len("threshold_") :]}), metrics["threshold"]["value"]
        elif level == "pixel":
            source, thr = _threshold_source(info), info["value"]
        elif level == "oracle":
            source = "best pooled Dice on the test split (oracle upper bound)"
            thr = metrics.get("threshold", {}).get("value")
        else:
            source = "best F1 on the test split (AE-FLOW paper protocol)"
            thr = metrics.get("threshold", {}).get("value")
        for name, m in metrics.items():
            rows.append(
                {
                    "level": level,
                    "metric": name,
                    "value": m["value"],
                    "ci_low": m["ci_low"],
                    "ci_high": m["ci_high"],
                    "threshold_source": source,
                    "threshold": thr,
                    **common,
                }
            )
    return rows


def _fmt(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return "" if not np.isfinite(v) else repr(float(v))
    return v


def _csv_text(rows: list[Mapping[str, Any]], columns: tuple[str, ...] | list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return buf.getvalue()


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_roc_pr(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """ROC and precision-recall curves of pixel, slice, volume (and image) level detection.

    Args:
        result: an evaluation result.
        path: the PNG to write.

    Returns:
        The path written.
    """
    curves = result["curves"]
    metrics = result["metrics"]
    fig = Figure(figsize=(10, 4.5))
    ax_roc, ax_pr = fig.subplots(1, 2)
    for level in ("pixel", "slice", "volume", "image"):
        c = curves.get(level)
        if not c:
            continue
        auc = metrics.get(level, {}).get("auroc", {}).get("value", float("nan"))
        ap = metrics.get(level, {}).get("auprc", {}).get("value", float("nan"))
        ax_roc.plot(c["fpr"], c["tpr"], label=f"{level} (AUROC {auc:.3f})")
        ax_pr.step(c["recall"], c["precision"], where="post", label=f"{level} (AUPRC {ap:.3f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax_roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (test)", xlim=(0, 1), ylim=(0, 1))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (test)", xlim=(0, 1), ylim=(0, 1.02))
    ax_roc.legend(fontsize=8, loc="lower right")
    ax_pr.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_score_distributions(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Score distributions of normal and abnormal voxels, slices, volumes (and images).

    Args:
        result: an evaluation result.
        path: the PNG to write.

    Returns:
        The path written.
    """
    curves = result["curves"]
    panels = [k for k in ("slice_scores", "volume_scores", "image_scores") if k in curves]
    fig = Figure(figsize=(4.2 * (1 + len(panels)), 3.8))
    axes = np.atleast_1d(fig.subplots(1, 1 + len(panels)))
    hist = curves.get("pixel_hist")
    ax = axes[0]
    if hist is not None and len(hist["edges"]) > 1:
        edges = np.asarray(hist["edges"], dtype=float)
        # Re-bin the fine grid into at most 60 bins of about equal width in score.
        coarse = np.unique(np.searchsorted(edges, np.linspace(edges[0], edges[-1], 61)).clip(0, len(edges) - 1))
        for name, color in (("normal", "tab:blue"), ("lesion", "tab:red")):
            counts = np.add.reduceat(np.asarray(hist[name], dtype=float), coarse[:-1]) if len(hist[name]) else []
            total = max(float(np.sum(counts)), 1.0)
            ax.stairs(np.asarray(counts) / total, edges[coarse], color=color, label=f"{name} voxels")
        ax.set_yscale("log")
    ax.set(xlabel="post-processed score", ylabel="fraction of voxels", title="brain voxels (test)")
    ax.legend(fontsize=8)
    for ax, key in zip(axes[1:], panels, strict=True):
        scores, labels = curves[key]
        scores = np.asarray(scores, dtype=float)
        labels = np.asarray(labels, dtype=bool)
        finite = scores[np.isfinite(scores)]
        bins = np.linspace(finite.min(), finite.max(), 31) if finite.size and np.ptp(finite) > 0 else 10
        for name, sel, color in (("normal", ~labels, "tab:blue"), ("abnormal", labels, "tab:red")):
            if sel.any():
                ax.hist(scores[sel], bins=bins, density=True, alpha=0.5, color=color, label=f"{name} ({sel.sum()})")
        ax.set(xlabel="score", ylabel="density", title=key.replace("_scores", "s") + " (test)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_dice_vs_threshold(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Pooled and mean per-volume Dice against the threshold, with the validated and oracle thresholds.

    Args:
        result: an evaluation result.
        path: the PNG to write.

    Returns:
        The path written.
    """
    curves = result["curves"]["dice_vs_threshold"]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    styles = {"validation": "tab:green", "test": "tab:blue"}
    for split, c in curves.items():
        ax.plot(c["threshold"], c["dice_pooled"], color=styles[split], label=f"{split}: pooled Dice")
        ax.plot(c["threshold"], c["dice_mean"], color=styles[split], ls="--", label=f"{split}: mean per-volume Dice")
    t = result["protocol"]["threshold"]["value"]
    ax.axvline(t, color="black", lw=1, label=f"chosen threshold {t:.4g}")
    oracle = result["metrics"].get("oracle", {}).get("threshold")
    if oracle is not None:
        ax.axvline(oracle["value"], color="grey", lw=1, ls=":", label=f"oracle on test {oracle['value']:.4g}")
    ax.set(xlabel="threshold on the post-processed score", ylabel="Dice", ylim=(0, 1), title="Dice vs threshold")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


def _show(slice2d: np.ndarray) -> np.ndarray:
    # RAS (x: right->left of patient, y: posterior->anterior): anterior up.
    return np.flipud(np.asarray(slice2d).T)


def plot_cases(result: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Grid of the best, median and worst test cases: original, reconstruction, residual, prediction, truth.

    Args:
        result: an evaluation result.
        path: the PNG to write.

    Returns:
        The path written, or ``None`` when no test case has lesions.
    """
    rows = result.get("figure_cases") or []
    if not rows:
        return None
    cols = [k for k in ("image", "reconstruction") if any(r.get(k) is not None for r in rows)]
    cols += ["map", "prediction", "label"]
    titles = {
        "image": "original",
        "reconstruction": "reconstruction",
        "map": "residual (post-processed)",
        "prediction": "prediction",
        "label": "ground truth",
    }
    fig = Figure(figsize=(2.6 * len(cols), 2.7 * len(rows)))
    axes = np.asarray(fig.subplots(len(rows), len(cols), squeeze=False))
    for r, row in enumerate(rows):
        vmax = float(np.percentile(row["map"], 99.9)) if np.any(row["map"]) else 1.0
        for c, key in enumerate(cols):
            ax = axes[r, c]
            data = row.get(key)
            if data is None:
                ax.axis("off")
                continue
            if key == "map":
                ax.imshow(_show(data), cmap="inferno", vmin=0, vmax=max(vmax, 1e-6), interpolation="nearest")
            elif key in ("image", "reconstruction"):
                ax.imshow(_show(data), cmap="gray", interpolation="nearest")
            else:
                ax.imshow(_show(data), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[key], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{row['role']}: {row['name']}\nslice {row['slice']}, Dice {row['dice']:.3f}", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def write_report(
    result: Mapping[str, Any], output_dir: str | os.PathLike, plots: bool = True, overwrite: bool = True
) -> dict[str, Path]:
    """Write the JSON, CSV and PNG reports of an evaluation.

    Args:
        result: the output of :func:`~monai_aeflow.evaluation.pipeline.evaluate_maps`.
        output_dir: destination folder (created).
        plots: also write the PNG plots.
        overwrite: replace a report already in the folder (its files that this report does not write are
            removed); when False, such a folder is refused (see :func:`check_report_folder`).

    Returns:
        ``{name: path}`` of the files written.

    Raises:
        AEFlowInputError: the output is a file, or it holds a report and ``overwrite`` is False.
    """
    out = Path(output_dir)
    existing = check_report_folder(out, overwrite)
    make_folder(out)
    written: dict[str, Path] = {}
    written["json"] = atomic_write_json(out / "metrics.json", result_to_json(result))
    written["metrics_csv"] = atomic_write_text(out / "metrics.csv", _csv_text(metrics_rows(result), _CSV_COLUMNS))
    case_cols = list(result["cases"][0].keys()) if result["cases"] else ["name"]
    written["cases_csv"] = atomic_write_text(out / "cases.csv", _csv_text(result["cases"], case_cols))
    curve_rows = []
    for split, c in result["curves"]["dice_vs_threshold"].items():
        for t, p, m in zip(c["threshold"], c["dice_pooled"], c["dice_mean"], strict=True):
            curve_rows.append({"split": split, "threshold": float(t), "dice_pooled": float(p), "dice_mean": float(m)})
    written["dice_csv"] = atomic_write_text(
        out / "dice_vs_threshold.csv", _csv_text(curve_rows, ("split", "threshold", "dice_pooled", "dice_mean"))
    )
    if plots:
        written["roc_pr"] = plot_roc_pr(result, out / "roc_pr.png")
        written["score_distributions"] = plot_score_distributions(result, out / "score_distributions.png")
        written["dice_vs_threshold"] = plot_dice_vs_threshold(result, out / "dice_vs_threshold.png")
        cases = plot_cases(result, out / "cases.png")
        if cases is not None:
            written["cases"] = cases
    kept = {p.name for p in written.values()}
    for stale in existing:  # files of the replaced report that this one does not have
        if stale.name not in kept:
            stale.unlink(missing_ok=True)
    return written
