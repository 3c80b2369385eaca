"""Helpers shared by the ``aeflow-cli`` sub-commands: user errors become one line and exit code 2; options that
several sub-commands take."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from monai_aeflow.errors import AEFlowInputError

T = TypeVar("T")

__all__ = ["UsageError", "run_guarded", "normalize_option"]

normalize_option = click.option(
    "--normalize",
    default="none",
    show_default=True,
    type=click.Choice(["none", "robust"]),
    help="Use the raw map (none) or standardise each scan's map within its brain, (m - median) / IQR, before "
    "thresholding (robust: one threshold then means the same on scans of another scale).",
)
"""``--normalize``: the per-scan normalisation of the maps (``PostprocessConfig.normalize``) of evaluate and compare."""


_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
"""Errors of a file or folder path: reported as a user mistake naming the path (exit code 2)."""


class UsageError(click.ClickException):
    """A user mistake: printed as ``Error: <message>`` with exit code 2 and no traceback."""

    exit_code = 2


def run_guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; turn :class:`AEFlowInputError` (bad file, folder, option or checkpoint) and the errors of a path
    (missing, a file where a folder is needed, not writable) into one ``Error:`` line and exit code 2.

    Args:
        fn: the work to do.
        args: positional arguments of ``fn``.
        kwargs: keyword arguments of ``fn``.

    Returns:
        What ``fn`` returns.
    """
    try:
        return fn(*args, **kwargs)
    except AEFlowInputError as err:
        raise UsageError(str(err)) from None
    except _PATH_ERRORS as err:  # a path the user gave that cannot be read or written, found late
        if not err.filename:
            raise
        raise UsageError(f"{err.filename}: {err.strerror or err}") from None
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
