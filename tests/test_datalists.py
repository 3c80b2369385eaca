"""The split rules of the data lists: the CLI / compare / demo (``monai_aeflow.data.datalists``) and the bundles
(``monai_aeflow.data.bundle_datalists``).

A real dataset is split the same way by both (one call of :func:`~monai_aeflow.data.splits.split_by_subject` with
the fractions and the seed). A synthetic cohort is split by one rule,
:func:`~monai_aeflow.data.datalists.split_healthy_and_lesioned`: healthy subjects three ways, lesioned subjects to
validation and test only, each group shuffled by the seed. The expected subjects here are recomputed by hand from
numpy's generator (sorted ids, ``default_rng(seed).permutation``, cumulative rounding), not by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from monai_aeflow.data.bundle_datalists import _split_synthetic
from monai_aeflow.data.datalists import DataConfig, _split_records, split_cohort, split_healthy_and_lesioned
from monai_aeflow.data.splits import split_by_subject
from monai_aeflow.errors import AEFlowInputError

# a cohort as generate_cohort lists it: healthy subjects first (synth-000...), then the lesioned ones
COHORT = [{"subject_id": f"synth-{i:03d}", "healthy": i < 6} for i in range(10)]


def _ids(splits):
    return {name: [r["subject_id"] for r in records] for name, records in splits.items()}


def _healthy_and_lesioned(cohort):
    return [c for c in cohort if c["healthy"]], [c for c in cohort if not c["healthy"]]


def _by_hand(ids, counts, seed):
    """Sorted ids, shuffled by numpy's generator, cut into consecutive counts; each split in the input order."""
    order = [sorted(ids)[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    cuts = np.cumsum([0, *counts])
    chosen = [set(order[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return [[i for i in ids if i in group] for group in chosen]


def _expected(cohort, healthy_counts, lesioned_counts, seed):
    healthy, lesioned = ([c["subject_id"] for c in group] for group in _healthy_and_lesioned(cohort))
    h = _by_hand(healthy, healthy_counts, seed)
    les = _by_hand(lesioned, (0, *lesioned_counts), seed)
    return {"train": h[0], "val": h[1] + les[1], "test": h[2] + les[2]}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_cli_demo_and_bundle_split_a_synthetic_cohort_by_the_same_seeded_rule(seed) -> None:
    healthy, lesioned = _healthy_and_lesioned(COHORT)
    expected = _expected(COHORT, (4, 1, 1), (2, 2), seed)
    # the CLI, compare and the demo: counts (the default SyntheticCohortConfig)
    assert _ids(split_cohort(COHORT, n_train=4, n_val_healthy=1, n_val_lesion=2, seed=seed)) == expected
    # the bundles: the fractions that give the same counts
    assert _ids(_split_synthetic(healthy, lesioned, (4 / 6, 1 / 6, 1 / 6), seed)) == expected
    assert _ids(split_healthy_and_lesioned(healthy, lesioned, (4, 1, 1), (2, 2), seed)) == expected


def test_the_split_does_not_depend_on_the_generation_order() -> None:
    shuffled = [COHORT[i] for i in np.random.default_rng(5).permutation(len(COHORT))]
    a = {k: sorted(v) for k, v in _ids(split_cohort(COHORT, 4, 1, 2, seed=3)).items()}
    b = {k: sorted(v) for k, v in _ids(split_cohort(shuffled, 4, 1, 2, seed=3)).items()}
    assert a == b


def test_training_takes_healthy_subjects_only_and_counts_are_exact() -> None:
    lesioned_ids = {c["subject_id"] for c in COHORT if not c["healthy"]}
    for seed in range(5):
        splits = _ids(split_cohort(COHORT, 4, 1, 2, seed=seed))
        assert not set(splits["train"]) & lesioned_ids
        assert {name: len(ids) for name, ids in splits.items()} == {"train": 4, "val": 3, "test": 3}
        assert [len(set(splits[n]) & lesioned_ids) for n in ("val", "test")] == [2, 2]
        assert sorted(sum(splits.values(), [])) == sorted(c["subject_id"] for c in COHORT)


def test_counts_that_do_not_fit_the_cohort_are_refused() -> None:
    with pytest.raises(AEFlowInputError, match="healthy"):
        split_cohort(COHORT, 5, 1, 2, n_test_healthy=1)
    with pytest.raises(AEFlowInputError, match="lesioned"):
        split_cohort(COHORT, 4, 1, 3, n_test_lesion=2)


def test_a_real_dataset_is_split_by_the_same_rule() -> None:
    # prepare_brain_mri_datalist splits a real dataset with split_by_subject(records, fractions, seed), as
    # prepare_data does (DataConfig.fractions, DataConfig.split_seed); lesioned subjects may train on both paths
    records = [{"subject_id": c["subject_id"], "image": f"{c['subject_id']}.nii.gz"} for c in COHORT]
    for fractions, seed in (((0.6, 0.2, 0.2), 0), ((0.5, 0.25, 0.25), 3)):
        cfg = DataConfig(data_dir="unused", fractions=fractions, split_seed=seed)
        assert _split_records(cfg, records) == split_by_subject(records, fractions, seed)
    ids = [c["subject_id"] for c in COHORT]
    train, val, test = _by_hand(ids, (6, 2, 2), 0)
    assert _ids(split_by_subject(COHORT, (0.6, 0.2, 0.2), 0)) == {"train": train, "val": val, "test": test}
