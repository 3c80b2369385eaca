"""A background writer: output groups are written in a thread while the next input is scored."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["BackgroundWriter"]


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
