"""The split rules of the data lists: the CLI / compare / demo (``monai_aeflow.data.datalists``) and the bundles
(``monai_aeflow.data.bundle_datalists``).

A real dataset is split the same way by both (one call of :func:`~monai_aeflow.data.splits.split_by_subject` with
the fractions and the seed). A synthetic cohort is split by two different rules, pinned here as they are:

- :func:`~monai_aeflow.data.datalists.split_cohort` (CLI, compare, demo): explicit counts, in generation order.
- ``_split_synthetic`` (bundles): fractions, healthy and lesioned subjects each in a seeded random order.

Both train on healthy subjects only and send lesioned subjects to validation and test.
"""

from __future__ import annotations

from monai_aeflow.data.bundle_datalists import _split_synthetic
from monai_aeflow.data.datalists import DataConfig, _split_records, split_cohort
from monai_aeflow.data.splits import split_by_subject

# a cohort as generate_cohort lists it: healthy subjects first (synth-000...), then the lesioned ones
COHORT = [{"subject_id": f"synth-{i:03d}", "healthy": i < 6} for i in range(10)]


def _ids(splits):
    return {name: [r["subject_id"] for r in records] for name, records in splits.items()}


def _healthy_and_lesioned(cohort):
    return [c for c in cohort if c["healthy"]], [c for c in cohort if not c["healthy"]]


def test_split_cohort_takes_subjects_in_generation_order() -> None:
    # the default SyntheticCohortConfig: 4 train, 1 + 2 validation, 1 + 2 test
    assert _ids(split_cohort(COHORT, n_train=4, n_val_healthy=1, n_val_lesion=2)) == {
        "train": ["synth-000", "synth-001", "synth-002", "synth-003"],
        "val": ["synth-004", "synth-006", "synth-007"],
        "test": ["synth-005", "synth-008", "synth-009"],
    }


def test_bundle_synthetic_split_shuffles_healthy_and_lesioned_subjects_by_seed() -> None:
    healthy, lesioned = _healthy_and_lesioned(COHORT)
    expected = {
        "train": ["synth-002", "synth-003", "synth-004", "synth-005"],
        "val": ["synth-000", "synth-006", "synth-008"],
        "test": ["synth-001", "synth-007", "synth-009"],
    }
    assert _ids(_split_synthetic(healthy, lesioned, (0.6, 0.2, 0.2), 0)) == expected
    # the fractions that give split_cohort's counts give the same subjects: the counts agree, the order does not
    assert _ids(_split_synthetic(healthy, lesioned, (4 / 6, 1 / 6, 1 / 6), 0)) == expected


def test_the_two_synthetic_rules_agree_on_counts_and_roles_not_on_subjects() -> None:
    healthy, lesioned = _healthy_and_lesioned(COHORT)
    cli = _ids(split_cohort(COHORT, 4, 1, 2))
    bundle = _ids(_split_synthetic(healthy, lesioned, (0.6, 0.2, 0.2), 0))
    lesioned_ids = {c["subject_id"] for c in lesioned}
    for splits in (cli, bundle):
        assert not set(splits["train"]) & lesioned_ids
        assert {name: len(ids) for name, ids in splits.items()} == {"train": 4, "val": 3, "test": 3}
        assert [len(set(splits[n]) & lesioned_ids) for n in ("val", "test")] == [2, 2]
    assert cli != bundle


def test_a_real_dataset_is_split_by_the_same_rule() -> None:
    # prepare_brain_mri_datalist splits a real dataset with split_by_subject(records, fractions, seed), as
    # prepare_data does (DataConfig.fractions, DataConfig.split_seed); lesioned subjects may train on both paths
    records = [{"subject_id": c["subject_id"], "image": f"{c['subject_id']}.nii.gz"} for c in COHORT]
    for fractions, seed in (((0.6, 0.2, 0.2), 0), ((0.5, 0.25, 0.25), 3)):
        cfg = DataConfig(data_dir="unused", fractions=fractions, split_seed=seed)
        assert _split_records(cfg, records) == split_by_subject(records, fractions, seed)
    assert _ids(split_by_subject(COHORT, (0.6, 0.2, 0.2), 0)) == {
        "train": ["synth-002", "synth-003", "synth-004", "synth-005", "synth-006", "synth-007"],
        "val": ["synth-000", "synth-009"],
        "test": ["synth-001", "synth-008"],
    }
