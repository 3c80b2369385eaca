"""The tables of a model comparison: one row per model (metrics with confidence intervals, the test Dice at each
validated threshold, reconstruction quality), as Markdown (``comparison.md``) and CSV (``comparison.csv``).

The rows come from :func:`monai_aeflow.compare.run_comparison`; a model that failed has a row with its error and
NaN metrics ("n/a" in the tables).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_aeflow.fileio import atomic_write_text, make_folder

__all__ = ["comparison_table", "comparison_row", "failed_row", "write_comparison"]

_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    # (column, metrics level, metric name, Markdown header)
    ("dice_pooled", "pixel", "dice_pooled", "DICE_T"),
    ("dice_mean", "pixel", "dice_mean", "DICE_S"),
    ("dice_std", "pixel", "dice_std", "DICE_S std"),
    ("pixel_auroc", "pixel", "auroc", "pixel AUROC"),
    ("pixel_auprc", "pixel", "auprc", "pixel AUPRC"),
    ("slice_auroc_map", "slice", "auroc", "slice AUROC (map)"),
    ("slice_auprc_map", "slice", "auprc", "slice AUPRC (map)"),
    ("slice_auroc_score", "image", "auroc", "slice AUROC (score)"),
    ("slice_auprc_score", "image", "auprc", "slice AUPRC (score)"),
    ("slice_f1_score", "image", "f1", "slice F1 (score)"),
    ("volume_auroc", "volume", "auroc", "volume AUROC"),
    ("oracle_dice_pooled", "oracle", "dice_pooled", "oracle DICE_T"),
)

_METHOD_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (column, threshold method, Markdown header): test Dice at each validated threshold
    ("dice_pooled_sweep", "sweep", "DICE_T (sweep thr.)"),
    ("dice_pooled_greedy", "greedy", "DICE_T (greedy thr.)"),
)

_RECON_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (column, key of the result's "reconstruction", Markdown header): healthy validation slices
    ("val_psnr", "psnr", "val PSNR"),
    ("val_ssim", "ssim", "val SSIM"),
)


def comparison_row(name: str, info: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """The table row of one evaluated model.

    Args:
        name: the model's registry name.
        info: ``params`` (trainable / total), ``train_seconds``, ``epochs``, ``score_seconds``.
        result: the model's evaluation (:func:`~monai_aeflow.evaluation.scoring.evaluate_model`).

    Returns:
        The row: every column of the tables, with ``<column>_ci_low`` / ``_ci_high`` where a CI exists.
    """
    m = result["metrics"]
    row: dict[str, Any] = {
        "model": name,
        "params_trainable": info["params"]["trainable"],
        "params_total": info["params"]["total"],
        "train_seconds": info["train_seconds"],
        "epochs": info["epochs"],
        "score_seconds": info["score_seconds"],
        "threshold": float(result["protocol"]["threshold"]["value"]),
    }
    for col, level, metric, _ in _COLUMNS:
        value = m.get(level, {}).get(metric) or {}
        row[col] = float(value.get("value", float("nan")))
        if math.isfinite(value.get("ci_low", float("nan"))):
            row[f"{col}_ci_low"] = float(value["ci_low"])
            row[f"{col}_ci_high"] = float(value["ci_high"])
    by_method = m.get("thresholds", {})
    for col, method, _ in _METHOD_COLUMNS:
        entry = by_method.get(method, {})
        row[col] = float(entry.get("dice_pooled", {}).get("value", float("nan")))
        row[f"threshold_{method}"] = float(entry.get("threshold", {}).get("value", float("nan")))
    recon = result.get("reconstruction") or {}
    for col, key, _ in _RECON_COLUMNS:
        row[col] = float(recon.get(key, float("nan")))  # NaN ("n/a") for models that do not reconstruct
    row["error"] = ""
    return row


def failed_row(name: str, error: BaseException) -> dict[str, Any]:
    """The row of a model whose training, scoring or evaluation raised: its error, every metric NaN."""
    row: dict[str, Any] = {"model": name, "params_trainable": float("nan"), "params_total": float("nan")}
    row.update(train_seconds=float("nan"), epochs=float("nan"), score_seconds=float("nan"), threshold=float("nan"))
    for col, *_ in _COLUMNS + _METHOD_COLUMNS + _RECON_COLUMNS:
        row[col] = float("nan")
    row["error"] = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return row


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table of a comparison (one row per model).

    Args:
        rows: rows of :func:`run_comparison`.

    Returns:
        The table (GitHub Markdown).
    """
    header = ["model", "params (trainable)", "train s", *[h for *_, h in _COLUMNS if h != "DICE_S std"]]
    header += [h for *_, h in _METHOD_COLUMNS + _RECON_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    failed = []
    for r in rows:
        if r.get("error"):
            failed.append(f"- {r['model']} failed: {r['error']}")
            cells = [r["model"], "failed", "n/a"] + ["n/a"] * (len(header) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [r["model"], f"{r['params_trainable']:,}", f"{r['train_seconds']:.1f}"]
        for col, _, _, h in _COLUMNS:
            if h == "DICE_S std":
                continue
            cell = _fmt(r[col])
            if col == "dice_mean" and math.isfinite(r["dice_std"]):
                cell += f" ± {r['dice_std']:.3f}"
            cells.append(cell)
        cells += [_fmt(r.get(col, float("nan"))) for col, *_ in _METHOD_COLUMNS + _RECON_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + failed if failed else []))


def write_comparison(rows: Sequence[Mapping[str, Any]], output_dir: str | Path, notes: str = "") -> dict[str, Path]:
    """Write ``comparison.md`` (table and protocol notes) and ``comparison.csv`` (every column, with CIs).

    Args:
        rows: rows of :func:`run_comparison`.
        output_dir: destination folder.
        notes: Markdown text appended under the table.

    Returns:
        ``{"markdown": path, "csv": path}``.
    """
    out = make_folder(output_dir)
    md = "# Model comparison\n\n" + comparison_table(rows) + "\n" + (f"\n{notes}\n" if notes else "")
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return {
        "markdown": atomic_write_text(out / "comparison.md", md),
        "csv": atomic_write_text(out / "comparison.csv", buf.getvalue()),
    }
