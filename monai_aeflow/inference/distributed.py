"""Scoring on many GPUs and nodes: the inputs sharded across ``torch.distributed`` ranks.

``torchrun --nproc_per_node N [--nnodes M --node_rank R --rdzv_endpoint HOST:PORT] -m aeflow_cli score ...``
starts one process per GPU; each takes its own device (``cuda:LOCAL_RANK``) and every N-th input, rank 0
holds the output folder's lock and writes ``summary.csv`` of all inputs, and every rank exits with the code
of the whole run. The backend is NCCL on CUDA and gloo on the CPU (which the tests use).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from monai_aeflow.errors import AEFlowInputError

__all__ = ["ShardContext", "launched_by_torchrun", "init_sharding", "shard", "gather_rows", "agree", "finish"]

T = TypeVar("T")


@dataclass
class ShardContext:
    """Where this process stands in a sharded run.

    Attributes:
        rank: global rank (0 in a single-process run).
        world_size: number of processes.
        device: the device this rank scores on.
        initialized_here: the process group was created by :func:`init_sharding` (and is destroyed by
            :func:`finish`).
    """

    rank: int = 0
    world_size: int = 1
    device: str = "auto"
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True inside a process that ``torchrun`` (or another launcher setting ``WORLD_SIZE > 1``) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_sharding(device: str = "auto", distributed: bool | None = None) -> ShardContext:
    """Join the process group of a ``torchrun`` launch (NCCL on CUDA, gloo on CPU) and choose this rank's device.

    Args:
        device: the ``--device`` option: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` when CUDA is there.
        distributed: force (True) or refuse (False) sharding; None: shard when launched by ``torchrun``.

    Returns:
        The :class:`ShardContext` (a single-process one when not sharding).

    Raises:
        AEFlowInputError: ``distributed`` asked for outside a launcher (no ``RANK`` / ``WORLD_SIZE`` set).
    """
    if distributed is None:
        distributed = launched_by_torchrun()
    if not distributed:
        return ShardContext(device=device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise AEFlowInputError(
            "--distributed needs a launcher that sets RANK and WORLD_SIZE: torchrun --nproc_per_node N -m aeflow_cli "
            "score ..."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return ShardContext(dist.get_rank(), dist.get_world_size(), device, created)


def shard(items: Sequence[T], ctx: ShardContext) -> list[T]:
    """This rank's items: every ``world_size``-th item from ``rank`` on (each item on exactly one rank)."""
    return list(items[ctx.rank :: ctx.world_size])


def agree(ctx: ShardContext, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 and raise its :class:`AEFlowInputError` on every rank (no rank is left waiting).

    Args:
        ctx: the shard context.
        check: a function raising :class:`AEFlowInputError` for a user's mistake.
    """
    message: list[Any] = [None]
    error = None
    if ctx.rank == 0:
        try:
            check()
        except AEFlowInputError as err:
            message[0], error = str(err), err
    if ctx.distributed:
        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise AEFlowInputError(message[0])


def gather_rows(rows: list[dict[str, Any]], ctx: ShardContext, order: Sequence[Any]) -> list[dict[str, Any]]:
    """Every rank's result rows, on every rank, in the order of the inputs.

    Args:
        rows: this rank's rows (``input`` keys).
        ctx: the shard context.
        order: all inputs, in the order the rows are wanted.

    Returns:
        The rows of all ranks.
    """
    if not ctx.distributed:
        return rows
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, rows)
    by_input = {r["input"]: r for part in everyone for r in part}
    return [by_input[str(p)] for p in order if str(p) in by_input]


def finish(ctx: ShardContext) -> None:
    """Wait for every rank, then leave the process group if :func:`init_sharding` created it."""
    if ctx.distributed:
        dist.barrier()
        if ctx.initialized_here:
            dist.destroy_process_group()
