"""The files of a training run folder: the model file, resumable checkpoints and the output-folder checks.

:func:`check_output_dir` refuses (before any data are prepared) a folder that cannot be written or that holds a
previous run; :func:`find_checkpoint`, :func:`read_training_checkpoint` and :func:`open_resume_checkpoint` find
and check the checkpoint a run resumes from; :func:`clear_previous_run` removes a run that is overwritten.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_aeflow.checkpoint import read_checkpoint
from monai_aeflow.engines.handlers import ResumableCheckpointSaver
from monai_aeflow.errors import AEFlowInputError, CheckpointError
from monai_aeflow.fileio import blocking_ancestor

__all__ = [
    "MODEL_FILE",
    "find_checkpoint",
    "read_training_checkpoint",
    "open_resume_checkpoint",
    "checkpoint_epoch",
    "check_output_dir",
    "previous_run_files",
    "clear_previous_run",
    "remove_unused_folders",
]

MODEL_FILE = "model.pt"
_RUN_GLOBS = (MODEL_FILE, ResumableCheckpointSaver.EPOCH_GLOB, ResumableCheckpointSaver.FINAL_GLOB)


def _number(path: Path) -> int:
    """N of ``checkpoint_epoch=N.pt`` / ``checkpoint_final_iteration=N.pt`` (-1 when it does not parse)."""
    try:
        return int(path.stem.rsplit("=", 1)[1])
    except (IndexError, ValueError):
        return -1


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``path`` itself when it is a file, else the latest one of the run folder.

    The latest checkpoint of a folder is its ``checkpoint_final_iteration=N.pt`` when the run completed, else its
    ``checkpoint_epoch=N.pt`` with the largest N.

    Args:
        path: a checkpoint file or a run folder.

    Returns:
        The checkpoint file.

    Raises:
        CheckpointError: nothing at ``path``, or a folder without checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        for pattern in (ResumableCheckpointSaver.FINAL_GLOB, ResumableCheckpointSaver.EPOCH_GLOB):
            found = sorted(path.glob(pattern), key=_number)
            if found:
                return found[-1]
        raise CheckpointError(
            "no checkpoint to resume from (checkpoint_epoch=N.pt is written at the end of each epoch); "
            "start the run again with --overwrite",
            path=path,
        )
    if not path.exists():
        raise CheckpointError("checkpoint or run folder to resume from not found", path=path)
    return path


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a resumable training checkpoint safely (``weights_only=True``) and check that it can be resumed.

    Args:
        path: a ``checkpoint_epoch=N.pt`` / ``checkpoint_final_iteration=N.pt`` file.

    Returns:
        The checkpoint dict (``network``, ``optimizer``, ``trainer``, ``config`` and, when saved, ``evaluator``
        and ``rng``).

    Raises:
        CheckpointError: a missing, truncated or unsafe file, or a file without optimiser and trainer state
            (a ``model.pt`` holds the weights only).
    """
    ckpt = read_checkpoint(path)
    trainer = ckpt.get("trainer")
    if not isinstance(ckpt.get("optimizer"), Mapping) or not isinstance(trainer, Mapping):
        raise CheckpointError(
            "not a resumable training checkpoint (no optimiser and trainer state; model files cannot be resumed: "
            "give the run folder or its checkpoint_epoch=N.pt)",
            path=path,
        )
    iteration, length = trainer.get("iteration"), trainer.get("epoch_length")
    if not isinstance(iteration, int) or not isinstance(length, int) or length < 1 or iteration < 0:
        raise CheckpointError("invalid trainer state in the checkpoint (iteration / epoch length)", path=path)
    return ckpt


def checkpoint_epoch(ckpt: Mapping[str, Any]) -> int:
    """Epochs completed when a training checkpoint was saved.

    Args:
        ckpt: a checkpoint of :func:`read_training_checkpoint`.

    Returns:
        The epoch count.
    """
    return int(ckpt["trainer"]["iteration"]) // int(ckpt["trainer"]["epoch_length"])


def previous_run_files(output_dir: str | os.PathLike) -> list[Path]:
    """The model file and checkpoints of a run in ``output_dir`` (empty when there is none).

    Args:
        output_dir: a run folder.

    Returns:
        The files, sorted.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted({p for pattern in _RUN_GLOBS for p in out.glob(pattern) if p.is_file()})


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False, existing_run_ok: bool = False) -> None:
    """Check, without writing anything, that a run can be written to ``output_dir``.

    Args:
        output_dir: the run folder (created later when missing).
        overwrite: a folder holding a run (``model.pt`` or checkpoints) may be reused (see
            :func:`clear_previous_run`).
        existing_run_ok: do not check for a previous run (resuming in its own folder).

    Raises:
        AEFlowInputError: the folder cannot be created or written, or it holds a run and ``overwrite`` is False.
    """
    out = Path(output_dir)
    blocked = blocking_ancestor(out)
    if blocked is not None and blocked[1] == "file":
        what = "it is a file" if blocked[0] == out else f"{blocked[0]} is not a folder"
        raise AEFlowInputError(f"cannot create the output folder ({what})", path=out)
    if blocked is not None:
        what = "is not writable" if blocked[0] == out else f"cannot be created ({blocked[0]} is not writable)"
        raise AEFlowInputError(f"the output folder {what}", path=out)
    if overwrite or existing_run_ok:
        return
    previous = previous_run_files(out)
    if previous:
        raise AEFlowInputError(
            f"the output folder holds a previous run ({', '.join(p.name for p in previous)}); give --overwrite "
            f"to replace it, --resume {out} to continue it, or another --out",
            path=out,
        )


def remove_unused_folders(output_dir: str | os.PathLike, created: Sequence[Path]) -> None:
    """After a failed run, remove the folders it created when it wrote no model or checkpoint.

    Args:
        output_dir: the run folder (its model file and checkpoints, see :func:`previous_run_files`).
        created: folders that did not exist before the run, outermost first; the first that exists is removed
            (with what it holds).
    """
    if previous_run_files(output_dir):
        return
    for folder in created:
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            return


def clear_previous_run(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the model file, checkpoints and TensorBoard events of a previous run, so that two runs never mix.

    Other files (e.g. a synthetic cohort in ``data/``) are kept.

    Args:
        output_dir: the run folder.

    Returns:
        The files removed.
    """
    out = Path(output_dir)
    removed = previous_run_files(out)
    if out.is_dir():
        # temporary files of writes that were killed, and the TensorBoard logs of the previous run
        removed += [p for p in out.glob(".*.tmp*") if p.is_file()]
        removed += [p for p in (out / "tensorboard").glob("events.out.tfevents.*") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def open_resume_checkpoint(resume: str | os.PathLike, max_epochs: int) -> tuple[Path, dict[str, Any]]:
    """Find, read and check the checkpoint a run resumes from (:func:`find_checkpoint`, then
    :func:`read_training_checkpoint`), and that epochs are left to train.

    Args:
        resume: a checkpoint file or a run folder.
        max_epochs: the epochs the resumed run trains up to.

    Returns:
        The checkpoint's path and content.

    Raises:
        CheckpointError: see :func:`read_training_checkpoint`.
        AEFlowInputError: the checkpoint already has ``max_epochs`` epochs or more.
    """
    path = find_checkpoint(resume)
    ckpt = read_training_checkpoint(path)
    done = checkpoint_epoch(ckpt)
    if done >= max_epochs:
        raise AEFlowInputError(
            f"the run already trained {done} epoch{'s' if done != 1 else ''} (of {max_epochs}); give --epochs N with "
            f"N > {done} to train longer",
            path=path,
        )
    return path, ckpt
