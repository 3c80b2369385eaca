"""Deterministic subject-level train/validation/test splits, written to and read from CSV.

All records of one subject (several sessions, modalities or slices) go to the same split, so that no
subject is seen in training and in testing.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_aeflow.errors import AEFlowInputError

__all__ = ["SPLIT_NAMES", "split_by_subject", "check_disjoint_subjects", "write_split_csv", "read_split_csv"]

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
"""Names of the three splits, in order."""

_BASE_COLUMNS = ("split", "subject_id", "image", "mask", "label", "modality")


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items by cumulative rounding, so that the counts sum to ``n``."""
    bounds = np.rint(np.cumsum(fractions) * n).astype(int)
    bounds[-1] = n
    return np.diff(np.concatenate([[0], bounds])).tolist()


def _subject_label(records: Sequence[Mapping[str, Any]]) -> int:
    """1 when any record of the subject has an abnormal image-level label (or a lesion label file)."""
    for record in records:
        label = record.get("label")
        if (isinstance(label, (int, np.integer)) and label > 0) or isinstance(label, str):
            return 1
    return 0


def split_by_subject(
    records: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    stratify: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Split records into ``"train"``, ``"val"`` and ``"test"`` at the subject level.

    The subjects are sorted, shuffled with ``numpy.random.default_rng(seed)`` and cut by cumulative
    rounding of ``fractions``; the result depends only on the set of subject ids and the seed, not on
    the order of ``records``.

    Args:
        records: data dicts with a ``"subject_id"`` key.
        fractions: fractions of subjects in train, val and test (normalised to sum 1).
        seed: random seed.
        stratify: split normal and abnormal subjects separately (a subject is abnormal when a record
            has an integer label > 0 or a lesion label file), so that each split keeps the ratio.

    Returns:
        a dict with the three lists of records, each in the order of ``records``.

    Raises:
        AEFlowInputError: for fractions that are negative or do not have three entries, or records
            without ``"subject_id"``.

    Example::

        splits = split_by_subject(index_brats(root), fractions=(0.6, 0.2, 0.2), seed=42)
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise AEFlowInputError(f"fractions must be three non-negative numbers, got {tuple(fractions)}")
    weights = np.asarray(fractions, dtype=float) / float(sum(fractions))
    by_subject: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if "subject_id" not in record or record["subject_id"] in (None, ""):
            raise AEFlowInputError(f"record without subject_id: {dict(record)}")
        by_subject.setdefault(str(record["subject_id"]), []).append(record)
    groups = [sorted(by_subject)]
    if stratify:
        groups = [[s for s in groups[0] if _subject_label(by_subject[s]) == k] for k in (0, 1)]
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for subjects in groups:
        order = [subjects[i] for i in rng.permutation(len(subjects))]
        start = 0
        for name, count in zip(SPLIT_NAMES, _counts(len(order), weights), strict=True):
            assignment.update(dict.fromkeys(order[start : start + count], name))
            start += count
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_NAMES}
    for record in records:
        out[assignment[str(record["subject_id"])]].append(dict(record))
    return out


def check_disjoint_subjects(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Check that no subject appears in two splits.

    Args:
        splits: split name to records.

    Raises:
        AEFlowInputError: naming the subjects found in two splits.
    """
    seen: dict[str, str] = {}
    clashes = []
    for name, records in splits.items():
        for record in records:
            subject = str(record["subject_id"])
            if seen.setdefault(subject, name) != name:
                clashes.append(f"{subject} ({seen[subject]}, {name})")
    if clashes:
        raise AEFlowInputError(f"subjects in two splits: {', '.join(sorted(set(clashes))[:10])}")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)


def write_split_csv(splits: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Write splits to a CSV file, one row per record.

    Columns: ``split``, ``subject_id``, ``image``, ``mask``, ``label``, ``modality``, then any other
    keys of the records (sorted). ``None`` is written as an empty cell, a multi-channel image as paths
    joined by ``;``, an integer image-level label as its digits.

    Args:
        splits: split name to records (e.g. the output of :func:`split_by_subject`).
        path: CSV file to write (parent folders are created).

    Returns:
        the path written.

    Raises:
        AEFlowInputError: when a subject appears in two splits.
    """
    check_disjoint_subjects(splits)
    extra = sorted({k for recs in splits.values() for r in recs for k in r} - set(_BASE_COLUMNS))
    columns = [*_BASE_COLUMNS, *extra]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for name, records in splits.items():
            for record in records:
                row = {c: _cell(record.get(c)) for c in columns}
                row["split"] = name
                writer.writerow(row)
    return out


def _parse(column: str, value: str, root: Path | None) -> Any:
    if value == "":
        return None
    if column == "label" and value.lstrip("-").isdigit():
        return int(value)  # an image-level label
    if column in ("image", "mask", "label"):
        parts = [p if root is None or Path(p).is_absolute() else str(root / p) for p in value.split(";")]
        return parts if column == "image" and len(parts) > 1 else parts[0]
    return value


def read_split_csv(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
    """Read splits written by :func:`write_split_csv`.

    Args:
        path: the CSV file.
        root: folder that relative image/mask/label paths are joined to (``None``: keep them as written).

    Returns:
        split name to records; ``"train"``, ``"val"`` and ``"test"`` are always present. Extra columns
        come back as strings (``None`` for empty cells).

    Raises:
        AEFlowInputError: when the file is missing, lacks a required column, or puts a subject in two
            splits.
    """
    source = Path(path)
    if not source.is_file():
        raise AEFlowInputError("split file not found", path=source)
    base = Path(root) if root is not None else None
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_NAMES}
    with open(source, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("split", "subject_id", "image") if c not in (reader.fieldnames or [])]
        if missing:
            raise AEFlowInputError(f"split file lacks the column(s) {', '.join(missing)}", path=source)
        for row in reader:
            record = {k: _parse(k, v or "", base) for k, v in row.items() if k != "split"}
            for key in ("mask", "label", "modality"):
                record.setdefault(key, None)
            out.setdefault(row["split"], []).append(record)
    try:
        check_disjoint_subjects(out)
    except AEFlowInputError as exc:
        raise AEFlowInputError(str(exc), path=source) from None
    return out
