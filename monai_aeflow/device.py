"""Choosing the torch device: one helper shared by training, comparison and inference."""

from __future__ import annotations

import torch

from monai_aeflow.errors import AEFlowInputError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AEFlowInputError("CUDA was requested but no CUDA device is available; use --device cpu")
    return dev
