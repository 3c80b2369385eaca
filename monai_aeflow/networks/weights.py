"""Reading a weights file of a backbone safely: a plain state dict, loaded with ``weights_only=True``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from monai_aeflow.errors import CheckpointError

__all__ = ["read_state_dict_file"]


def read_state_dict_file(path: Path, expected: str) -> Mapping[str, torch.Tensor]:
    """Read a state-dict file (a ``{"state_dict": ...}`` wrapper is unwrapped); never unpickles arbitrary objects.

    Args:
        path: the weights file.
        expected: what the file should hold, for the message when it is missing (e.g. "torchvision's resnet18
            state dict").

    Returns:
        The state dict.

    Raises:
        CheckpointError: missing file, a file ``torch.load(weights_only=True)`` refuses, or not a mapping.
    """
    if not path.is_file():
        raise CheckpointError(f"backbone weights file not found; expected {expected}", path=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"not a plain state-dict file ({err.__class__.__name__})", path=path) from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a state dict of tensors, got {type(state).__name__}", path=str(path))
    return state
