"""What a MONAI Label client may ask of the AE-FLOW app: datastore ids only, and a checked ``params`` object.

A client names an image by its datastore id; it never names a file of the server. The functions here turn a
request's untrusted parts into values the app can use, or raise :class:`RequestError` with an HTTP status and a
one-line reason:

- :func:`parse_params`: the ``params`` form field must be a JSON object; only the keys of :data:`PARAM_TYPES`
  are kept (type-checked), others are dropped, and ``image`` is refused (a path or id belongs in the query);
- :func:`resolve_image`: a datastore id to the datastore's own file. Anything else (a path, an unknown id, an id
  with a path separator) gets the same 404 answer, so the server is no oracle for which files exist;
- :func:`resolve_brain_mask`: a label tag of the same datastore image to the datastore's file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IMAGE_NOT_FOUND",
    "PARAM_TYPES",
    "RequestError",
    "SERVER_IMAGE_KEY",
    "ServerImage",
    "is_safe_id",
    "is_safe_tag",
    "parse_params",
    "resolve_brain_mask",
    "resolve_image",
]

logger = logging.getLogger(__name__)

SERVER_IMAGE_KEY = "aeflow_server_image"
"""Request key of a :class:`ServerImage` (set only by the app's own endpoint; a client's value is ignored)."""
IMAGE_NOT_FOUND = "image not found in the datastore: name a datastore image by its id (GET /datastore/?output=all)"
_MAX_ID = 512
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class RequestError(Exception):
    """A request the app refuses: ``status`` is the HTTP status, the message a one-line reason for the client.

    Args:
        status: HTTP status code (400, 404, 503, ...).
        message: the reason, one line.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = " ".join(str(message).split())


@dataclass(frozen=True)
class ServerImage:
    """An image file the server itself created for this request (an upload or a session), never a client's path.

    A JSON ``params`` object cannot produce an instance of this class, so a request that carries one was built by
    the app's own endpoint.

    Args:
        path: the server-side file.
        origin: ``"upload"`` or ``"session"`` (for the log).
    """

    path: str
    origin: str


def is_safe_id(value: Any) -> bool:
    """Whether ``value`` can be a datastore image id: a non-empty string that cannot be read as a path.

    Ids are file names without their extension (local datastore) or series instance UIDs (DICOMweb), so any
    character but a path separator or NUL is allowed; ``.`` and ``..`` are not ids.

    Args:
        value: the client's value.

    Returns:
        True when it may be looked up in the datastore.
    """
    if not isinstance(value, str) or not value or len(value) > _MAX_ID:
        return False
    if value in (".", "..") or any(c in value for c in ("/", "\\", "\x00")):
        return False
    return os.sep not in value and (os.altsep is None or os.altsep not in value)


def is_safe_tag(value: Any) -> bool:
    """Whether ``value`` is a label tag (a folder name of the datastore): letters, digits, ``_``, ``.``, ``-``.

    Args:
        value: the client's value.

    Returns:
        True for a tag that cannot leave the datastore's label folder.
    """
    return isinstance(value, str) and bool(_TAG.match(value)) and ".." not in value


def _check_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RequestError(400, f"params.{key} must be true or false, not {json.dumps(value)[:40]}")


def _check_tag(key: str, value: Any) -> str:
    if not is_safe_tag(value):
        raise RequestError(
            400, f"params.{key} must be a datastore label tag (letters, digits, '_', '.', '-'), not a path"
        )
    return value


def _check_timeout(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 86400:
        raise RequestError(400, f"params.{key} must be a number of seconds between 0 and 86400")
    return float(value)


def _check_level(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in _LOG_LEVELS:
        raise RequestError(400, f"params.{key} must be one of {', '.join(_LOG_LEVELS)}")
    return value.upper()


def _check_client(key: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise RequestError(400, f"params.{key} must be a string of at most 256 characters")
    return value


PARAM_TYPES = {
    "brain_mask": _check_tag,
    "label_tag": _check_tag,
    "save_label": _check_bool,
    "timeout": _check_timeout,
    "logging": _check_level,
    "client_id": _check_client,
}
"""The ``params`` keys the app reads, with their checks; every other key is dropped."""


def parse_params(text: str | bytes | None) -> dict[str, Any]:
    """Parse and check the ``params`` form field of ``POST /infer/<model>``.

    Args:
        text: the field as sent (a JSON object; empty or missing means ``{}``).

    Returns:
        The checked options: only the keys of :data:`PARAM_TYPES`.

    Raises:
        RequestError: 400 when it is not a JSON object, names an ``image``, or holds a value of the wrong type.
    """
    if text is None:
        return {}
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}"
        raise RequestError(400, f"params is not valid JSON: {err.msg} at {where}") from None
    except RecursionError:  # thousands of nested brackets
        raise RequestError(400, "params is nested too deeply: expected a flat JSON object of options") from None
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise RequestError(400, f"params must be a JSON object, not {kind}")
    if "image" in value:
        raise RequestError(400, "params.image is not accepted: name the datastore image with the query image=<id>")
    checked: dict[str, Any] = {}
    for key, item in value.items():
        check = PARAM_TYPES.get(key)
        if check is None:
            logger.debug("dropping request option %r", key)
            continue
        checked[key] = check(key, item)
    return checked


def resolve_image(datastore: Any, image_id: Any) -> str:
    """The datastore's file (or DICOM folder) of the image ``image_id``.

    Args:
        datastore: the app's MONAI Label datastore.
        image_id: the client's id.

    Returns:
        The path the datastore gives for the id.

    Raises:
        RequestError: 404 with the same message for every id the datastore does not hold, paths included.
    """
    if not is_safe_id(image_id):
        raise RequestError(404, IMAGE_NOT_FOUND)
    try:
        uri = datastore.get_image_uri(image_id)
    except Exception as err:  # a DICOMweb datastore raises for an unknown series: same answer as any unknown id
        logger.debug("datastore has no image %r: %s", image_id, err)
        raise RequestError(404, IMAGE_NOT_FOUND) from None
    if not uri or not isinstance(uri, str) or not os.path.exists(uri):
        raise RequestError(404, IMAGE_NOT_FOUND)
    return uri


def resolve_brain_mask(datastore: Any, image_id: str, tag: Any) -> str:
    """The datastore's file of the label ``tag`` of image ``image_id``, used as its brain mask.

    Args:
        datastore: the app's MONAI Label datastore.
        image_id: a datastore image id (already resolved by :func:`resolve_image`).
        tag: the label tag that holds the brain mask.

    Returns:
        The label file's path.

    Raises:
        RequestError: 400 for a tag that is not a tag, 404 when the image has no label of that tag.
    """
    _check_tag("brain_mask", tag)
    message = f"the image has no label with tag {tag!r} to use as brain_mask"
    try:
        uri = datastore.get_label_uri(image_id, tag)
    except Exception:
        raise RequestError(404, message) from None
    if not uri or not os.path.exists(uri):
        raise RequestError(404, message)
    return uri
