"""Export of a trained model's image-to-anomaly-map network as ONNX or TorchScript, with its preprocessing.

The exported network is :class:`~monai_aeflow.bundle.AnomalyMapNet`: preprocessed slices ``(B, C, H, W)``
in [0, 1] in, the pixel anomaly map ``(B, 1, H, W)`` out, computed by the model's own scorer with the map
kind and score weight stored in the model file. Beside the exported file, ``<file>.json`` records what the
network expects (orientation, spacing, intensity scaling, in-plane size, channels, size multiple), what it
returns (map kind), the threshold stored in the model file, the exporter and the measured parity.

- ONNX: ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based exporter; the TorchScript-based one is
  deprecated), one self-contained file (no external data), checked with ``onnx.checker`` (full check).
- TorchScript: ``torch.jit.trace`` (FrEIA's flow cannot be scripted).

The batch axis is always dynamic; height and width are dynamic where the network allows it (the dense VAE
has a fixed input size, and a few pixel maps need a fixed size in ONNX). Every export is run again, before it
is written, on a batch of another size (and, where height and width are dynamic, on another size) and
compared with eager PyTorch: a difference above :data:`PARITY_TOLERANCE` refuses the export.

Example::

    metadata = export_model("aeflow_demo/model/model.pt", "aeflow.onnx")
    metadata["input"]["shape"]  # ['batch', 1, 'height', 'width']
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_aeflow import __version__
from monai_aeflow.bundle import AnomalyMapNet
from monai_aeflow.checkpoint import load_model
from monai_aeflow.data.preprocessing import build_image_preprocessing, build_volume_preprocessing
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import atomic_write, atomic_write_json, make_folder
from monai_aeflow.inference.model_file import resolve_model_path
from monai_aeflow.networks.efficientnet_lite import SameConv2d

__all__ = [
    "EXPORT_FORMATS",
    "PARITY_TOLERANCE",
    "ExportError",
    "export_model",
    "export_network",
    "export_format_for",
    "metadata_path",
]

logger = logging.getLogger("monai_aeflow.export")

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
"""The formats :func:`export_model` writes."""

PARITY_TOLERANCE = 1e-4
"""Largest absolute difference from eager PyTorch that an export may show on its check inputs."""

_SUFFIX_FORMATS = {".onnx": "onnx", ".ts": "torchscript", ".pt": "torchscript", ".torchscript": "torchscript"}
_EXAMPLE_BATCH = 2  # the traced batch; never 1 (torch.export specialises sizes 0 and 1)
_CHECK_BATCH = 3  # another batch size, to show that the batch axis is dynamic
_INPUT_NAME, _OUTPUT_NAME = "image", "anomaly_map"


class ExportError(AEFlowInputError):
    """A model that cannot be exported in the asked format (the message says which model and why)."""


def metadata_path(out: str | os.PathLike) -> Path:
    """The JSON file written beside an exported network: ``<out>.json`` (``aeflow.onnx`` -> ``aeflow.onnx.json``).

    Args:
        out: the exported file.

    Returns:
        The metadata path.
    """
    out = Path(out)
    return out.with_name(out.name + ".json")


def export_format_for(out: str | os.PathLike, fmt: str | None = None) -> str:
    """The export format: ``fmt`` when given, else from the output's suffix (``.onnx``; ``.ts``, ``.pt``).

    Args:
        out: the output file.
        fmt: ``"onnx"``, ``"torchscript"`` or None.

    Returns:
        The format.

    Raises:
        AEFlowInputError: an unknown format, or none given and none implied by the suffix.
    """
    if fmt is None:
        suffix = Path(out).suffix.lower()
        if suffix not in _SUFFIX_FORMATS:
            raise AEFlowInputError(
                f"cannot tell the export format from the suffix {suffix or '(none)'!r}; "
                f"give --format ({' or '.join(EXPORT_FORMATS)})",
                path=out,
            )
        return _SUFFIX_FORMATS[suffix]
    key = str(fmt).strip().lower()
    if key not in EXPORT_FORMATS:
        raise AEFlowInputError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    return key


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _root_cause(err: BaseException) -> str:
    """``Type: first line`` of the innermost exception behind ``err`` (exporter errors are long)."""
    seen = err
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    lines = [line.strip() for line in str(seen).splitlines() if line.strip()]
    return f"{type(seen).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _median_dim(self: Any, dim: int, keepdim: bool = False) -> tuple[Any, Any]:
    """ONNX translation of ``aten.median.dim`` (lower median, as torch): the k-th smallest by ``TopK``."""
    from onnxscript import opset18 as op

    one = op.Constant(value_ints=[1])
    n = op.Shape(self, start=dim, end=dim + 1)
    k = op.Add(op.Div(op.Sub(n, one), op.Constant(value_ints=[2])), one)
    values, indices = op.TopK(self, k, axis=dim, largest=0, sorted=1)
    last = op.Sub(k, one)
    values, indices = op.Gather(values, last, axis=dim), op.Gather(indices, last, axis=dim)
    if not keepdim:
        axis = op.Constant(value_ints=[dim])
        values, indices = op.Squeeze(values, axis), op.Squeeze(indices, axis)
    return values, indices


def _max_abs_diff(got: np.ndarray | torch.Tensor, expected: torch.Tensor) -> float:
    got_t = torch.as_tensor(np.asarray(got) if not isinstance(got, torch.Tensor) else got)
    if tuple(got_t.shape) != tuple(expected.shape):
        return math.inf
    return float((got_t.float() - expected.float()).abs().max())


def _check_inputs(example: torch.Tensor, multiple: int, spatial: bool) -> list[torch.Tensor]:
    """A batch of another size at the traced size, and (``spatial``) one at another height and width."""
    gen = torch.Generator().manual_seed(0)
    _, c, h, w = example.shape
    inputs = [torch.rand(_CHECK_BATCH, c, h, w, generator=gen)]
    if spatial:
        step = multiple * max(1, math.ceil(16 / multiple))
        inputs.append(torch.rand(1, c, h + step, w + 2 * step, generator=gen))
    return inputs


def _parity(run: Callable[[torch.Tensor], Any], net: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            expected = net(x)
        worst = max(worst, _max_abs_diff(run(x), expected))
    return worst


def _export_onnx(net: nn.Module, example: torch.Tensor, path: str, multiple: int) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1)
    attempts = [
        (
            "dynamic height and width failed",
            {0: batch, 2: torch.export.Dim("height", min=1), 3: torch.export.Dim("width", min=1)},
        ),
        ("dynamic batch only failed", {0: batch}),
    ]
    failures = []
    if any(isinstance(m, SameConv2d) for m in net.modules()):
        # its padding is computed from the input size: symbolic sizes make torch.export take hours
        attempts = attempts[1:]
        failures.append("height and width fixed: the EfficientNet-Lite encoder pads from the input size")
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    for label, shapes in attempts:
        torch_onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" notes of the op registry
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    net,
                    (example,),
                    path,
                    dynamo=True,
                    dynamic_shapes=(shapes,),
                    input_names=[_INPUT_NAME],
                    output_names=[_OUTPUT_NAME],
                    external_data=False,
                    verbose=False,
                    custom_translation_table={torch.ops.aten.median.dim: _median_dim},
                )
        except Exception as err:  # exporter errors have many types (torch.export, dispatch, conversion)
            failures.append(f"{label}: {_root_cause(err)}")
            continue
        finally:
            torch_onnx_log.setLevel(level)
        try:
            onnx.checker.check_model(path, full_check=True)
        except Exception as err:  # onnx.checker.ValidationError, shape inference errors
            failures.append(f"{label}: onnx.checker: {_root_cause(err)}")
            continue
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        shape = list(session.get_inputs()[0].shape)
        if not isinstance(shape[0], str):
            failures.append(f"{label}: the batch axis became fixed ({shape[0]})")
            continue
        spatial = isinstance(shape[2], str) and isinstance(shape[3], str)

        def run(x: torch.Tensor, session: Any = session) -> np.ndarray:
            return session.run(None, {_INPUT_NAME: x.numpy()})[0]

        try:
            diff = _parity(run, net, _check_inputs(example, multiple, spatial))
        except Exception as err:  # a shape the graph does not support after all
            failures.append(f"{label}: onnxruntime: {_root_cause(err)}")
            continue
        if diff > PARITY_TOLERANCE:
            failures.append(f"{label}: differs from PyTorch by {diff:.3g} (tolerance {PARITY_TOLERANCE:g})")
            continue
        model = onnx.load(path, load_external_data=False)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        return {
            "shape": shape,
            "max_abs_diff": diff,
            "exporter": {"method": "torch.onnx.export(dynamo=True)", "opset": opset, "onnx": onnx.__version__},
            "checked_with": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
            "notes": failures or ([] if spatial else ["height and width are fixed in the exported graph"]),
        }
    raise ExportError("; ".join(dict.fromkeys(failures)))


def _export_torchscript(net: nn.Module, example: torch.Tensor, path: str, multiple: int) -> dict[str, Any]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notes; the checks below decide
        traced = torch.jit.trace(net, example, check_trace=False)
    traced.save(path)
    loaded = torch.jit.load(path, map_location="cpu")  # the file just written, not a user's

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(x)

    c, h, w = example.shape[1:]
    batch_input, spatial_input = _check_inputs(example, multiple, spatial=True)
    try:
        diff = _parity(run, net, [batch_input])
    except Exception as err:  # a batch size baked into the trace
        raise ExportError(f"the traced network does not run on another batch size ({_root_cause(err)})") from None
    if diff > PARITY_TOLERANCE:
        raise ExportError(f"the traced network does not follow the batch size (difference {diff:.3g})")
    try:
        spatial_diff = _parity(run, net, [spatial_input])
    except Exception:  # a size baked into the trace
        spatial_diff = math.inf
    spatial = spatial_diff <= PARITY_TOLERANCE
    return {
        "shape": ["batch", c, "height" if spatial else h, "width" if spatial else w],
        "max_abs_diff": max(diff, spatial_diff) if spatial else diff,
        "exporter": {"method": "torch.jit.trace"},
        "checked_with": "torch.jit.load",
        "notes": [] if spatial else ["height and width are fixed: the trace does not follow another size"],
    }


def export_network(
    net: AnomalyMapNet, path: str | os.PathLike, fmt: str, example: torch.Tensor, size_multiple: int = 16
) -> dict[str, Any]:
    """Export an :class:`AnomalyMapNet` to ``path`` (written in place) and check it against eager PyTorch.

    Args:
        net: the network, in ``eval()`` mode.
        path: the file to write.
        fmt: ``"onnx"`` or ``"torchscript"``.
        example: an input ``(B, C, H, W)`` with ``B >= 2`` (the traced one).
        size_multiple: height and width multiple of the network, for the check at another size.

    Returns:
        ``shape`` (the input shape, names for dynamic axes), ``max_abs_diff`` (largest difference from eager
        PyTorch on the check inputs), ``exporter``, ``checked_with`` and ``notes`` (why an axis is fixed).

    Raises:
        ExportError: the network cannot be exported, or the export disagrees with PyTorch.
    """
    fmt = export_format_for(path, fmt)
    net = net.eval()
    if fmt == "onnx":
        return _export_onnx(net, example, str(path), size_multiple)
    return _export_torchscript(net, example, str(path), size_multiple)


def _input_size(hparams: Mapping[str, Any], preprocessing: Mapping[str, Any]) -> tuple[int, int]:
    size = hparams.get("image_size") or preprocessing.get("spatial_size") or (256, 256)
    size = [int(size)] * 2 if isinstance(size, int | float) else [int(s) for s in size]
    return (size[0], size[-1])


def _defaults(builder: Callable[..., Any]) -> dict[str, Any]:
    params = inspect.signature(builder).parameters
    return {k: p.default for k, p in params.items() if not k.endswith("_key")}


def _preprocessing(stored: Mapping[str, Any], channels: int, size: tuple[int, int], multiple: int) -> dict:
    volume = {k: stored.get(k, v) for k, v in _defaults(build_volume_preprocessing).items()}
    image = {k: stored.get(k, v) for k, v in _defaults(build_image_preprocessing).items()}
    percentiles = [float(p) for p in volume["percentiles"]]
    return {
        "stored": dict(stored),
        "volume": volume,
        "image2d": image,
        "orientation": volume["orientation"],
        "spacing": volume["spacing"],
        "intensity": {
            "method": f"clip to percentiles {percentiles[0]:g} and {percentiles[1]:g} of the intensities inside the "
            "brain mask, then scale linearly to [0, 1]",
            "percentiles": percentiles,
            "range": [0.0, 1.0],
        },
        "in_plane_size": list(size),
        "channels": channels,
        "size_multiple": multiple,
        "slices": f"axial slices of the {volume['orientation']}-oriented volume (its last axis), each "
        "(channels, X, Y) as height x width; 2D images: (channels, rows, columns) after resizing",
        "padding": f"height and width not multiples of {multiple}: zero-pad symmetrically, crop the map back",
    }


def export_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a model file's (or bundle's) image-to-anomaly-map network and write its metadata beside it.

    Args:
        model: a model file (``model.pt``) or a bundle folder (``models/model.pt``).
        out: the exported file (``.onnx``; ``.ts`` or ``.pt`` for TorchScript); the metadata goes to
            :func:`metadata_path` (``<out>.json``).
        fmt: ``"onnx"`` or ``"torchscript"`` (default: from the suffix of ``out``).
        overwrite: replace existing files.

    Returns:
        The metadata written (see the module docstring).

    Raises:
        AEFlowInputError: an unknown format, an existing output without ``overwrite``, a missing ONNX package.
        CheckpointError: a missing, unsafe or foreign model file.
        ExportError: the model cannot be exported in that format (the message says why).
    """
    out = Path(out)
    fmt = export_format_for(out, fmt)
    meta_path = metadata_path(out)
    for path in (out, meta_path):
        if path.is_dir():
            raise AEFlowInputError("is a folder; give the file to write", path=path)
    if not overwrite:
        for path in (out, meta_path):
            if path.exists():
                raise AEFlowInputError("output exists (use --overwrite to replace it)", path=path)
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise AEFlowInputError(f"ONNX export needs {', '.join(missing)}: pip install 'monai-aeflow[export]'")
    model_path = resolve_model_path(model)
    network, ckpt = load_model(model_path, "cpu")
    config = ckpt["config"]
    score = dict(config.get("score") or {})
    map_kind, beta = str(score.get("map_kind", "residual")), float(score.get("beta", 0.9))
    net = AnomalyMapNet(network, map_kind=map_kind, beta=beta).eval()
    hparams, stored = dict(config["model"]), dict(config.get("preprocessing") or {})
    channels = int(hparams.get("in_channels", 1))
    size = _input_size(hparams, stored)
    multiple = net.spec.size_multiple_of(network)
    example = torch.rand(_EXAMPLE_BATCH, channels, *size, generator=torch.Generator().manual_seed(0))
    result: dict[str, Any] = {}

    def write(tmp: str) -> None:
        try:
            result.update(export_network(net, tmp, fmt, example, multiple))
        except ExportError as err:
            raise ExportError(f"model {net.model_name!r} cannot be exported as {fmt}: {err}", path=model_path) from None

    make_folder(out.parent)
    if not os.access(out.parent, os.W_OK):
        raise AEFlowInputError("output folder is not writable", path=out.parent)
    logger.info("exporting %s (%s) as %s to %s", model_path, net.model_name, fmt, out)
    atomic_write(out, write)
    shape = result["shape"]
    metadata = {
        "format": fmt,
        "file": out.name,
        "sha256": _sha256(out),
        "created_by": f"monai-aeflow {__version__}",
        "exporter": {"torch": torch.__version__, **result["exporter"]},
        "model": {
            "file": str(model_path.resolve()),
            "sha256": _sha256(model_path),
            "model_name": net.model_name,
            "network": hparams,
        },
        "input": {
            "name": _INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": shape,
            "dynamic_axes": {str(i): d for i, d in enumerate(shape) if isinstance(d, str)},
            "value_range": [0.0, 1.0],
        },
        "output": {
            "name": _OUTPUT_NAME,
            "dtype": "float32",
            "shape": [shape[0], 1, shape[2], shape[3]],
            "map_kind": map_kind,
            "beta": beta,
            "meaning": f"pixel anomaly map of kind {map_kind!r} (as aeflow-cli score computes it), higher is more "
            "anomalous",
        },
        "preprocessing": _preprocessing(stored, channels, size, multiple),
        "threshold": ckpt.get("threshold"),
        "threshold_protocol": dict(ckpt.get("threshold_protocol") or {}),
        "threshold_applies_to": "the map after the post-processing of threshold_protocol (brain mask, median "
        "filter, small components removed)",
        "parity": {
            "reference": "eager PyTorch (AnomalyMapNet)",
            "checked_with": result["checked_with"],
            "max_abs_diff": result["max_abs_diff"],
            "tolerance": PARITY_TOLERANCE,
            "check_batch_size": _CHECK_BATCH,
            "traced_batch_size": _EXAMPLE_BATCH,
        },
        "notes": result["notes"],
    }
    try:
        atomic_write_json(meta_path, metadata)
    except BaseException:
        out.unlink(missing_ok=True)  # never an exported file without its metadata
        raise
    return metadata
