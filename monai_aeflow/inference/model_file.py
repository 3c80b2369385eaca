"""Where a model file is and how its preprocessing is rebuilt: :func:`resolve_model_path` and
:func:`preprocessing_from_config`."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from monai_aeflow.data.preprocessing import build_image_preprocessing, build_volume_preprocessing
from monai_aeflow.errors import CheckpointError

__all__ = ["BUNDLE_MODEL_FILES", "preprocessing_from_config", "resolve_model_path"]

BUNDLE_MODEL_FILES = ("models/model.pt", "model.pt")


def resolve_model_path(model: str | os.PathLike) -> Path:
    """The model file behind a path: the file itself, or ``models/model.pt`` of a bundle folder.

    Args:
        model: a ``.pt`` model file or a bundle (or training output) folder.

    Returns:
        The model file.

    Raises:
        CheckpointError: nothing usable at that path.
    """
    path = Path(model)
    if path.is_file():
        return path
    if path.is_dir():
        for rel in BUNDLE_MODEL_FILES:
            if (path / rel).is_file():
                return path / rel
        raise CheckpointError(
            f"folder holds no trained model ({' or '.join(BUNDLE_MODEL_FILES)}); train the bundle first", path=path
        )
    raise CheckpointError("model file not found", path=path)


def _kwargs_for(builder: Callable[..., Any], config: Mapping[str, Any]) -> dict[str, Any]:
    accepted = set(inspect.signature(builder).parameters) - {"image_key", "mask_key", "label_key"}
    out = {k: v for k, v in config.items() if k in accepted}
    if "percentiles" in out:
        out["percentiles"] = tuple(out["percentiles"])
    return out


def preprocessing_from_config(config: Mapping[str, Any], kind: str = "volume") -> Callable[[dict], dict]:
    """Rebuild the training preprocessing from the configuration stored in a model file.

    Args:
        config: the model file's ``config["preprocessing"]`` (keyword arguments of
            :func:`~monai_aeflow.data.preprocessing.build_volume_preprocessing` or
            :func:`~monai_aeflow.data.preprocessing.build_image_preprocessing`; other keys are ignored).
        kind: ``"volume"`` (NIfTI, DICOM, MetaImage) or ``"image2d"`` (PNG, JPEG...).

    Returns:
        The invertible preprocessing pipeline (keys ``image``, ``mask``, ``label``).
    """
    if kind == "image2d":
        return build_image_preprocessing(**_kwargs_for(build_image_preprocessing, config))
    return build_volume_preprocessing(**_kwargs_for(build_volume_preprocessing, config))
