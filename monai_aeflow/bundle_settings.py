"""The settings check of the MONAI bundles: every key a bundle run may override, checked before anything is built.

:func:`check_bundle_settings` is what the bundles' ``initialize`` calls first (through
``monai_aeflow.bundle.check_bundle_settings``): a wrong ``--max_epochs``, ``--device`` or ``--ckpt_dir`` stops the
run with one line naming the key, instead of a traceback after the data were prepared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_aeflow.data.bundle_datalists import as_flag, check_dataset_dir
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import blocking_ancestor
from monai_aeflow.models import get_model_spec

__all__ = ["check_bundle_settings"]


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"{value!r} (a string)"
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(float(value))


def _int_rule(minimum: int, what: str) -> Callable[[Any], str | None]:
    return lambda v: None if _is_int(v) and v >= minimum else what


def _number_rule(low: float, high: float, what: str, open_low: bool = False) -> Callable[[Any], str | None]:
    def _rule(v: Any) -> str | None:
        ok = _is_number(v) and (float(v) > low if open_low else float(v) >= low) and float(v) <= high
        return None if ok else what

    return _rule


def _bool_rule(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True or False (capitalised on the command line)"


def _flag_rule(v: Any) -> str | None:
    try:
        as_flag(v)
    except AEFlowInputError:
        return "must be True or False"
    return None


def _image_size_rule(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)
    return None if ok else "must be two positive integers, e.g. [256, 256]"


def _device_rule(v: Any) -> str | None:
    from monai_aeflow.device import resolve_device

    try:
        resolve_device(str(v))
    except AEFlowInputError as err:
        return f"is not a device of this machine ({str(err).replace('--device', 'device')})"
    return None


def _model_rule(v: Any) -> str | None:
    from monai_aeflow.models import MODELS

    get_model_spec(None)  # registers the built-in models
    return None if isinstance(v, str) and v.lower() in MODELS else f"must be one of {', '.join(sorted(MODELS))}"


def _choice_rule(choices: Callable[[], Sequence[str]]) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, str) and v in choices() else f"must be one of {', '.join(choices())}"


def _recipes() -> Sequence[str]:
    from monai_aeflow.models.aeflow import RECIPES

    return sorted(RECIPES)


def _map_kinds() -> Sequence[str]:
    from monai_aeflow.scores import MAP_KINDS

    return MAP_KINDS


def _spacing_rule(v: Any) -> str | None:
    return None if v is None or (_is_number(v) and float(v) > 0) else "must be null or a positive number of mm"


def _folder_rule(v: Any) -> str | None:
    """A folder that exists or can be created: its first existing ancestor is a writable folder."""
    blocked = blocking_ancestor(Path(str(v)).expanduser())
    if blocked is None:
        return None
    return (
        f"cannot be a folder: {blocked[0]} is a file"
        if blocked[1] == "file"
        else f"cannot be created: {blocked[0]} is not writable"
    )


def _fractions_rule(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) and float(x) >= 0 for x in v)
    ok = ok and sum(float(x) for x in v) > 0
    return None if ok else "must be three non-negative numbers (train, val, test), e.g. [0.6, 0.2, 0.2]"


_SETTING_RULES: dict[str, Callable[[Any], str | None]] = {
    "max_epochs": _int_rule(1, "must be a positive integer"),
    "batch_size": _int_rule(1, "must be a positive integer"),
    "val_interval": _int_rule(1, "must be a positive integer"),
    "num_workers": _int_rule(0, "must be a non-negative integer"),
    "flow_init": _int_rule(0, "must be a non-negative integer"),
    "grid_images": _int_rule(0, "must be a non-negative integer"),
    "n_bootstrap": _int_rule(0, "must be a non-negative integer"),
    "seed": _int_rule(0, "must be a non-negative integer"),
    "learning_rate": _number_rule(0.0, math.inf, "must be a positive number", open_low=True),
    "weight_decay": _number_rule(0.0, math.inf, "must be a non-negative number"),
    "alpha": _number_rule(0.0, 1.0, "must be a number in [0, 1]"),
    "beta": _number_rule(0.0, 1.0, "must be a number in [0, 1]"),
    "image_size": _image_size_rule,
    "split_fractions": _fractions_rule,
    "amp": _bool_rule,
    "overwrite": _bool_rule,
    "grayscale": _bool_rule,
    "synthetic": _flag_rule,
    "device": _device_rule,
    "model_name": _model_rule,
    "recipe": _choice_rule(_recipes),
    "recon_loss": _choice_rule(lambda: ("mse", "ssim")),
    "map_kind": _choice_rule(_map_kinds),
    "spacing": _spacing_rule,
    "ckpt_dir": _folder_rule,
    "log_dir": _folder_rule,
}


def check_bundle_settings(**settings: Any) -> None:
    """Check a bundle's settings (after the command line's overrides) before anything is built or read.

    The bundles call this first in ``initialize``, so that ``--max_epochs abc`` or ``--batch_size '"16"'``
    stops the run at once, with a message naming the key, instead of failing after the data were prepared.
    With ``dataset_dir`` (and ``synthetic``) the dataset folder is checked too (:func:`check_dataset_dir`),
    and an optional ``healthy_dataset_dir`` must exist.

    Args:
        settings: any of ``max_epochs``, ``batch_size``, ``val_interval`` (positive integers),
            ``num_workers``, ``flow_init``, ``grid_images``, ``n_bootstrap``, ``seed`` (non-negative
            integers), ``learning_rate`` (positive), ``weight_decay`` (non-negative), ``alpha``, ``beta``
            (in [0, 1]), ``image_size`` (two positive integers), ``split_fractions`` (three non-negative
            numbers), ``amp``, ``overwrite``, ``grayscale`` (booleans), ``synthetic`` (``True`` / ``False`` /
            ``"true"`` / ``"false"``), ``dataset_dir``, ``healthy_dataset_dir`` (folders), ``device`` (one this
            machine has), ``model_name`` (registered), ``recipe``, ``recon_loss``, ``map_kind`` (known names),
            ``spacing`` (null or positive), ``ckpt_dir``, ``log_dir`` (folders that can be created).

    Raises:
        AEFlowInputError: the first wrong setting, in one line that starts with its key.
        TypeError: a key this function does not know (a mistake in the configuration, not in the overrides).
    """
    unknown = sorted(set(settings) - set(_SETTING_RULES) - {"dataset_dir", "healthy_dataset_dir"})
    if unknown:
        raise TypeError(f"check_bundle_settings: unknown setting(s) {unknown}")
    for key, rule in _SETTING_RULES.items():
        if key in settings:
            problem = rule(settings[key])
            if problem:
                raise AEFlowInputError(f"{key} {problem}, got {_describe(settings[key])}")
    healthy = settings.get("healthy_dataset_dir")
    if healthy is not None and not Path(str(healthy)).expanduser().is_dir():
        raise AEFlowInputError(f"healthy_dataset_dir {healthy} is not an existing folder")
    if "dataset_dir" in settings:
        check_dataset_dir(str(settings["dataset_dir"]), settings.get("synthetic", False))
