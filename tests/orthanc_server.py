"""Test harness: Orthanc (with its DICOMweb plugin) on a free loopback port, with a temporary configuration and storage.

For ``tests/test_orthanc.py`` and ``benchmarks/bench_label.py --dicom``; not part of the library.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import requests
from label_server import free_port

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
"""The Orthanc binary (Debian package ``orthanc``), or None."""
_PLUGINS = [
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")),
]
PLUGIN = next((p for p in _PLUGINS if p.exists()), None)
"""The DICOMweb plugin (Debian package ``orthanc-dicomweb``), or None."""


class LocalOrthanc:
    """Orthanc on a free loopback port with a temporary configuration and storage, in its own process group."""

    def __init__(self, root: Path) -> None:
        if ORTHANC is None or PLUGIN is None:
            raise RuntimeError(
                "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
            )
        self.root = root
        self.port = free_port()
        storage = root / "storage"
        storage.mkdir(parents=True)
        self.config = root / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "aeflow-test",
                    "StorageDirectory": str(storage),
                    "IndexDirectory": str(storage),
                    "HttpPort": self.port,
                    "DicomServerEnabled": False,
                    "DicomPort": free_port(),
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "Plugins": [str(PLUGIN)],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                }
            )
        )
        self.log = root / "orthanc.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> LocalOrthanc:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [ORTHANC, str(self.config)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log.read_text(errors='replace')[-3000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"Orthanc did not answer: {self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
