"""Validation of the configuration stored in a model file, before any network is built or any input is read.

A model file (see :mod:`monai_aeflow.checkpoint`) stores the network's keyword arguments, the preprocessing,
the score settings and a threshold. A value of the wrong type or range (a threshold ``"abc"``, a spacing
given as a string, ``hidden_ratio=2000``) would otherwise surface late: as a traceback deep in a transform,
or as a network too large for memory. :func:`validate_model_config` checks each concern with a table of
rules (``key -> check``) and raises a one-line :class:`~monai_aeflow.errors.CheckpointError` naming the model
file and the key::

    /models/model.pt: invalid stored value config.model.hidden_ratio = 2000: expected a number in (0, 16]

Keys that the consumers ignore (e.g. ``modalities`` in the preprocessing) are not checked; unknown keyword
arguments of a network are refused (they would fail its constructor).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

from monai_aeflow.config_rules import (
    Check,
    _anything,
    _boolean,
    _int_list,
    _integer,
    _is_int,
    _is_real,
    _number,
    _odd,
    _one_of,
    _optional,
    _sequence,
    _string,
)
from monai_aeflow.errors import CheckpointError
from monai_aeflow.networks.backbone import BACKBONES
from monai_aeflow.networks.flow import SUBNETS

__all__ = [
    "NETWORK_RULES",
    "PREPROCESSING_RULES",
    "SCORE_RULES",
    "POSTPROCESSING_RULES",
    "MAP_KINDS_BY_MODEL",
    "validate_axcodes",
    "validate_model_name",
    "validate_network_kwargs",
    "validate_preprocessing",
    "validate_score",
    "validate_threshold",
    "validate_postprocessing",
    "validate_model_config",
]

PathLike = str | os.PathLike | None


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _invalid(key: str, value: Any, problem: str, path: PathLike) -> CheckpointError:
    """The one-line error: ``<path>: invalid stored value <key> = <value>: <problem>``."""
    return CheckpointError(f"invalid stored value {key} = {_shown(value)}: {problem}", path=path)


# -- rules of single settings (the generic rule builders are in monai_aeflow.config_rules) -------------------


def _spatial_size(v: Any) -> str | None:
    """In-plane size: one or two multiples of 16 (what the crop/pad and resize transforms accept)."""
    sizes = [v] if _is_int(v) else list(v) if _sequence(v) and len(v) == 2 else []
    if not sizes or not all(_is_int(s) and 16 <= s <= 8192 and not s % 16 for s in sizes):
        return "expected one or two multiples of 16 in [16, 8192]"
    return None


def _percentiles(v: Any) -> str | None:
    if _sequence(v) and len(v) == 2 and all(_is_real(p) for p in v) and 0.0 <= v[0] < v[1] <= 100.0:
        return None
    return "expected [lower, upper] with 0 <= lower < upper <= 100"


def _spacing(v: Any) -> str | None:
    """Voxel spacing in mm: ``None``, one positive number, or three."""
    values = [v] if not _sequence(v) else list(v)
    if v is None:
        return None
    if len(values) not in (1, 3) or not all(_is_real(s) and 0.0 < float(s) <= 100.0 for s in values):
        return "expected null, a positive number of mm (at most 100), or a list of three"
    return None


_AXES = (("L", "R"), ("A", "P"), ("S", "I"))


def validate_axcodes(codes: Any) -> str | None:
    """What is wrong with orientation axis codes, if anything.

    Valid codes are three letters, one of each pair L/R, A/P, S/I (``"RAS"``, ``"LPS"``, ``"PIR"``...), as
    nibabel and MONAI's ``Orientation`` read them. 2D images keep their pixel order and use none.

    Args:
        codes: the stored value.

    Returns:
        ``None`` when valid, else the problem.
    """
    expected = "expected three letters, one of each of L/R, A/P, S/I (e.g. 'RAS'), or null"
    if not isinstance(codes, str) or len(codes) != 3:
        return expected
    for pair in _AXES:
        if sum(codes.count(c) for c in pair) != 1:
            return expected
    return None


def _axcodes(v: Any) -> str | None:
    return None if v is None else validate_axcodes(v)


def _background(v: Any) -> str | None:
    if v is None or _is_real(v) or (isinstance(v, str) and v in ("auto", "min")):
        return None
    return "expected a number, 'auto', 'min' or null"


def _median_size(v: Any) -> str | None:
    if _is_int(v) and (v in (0, 1) or (3 <= v <= 31 and v % 2)):
        return None
    return "expected 0 or 1 (no filter) or an odd integer in [3, 31]"


_WIDTH = (1, 4096)
_AEFLOW_RULES: dict[str, Check] = {
    "in_channels": _one_of(1, 3),
    "backbone": _one_of(*BACKBONES),
    "backbone_weights": _anything,  # replaced by None when a model file is loaded (the file holds the weights)
    "flow_blocks": _integer(1, 64),
    "subnet": _one_of(*SUBNETS),
    "hidden_ratio": _number(0.0, 16.0, lo_open=True),
    "affine_clamping": _number(0.0, 10.0, lo_open=True),
    "decoder_channels": _optional(_int_list([3], *_WIDTH)),
    "train_encoder": _boolean,
    "actnorm": _boolean,
}
_VQ_RULES: dict[str, Check] = {
    "in_channels": _integer(1, 16),
    "channels": _int_list(range(1, 7), *_WIDTH),
    "num_res_layers": _integer(0, 16),
    "num_res_channels": _optional(_int_list(range(1, 7), *_WIDTH)),
    "num_embeddings": _integer(1, 65536),
    "embedding_dim": _integer(*_WIDTH),
    "commitment_cost": _number(0.0, 100.0),
    "decay": _number(0.0, 1.0),
    "embedding_init": _one_of("normal", "kaiming_uniform"),
    "codebook_restart": _boolean,
    "restart_threshold": _number(0.0, None),
}

NETWORK_RULES: dict[str, dict[str, Check]] = {
    "aeflow": _AEFLOW_RULES,
    "flowonly": {k: v for k, v in _AEFLOW_RULES.items() if k != "decoder_channels"},
    "ae": {
        "in_channels": _integer(1, 16),
        "channels": _int_list([4], *_WIDTH),
        "latent_channels": _integer(*_WIDTH),
        "decoder_channels": _optional(_int_list([3], *_WIDTH)),
    },
    "vae": {
        "in_channels": _integer(1, 16),
        "image_size": _int_list([2], 8, 8192),
        "latent_dim": _integer(1, 65536),
        "channels": _int_list([3], *_WIDTH),
        "bottleneck_channels": _integer(*_WIDTH),
        "decoder_bottleneck_channels": _integer(*_WIDTH),
        "decoder_channels": _int_list([4], *_WIDTH),
        "kernel_size": _odd(1, 15),
    },
    "pchvae": {
        "in_channels": _integer(1, 16),
        "channels": _int_list([4], *_WIDTH),
        "high_latent_channels": _integer(*_WIDTH),
        "low_latent_channels": _integer(*_WIDTH),
    },
    "vqvae": _VQ_RULES,
    "vqgan": _VQ_RULES,
    "intensity": {"in_channels": _integer(1, 16), "median_size": _odd(1, 31)},
    "dae": {
        "in_channels": _integer(1, 16),
        "channels": _int_list(range(2, 8), *_WIDTH),
        "num_res_units": _integer(0, 16),
        "norm": _one_of("instance", "batch", "group", "layer", "instance_nvfuser"),
    },
    "patchcore": {
        "in_channels": _one_of(1, 3),
        "backbone": _one_of(*BACKBONES),
        "backbone_weights": _anything,  # replaced by None when a model file is loaded (the file holds the weights)
        "bank_size": _integer(0, 2**31 - 1),
        "feature_dim": _optional(_integer(*_WIDTH)),
        "patch_size": _odd(1, 15),
        "sigma": _number(0.0, 64.0),
        "num_neighbors": _integer(0, 4096),
    },
}
"""Rules of each registered model's network keyword arguments (as stored in ``config["model"]``)."""

PREPROCESSING_RULES: dict[str, Check] = {
    "spatial_size": _spatial_size,
    "percentiles": _percentiles,
    "spacing": _spacing,
    "orientation": _axcodes,
    "mask_threshold": _number(),
    "background": _background,
    "mask_erosion": _integer(0, 100),
    "smoothing": _boolean,
    "smoothing_iterations": _integer(0, 1000),
    "grayscale": _boolean,
    "image_key": _string,
    "mask_key": _optional(_string),
    "label_key": _optional(_string),
}
"""Rules of the preprocessing keys that the scorer passes to the volume and 2D image preprocessing."""

_RECON_MAPS = ("residual", "ssim")
_ALL_MAPS = ("residual", "flow", "ssim", "product")
MAP_KINDS_BY_MODEL: dict[str, tuple[str, ...]] = {
    "aeflow": _ALL_MAPS,
    "flowonly": _ALL_MAPS,  # one map whatever the kind
    "intensity": _ALL_MAPS,  # one map whatever the kind
    "patchcore": _ALL_MAPS,  # one map whatever the kind
    "dae": _RECON_MAPS,
    "ae": _RECON_MAPS,
    "vae": _RECON_MAPS,
    "pchvae": _RECON_MAPS,
    "vqvae": _RECON_MAPS,
    "vqgan": _RECON_MAPS,
}
"""Pixel maps each model's scorer can produce (``config["score"]["map_kind"]``)."""


def _calibration(v: Any) -> str | None:
    keys = ("flow_mean", "flow_std", "recon_mean", "recon_std")
    if v is None:
        return None
    if not isinstance(v, Mapping) or not all(k in v and _is_real(v[k]) for k in keys):
        return f"expected finite numbers {', '.join(keys)}, or null"
    if v["flow_std"] < 0 or v["recon_std"] < 0:
        return "expected non-negative standard deviations"
    return None


SCORE_RULES: dict[str, Check] = {
    "beta": _number(0.0, 1.0),
    "map_kind": _one_of(*_ALL_MAPS),
    "ssim_window": _odd(3, 63),
    "data_range": _number(0.0, None, lo_open=True),
    "calibration": _calibration,
}
"""Rules of the image-score settings (``config["score"]``)."""

POSTPROCESSING_RULES: dict[str, Check] = {
    "residual": _one_of("positive", "absolute"),
    "erosion_iterations": _integer(0, 100),
    "median_size": _median_size,
    "median_dims": _one_of(2, 3),
    "min_component_size": _integer(0, 10**9),
    "component_dims": _optional(_one_of(2, 3)),
    "component_connectivity": _one_of(1, 2, 3),
}
"""Rules of the post-processing stored with a threshold (``threshold_protocol["postprocessing"]``), those of
:class:`~monai_aeflow.evaluation.postprocess.PostprocessConfig` that the scorer builds from it."""


def _sha256_hex(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
        return None
    return "expected 64 lower-case hexadecimal digits or null"


ENCODER_WEIGHTS_RULES: dict[str, Check] = {
    "backbone": _one_of(*BACKBONES),
    "source": _string,
    "file": _optional(_string),
    "sha256": _sha256_hex,
}
"""Rules of the record of the encoder weights (``config["encoder_weights"]``, absent from older model files)."""


# -- one function per concern ----------------------------------------------------------------------------


def _apply(rules: Mapping[str, Check], values: Mapping[str, Any], prefix: str, path: PathLike) -> None:
    for key, value in values.items():
        check = rules.get(key)
        problem = check(value) if check is not None else None
        if problem is not None:
            raise _invalid(f"{prefix}.{key}", value, problem, path)


def _mapping(value: Any, key: str, path: PathLike) -> Mapping[str, Any]:
    """``None`` is an empty mapping; anything else that is not a mapping is refused."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _invalid(key, value, "expected a mapping of settings", path)
    return value


def validate_model_name(config: Mapping[str, Any], path: PathLike = None) -> str:
    """The registered model name stored in ``config["model_name"]`` (AE-FLOW when absent).

    Args:
        config: the model file's ``config``.
        path: the model file, named in the error.

    Returns:
        The registry key.

    Raises:
        CheckpointError: not a string, or not a registered model.
    """
    from monai_aeflow.models import MODELS, get_model_spec

    name = config.get("model_name", "aeflow")
    if not isinstance(name, str):
        raise _invalid("config.model_name", name, "expected the name of a registered model", path)
    try:
        get_model_spec(name)
    except ValueError:
        raise _invalid("config.model_name", name, f"unknown model; known: {', '.join(sorted(MODELS))}", path) from None
    return name.lower()


def validate_network_kwargs(name: str, hparams: Mapping[str, Any], path: PathLike = None) -> None:
    """Check the network keyword arguments stored in ``config["model"]`` against :data:`NETWORK_RULES`.

    Arguments that the network class does not take are refused; a model registered without rules is only
    checked against its constructor's signature.

    Args:
        name: the registry key (see :func:`validate_model_name`).
        hparams: the stored keyword arguments.
        path: the model file, named in the error.

    Raises:
        CheckpointError: an unknown argument, or a value of the wrong type or out of range.
    """
    from monai_aeflow.models import get_model_spec

    params = inspect.signature(get_model_spec(name).network_cls).parameters
    any_key = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in hparams.items():
        if key not in params and not any_key:
            raise _invalid(f"config.model.{key}", value, f"not an argument of the {name} network", path)
    _apply(NETWORK_RULES.get(name, {}), hparams, "config.model", path)


def validate_preprocessing(preprocessing: Any, path: PathLike = None) -> None:
    """Check ``config["preprocessing"]``: a mapping whose known keys pass :data:`PREPROCESSING_RULES`.

    Args:
        preprocessing: the stored value (``None`` means the defaults).
        path: the model file, named in the error.

    Raises:
        CheckpointError: not a mapping, or a value of the wrong type or out of range.
    """
    _apply(PREPROCESSING_RULES, _mapping(preprocessing, "config.preprocessing", path), "config.preprocessing", path)


def validate_score(score: Any, name: str, path: PathLike = None) -> None:
    """Check ``config["score"]``: :data:`SCORE_RULES` and a pixel map that the model can produce.

    Args:
        score: the stored value (``None`` means the defaults).
        name: the registry key of the model.
        path: the model file, named in the error.

    Raises:
        CheckpointError: not a mapping, a value of the wrong type or out of range, or a map kind of another model.
    """
    values = _mapping(score, "config.score", path)
    _apply(SCORE_RULES, values, "config.score", path)
    kinds = MAP_KINDS_BY_MODEL.get(name, _ALL_MAPS)
    kind = values.get("map_kind")
    if kind is not None and kind not in kinds:
        raise _invalid("config.score.map_kind", kind, f"a {name} model gives one of {', '.join(kinds)}", path)


def validate_threshold(threshold: Any, path: PathLike = None) -> None:
    """Check the stored binarisation threshold: ``None`` or a finite number.

    Args:
        threshold: the stored value.
        path: the model file, named in the error.

    Raises:
        CheckpointError: anything else (a string, NaN, infinity, a bool).
    """
    if threshold is not None and not _is_real(threshold):
        raise _invalid("threshold", threshold, "expected a finite number or null", path)


def validate_postprocessing(protocol: Any, path: PathLike = None) -> None:
    """Check ``threshold_protocol["postprocessing"]`` (the settings the scorer binarises maps with).

    Args:
        protocol: the stored ``threshold_protocol`` (``None`` means none).
        path: the model file, named in the error.

    Raises:
        CheckpointError: not a mapping, or a value that :data:`POSTPROCESSING_RULES` refuses.
    """
    pp = _mapping(protocol, "threshold_protocol", path).get("postprocessing")
    key = "threshold_protocol.postprocessing"
    _apply(POSTPROCESSING_RULES, _mapping(pp, key, path), key, path)


def validate_model_config(checkpoint: Mapping[str, Any], path: PathLike = None) -> None:
    """Check every stored setting of a model file: model name, network arguments, preprocessing, score, threshold.

    :func:`monai_aeflow.checkpoint.read_checkpoint` calls it, so it runs before any network is built or any
    input is read.

    Args:
        checkpoint: the dict read from the file (with ``config`` and ``config["model"]``).
        path: the model file, named in the error.

    Raises:
        CheckpointError: ``"<path>: invalid stored value <key> = <value>: <problem>"``.

    Example::

        validate_model_config(torch.load("model.pt", weights_only=True), "model.pt")
    """
    config = checkpoint["config"]
    name = validate_model_name(config, path)
    validate_network_kwargs(name, config["model"], path)
    validate_preprocessing(config.get("preprocessing"), path)
    validate_score(config.get("score"), name, path)
    _mapping(config.get("training"), "config.training", path)
    _apply(
        ENCODER_WEIGHTS_RULES,
        _mapping(config.get("encoder_weights"), "config.encoder_weights", path),
        "config.encoder_weights",
        path,
    )
    validate_threshold(checkpoint.get("threshold"), path)
    validate_postprocessing(checkpoint.get("threshold_protocol"), path)
