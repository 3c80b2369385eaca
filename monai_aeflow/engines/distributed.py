"""Rank helpers of distributed runs (plain single-process behaviour when ``torch.distributed`` is not set up)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["rank", "rank0_first"]


def rank() -> int:
    """This process's rank in a distributed run (0 outside one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank0_first(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on rank 0 while the other ranks of a distributed run wait (a plain call otherwise)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        fn()
        return
    try:
        if dist.get_rank() == 0:
            fn()
    finally:
        dist.barrier()
