"""A throwaway Orthanc on loopback, started and stopped by its process id.

Debian's ``Orthanc`` 1.10 cannot choose its listening address: it listens on every interface.
``RemoteAccessAllowed: false`` makes it refuse HTTP requests from anywhere but this host, and
callers that must not listen outside loopback at all (tests) run it in their own network
namespace. The configuration is private (its own storage, free ports, no authentication: only
this host can reach it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

ORTHANC_BINARY = "Orthanc"
LOOPBACK = "127.0.0.1"
#: Where Debian's ``orthanc-dicomweb`` package puts its plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def find_orthanc() -> str | None:
    """Path of the ``Orthanc`` binary: on PATH, or where the Debian package puts it."""
    found = shutil.which(ORTHANC_BINARY)
    if found is None and os.access(f"/usr/sbin/{ORTHANC_BINARY}", os.X_OK):
        found = f"/usr/sbin/{ORTHANC_BINARY}"
    return found


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


class OrthancServer:
    """An Orthanc process with its own storage, started and stopped by process id.

    Parameters
    ----------
    workdir : pathlib.Path
        Folder for the configuration, the storage and the log; created if missing.
    name : str
        The server's name (shown in its REST API).
    settings : dict, optional
        Configuration entries added to (or replacing) the defaults: HTTP on a free port, remote
        access refused, no DICOM server, no plugins.
    """

    def __init__(self, workdir: Path, name: str = "codegraph3d", settings: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.http_port = free_port()
        self.settings = dict(settings or {})
        self.log_path = self.workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("Orthanc is not running; call start() first")
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def configuration(self) -> dict[str, Any]:
        """The defaults (loopback HTTP only, no DICOM server, no plugins) updated with ``settings``."""
        return {
            "Name": self.name,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "SaveJobs": False,
            **self.settings,
        }

    def start(self, timeout_s: float = 60.0) -> None:
        """Start Orthanc and wait until its REST API answers; raise with the log if it does not."""
        binary = find_orthanc()
        if binary is None:
            raise FileNotFoundError(f"{ORTHANC_BINARY} not on PATH; install it with: apt-get install orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.configuration(), indent=2), encoding="utf-8")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on port {self.http_port} within {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """Send SIGTERM to the process id, wait, SIGKILL if it hangs; return its exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=timeout_s)

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-n_chars:] if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> Any:
        """One REST call: ``body`` sent as JSON (or ``raw`` bytes); parsed JSON or raw bytes back."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode("utf-8"))
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
            content_type = response.headers.get_content_type()
        return json.loads(payload) if content_type == "application/json" else payload

    def get(self, path: str) -> Any:
        """GET on the REST API: parsed JSON, or the raw bytes for files."""
        return self.request("GET", path)

    def find(self, level: str, query: dict[str, str]) -> list[str]:
        """Orthanc identifiers of the resources at ``level`` matching a DICOM ``query``."""
        return list(self.request("POST", "/tools/find", {"Level": level, "Query": query}))

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file (REST ``POST /instances``); Orthanc's answer (``ID``, ``Status``)."""
        return dict(self.request("POST", "/instances", raw=Path(path).read_bytes()))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
