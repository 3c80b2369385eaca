"""The data dict of one case, shared by every dataset indexer.

:func:`make_record` builds a record with the standard keys (``"image"``, ``"mask"``, ``"label"``,
``"subject_id"``, ``"modality"`` and any extra keys); the indexers of :mod:`monai_aeflow.data.indexers`,
:mod:`monai_aeflow.data.image_folder_2d` and :mod:`monai_aeflow.data.isic` build their records with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_aeflow.errors import AEFlowInputError

__all__ = ["make_record"]


def make_record(
    image: str | os.PathLike | Sequence[str | os.PathLike],
    subject_id: str,
    modality: str,
    mask: str | os.PathLike | None = None,
    label: str | os.PathLike | int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build one data dict with the standard keys.

    Args:
        image: image path, or a list of paths (one per channel).
        subject_id: subject identifier; splits never put one subject in two sets.
        modality: modality name (e.g. ``"flair"``, ``"t1"``, ``"xray"``).
        mask: brain mask path, or ``None``.
        label: lesion label path, an integer image-level label, or ``None``.
        extra: further keys (site, session, ...).

    Returns:
        the data dict, with paths as strings.
    """

    def _str(value: Any) -> Any:
        return str(value) if isinstance(value, os.PathLike) else value

    image_value = [str(p) for p in image] if isinstance(image, (list, tuple)) else str(image)
    return {
        "image": image_value,
        "mask": _str(mask),
        "label": _str(label),
        "subject_id": str(subject_id),
        "modality": modality,
        **extra,
    }


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise AEFlowInputError("dataset folder not found", path=path)
    if not path.is_dir():
        raise AEFlowInputError("is not a folder", path=path)
    return path
