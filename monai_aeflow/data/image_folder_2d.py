"""Indexer of 2D image folders in the layout of the chest X-ray and OCT releases (``<split>/<CLASS>/*.jpeg``).

:func:`index_image_folder_2d` is registered as the ``"images2d"`` kind of
:data:`monai_aeflow.data.indexers.INDEXERS`; its records carry an ``int`` image-level label.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_aeflow.data.io import IMAGE_2D_SUFFIXES
from monai_aeflow.data.records import _check_root, make_record
from monai_aeflow.errors import AEFlowInputError

__all__ = ["index_image_folder_2d"]


_NORMAL_NAMES = ("normal", "good", "healthy", "negative", "no_finding", "nofinding")
_SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_2D_SUFFIXES))


def index_image_folder_2d(
    root: str | os.PathLike,
    modality: str = "image",
    normal_classes: Sequence[str] = _NORMAL_NAMES,
    subject_pattern: str | None = None,
) -> list[dict[str, Any]]:
    """Index a folder of 2D images in the layout of the chest X-ray and OCT releases.

    Two layouts are recognised: ``<root>/<split>/<CLASS>/*.jpeg`` with split ``train``, ``val`` or
    ``test`` and classes such as ``NORMAL``, ``PNEUMONIA`` (OCT: ``NORMAL``, ``CNV``, ``DME``,
    ``DRUSEN``), and ``<root>/<class>/*.png`` with classes such as ``normal`` and ``abnormal``.
    Images of a normal class get label 0, all others label 1.

    Args:
        root: dataset folder.
        modality: modality name stored in each record (e.g. ``"xray"``, ``"oct"``).
        normal_classes: class folder names (case-insensitive) holding normal images.
        subject_pattern: regular expression whose first group, searched in the file name, is the
            subject (patient) id, e.g. ``r"(person\\d+)"`` for the pneumonia release; default: the file
            name without extension.

    Returns:
        one record per image with an ``int`` ``"label"``, ``"mask"`` ``None``, ``"class_name"`` and
        ``"split"`` (``None`` in the class-only layout).

    Raises:
        AEFlowInputError: when no class folder with images is found, or all images are of one kind
            and no class folder is normal.
    """
    root_path = _check_root(root)
    normal = {n.lower() for n in normal_classes}
    pattern = re.compile(subject_pattern) if subject_pattern else None
    groups: list[tuple[str | None, Path]] = []
    for child in sorted(p for p in root_path.iterdir() if p.is_dir()):
        if child.name.lower() in _SPLIT_NAMES:
            groups += [(child.name, c) for c in sorted(p for p in child.iterdir() if p.is_dir())]
        else:
            groups.append((None, child))
    records = []
    for split, class_dir in groups:
        for image in _images_in(class_dir):
            subject = image.stem
            if pattern is not None:
                match = pattern.search(image.name)
                if match is None:
                    raise AEFlowInputError(f"subject pattern {subject_pattern!r} does not match", path=image)
                subject = match.group(1) if match.groups() else match.group(0)
            label = 0 if class_dir.name.lower() in normal else 1
            records.append(
                make_record(image, subject, modality, mask=None, label=label, class_name=class_dir.name, split=split)
            )
    if not records:
        raise AEFlowInputError(
            "no 2D image recognised (expected <split>/<CLASS>/*.jpeg or normal/ and abnormal/ folders of "
            f"{', '.join(IMAGE_2D_SUFFIXES)} files)",
            path=root_path,
        )
    if not any(r["label"] == 0 for r in records):
        classes = sorted({r["class_name"] for r in records})
        raise AEFlowInputError(
            f"no normal class among the folders {classes}; name it 'normal' or pass normal_classes", path=root_path
        )
    return records
