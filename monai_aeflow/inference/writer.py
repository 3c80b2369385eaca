"""Background writing: output groups are written in threads (or processes) while the next input is scored."""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from types import TracebackType
from typing import Any

from monai_aeflow.errors import AEFlowInputError

__all__ = ["BackgroundWriter", "call_reporting_errors", "writer_processes"]


class BackgroundWriter:
    """Runs ``write(*args)`` for each :meth:`put` in background threads, with a bounded queue.

    One thread writes the items in order; several write them concurrently (compressing a ``.nii.gz`` releases
    the GIL, so a GPU scorer that outpaces one writer is kept fed by a few), each item still whole.

    ``put`` blocks while ``max_pending`` items wait, so a slow disk holds the producer back instead of filling
    memory. ``write`` handles the errors of one item itself (a failed input is recorded, the others go on);
    an exception that escapes it stops the writer and is raised again by the next :meth:`put` or on exit.

    Args:
        write: the function that writes one item.
        max_pending: items waiting at most.
        threads: writer threads.

    Example::

        with BackgroundWriter(write_one) as writer:
            for result in results:
                writer.put(result)
    """

    def __init__(self, write: Callable[..., None], max_pending: int = 2, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"at least one writer thread is needed, got {threads}")
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"aeflow-writer-{i}", daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> BackgroundWriter:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as err:  # kept for the producer
                    self._error = err

    def put(self, *args: Any) -> None:
        """Queue one item (blocks while the queue is full); raise the writer's error if it stopped."""
        if self._error is not None:
            raise self._error
        self._queue.put(args)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        if self._error is not None and exc is None:
            raise self._error


def writer_processes(processes: int) -> ProcessPoolExecutor:
    """A pool of writer processes (started by a fork server that has imported the output writers once).

    Writing a ``.nii.gz`` map and a preview is CPU work that partly holds the GIL (the preview's drawing, the
    compression's Python loop); in processes it neither competes with the scoring thread nor with each other.

    Args:
        processes: worker processes.

    Returns:
        The executor; submit :func:`call_reporting_errors` to it.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["monai_aeflow.inference.outputs"])
    return ProcessPoolExecutor(max_workers=processes, mp_context=context)


def call_reporting_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str | None, bool]:
    """``fn(*args, **kwargs)`` returning ``(value, None, False)``, or ``(None, message, user_error)`` when it raises,
    so that no exception object has to cross a process boundary (some cannot be pickled back).

    Args:
        fn: the function.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        The value, the error message (None on success) and whether the error is the user's
        (:class:`~monai_aeflow.errors.AEFlowInputError`).
    """
    try:
        return fn(*args, **kwargs), None, False
    except Exception as exc:
        user = isinstance(exc, AEFlowInputError)
        return None, str(exc) if user else f"{type(exc).__name__}: {exc}", user
