"""``comparison.png``: the slice it draws, every model's mask on it (the evaluation's, checked against the per-case
Dice of the evaluation itself), and the numbers on its bars (the rows')."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from monai_aeflow.compare_figure import HEADLINE_METRICS, gallery_entry, gallery_slice, save_comparison_figure
from monai_aeflow.data.datalists import DataConfig, SyntheticCohortConfig, prepare_data
from monai_aeflow.evaluation.pipeline import EvaluationConfig
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.evaluation.scoring import evaluate_model
from monai_aeflow.models import build_model


def _volume(label: np.ndarray) -> dict:
    return {"image": torch.zeros((1, *label.shape)), "label": torch.from_numpy(label[None].astype(np.float32))}


def test_gallery_slice_is_the_largest_lesion_slice_of_the_split():
    rng = np.random.default_rng(0)
    labels = [rng.random((12, 10, 6)) > t for t in (0.9, 0.7, 0.95)]
    labels.append(np.zeros((12, 10, 6), bool))
    best = max(
        ((int(lab[..., z].sum()), i, z) for i, lab in enumerate(labels) for z in range(lab.shape[-1])),
        key=lambda t: t[0],
    )
    assert gallery_slice([_volume(lab) for lab in labels]) == (best[1], best[2])
    assert gallery_slice([_volume(np.zeros((4, 4, 3), bool))]) is None


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The intensity baseline evaluated on a small synthetic cohort (no training: the map is the image)."""
    data = prepare_data(
        DataConfig(synthetic=SyntheticCohortConfig(n_train=2, shape=(64, 64, 32))), tmp_path_factory.mktemp("d")
    )
    net, _ = build_model("intensity", data.in_channels, data.image_size)
    pp = PostprocessConfig()
    result = evaluate_model(net, data.val, data.test, EvaluationConfig(postprocess=pp, n_bootstrap=0))
    return net, data, pp, result


def test_gallery_masks_are_the_evaluations(evaluated):
    net, data, pp, result = evaluated
    threshold = float(result["protocol"]["threshold"]["value"])
    where = gallery_slice(data.test)
    vol = data.test[where[0]]
    depth = vol["label"].shape[-1]
    masks = np.stack([gallery_entry(net, vol, z, threshold, pp)["mask"] for z in range(depth)], axis=-1)
    truth = np.asarray(vol["label"][0]) > 0
    case = next(c for c in result["cases"] if c["name"] == str(vol["subject_id"]) and c["split"] == "test")
    # the slice-by-slice masks of the figure add up to the evaluation's own counts for that volume
    tp, fp, fn = int((masks & truth).sum()), int((masks & ~truth).sum()), int((~masks & truth).sum())
    assert (tp, fp, fn) == (case["tp"], case["fp"], case["fn"])
    entry = gallery_entry(net, vol, where[1], threshold, pp)
    assert entry["map"].shape == truth.shape[:2] and entry["threshold"] == threshold


def test_figure_draws_the_rows_numbers_and_each_models_slice_dice(evaluated, tmp_path):
    net, data, pp, result = evaluated
    where = gallery_slice(data.test)
    vol, z = data.test[where[0]], where[1]
    image, truth = np.asarray(vol["image"][0])[..., z], np.asarray(vol["label"][0])[..., z] > 0
    threshold = float(result["protocol"]["threshold"]["value"])
    rows = [
        {"model": "intensity", "dice_pooled": 0.4, "pixel_auroc": 0.9, "slice_auroc_score": 0.8, "volume_auroc": 0.5},
        {"model": "broken", "error": "RuntimeError: boom", "dice_pooled": math.nan},
    ]
    galleries = {"intensity": gallery_entry(net, vol, z, threshold, pp)}
    path, drawn = save_comparison_figure(tmp_path / "comparison.png", rows, image, truth, galleries)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 400
    assert drawn["bars"]["intensity"] == {col: rows[0][col] for col, _ in HEADLINE_METRICS}
    assert all(math.isnan(v) for v in drawn["bars"]["broken"].values())
    mask = galleries["intensity"]["mask"]
    expected = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
    assert drawn["slice_dice"] == {"intensity": pytest.approx(expected)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically


def test_figure_without_a_lesioned_test_slice_draws_the_bars_only(tmp_path):
    rows = [{"model": "ae", "dice_pooled": 0.1, "pixel_auroc": 0.7, "slice_auroc_score": 0.6, "volume_auroc": 0.5}]
    path, drawn = save_comparison_figure(tmp_path / "c.png", rows)
    assert path.is_file() and drawn["slice_dice"] == {}
