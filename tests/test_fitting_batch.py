"""A scorer whose device runs out of memory halves its batch and scores the input again (``FittingBatch``).

The out-of-memory error is raised by the network itself above a batch of 4 slices (what a shared GPU does), so
the test runs on the CPU; the maps must equal those of a scorer asked for 4 slices per pass from the start.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_aeflow.inference import AnomalyScorer, score_paths
from monai_aeflow.inference.volume import FittingBatch


def _limit_memory(scorer: AnomalyScorer, max_batch: int) -> list[int]:
    """Make the scorer's network fail like a full GPU on batches above ``max_batch``; returns the batches seen."""
    net, seen = scorer.network, []
    forward = net.forward

    def limited(x, *args, **kwargs):
        seen.append(int(x.shape[0]))
        if x.shape[0] > max_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {x.shape[0]} slices")
        return forward(x, *args, **kwargs)

    net.forward = limited
    return seen


def test_scorer_halves_the_batch_until_it_fits_and_keeps_it(small_volume_model):
    image = small_volume_model["lesioned"][0]["image"]
    reference = AnomalyScorer(small_volume_model["model"], device="cpu", batch_size=4).score(image)
    scorer = AnomalyScorer(small_volume_model["model"], device="cpu", batch_size=32)
    seen = _limit_memory(scorer, 4)
    with pytest.warns(RuntimeWarning, match="ran out of memory at 32 slices.*16"):
        result = scorer.score(image)
    assert scorer.batch_size == 4  # 32 -> 16 -> 8 -> 4
    assert seen[:3] == [32, 16, 8] and max(seen[3:]) == 4
    np.testing.assert_array_equal(result.anomaly_map, reference.anomaly_map)
    np.testing.assert_array_equal(result.lesion_mask, reference.lesion_mask)
    assert result.scores["slice_scores"] == reference.scores["slice_scores"]
    seen.clear()
    scorer.score(image)  # the next input starts at the batch that fits
    assert max(seen) == 4


def test_an_input_that_does_not_fit_one_slice_fails_alone(small_volume_model, tmp_path):
    scorer = AnomalyScorer(small_volume_model["model"], device="cpu", batch_size=2)
    _limit_memory(scorer, 0)
    inputs = [small_volume_model["lesioned"][0]["image"]]
    with pytest.warns(RuntimeWarning, match="ran out of memory at 2 slices"):
        rows = score_paths(scorer, inputs, tmp_path / "out", preview=False, workers=0, progress=False)
    assert rows[0]["status"] == "error" and "OutOfMemoryError" in rows[0]["error"]
    assert scorer.batch_size == 1


def test_fitting_batch_starts_from_the_device_default_and_lets_other_errors_through():
    batch = FittingBatch(None, "cpu")  # CPU default at 64 x 64: 64 slices
    tried = []

    def run(size):
        tried.append(size)
        if (size or 64) > 10:
            raise torch.OutOfMemoryError("full")
        return size

    with pytest.warns(RuntimeWarning):
        assert batch.run(run, 64, 64) == 8
    assert tried == [None, 32, 16, 8]
    with pytest.raises(ValueError):
        batch.run(lambda size: (_ for _ in ()).throw(ValueError("not memory")), 64, 64)
    assert batch.size == 8
