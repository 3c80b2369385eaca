"""The brain MRI evaluation protocol on whole volumes: score validation and test volumes, evaluate the maps.

Example::

    summary = evaluate_volumes("models/model.pt", lists["val"], lists["test"], "eval/")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import atomic_write_json, save_nifti

__all__ = ["evaluate_volumes"]


def _single_image(record: Mapping[str, Any]) -> str:
    image = record["image"]
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise AEFlowInputError(
                "multi-channel records cannot be scored from files; stack the channels into one file",
                path=image[0],
            )
        image = image[0]
    return str(image)


def _zero_label(map_path: Path, out: Path) -> Path:
    ref = nib.load(str(map_path))
    img = nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine)
    save_nifti(img, out)
    return out


def evaluate_volumes(
    model: str | os.PathLike,
    val_records: Sequence[Mapping[str, Any]],
    test_records: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    device: str | torch.device = "auto",
    batch_size: int = 32,
    evaluation: Mapping[str, Any] | None = None,
    metrics_file: str | os.PathLike | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """The brain MRI protocol on whole volumes: score validation and test volumes, then evaluate the maps.

    Every volume is scored on its own grid with :class:`monai_aeflow.inference.AnomalyScorer`; the maps and
    brain masks go to ``<output_dir>/maps/<split>/``. :func:`monai_aeflow.evaluation.evaluate_maps` then
    chooses the threshold on the validation split only and reports pixel Dice (per volume and pooled), pixel
    AUROC / AUPRC over brain voxels, slice- and volume-level metrics and the oracle Dice;
    :func:`~monai_aeflow.evaluation.write_report` writes them to ``<output_dir>/report/``. Healthy volumes
    without a label file get an all-zero label.

    Args:
        model: a model file or bundle folder.
        val_records: labelled validation volumes (``image``, ``label``, ``mask``).
        test_records: test volumes.
        output_dir: where maps and the report go.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        batch_size: slices per forward pass.
        evaluation: settings of :class:`~monai_aeflow.evaluation.EvaluationConfig` (``postprocess`` as a dict).
        metrics_file: a JSON file to add the protocol's metrics to (key ``"volume_protocol"``).
        plots: write the report's PNG plots.

    Returns:
        The JSON part of the result (:func:`~monai_aeflow.evaluation.result_to_json`).
    """
    from monai_aeflow.evaluation import EvaluationConfig, PostprocessConfig, evaluate_maps, result_to_json, write_report
    from monai_aeflow.inference import AnomalyScorer, write_outputs

    settings = dict(evaluation or {})
    if isinstance(settings.get("postprocess"), Mapping):
        settings["postprocess"] = PostprocessConfig(**settings["postprocess"])
    config = EvaluationConfig(**settings)
    scorer = AnomalyScorer(model, device=device, batch_size=batch_size)
    out = Path(output_dir)
    cases: dict[str, list[dict[str, Any]]] = {}
    for split, records in (("val", val_records), ("test", test_records)):
        folder = out / "maps" / split
        cases[split] = []
        for record in records:
            result = scorer.score(_single_image(record), record.get("mask"))
            written = write_outputs(result, folder, overwrite=True, preview=False)
            mask_path = folder / f"{result.name}_brainmask.nii.gz"
            mask_img = nib.Nifti1Image(result.brain_mask.astype(np.uint8), result.affine)
            save_nifti(mask_img, mask_path)
            label = record.get("label")
            if label is None:
                label = _zero_label(written["anomaly"], folder / f"{result.name}_zerolabel.nii.gz")
            case = {"name": result.name, "map": written["anomaly"], "label": label, "mask": mask_path}
            if record.get("region_labels") is not None:  # a BraTS region (see data.indexers.with_brats_region)
                case["region_labels"] = list(record["region_labels"])
            cases[split].append(case)
    result = evaluate_maps(cases["val"], cases["test"], config)
    write_report(result, out / "report", plots=plots)
    summary = result_to_json(result)
    if metrics_file is not None:
        path = Path(metrics_file)
        current = json.loads(path.read_text()) if path.is_file() else {}
        current["volume_protocol"] = {"metrics": summary["metrics"], "protocol": summary.get("protocol")}
        atomic_write_json(path, current)
    return summary
