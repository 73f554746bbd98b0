"""A PACS on loopback for the round trip test: Orthanc as the archive, pynetdicom as the gateway.

:class:`OrthancServer` starts the Debian package's ``Orthanc`` binary with a private configuration
(loopback only, free ports, its own storage folder) and stops it by its process id. :class:`Gateway`
plays the MONAI Deploy Informatics Gateway's DICOM side: a C-STORE SCP that lays the instances it
receives out as ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` with a DICOM JSON
side file ``<SOPInstanceUID>.dcm.json``, a C-MOVE SCU that asks the PACS to send it a study, and a
C-STORE SCU that exports result files back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Any, Self

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from codegraph3d.io.selection import is_valid_uid

ORTHANC_BINARY = "Orthanc"
PACS_AET = "TESTPACS"
GATEWAY_AET = "CDG3D_IG"
LOOPBACK = "127.0.0.1"


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
    """An Orthanc process on loopback with its own storage, started and stopped by process id.

    Parameters
    ----------
    workdir : pathlib.Path
        Folder for the configuration, the storage and the log; created if missing.
    gateway_port : int
        Port of the gateway's C-STORE SCP, registered as modality ``GATEWAY_AET`` (the C-MOVE target).
    """

    def __init__(self, workdir: Path, gateway_port: int) -> None:
        self.workdir = Path(workdir)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.gateway_port = gateway_port
        self.log_path = self.workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("Orthanc is not running; call start() first")
        return self.process.pid

    def configuration(self) -> dict[str, Any]:
        """Loopback only, no plugins, no authentication (nothing but this host can connect)."""
        return {
            "Name": "codegraph3d-round-trip",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": PACS_AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomModalities": {"gateway": {"AET": GATEWAY_AET, "Host": LOOPBACK, "Port": self.gateway_port}},
            "SaveJobs": False,
            "StableAge": 1,
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

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        if response.headers.get_content_type() == "application/json":
            return json.loads(payload)
        return payload

    def get(self, path: str) -> Any:
        """GET on the REST API: parsed JSON, or the raw bytes for files."""
        return self._request("GET", path)

    def find(self, level: str, query: dict[str, str]) -> list[str]:
        """Orthanc identifiers of the resources at ``level`` matching a DICOM ``query``."""
        return list(self._request("POST", "/tools/find", {"Level": level, "Query": query}))

    def instance_dataset(self, orthanc_id: str) -> Dataset:
        """The stored DICOM file of one instance, read with pydicom."""
        return pydicom.dcmread(BytesIO(self.get(f"/instances/{orthanc_id}/file")))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Gateway:
    """The gateway's DICOM side: receive into the MAP input layout, pull studies, export results.

    Parameters
    ----------
    inbox : pathlib.Path
        Where received instances go, as ``<study>/<series>/<sop>.dcm`` plus ``<sop>.dcm.json``.
    """

    def __init__(self, inbox: Path) -> None:
        self.inbox = Path(inbox)
        self.port = free_port()
        self.received: list[Path] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        uids = (dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
        if not all(is_valid_uid(str(uid)) for uid in uids):
            return 0xC000  # "cannot understand": a UID that cannot name a file is refused, not stored
        study, series, sop = (str(uid) for uid in uids)
        folder = self.inbox / study / series
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{sop}.dcm"
        dataset.save_as(target, enforce_file_format=True)
        metadata = Dataset()
        metadata.update({element.tag: element for element in dataset if element.keyword != "PixelData"})
        (folder / f"{sop}.dcm.json").write_text(metadata.to_json(), encoding="utf-8")
        with self._lock:
            self.received.append(target)
        return 0x0000

    def start(self) -> None:
        """Listen for C-STORE on loopback (the C-MOVE destination)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=GATEWAY_AET)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def store(self, pacs: OrthancServer, files: list[Path]) -> list[int]:
        """C-STORE ``files`` to the PACS in one association; the status of each, in order."""
        datasets = [pydicom.dcmread(path) for path in files]
        ae = AE(ae_title=GATEWAY_AET)
        for sop_class, syntax in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
            ae.add_requested_context(sop_class, syntax)
        association = ae.associate(LOOPBACK, pacs.dicom_port, ae_title=PACS_AET)
        if not association.is_established:
            raise ConnectionError(f"association with {PACS_AET} on port {pacs.dicom_port} refused:\n{pacs.log_tail()}")
        try:
            statuses = []
            for dataset in datasets:
                status = association.send_c_store(dataset)
                statuses.append(int(status.Status) if status else -1)
            return statuses
        finally:
            association.release()

    def move_study(self, pacs: OrthancServer, study_instance_uid: str) -> int:
        """C-MOVE one study from the PACS to this gateway; the final status (0 = success)."""
        ae = AE(ae_title=GATEWAY_AET)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        association = ae.associate(LOOPBACK, pacs.dicom_port, ae_title=PACS_AET)
        if not association.is_established:
            raise ConnectionError(f"association with {PACS_AET} on port {pacs.dicom_port} refused:\n{pacs.log_tail()}")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_instance_uid
        final = -1
        try:
            for status, _identifier in association.send_c_move(
                query, GATEWAY_AET, StudyRootQueryRetrieveInformationModelMove
            ):
                if status and int(status.Status) not in (0xFF00, 0xFF01):
                    final = int(status.Status)
        finally:
            association.release()
        return final

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
