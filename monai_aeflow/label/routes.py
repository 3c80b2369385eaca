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
import functools
import inspect
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from starlette.concurrency import run_in_threadpool

from monai_aeflow.label.validation import (
    SERVER_IMAGE_KEY,
    RequestError,
    ServerImage,
    is_safe_id,
    is_safe_tag,
    parse_params,
)

DICOM_SEG_REQUEST_KEY = "aeflow_dicom_seg_output"
"""Request key set here for ``output=dicom_seg`` (never taken from a client's ``params``)."""

__all__ = ["InferQueue", "QueueFull", "install_infer_route", "install_route_guards", "make_infer_endpoint"]

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


_ID_CHECKS: dict[str, Callable[[Any], bool]] = {"image": is_safe_id, "id": is_safe_id, "label": is_safe_id}
_ID_CHECKS["tag"] = is_safe_tag

_REFUSED: tuple[tuple[str, str, int, str], ...] = (
    # (method, path under the API prefix, status, answer)
    ("PUT", "/model/{model}", 403, "the AE-FLOW app serves the model file it was started with (--conf model); it "
     "is not replaced over HTTP"),
    ("DELETE", "/model/{model}", 403, "the AE-FLOW app serves the model file it was started with (--conf model); "
     "it is not removed over HTTP"),
    ("POST", "/batch/infer/{model}", 400, "batch inference is not served by the AE-FLOW app: POST /infer/<model> "
     "for each image (aeflow-cli score scores folders)"),
)  # fmt: skip


def _checked(endpoint: Callable[..., Any], names: set[str]) -> Callable[..., Any]:
    """``endpoint`` answering 400 when one of its ``names`` parameters is not a datastore id / label tag."""

    @functools.wraps(endpoint)  # FastAPI reads the parameters of the wrapped endpoint
    async def checked(*args: Any, **kwargs: Any) -> Any:
        for name in sorted(names):
            value = kwargs.get(name)
            if isinstance(value, str) and value and not _ID_CHECKS[name](value):  # (``label`` may be the file)
                kind = "label tag" if name == "tag" else "datastore id"
                raise HTTPException(
                    status_code=400,
                    detail=f"{name} must be a {kind} (no path separators, not '.' or '..'), got {str(value)[:64]!r}",
                )
        if inspect.iscoroutinefunction(endpoint):
            return await endpoint(*args, **kwargs)
        return await run_in_threadpool(endpoint, *args, **kwargs)  # as FastAPI runs a plain endpoint

    return checked


def _refusal(status: int, detail: str) -> Callable[..., Any]:
    async def refuse(model: str) -> None:
        raise HTTPException(status_code=status, detail=detail)

    return refuse


def _api_routes(server: FastAPI) -> Iterator[tuple[str, APIRoute]]:
    """Every endpoint route of the server with the prefix it is served under (FastAPI flattens included routers
    into the application's routes, or keeps each as one entry holding its router and prefix)."""
    for entry in server.router.routes:
        if isinstance(entry, APIRoute):
            yield "", entry
            continue
        sub = getattr(entry, "original_router", None) or getattr(entry, "router", None)
        if sub is None or not hasattr(sub, "routes"):
            continue
        context = getattr(entry, "include_context", None)
        prefix = str(getattr(context, "prefix", None) or getattr(entry, "prefix", None) or "")
        for route in sub.routes:
            if isinstance(route, APIRoute):
                yield prefix, route


def _to_front(server: FastAPI) -> None:
    routes = server.router.routes
    routes.insert(0, routes.pop())


def install_route_guards(server: FastAPI) -> list[str]:
    """Guard the routes of MONAI Label that the app does not replace.

    MONAI Label 0.8.5 joins the client's ``image``, ``id``, ``label`` and ``tag`` to datastore paths unchecked
    (``PUT /datastore/?image=../x`` writes outside the studies folder, ``tag=../../x`` too), lets any client
    replace or rename the served model file (``PUT`` / ``DELETE /model/<name>``), and answers batch inference on a
    CPU server with a 500. Every ``/datastore`` route with such a parameter gets a copy that answers 400 for a value
    that is not an id or a tag (then runs MONAI Label's endpoint); the model upload and removal answer 403 and
    batch inference 400.

    Args:
        server: MONAI Label's FastAPI application (``monailabel.app.app``).

    Returns:
        The guarded routes, as ``"METHOD path"``.
    """
    api = settings.MONAI_LABEL_API_STR
    done = []
    for prefix, route in list(_api_routes(server)):
        path = prefix + route.path
        if not path.startswith(f"{api}/datastore"):
            continue
        names = set(inspect.signature(route.endpoint).parameters) & set(_ID_CHECKS)
        if not names:
            continue
        server.add_api_route(
            path,
            _checked(route.endpoint, names),
            methods=sorted(route.methods),
            summary=route.summary,
            include_in_schema=route.include_in_schema,
        )
        _to_front(server)
        done += [f"{m} {path}" for m in sorted(route.methods)]
    for method, path, status, detail in _REFUSED:
        server.add_api_route(f"{api}{path}", _refusal(status, detail), methods=[method], include_in_schema=False)
        _to_front(server)
        done.append(f"{method} {api}{path}")
    server.openapi_schema = None
    logger.info(f"AE-FLOW app guards {len(done)} MONAI Label routes (ids and tags checked; model upload refused)")
    return done
