"""The whole evaluation protocol: post-process, choose the threshold on validation, score the test split.

:func:`evaluate_maps` takes validation and test cases (NIfTI paths or arrays of anomaly maps, labels and brain
masks), runs the brain MRI protocol of the project and returns every metric with the protocol that produced
it. The threshold comes from the validation split only; the best threshold on the test split is reported
separately as an oracle upper bound. The metrics, curves and figure cases of a split are computed in
:mod:`monai_aeflow.evaluation.split_metrics`; this module runs the protocol and assembles the result.

Example::

    cases = find_cases("val/maps", "val/labels", "val/masks")
    result = evaluate_maps(cases, find_cases("test/maps", "test/labels", "test/masks"), EvaluationConfig())
    result["metrics"]["pixel"]["dice_pooled"]["value"]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.cases import PreparedCase, prepare_case
from monai_aeflow.evaluation.io import load_case
from monai_aeflow.evaluation.metrics import classification_metrics, dice_from_counts, roc_points
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.evaluation.split_metrics import (
    _classification_curves,
    _dice_curves,
    _dice_metrics,
    _figure_cases,
    _metric,
    _pixel_metrics,
    _split_sweep,
    _thin,
    healthy_percentiles,
)
from monai_aeflow.evaluation.thresholds import (
    exact_oracle_threshold,
    greedy_threshold_search,
    pooled_dice_objective,
    sweep_threshold,
    threshold_at_fpr,
)

__all__ = [
    "RESULT_FORMAT",
    "THRESHOLD_METHODS",
    "EvaluationConfig",
    "prepare_cases",
    "select_threshold",
    "evaluate_prepared",
    "evaluate_maps",
    "result_to_json",
]

RESULT_FORMAT = "monai-aeflow-evaluation/1"
"""Value of the ``format`` key of evaluation results."""

THRESHOLD_METHODS: tuple[str, ...] = ("sweep", "greedy", "fpr", "fixed")
"""``sweep``: the exact maximiser of the validation Dice over all thresholds (default); ``greedy``: the interval
search of the seed thesis; ``fpr``: target false-positive rate on validation; ``fixed``: a threshold given by the
user (e.g. one stored with a model)."""


@dataclass
class EvaluationConfig:
    """Settings of the evaluation protocol.

    Args:
        postprocess: post-processing of the maps.
        threshold_method: one of :data:`THRESHOLD_METHODS`.
        threshold: the threshold for ``threshold_method="fixed"``.
        greedy_steps: halvings of the greedy interval search.
        target_fpr: voxel false-positive rate for ``threshold_method="fpr"``.
        fpr_reference: ``"healthy"``: brain voxels of validation volumes without lesion voxels;
            ``"normal_voxels"``: brain voxels outside lesions in all validation volumes.
        n_thresholds: size of the threshold grid of the sweeps (curves, pixel AUROC / AUPRC, oracle).
        slice_min_brain_fraction: slices with a smaller brain area (fraction of the largest) are left out of
            slice-level metrics.
        n_bootstrap: bootstrap resamples for the confidence intervals (0: none).
        confidence: coverage of the confidence intervals.
        seed: seed of the bootstrap and of the grid subsample.
        check_affine: NIfTI map, label and mask must share the voxel grid (affine).
        reorient: NIfTI arrays are brought to RAS axis order (last axis axial).
        label_values: label values that are lesion (a BraTS region, see
            :data:`~monai_aeflow.data.indexers.BRATS_REGION_LABELS`); ``None``: ``label > 0``.
        report_methods: further validated threshold methods (``sweep``, ``greedy``, ``fpr``) whose threshold and
            test Dice are reported beside the main one (``metrics["thresholds"]``), e.g. to compare the exact
            sweep with the seed thesis' greedy search.
    """

    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    threshold_method: str = "sweep"
    threshold: float | None = None
    greedy_steps: int = 10
    target_fpr: float = 0.01
    fpr_reference: str = "healthy"
    n_thresholds: int = 16384
    slice_min_brain_fraction: float = 0.0
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    check_affine: bool = True
    reorient: bool = True
    report_methods: tuple[str, ...] = ()
    label_values: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.threshold_method not in THRESHOLD_METHODS:
            raise AEFlowInputError(
                f"threshold method must be one of {THRESHOLD_METHODS}, got {self.threshold_method!r}"
            )
        if self.threshold_method == "fixed":
            if self.threshold is None or not np.isfinite(self.threshold) or self.threshold < 0:
                raise AEFlowInputError("a fixed threshold must be a finite number >= 0 (maps are non-negative)")
        if self.fpr_reference not in ("healthy", "normal_voxels"):
            raise AEFlowInputError(f"fpr_reference must be 'healthy' or 'normal_voxels', got {self.fpr_reference!r}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise AEFlowInputError(f"target false-positive rate must be in [0, 1), got {self.target_fpr}")
        if self.greedy_steps < 1 or self.n_thresholds < 2 or self.n_bootstrap < 0:
            raise AEFlowInputError("greedy_steps >= 1, n_thresholds >= 2 and n_bootstrap >= 0 are required")
        bad = [m for m in self.report_methods if m not in THRESHOLD_METHODS or m == "fixed"]
        if bad:
            raise AEFlowInputError(f"report_methods must be validated threshold methods, not {', '.join(bad)}")
        if not 0.0 < self.confidence < 1.0:
            raise AEFlowInputError(f"confidence must be in (0, 1), got {self.confidence}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        out = asdict(self)
        out["postprocess"] = self.postprocess.to_dict()
        return out


def _progress(iterable: Any, enabled: bool, desc: str, total: int | None = None, unit: str = "case") -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)


def prepare_cases(
    cases: Sequence[Mapping[str, Any]], config: EvaluationConfig, split: str = "test", progress: bool = False
) -> list[PreparedCase]:
    """Load and post-process cases.

    Args:
        cases: case mappings (see :func:`~monai_aeflow.evaluation.io.load_case`).
        config: evaluation settings.
        split: split name for messages.
        progress: show a progress bar on stderr.

    Returns:
        The prepared cases, in the given order.
    """
    prepared: list[PreparedCase] = []
    names: set[str] = set()
    for i, case in enumerate(_progress(cases, progress, f"{split} cases", total=len(cases))):
        if not isinstance(case, Mapping):
            raise AEFlowInputError(f"{split} case {i} is not a mapping with 'map', 'label' and 'mask'")
        case = dict(case)
        case.setdefault("name", f"{split}_{i:04d}")
        arrays = load_case(
            case, check_affine=config.check_affine, reorient=config.reorient, label_values=config.label_values
        )
        if arrays["name"] in names:
            raise AEFlowInputError(f"two {split} cases are named {arrays['name']!r}")
        names.add(str(arrays["name"]))
        prepared.append(prepare_case(arrays, config.postprocess, config.slice_min_brain_fraction, source=case))
    return prepared


def select_threshold(
    validation: Sequence[PreparedCase], config: EvaluationConfig, progress: bool = False
) -> dict[str, Any]:
    """Choose the binarisation threshold on the validation split (or take the fixed one).

    Args:
        validation: prepared validation cases (unused for ``fixed``).
        config: evaluation settings.
        progress: show a progress bar on stderr.

    Returns:
        ``{"value", "method", "source", ...}``: the threshold and how it was chosen.

    Raises:
        AEFlowInputError: no validation cases, empty validation labels (greedy), no normal voxels (fpr).
    """
    pp = config.postprocess
    if config.threshold_method == "fixed":
        return {"value": float(config.threshold), "method": "fixed", "source": "given by the user"}
    if not validation:
        raise AEFlowInputError(f"the {config.threshold_method!r} threshold needs a validation split")
    names = [c.name for c in validation]
    if config.threshold_method == "sweep":
        res = sweep_threshold(validation, pp)
        counts = np.array([c.counts_at(res.threshold, pp) for c in validation], dtype=np.int64).sum(0)
        return {
            "value": res.threshold,
            "method": "sweep",
            "source": "validation split",
            "objective": "pooled Dice of the post-processed, binarised and cleaned validation maps",
            "search": "exact: every distinct value of the component-opened validation maps (and 0)",
            "n_candidates": res.n_candidates,
            "equivalent_interval": [res.candidate, res.next_value],
            "validation_dice_pooled": float(dice_from_counts(*counts)),
            "validation_cases": names,
        }
    if config.threshold_method == "greedy":
        objective = pooled_dice_objective(validation, pp)
        high = max(c.max_score() for c in validation)
        bar = _progress(range(config.greedy_steps), progress, "threshold search", unit="step")
        calls = {"n": 0}

        def tracked(t: float) -> float:
            calls["n"] += 1
            if progress and calls["n"] % 2 == 0:
                bar.update(1)
            return objective(t)

        res = greedy_threshold_search(tracked, high=high, low=0.0, steps=config.greedy_steps)
        if progress:
            bar.close()
        return {
            "value": res.threshold,
            "method": "greedy",
            "source": "validation split",
            "objective": "pooled Dice of the post-processed, binarised and cleaned validation maps",
            "search_interval": [res.low, res.high],
            "steps": res.steps,
            "final_step_width": res.step_width,
            "validation_dice_pooled": res.score,
            "trace": [[t, v] for t, v in res.trace],
            "validation_cases": names,
        }
    if config.fpr_reference == "healthy":
        healthy = [c for c in validation if not c.volume_label]
        if not healthy:
            raise AEFlowInputError(
                "no healthy validation volumes (without lesion voxels) for the false-positive-rate threshold; "
                "use the 'normal_voxels' reference to use the normal voxels of all validation volumes"
            )
        normal = [c.brain_scores() for c in healthy]
        reference = "brain voxels of healthy validation volumes"
    else:
        normal = [c.brain_scores()[~c.brain_labels()] for c in validation]
        reference = "brain voxels outside lesions in all validation volumes"
    t, achieved = threshold_at_fpr(normal, config.target_fpr)
    counts = np.array([c.counts_at(t, pp) for c in validation], dtype=np.int64).sum(0)
    return {
        "value": t,
        "method": "fpr",
        "source": "validation split",
        "target_fpr": config.target_fpr,
        "achieved_fpr": achieved,
        "reference_voxels": reference,
        "validation_dice_pooled": float(dice_from_counts(*counts)),
        "validation_cases": names,
    }


def _test_dice(info: Mapping[str, Any], counts: np.ndarray, test: Sequence[PreparedCase]) -> dict[str, Any]:
    """Threshold, validation Dice and test Dice (pooled and mean over lesioned volumes) of one method."""
    per = dice_from_counts(counts[:, 0], counts[:, 1], counts[:, 2])
    lesion = np.array([c.volume_label for c in test])
    return {
        "threshold": _metric(float(info["value"])),
        "validation_dice_pooled": _metric(float(info.get("validation_dice_pooled", float("nan")))),
        "dice_pooled": _metric(float(dice_from_counts(*counts.sum(0)))),
        "dice_mean": _metric(float(np.nanmean(per[lesion])) if lesion.any() else float("nan")),
    }


def evaluate_prepared(
    validation: Sequence[PreparedCase],
    test: Sequence[PreparedCase],
    config: EvaluationConfig,
    image_scores: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the protocol on prepared cases (see :func:`evaluate_maps`).

    Args:
        validation: prepared validation cases (may be empty for a fixed threshold).
        test: prepared test cases.
        config: evaluation settings.
        image_scores: optional image-level scores ``{"scores", "labels"}`` (e.g. the AE-FLOW image score per
            slice or per 2D image) for the image-level metrics.
        progress: show progress bars on stderr.

    Returns:
        The result dict (see :func:`evaluate_maps`).
    """
    if not test:
        raise AEFlowInputError("the test split has no cases")
    if image_scores is not None:
        s_img = np.asarray(image_scores["scores"], dtype=np.float64)
        y_img = np.asarray(image_scores["labels"], dtype=bool)
        if s_img.shape != y_img.shape or s_img.ndim != 1:
            raise AEFlowInputError("image scores and labels must be 1D arrays of the same length")
    pp = config.postprocess
    threshold_info = select_threshold(validation, config, progress)
    if validation and (healthy := healthy_percentiles(validation)) is not None:
        threshold_info["healthy_percentiles"] = healthy  # grades the map below the threshold (Label levels)
    t = float(threshold_info["value"])

    # Full pipeline at the validated threshold.
    counts = np.array(
        [c.counts_at(t, pp) for c in _progress(test, progress, "test Dice", total=len(test))], dtype=np.int64
    ).reshape(-1, 3)
    per_dice = dice_from_counts(counts[:, 0], counts[:, 1], counts[:, 2])
    pixel = _dice_metrics(counts, config)
    by_method = {threshold_info["method"]: _test_dice(threshold_info, counts, test)}
    for method in dict.fromkeys(config.report_methods):
        if method not in by_method:
            info = select_threshold(validation, dataclasses.replace(config, threshold_method=method))
            other = np.array([c.counts_at(float(info["value"]), pp) for c in test], dtype=np.int64).reshape(-1, 3)
            by_method[method] = _test_dice(info, other, test)

    # Sweeps on the test split's own grid: pixel AUROC / AUPRC, Dice curves, oracle.
    lesion = np.array([c.volume_label for c in test])
    brain, support = _split_sweep(test, config.n_thresholds, config.seed)
    pixel.update(_pixel_metrics(brain, config))
    pooled_curve, mean_curve = _dice_curves(support, lesion)
    pixel["n_volumes"] = _metric(len(test))
    pixel["n_volumes_with_lesions"] = _metric(int(lesion.sum()))
    pixel["n_brain_voxels"] = _metric(int(brain.n_pos.sum() + brain.n_neg.sum()))
    pixel["n_lesion_voxels"] = _metric(int(support.n_pos.sum()))

    oracle: dict[str, Any] = {}
    if np.isfinite(pooled_curve).any():
        k = int(np.nanargmax(pooled_curve))
        # the exact maximiser of the test Dice after component removal (what the validated thresholds are scored
        # with), so that no validated threshold can beat the oracle; the grid's maximum before removal is kept
        t_oracle = exact_oracle_threshold(test, pp) if lesion.any() else float(support.thresholds[k])
        oc = np.array([c.counts_at(t_oracle, pp) for c in test], dtype=np.int64).reshape(-1, 3)
        od = dice_from_counts(oc[:, 0], oc[:, 1], oc[:, 2])
        oracle = {
            "threshold": _metric(t_oracle),
            "dice_pooled": _metric(float(dice_from_counts(*oc.sum(0)))),
            "dice_mean": _metric(float(np.nanmean(od[lesion])) if lesion.any() else float("nan")),
            "dice_pooled_before_component_removal": _metric(float(pooled_curve[k])),
        }

    slice_scores = np.concatenate([c.slice_scores for c in test])
    slice_labels = np.concatenate([c.slice_labels for c in test])
    slice_groups = np.concatenate([np.full(c.slice_scores.size, i) for i, c in enumerate(test)])
    vol_scores = np.array([c.volume_score for c in test])
    boot = {"n_bootstrap": config.n_bootstrap, "confidence": config.confidence, "seed": config.seed}
    metrics: dict[str, Any] = {
        "pixel": pixel,
        "oracle": oracle,
        "thresholds": by_method,
        "slice": classification_metrics(slice_scores, slice_labels, groups=slice_groups, **boot),
        "volume": classification_metrics(vol_scores, lesion, **boot),
    }
    curves: dict[str, Any] = {}
    if image_scores is not None:
        metrics["image"] = classification_metrics(s_img, y_img, **boot)
        curves["image"] = _classification_curves(s_img, y_img)
        curves["image_scores"] = (s_img, y_img)

    # Curves for reports.
    rev_tp, rev_fp = brain.tp.sum(0)[::-1], brain.fp.sum(0)[::-1]
    n_pos, n_neg = int(brain.n_pos.sum()), int(brain.n_neg.sum())
    if n_pos and n_neg:
        fpr, tpr = roc_points(rev_tp, rev_fp, n_pos, n_neg)
        some = rev_tp + rev_fp > 0
        precision = rev_tp[some] / (rev_tp + rev_fp)[some]
        curves["pixel"] = dict(zip(("fpr", "tpr"), _thin(fpr, tpr), strict=True))
        curves["pixel"].update(dict(zip(("recall", "precision"), _thin(rev_tp[some] / n_pos, precision), strict=True)))
    curves["slice"] = _classification_curves(slice_scores, slice_labels)
    curves["volume"] = _classification_curves(vol_scores, lesion)
    curves["slice_scores"] = (slice_scores, slice_labels)
    curves["volume_scores"] = (vol_scores, lesion)
    # Pixel score histograms (normal / lesion voxels) on the grid: counts in (t_j, t_j+1].
    # Scores at or below the lowest grid value go to the first bin.
    hist_lesion, hist_normal = -np.diff(brain.tp.sum(0)), -np.diff(brain.fp.sum(0))
    if hist_lesion.size:
        hist_lesion[0] += n_pos - brain.tp.sum(0)[0]
        hist_normal[0] += n_neg - brain.fp.sum(0)[0]
    curves["pixel_hist"] = {"edges": support.thresholds, "lesion": hist_lesion, "normal": hist_normal}
    thr_t, pooled_t, mean_t = _thin(support.thresholds, pooled_curve, mean_curve)
    curves["dice_vs_threshold"] = {"test": {"threshold": thr_t, "dice_pooled": pooled_t, "dice_mean": mean_t}}
    if validation:
        v_lesion = np.array([c.volume_label for c in validation])
        _, v_support = _split_sweep(validation, config.n_thresholds, config.seed)
        v_pooled, v_mean = _dice_curves(v_support, v_lesion)
        thr_v, pooled_v, mean_v = _thin(v_support.thresholds, v_pooled, v_mean)
        curves["dice_vs_threshold"]["validation"] = {"threshold": thr_v, "dice_pooled": pooled_v, "dice_mean": mean_v}

    case_rows = []
    for c, (tp, fp, fn), d in zip(test, counts, per_dice, strict=True):
        case_rows.append(
            {
                "name": c.name,
                "split": "test",
                "has_lesion": bool(c.volume_label),
                "n_lesion_voxels": int(tp + fn),
                "n_predicted_voxels": int(tp + fp),
                "tp": int(tp),
                "fp": int(fp),
                "fn": int(fn),
                "dice": float(d),
                "volume_score": float(c.volume_score),
            }
        )

    protocol = {
        "splits": {
            "validation": {
                "n_volumes": len(validation),
                "n_volumes_with_lesions": int(sum(c.volume_label for c in validation)),
                "cases": [c.name for c in validation],
            },
            "test": {
                "n_volumes": len(test),
                "n_volumes_with_lesions": int(lesion.sum()),
                "cases": [c.name for c in test],
            },
        },
        "postprocessing": pp.to_dict(),
        "binarisation": "a voxel is abnormal when its post-processed score is > threshold; then small components go",
        "threshold": threshold_info,
        "dice": "dice_pooled (DICE_T): one Dice over all test voxels; dice_mean +- dice_std (DICE_S): per test "
        "volume with lesion voxels",
        "pixel_auc": f"pooled over the brain-mask voxels of the test split, on a grid of {support.thresholds.size} "
        "thresholds (exact when the scores take no more distinct values)",
        "oracle": "best pooled Dice over every threshold on the test split's own labels, after the same "
        "component removal (exact sweep): an upper bound of any threshold's test Dice, not a validated result",
        "slice_score": "mean post-processed score over the brain voxels of each axial slice; abnormal when the "
        "slice contains lesion voxels",
        "slice_min_brain_fraction": config.slice_min_brain_fraction,
        "volume_score": "mean post-processed score over the brain mask; abnormal when the volume has lesion voxels",
        "classification_threshold": "F1, ACC, SEN, SPE at the threshold of best F1 on the test split (the AE-FLOW "
        "paper's protocol); AUC = auroc",
        "bootstrap": {
            **boot,
            "method": "percentile",
            "unit": "volume (slices resampled with their volume); image for image-level metrics",
        },
        "config": config.to_dict(),
    }
    result = {
        "format": RESULT_FORMAT,
        "protocol": protocol,
        "metrics": metrics,
        "cases": case_rows,
        "curves": curves,
        "figure_cases": _figure_cases(test, per_dice, t, config),
    }
    return result


def evaluate_maps(
    validation_cases: Sequence[Mapping[str, Any]] | None,
    test_cases: Sequence[Mapping[str, Any]],
    config: EvaluationConfig | None = None,
    image_scores: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate anomaly maps with the brain MRI protocol.

    Each case is a mapping with ``"map"`` (the residual or anomaly map; or ``"image"`` and
    ``"reconstruction"``), ``"label"`` (lesion label, ``> 0`` is lesion) and ``"mask"`` (brain mask, ``> 0.5``)
    given as NIfTI paths or arrays of the same shape, last axis axial, and an optional ``"name"``. The
    threshold is chosen on ``validation_cases`` only.

    Args:
        validation_cases: the labelled validation split (``None`` or empty for a fixed threshold).
        test_cases: the test split.
        config: evaluation settings (defaults: :class:`EvaluationConfig`).
        image_scores: optional ``{"scores", "labels"}`` image-level scores for the image-level metrics.
        progress: show progress bars on stderr.

    Returns:
        ``{"format", "protocol", "metrics", "cases", "curves", "figure_cases"}``: ``metrics`` holds
        ``pixel`` (``dice_pooled``, ``dice_mean``, ``dice_std``, ``auroc``, ``auprc``), ``oracle``, ``slice``,
        ``volume`` (and ``image``), each metric as ``{"value", "ci_low", "ci_high"}``; ``curves`` and
        ``figure_cases`` hold arrays for :func:`~monai_aeflow.evaluation.report.write_report`
        (:func:`result_to_json` leaves them out).
    """
    config = config or EvaluationConfig()
    validation = (
        prepare_cases(validation_cases, config, "validation", progress)
        if validation_cases and config.threshold_method != "fixed"
        else []
    )
    test = prepare_cases(test_cases, config, "test", progress)
    return evaluate_prepared(validation, test, config, image_scores=image_scores, progress=progress)


def result_to_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON part of a result: format, protocol, metrics and per-case rows (no arrays)."""
    return {k: result[k] for k in ("format", "protocol", "metrics", "cases") if k in result}
