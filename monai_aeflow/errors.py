"""Exceptions raised for problems with a user's input (files, folders, checkpoints, options).

The command-line interface turns them into a one-line message and exit code 2, without a traceback.
"""

from __future__ import annotations

__all__ = ["AEFlowInputError", "CheckpointError"]


class AEFlowInputError(ValueError):
    """A user-supplied file, folder or option cannot be used.

    Args:
        message: what is wrong, in one line.
        path: the offending file or folder, named at the start of the message when given.
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointError(AEFlowInputError):
    """A checkpoint is missing, not a plain state dict, or belongs to another model."""
