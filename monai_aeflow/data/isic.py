"""Indexer of ISIC skin-lesion releases (image files plus a ground-truth CSV), for the 2D bundle's data lists.

Example::

    records = index_isic("data/ISIC2019")  # one record per labelled image, int "label" 0 normal / 1 abnormal
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_aeflow.data.indexers import make_record
from monai_aeflow.data.io import IMAGE_2D_SUFFIXES
from monai_aeflow.errors import AEFlowInputError

__all__ = ["index_isic", "is_isic_folder"]

logger = logging.getLogger("monai_aeflow.bundle")  # the logger its warnings went to before the move


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


_ISIC_IMAGE_COLUMNS = ("image", "image_id", "image_name", "isic_id")
_ISIC_SUBJECT_COLUMNS = ("lesion_id", "patient_id")


def _isic_tables(root: Path) -> list[tuple[Path, list[str], str]]:
    tables = []
    for path in sorted(root.rglob("*.csv")):
        try:
            columns, _ = _csv_rows(path)
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        lowered = [c.lower() for c in columns]
        image_col = next((columns[lowered.index(c)] for c in _ISIC_IMAGE_COLUMNS if c in lowered), None)
        if image_col is not None:
            tables.append((path, columns, image_col))
    return tables


def index_isic(
    root: str | os.PathLike,
    normal_classes: Sequence[str] = ("NV", "nevus", "benign"),
    modality: str = "dermoscopy",
) -> list[dict[str, Any]]:
    """Index an ISIC skin-lesion release: image files plus a ground-truth CSV.

    Recognised ground truths: one-hot class columns (ISIC 2018 / 2019 Task 3: ``image, MEL, NV, ...``; a
    row is normal when a column named in ``normal_classes`` is 1; ISIC 2017: ``image_id, melanoma,
    seborrheic_keratosis``, normal when all are 0), or a ``target`` / ``benign_malignant`` column (ISIC
    2020). A ``lesion_id`` or ``patient_id`` column in any CSV of the folder (e.g. ``HAM10000_metadata.csv``)
    gives the subject, so that images of one lesion stay in one split.

    Args:
        root: the release folder (images anywhere below it).
        normal_classes: class columns (case-insensitive) of normal images.
        modality: modality name stored in each record.

    Returns:
        One record per labelled image with an ``int`` ``"label"`` (0 normal, 1 abnormal) and ``"class_name"``.

    Raises:
        AEFlowInputError: no ground-truth CSV or no listed image found.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise AEFlowInputError("dataset folder not found", path=root_path)
    images = {p.stem: p for p in root_path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_2D_SUFFIXES)}
    subjects: dict[str, str] = {}
    truth: dict[str, tuple[int, str]] = {}
    normal = {c.lower() for c in normal_classes}
    for path, columns, image_col in _isic_tables(root_path):
        _, rows = _csv_rows(path)
        lowered = {c.lower(): c for c in columns}
        subject_col = next((lowered[c] for c in _ISIC_SUBJECT_COLUMNS if c in lowered), None)
        if subject_col is not None:
            subjects.update({r[image_col]: r[subject_col] for r in rows if r.get(subject_col)})
        if "target" in lowered or "benign_malignant" in lowered:
            for r in rows:
                if "target" in lowered and r.get(lowered["target"], "") != "":
                    label = int(float(r[lowered["target"]]))
                else:
                    label = int(r[lowered["benign_malignant"]].lower() == "malignant")
                truth[r[image_col]] = (label, "malignant" if label else "benign")
            continue
        class_cols = [c for c in columns if c not in (image_col, subject_col)]

        def _is_one_hot(rows: list[dict[str, str]], cols: list[str]) -> bool:
            try:
                return all(float(r[c]) in (0.0, 1.0) for r in rows[:50] for c in cols)
            except (TypeError, ValueError):
                return False

        if not class_cols or not rows or not _is_one_hot(rows, class_cols):
            continue
        normal_cols = [c for c in class_cols if c.lower() in normal]
        for r in rows:
            hot = [c for c in class_cols if float(r[c]) == 1.0]
            label = int(not any(c in normal_cols for c in hot)) if normal_cols else int(bool(hot))
            truth[r[image_col]] = (label, hot[0] if hot else "normal")
    if not truth:
        raise AEFlowInputError("no ISIC ground-truth CSV recognised (image column plus class columns)", path=root_path)
    records, missing = [], 0
    for image_id in sorted(truth):
        path = images.get(image_id) or images.get(Path(image_id).stem)
        if path is None:
            missing += 1
            continue
        label, class_name = truth[image_id]
        subject = subjects.get(image_id, image_id)
        records.append(make_record(path, subject, modality, mask=None, label=label, class_name=class_name))
    if missing:
        logger.warning("%d images listed in the ISIC ground truth were not found under %s", missing, root_path)
    if not records:
        raise AEFlowInputError("none of the images listed in the ISIC ground truth was found", path=root_path)
    return records


def is_isic_folder(root: str | os.PathLike) -> bool:
    """Whether a CSV below ``root`` has an ISIC image column (what :func:`index_isic` reads)."""
    return bool(_isic_tables(Path(root)))
