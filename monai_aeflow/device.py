"""Choosing the torch device and the autocast precision: helpers shared by training, comparison and inference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from monai_aeflow.errors import AEFlowInputError

__all__ = ["AMP_DTYPES", "autocast", "resolve_amp_dtype", "resolve_device"]

AMP_DTYPES: dict[str, torch.dtype | None] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}
"""Autocast precisions by name. bfloat16 is the CUDA default: it has float32's exponent range, so activations
cannot overflow (float16 overflows beyond 65504, e.g. in the flow of Wide-ResNet-50-2 features)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device of a ``--device`` value, checked to be there.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or another
            accelerator torch knows (``"mps"``, ``"xpu"``) when this machine has it.

    Returns:
        The device.

    Raises:
        AEFlowInputError: an unknown device name, an accelerator this machine lacks (or a ``cuda:N`` beyond its
            GPUs), or a device that holds no data (``meta``).
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise AEFlowInputError(f"--device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AEFlowInputError("CUDA was requested but no CUDA device is available; use --device cpu")
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type == "meta" or not callable(available) or not available():
        raise AEFlowInputError(f"--device {device!r}: this machine has no such device (use auto, cpu or cuda)")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise AEFlowInputError(f"--device {device!r}: this machine has {count()} {dev.type} device(s)")
    return dev


def resolve_amp_dtype(
    amp_dtype: str | torch.dtype | None, device: str | torch.device, amp: bool | None = None
) -> torch.dtype | None:
    """The autocast dtype to use on a device, or None for full float32.

    Args:
        amp_dtype: ``"bfloat16"``, ``"float16"``, ``"none"``, a torch dtype, or None / ``"auto"`` for the
            default (bfloat16 on CUDA, none elsewhere). An explicit dtype applies on any device (CPU autocast
            supports both), which is what the CPU tests use.
        device: where the model runs.
        amp: the older on/off switch, used only when ``amp_dtype`` is None / ``"auto"``: False turns autocast
            off, True / None keep the device's default.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or None.

    Raises:
        AEFlowInputError: an unknown dtype name.
    """
    if isinstance(amp_dtype, torch.dtype):
        if amp_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise AEFlowInputError(f"autocast dtype must be bfloat16, float16 or none, got {amp_dtype}")
        return None if amp_dtype == torch.float32 else amp_dtype
    if amp_dtype is None or str(amp_dtype) == "auto":
        if amp is False or torch.device(device).type != "cuda":
            return None
        return torch.bfloat16
    if str(amp_dtype) not in AMP_DTYPES:
        raise AEFlowInputError(f"autocast dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    return AMP_DTYPES[str(amp_dtype)]


@contextlib.contextmanager
def autocast(device: str | torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on the device's type with ``dtype``; a no-op context when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield
