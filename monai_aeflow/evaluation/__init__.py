"""Evaluation of anomaly maps with the brain MRI protocol: post-processing, validated thresholds, metrics, reports.

Typical use::

    from monai_aeflow.evaluation import EvaluationConfig, evaluate_maps, find_cases, write_report

    val = find_cases("val/maps", "val/labels", "val/masks")
    test = find_cases("test/maps", "test/labels", "test/masks")
    result = evaluate_maps(val, test, EvaluationConfig())
    write_report(result, "evaluation/")
"""

from monai_aeflow.evaluation.cases import PreparedCase, prepare_case
from monai_aeflow.evaluation.checkpoint import check_checkpoint, save_threshold, threshold_protocol
from monai_aeflow.evaluation.io import LabelValuesWarning, find_cases, load_case
from monai_aeflow.evaluation.metrics import (
    auroc_from_counts,
    average_precision,
    average_precision_from_counts,
    best_f1_metrics,
    bootstrap_ci,
    classification_metrics,
    curve_counts,
    dice_coefficient,
    dice_from_counts,
    roc_auc,
)
from monai_aeflow.evaluation.pipeline import (
    EvaluationConfig,
    evaluate_maps,
    evaluate_prepared,
    prepare_cases,
    result_to_json,
    select_threshold,
)
from monai_aeflow.evaluation.postprocess import (
    PostprocessConfig,
    apply_residual_mode,
    binarize,
    component_opening,
    erode_mask_per_slice,
    median_filter,
    postprocess_map,
    remove_small_components,
    segment,
)
from monai_aeflow.evaluation.report import check_report_folder, write_report
from monai_aeflow.evaluation.sweep import SweepCounts, dice_sweep, exceedance_counts, sweep_counts, threshold_grid
from monai_aeflow.evaluation.thresholds import (
    GreedySearchResult,
    SweepSearchResult,
    greedy_threshold_search,
    oracle_threshold,
    pooled_dice_objective,
    sweep_threshold,
    threshold_at_fpr,
)

__all__ = [
    "EvaluationConfig",
    "GreedySearchResult",
    "SweepSearchResult",
    "PostprocessConfig",
    "PreparedCase",
    "SweepCounts",
    "apply_residual_mode",
    "auroc_from_counts",
    "average_precision",
    "average_precision_from_counts",
    "best_f1_metrics",
    "binarize",
    "bootstrap_ci",
    "check_checkpoint",
    "classification_metrics",
    "curve_counts",
    "dice_coefficient",
    "dice_from_counts",
    "dice_sweep",
    "erode_mask_per_slice",
    "evaluate_maps",
    "evaluate_prepared",
    "exceedance_counts",
    "find_cases",
    "greedy_threshold_search",
    "load_case",
    "LabelValuesWarning",
    "median_filter",
    "oracle_threshold",
    "pooled_dice_objective",
    "postprocess_map",
    "prepare_case",
    "prepare_cases",
    "remove_small_components",
    "component_opening",
    "result_to_json",
    "roc_auc",
    "save_threshold",
    "segment",
    "select_threshold",
    "sweep_counts",
    "sweep_threshold",
    "threshold_at_fpr",
    "threshold_grid",
    "threshold_protocol",
    "write_report",
    "check_report_folder",
]
