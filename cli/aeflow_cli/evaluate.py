"""``aeflow-cli evaluate``: score folders of anomaly maps with the brain MRI evaluation protocol."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np

from aeflow_cli.common import normalize_option, run_guarded
from monai_aeflow.errors import AEFlowInputError

__all__ = ["evaluate"]

_DIR = click.Path(file_okay=False, path_type=Path)


def _split_folders(
    root: Path | None, maps: Path | None, labels: Path | None, masks: Path | None, split: str, no_masks: bool
) -> tuple[Path | None, Path | None, Path | None]:
    """Folders of a split: explicit options win over ``root/maps``, ``root/labels``, ``root/masks``."""
    if root is not None:
        if not root.is_dir():
            raise AEFlowInputError(f"{split} folder not found", path=root)
        maps = maps or root / "maps"
        labels = labels or root / "labels"
        if masks is None and not no_masks:
            masks = root / "masks"
    if maps is None and labels is None:
        return None, None, None
    if maps is None or labels is None:
        raise AEFlowInputError(f"the {split} split needs both a map folder and a label folder")
    if masks is None and not no_masks:
        raise AEFlowInputError(
            f"no brain-mask folder for the {split} split (give --{split}-masks, or --no-masks to use whole volumes)"
        )
    return maps, labels, None if no_masks else masks


def _read_scores_csv(path: Path) -> dict[str, Any]:
    """Image-level scores from a CSV with columns ``name``, ``score`` and ``label`` (0/1)."""
    if not path.is_file():
        raise AEFlowInputError("scores CSV not found", path=path)
    scores, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"score", "label"} <= set(reader.fieldnames):
            raise AEFlowInputError("the scores CSV needs the columns 'score' and 'label'", path=path)
        for i, row in enumerate(reader, start=2):
            try:
                scores.append(float(row["score"]))
                labels.append(int(float(row["label"])) > 0)
            except (TypeError, ValueError) as err:
                raise AEFlowInputError(f"line {i}: score and label must be numbers", path=path) from err
    if not scores:
        raise AEFlowInputError("the scores CSV has no rows", path=path)
    if not np.all(np.isfinite(scores)):
        raise AEFlowInputError("the scores CSV has non-finite scores", path=path)
    return {"scores": np.array(scores), "labels": np.array(labels)}


def _summary(result: dict[str, Any]) -> str:
    m = result["metrics"]
    thr = result["protocol"]["threshold"]

    def fmt(level: str, name: str) -> str:
        v = m.get(level, {}).get(name)
        if not v or not np.isfinite(v["value"]):
            return "n/a"
        ci = f" [{v['ci_low']:.4f}, {v['ci_high']:.4f}]" if np.isfinite(v["ci_low"]) else ""
        return f"{v['value']:.4f}{ci}"

    lines = [
        f"threshold {thr['value']:.6g} ({thr['method']}, {thr['source']})",
        f"pixel   DICE_T {fmt('pixel', 'dice_pooled')}  DICE_S {fmt('pixel', 'dice_mean')} +- "
        f"{m['pixel']['dice_std']['value']:.4f}  AUROC {fmt('pixel', 'auroc')}  AUPRC {fmt('pixel', 'auprc')}",
    ]
    for method, entry in m.get("thresholds", {}).items():
        if method != thr["method"]:
            lines.append(
                f"{method:<7} threshold {entry['threshold']['value']:.6g}: DICE_T {entry['dice_pooled']['value']:.4f} "
                f"(validation {entry['validation_dice_pooled']['value']:.4f})"
            )
    if m.get("oracle"):
        lines.append(
            f"oracle  (best on test, upper bound) DICE_T {fmt('oracle', 'dice_pooled')} at "
            f"{m['oracle']['threshold']['value']:.6g}"
        )
    for level in ("slice", "volume", "image"):
        if level in m:
            lines.append(
                f"{level:<7} AUROC {fmt(level, 'auroc')}  AUPRC {fmt(level, 'auprc')}  F1 {fmt(level, 'f1')}  "
                f"ACC {fmt(level, 'acc')}  SEN {fmt(level, 'sen')}  SPE {fmt(level, 'spe')}"
            )
    return "\n".join(lines)


@contextmanager
def _label_warnings_on_stderr() -> Iterator[None]:
    """Print each label warning once, as a ``Warning: <file>: ...`` line on stderr (no Python source line)."""
    from monai_aeflow.evaluation import LabelValuesWarning

    shown: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", LabelValuesWarning)
        default = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: Any = None,
            line: str | None = None,
        ) -> None:
            if not issubclass(category, LabelValuesWarning):
                default(message, category, filename, lineno, file, line)
            elif str(message) not in shown:
                shown.add(str(message))
                click.echo(f"Warning: {message}", err=True)

        warnings.showwarning = show
        yield


def _run(opts: dict[str, Any]) -> None:
    from monai_aeflow.evaluation import (
        EvaluationConfig,
        PostprocessConfig,
        check_checkpoint,
        check_report_folder,
        evaluate_maps,
        find_cases,
        result_to_json,
        save_threshold,
        threshold_protocol,
        write_report,
    )
    from monai_aeflow.evaluation.io import to_jsonable

    method = opts["threshold_method"]
    if opts["threshold"] is not None:
        if method not in (None, "fixed"):
            raise AEFlowInputError(f"--threshold gives a fixed threshold; it cannot be combined with --method {method}")
        method = "fixed"
    method = method or "sweep"
    if opts["checkpoint"] is not None and method == "fixed":
        raise AEFlowInputError("--checkpoint stores a threshold chosen on validation; not with a fixed --threshold")
    pp = PostprocessConfig(
        normalize=opts["normalize"],
        residual=opts["residual"],
        erosion_iterations=opts["erosion"],
        median_size=opts["median_size"],
        median_dims=opts["median_dims"],
        min_component_size=opts["min_component_size"],
        component_dims=opts["component_dims"],
        component_connectivity=opts["connectivity"],
    )
    label_values = None
    if opts["region"] != "wt":
        from monai_aeflow.data.indexers import brats_region_labels

        if opts["brats_labels"] is None:
            raise AEFlowInputError(
                f"--region {opts['region']} needs --brats-labels (2013-2015, 2017-2021 or 2023+): the label values "
                "of the tumour core and enhancing tumour differ between BraTS releases"
            )
        label_values = brats_region_labels(opts["brats_labels"], opts["region"])
    config = EvaluationConfig(
        postprocess=pp,
        label_values=label_values,
        report_methods=("sweep", "greedy") if method in ("sweep", "greedy") else (),
        threshold_method=method,
        threshold=opts["threshold"],
        greedy_steps=opts["steps"],
        target_fpr=opts["target_fpr"],
        fpr_reference=opts["fpr_reference"],
        n_thresholds=opts["grid_size"],
        slice_min_brain_fraction=opts["slice_min_brain_fraction"],
        n_bootstrap=opts["bootstrap"],
        seed=opts["seed"],
        check_affine=not opts["ignore_affine"],
    )
    no_masks = opts["no_masks"]
    t_maps, t_labels, t_masks = _split_folders(
        opts["test"], opts["test_maps"], opts["test_labels"], opts["test_masks"], "test", no_masks
    )
    if t_maps is None:
        raise AEFlowInputError(
            "no test split: give --test DIR (with maps/, labels/, masks/) or --test-maps/--test-labels"
        )
    v_maps, v_labels, v_masks = _split_folders(
        opts["val"], opts["val_maps"], opts["val_labels"], opts["val_masks"], "val", no_masks
    )
    if v_maps is None and method != "fixed":
        raise AEFlowInputError(
            f"the {method!r} threshold is chosen on a validation split: give --val DIR or --val-maps/--val-labels "
            "(or a fixed --threshold)"
        )
    if opts["checkpoint"] is not None:
        check_checkpoint(opts["checkpoint"])  # fail before the long work
    image_scores = _read_scores_csv(opts["scores_csv"]) if opts["scores_csv"] is not None else None
    check_report_folder(opts["output"], overwrite=opts["overwrite"])  # fail before the long work
    test_cases = find_cases(t_maps, t_labels, t_masks, opts["test_images"], opts["test_reconstructions"])
    val_cases = find_cases(v_maps, v_labels, v_masks) if v_maps is not None else None
    with _label_warnings_on_stderr():
        result = evaluate_maps(val_cases, test_cases, config, image_scores=image_scores, progress=not opts["quiet"])
    written = write_report(result, opts["output"], plots=not opts["no_plots"], overwrite=opts["overwrite"])
    if opts["checkpoint"] is not None:
        save_threshold(opts["checkpoint"], result["protocol"]["threshold"]["value"], threshold_protocol(result))
    if opts["as_json"]:
        click.echo(json.dumps(to_jsonable(result_to_json(result)), indent=2, allow_nan=False))
    else:
        click.echo(_summary(result))
        click.echo(f"reports written to {Path(opts['output'])} ({len(written)} files)")
        if opts["checkpoint"] is not None:
            click.echo(f"threshold stored in {opts['checkpoint']}")


@click.command(
    "evaluate",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="""Score anomaly maps (NIfTI) against lesion labels with the brain MRI protocol.

Maps, labels and brain masks are matched by file name. Give each split as a folder holding maps/, labels/
and masks/ (--val, --test), or folder by folder (--val-maps, --val-labels, --val-masks, ...). The
binarisation threshold is chosen on the validation split only (by default the exact maximiser of the validation
Dice over all thresholds; --method greedy: the seed thesis' interval search), then test
Dice (pooled and per volume), pixel AUROC/AUPRC over brain voxels, slice- and volume-level AUROC/AUPRC and
F1/ACC/SEN/SPE at the best-F1 threshold are written with bootstrap 95% CIs to the output folder
(metrics.json, metrics.csv, cases.csv, plots); a folder that already holds a report needs --overwrite.
Labels are binarised as label > 0 (BraTS 0/1/2/4; a label with other values than 0 and 1 is named in a
warning), or to a BraTS region with --region tc|et and --brats-labels.

\b
Example:
  aeflow-cli evaluate --val runs/val --test runs/test -o evaluation --median-size 5 --json
""",
)
@click.option("--val", type=_DIR, default=None, help="Validation folder with maps/, labels/ and masks/.")
@click.option("--val-maps", type=_DIR, default=None, help="Validation anomaly maps (overrides --val).")
@click.option("--val-labels", type=_DIR, default=None, help="Validation lesion labels.")
@click.option("--val-masks", type=_DIR, default=None, help="Validation brain masks.")
@click.option("--test", type=_DIR, default=None, help="Test folder with maps/, labels/ and masks/.")
@click.option("--test-maps", type=_DIR, default=None, help="Test anomaly maps (overrides --test).")
@click.option("--test-labels", type=_DIR, default=None, help="Test lesion labels.")
@click.option("--test-masks", type=_DIR, default=None, help="Test brain masks.")
@click.option("--test-images", type=_DIR, default=None, help="Test input images, only for the figure of cases.")
@click.option(
    "--test-reconstructions", type=_DIR, default=None, help="Test reconstructions, only for the figure of cases."
)
@click.option("--no-masks", is_flag=True, help="No brain masks: the whole volume counts as brain.")
@click.option(
    "--region",
    type=click.Choice(["wt", "tc", "et"]),
    default="wt",
    show_default=True,
    help="BraTS region scored: whole tumour (label > 0), tumour core or enhancing tumour (needs --brats-labels).",
)
@click.option(
    "--brats-labels",
    type=click.Choice(["2013-2015", "2017-2021", "2023+"]),
    default=None,
    help="BraTS label naming of the labels, for --region tc/et (tc = 1,3,4 / 1,4 / 1,3; et = 4 / 4 / 3).",
)
@click.option("-o", "--output", type=_DIR, default=Path("evaluation"), show_default=True, help="Report folder.")
@click.option("--overwrite", is_flag=True, help="Replace a report already in the output folder.")
@normalize_option
@click.option(
    "--residual",
    type=click.Choice(["positive", "absolute"]),
    default="absolute",
    show_default=True,
    help="Keep the positive part or the absolute value of signed maps.",
)
@click.option(
    "--erosion",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Erosions of the brain mask per axial slice.",
)
@click.option(
    "--median-size",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Median filter size k (0 or 1: none).",
)
@click.option(
    "--median-dims",
    type=click.Choice(["2", "3"]),
    default="2",
    show_default=True,
    callback=lambda c, p, v: int(v),
    help="2: k x k per axial slice; 3: k x k x k.",
)
@click.option(
    "--min-component-size",
    type=click.IntRange(min=0),
    default=7,
    show_default=True,
    help="Remove connected components of this many voxels or fewer.",
)
@click.option(
    "--component-dims",
    type=click.Choice(["2", "3"]),
    default=None,
    callback=lambda c, p, v: None if v is None else int(v),
    help="Components per axial slice (2) or in 3D (3); default: as --median-dims.",
)
@click.option(
    "--connectivity",
    type=click.IntRange(1, 3),
    default=1,
    show_default=True,
    help="Neighbourhood of connected components (1: faces).",
)
@click.option(
    "--method",
    "threshold_method",
    type=click.Choice(["sweep", "greedy", "fpr", "fixed"]),
    default=None,
    help="Threshold choice on validation: sweep (default: the exact validation-Dice maximum), greedy (the "
    "seed thesis' interval search) or fpr (a target false-positive rate).",
)
@click.option("--threshold", type=float, default=None, help="Use this fixed threshold (no validation split needed).")
@click.option(
    "--target-fpr",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.01,
    show_default=True,
    help="Voxel false-positive rate for --method fpr.",
)
@click.option(
    "--fpr-reference",
    type=click.Choice(["healthy", "normal_voxels"]),
    default="healthy",
    show_default=True,
    help="Normal voxels for --method fpr: healthy volumes, or all non-lesion voxels.",
)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Greedy search steps.")
@click.option(
    "--grid-size",
    type=click.IntRange(min=2),
    default=16384,
    show_default=True,
    help="Thresholds of the sweeps (curves, pixel AUROC/AUPRC, oracle).",
)
@click.option(
    "--slice-min-brain-fraction",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Leave out slices with less brain than this fraction of the largest slice.",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Bootstrap resamples for 95% CIs (0: none).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option(
    "--scores-csv",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Image-level scores (columns name, score, label) for image-level metrics.",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Store the validated threshold and its protocol in this model file.",
)
@click.option("--ignore-affine", is_flag=True, help="Do not require maps, labels and masks to share their affine.")
@click.option("--no-plots", is_flag=True, help="Write JSON and CSV only.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def evaluate(**opts: Any) -> None:
    run_guarded(_run, opts)
