"""Test harness: a MONAI Label server on this machine in a subprocess, talked to as a client does.

For the tests and ``benchmarks/bench_label.py``; not part of the library. :class:`LocalLabelServer` starts
``monailabel start_server`` (as ``python -m monailabel.main``, which is what the ``monailabel`` console script runs)
on a free loopback port, waits for ``/info/``, sends ``POST /infer/<model>`` requests and stops the whole process
group.

Example::

    with LocalLabelServer("apps/aeflow_label", "studies/", {"model": "runs/brats/model.pt"}) as server:
        server.wait_ready()
        label_bytes, result = server.infer("aeflow", "BraTS2021_00000_flair")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

__all__ = ["LocalLabelServer", "free_port", "parse_infer_response"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now.

    Args:
        host: the address to bind.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def parse_infer_response(response: requests.Response) -> tuple[bytes | None, dict[str, Any]]:
    """Split the answer of ``POST /infer/<model>`` into the label file's bytes and the result JSON.

    MONAI Label answers ``multipart/form-data`` with a ``params`` part (JSON) and an ``image`` part (the label
    file), or plain JSON when there is no label file.

    Args:
        response: the HTTP response (status 200).

    Returns:
        ``(label bytes or None, result dict)``.
    """
    if not response.headers.get("content-type", "").startswith("multipart/"):
        return None, response.json()
    label: bytes | None = None
    params: dict[str, Any] = {}
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        else:
            label = part.content
    return label, params


class LocalLabelServer:
    """``monailabel start_server`` for one app on a loopback port, in its own process group.

    Args:
        app_dir: the app folder (``monailabel`` creates ``bin``, ``lib``, ``logs`` and ``model`` in it).
        studies: the studies folder, or the address of a DICOMweb server.
        conf: ``--conf KEY VALUE`` options of the app.
        host: address to serve on (loopback by default).
        port: port (default: a free one).
        log_file: where the server's output goes (default: a temporary file).
        env: extra environment variables of the server process.
    """

    def __init__(
        self,
        app_dir: str | os.PathLike,
        studies: str | os.PathLike,
        conf: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_file: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.app_dir = Path(app_dir)
        self.studies = str(studies)  # a folder or a DICOMweb address (a Path would fold its "//")
        self.conf = {str(k): str(v) for k, v in dict(conf or {}).items()}
        self.host = host
        self.port = int(port) if port else free_port(host)
        if log_file is None:
            fd, name = tempfile.mkstemp(prefix="monailabel_", suffix=".log")
            os.close(fd)
            log_file = name
        self.log_file = Path(log_file)
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Base address of the server."""
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(self.app_dir)]
        cmd += ["--studies", str(self.studies), "--host", self.host, "--port", str(self.port)]
        for key, value in self.conf.items():
            cmd += ["--conf", key, value]
        return cmd

    def start(self) -> LocalLabelServer:
        """Start the server process (returns at once; see :meth:`wait_ready`)."""
        env = {**os.environ, **self.env}
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.app_dir,
                env=env,
                start_new_session=True,
            )
        return self

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output."""
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 240.0, poll: float = 0.5) -> dict[str, Any]:
        """Wait until ``GET /info/`` answers.

        Args:
            timeout: seconds to wait.
            poll: seconds between attempts.

        Returns:
            The ``/info/`` JSON.

        Raises:
            RuntimeError: the server exited or did not answer in time (with the end of its output).
        """
        if self.process is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"MONAI Label server exited with code {code}:\n{self.log_tail()}")
            try:
                res = requests.get(f"{self.url}/info/", timeout=5)
                if res.status_code == 200:
                    return res.json()
            except requests.RequestException:
                pass
            time.sleep(poll)
        raise RuntimeError(f"MONAI Label server did not answer /info/ within {timeout} s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the server process to end by itself; returns its exit code, None if it still runs."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def infer(
        self, model: str, image: str, params: Mapping[str, Any] | None = None, timeout: float = 600.0
    ) -> tuple[bytes | None, dict[str, Any]]:
        """``POST /infer/<model>?image=<id>`` as a MONAI Label client sends it.

        Args:
            model: the infer task's name.
            image: the datastore image id.
            params: request options (sent as the ``params`` form field).
            timeout: seconds to wait for the answer.

        Returns:
            The label file's bytes and the result JSON.

        Raises:
            requests.HTTPError: a non-200 answer.
        """
        res = requests.post(
            f"{self.url}/infer/{model}",
            params={"image": image},
            data={"params": json.dumps(dict(params or {}))},
            timeout=timeout,
        )
        res.raise_for_status()
        return parse_infer_response(res)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the server's process group: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Returns:
            The exit code (None if it was never started).
        """
        proc = self.process
        if proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()

    def __enter__(self) -> LocalLabelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
