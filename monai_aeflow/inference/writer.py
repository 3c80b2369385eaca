"""A background writer: output groups are written in a thread while the next input is scored."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """Runs ``write(*args)`` for each :meth:`put` in one background thread, in order, with a bounded queue.

    ``put`` blocks while ``max_pending`` items wait, so a slow disk holds the producer back instead of filling
    memory. ``write`` handles the errors of one item itself (a failed input is recorded, the others go on);
    an exception that escapes it stops the writer and is raised again by the next :meth:`put` or on exit.

    Args:
        write: the function that writes one item.
        max_pending: items waiting at most.

    Example::

        with BackgroundWriter(write_one) as writer:
            for result in results:
                writer.put(result)
    """

    def __init__(self, write: Callable[..., None], max_pending: int = 2) -> None:
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="aeflow-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
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
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc is None:
            raise self._error
