"""The app's own ``POST /infer/<model>`` endpoint: checked requests, inference off the event loop, a bounded queue.

MONAI Label 0.8.5 serves ``/infer/<model>`` with an ``async`` endpoint that runs the whole inference on the
server's event loop (every other request, ``GET /info/`` included, waits for it), merges the client's ``params``
into the request unchecked (``{"image": "/any/path"}`` is read), answers 500 with a traceback for a ``params``
that is not JSON, and keeps an uploaded file when the request fails. :func:`install_infer_route` replaces that one
route of the running server with :func:`make_infer_endpoint`'s, which:

- checks ``params`` (:func:`~monai_aeflow.label.validation.parse_params`) and answers 400 with one line;
- hands the datastore id, the session's image or the uploaded file to the app (uploads and sessions as
  :class:`~monai_aeflow.label.validation.ServerImage`, the only way a server path reaches it);
- runs the inference in a worker thread of an :class:`InferQueue` and answers 503 when the queue is full;
- removes the uploaded file whatever the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User

from monai_aeflow.label.validation import SERVER_IMAGE_KEY, RequestError, ServerImage, parse_params

DICOM_SEG_REQUEST_KEY = "aeflow_dicom_seg_output"
"""Request key set here for ``output=dicom_seg`` (never taken from a client's ``params``)."""

__all__ = ["InferQueue", "QueueFull", "install_infer_route", "make_infer_endpoint"]

logger = logging.getLogger(__name__)

_SUFFIX = re.compile(r"^(\.[A-Za-z0-9]{1,8}){1,2}$")


class QueueFull(Exception):
    """The :class:`InferQueue` holds as many requests as it may."""


class InferQueue:
    """A bounded queue of inference jobs run by daemon worker threads.

    The workers are daemon threads, so stopping the server does not wait for the queued volumes to be scored (a
    ``ThreadPoolExecutor`` would run its whole queue before the process could exit).

    Args:
        max_pending: the most jobs waiting or running at once; :meth:`submit` raises :class:`QueueFull` beyond.
        workers: threads running jobs (one: the model scores one volume at a time).
    """

    def __init__(self, max_pending: int, workers: int = 1) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.max_pending = int(max_pending)
        self._pending = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(workers):
            threading.Thread(target=self._work, name=f"aeflow-infer-{i}", daemon=True).start()

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args)
                    except BaseException as err:
                        future.set_exception(err)
                    else:
                        future.set_result(result)
            finally:
                with self._lock:
                    self._pending -= 1

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        with self._lock:
            return self._pending

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``.

        Args:
            fn: the job.
            args: its arguments.

        Returns:
            The job's future.

        Raises:
            QueueFull: ``max_pending`` jobs are waiting or running.
        """
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests are waiting or running")
            self._pending += 1
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def info(self) -> dict[str, int]:
        """``{"pending": ..., "max_pending": ...}`` for ``/info/``."""
        return {"pending": self.pending, "max_pending": self.max_pending}


def _upload_suffix(filename: str | None) -> str:
    """The extension of an uploaded file's name (``.nii.gz``), or ``.nii.gz`` when it is not a plain extension."""
    suffix = "".join(Path(filename or "").suffixes[-2:]).lower()
    return suffix if _SUFFIX.match(suffix) else ".nii.gz"


def _save_upload(upload: UploadFile) -> str:
    """Copy an uploaded file to a private temporary file; returns its path."""
    fd, path = tempfile.mkstemp(prefix="aeflow_upload_", suffix=_upload_suffix(upload.filename))
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(upload.file, out)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _remove(path: str | None) -> None:
    if path and os.path.exists(path):
        try:
            os.unlink(path)
        except OSError as err:
            logger.warning(f"could not remove {path}: {err}")


def make_infer_endpoint(app: Any, infer_queue: InferQueue) -> Callable[..., Any]:
    """The ``POST /infer/<model>`` endpoint of the AE-FLOW app.

    Args:
        app: the :class:`~monai_aeflow.label.AEFlowLabelApp` (its ``infer``, ``datastore``, ``sessions`` and
            ``app_config.name``).
        infer_queue: the queue that runs the inference.

    Returns:
        An ``async`` FastAPI endpoint with MONAI Label's parameters (``model``, ``image``, ``session_id``,
        ``params``, ``file``, ``label``, ``output``) and its authentication dependency.
    """

    def run(
        model: str, image: str, session_id: str, options: dict[str, Any], upload: UploadFile | None, dicom_seg: bool
    ) -> Any:
        saved = None
        try:
            request: dict[str, Any] = {**options, "model": model, "image": image}
            if dicom_seg:
                request[DICOM_SEG_REQUEST_KEY] = True
            if upload is not None:
                saved = _save_upload(upload)
                request[SERVER_IMAGE_KEY] = ServerImage(saved, "upload")
            elif session_id:
                sessions = app.sessions()
                session = sessions.get_session(session_id) if sessions else None
                if session is None:
                    raise RequestError(404, "session not found (it may have expired)")
                request[SERVER_IMAGE_KEY] = ServerImage(str(session.image), "session")
            return app.infer(request)
        finally:
            _remove(saved)

    async def infer_endpoint(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: ResultType | None = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ) -> Any:
        try:
            served = app.served_models()
            if model not in served:
                raise RequestError(404, f"no model {model[:64]!r}: this server serves {', '.join(map(repr, served))}")
            options = parse_params(params)
            dicom_seg = output == ResultType.dicom_seg
            if dicom_seg and (file or session_id):
                raise RequestError(400, "output=dicom_seg needs a DICOM series of the datastore (image=<id>)")
            if not (file or image or session_id):
                raise RequestError(400, "name a datastore image (image=<id>), a session_id, or upload a file")
            future = infer_queue.submit(run, model, image, session_id, options, file if file else None, dicom_seg)
            result = await asyncio.wrap_future(future)
        except RequestError as err:
            raise HTTPException(status_code=err.status, detail=err.message) from None
        except QueueFull as err:
            raise HTTPException(
                status_code=503,
                detail=f"the AE-FLOW queue is full ({err}): try again later",
                headers={"Retry-After": "30"},
            ) from None
        background_tasks.add_task(_remove, result.get("dicom_seg"))
        try:
            return send_response(app.datastore(), result, output.value if output else None, background_tasks)
        except BaseException:
            _remove(result.get("file"))
            _remove(result.get("dicom_seg"))
            raise

    return infer_endpoint


def install_infer_route(server: FastAPI, endpoint: Callable[..., Any]) -> None:
    """Replace MONAI Label's ``POST /infer/{model}`` route of a running server by ``endpoint``.

    Args:
        server: MONAI Label's FastAPI application (``monailabel.app.app``).
        endpoint: the endpoint from :func:`make_infer_endpoint`.
    """
    path = f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}"
    server.add_api_route(path, endpoint, methods=["POST"], summary="Run AE-FLOW inference on a datastore image")
    # routes match in order: put this one before MONAI Label's routers (FastAPI may keep those as one entry each)
    routes = server.router.routes
    routes.insert(0, routes.pop())
    server.openapi_schema = None
    logger.info(f"AE-FLOW app serves POST {path} (datastore ids only, inference off the event loop)")
