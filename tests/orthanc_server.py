"""A real Orthanc (Debian's package) on loopback for DICOMweb tests.

HTTP on a free port with authentication on, the DICOM port off (Orthanc 1.10 cannot bind it to
loopback only), the DICOMweb plugin, storage in a temporary folder. Started and stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "tester", "orthanc-test-password"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OrthancServer:
    """One Orthanc process; :meth:`start` and :meth:`stop` may be called again (same storage)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        storage = folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "medvae-retrieval-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_source(self) -> str:
        return f"dicomweb+{self.url}/dicom-web"

    def start(self) -> OrthancServer:
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def discard(self) -> None:
        """End a server whose storage the test no longer needs: SIGKILL, no ~2.5 s graceful shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Shut the server down as an operator would (SIGTERM), keeping its storage for a restart."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def upload(self, *paths: Path) -> list[str]:
        """``POST /instances`` each file; returns Orthanc's statuses (``Success``, ``AlreadyStored``)."""
        statuses = []
        for path in paths:
            response = httpx.post(f"{self.url}/instances", content=Path(path).read_bytes(), auth=(USER, PASSWORD),
                                  timeout=30)
            response.raise_for_status()
            statuses.append(response.json()["Status"])
        return statuses
