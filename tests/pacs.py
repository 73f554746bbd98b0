"""A PACS on loopback for the round trip test: Orthanc as the archive, pynetdicom as the gateway.

:class:`OrthancServer` starts the Debian package's ``Orthanc`` binary with a private configuration
(free ports, its own storage folder; see :mod:`codegraph3d_research.viewer.orthanc`) and stops it by
its process id. :class:`Gateway`
plays the MONAI Deploy Informatics Gateway's DICOM side: a C-STORE SCP that lays the instances it
receives out as ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` with a DICOM JSON
side file ``<SOPInstanceUID>.dcm.json``, a C-MOVE SCU that asks the PACS to send it a study, and a
C-STORE SCU that exports result files back.
"""

from __future__ import annotations

import threading
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
from codegraph3d_research.viewer import orthanc
from codegraph3d_research.viewer.orthanc import LOOPBACK, find_orthanc, free_port

__all__ = ["GATEWAY_AET", "PACS_AET", "Gateway", "OrthancServer", "find_orthanc", "free_port"]

PACS_AET = "TESTPACS"
GATEWAY_AET = "CDG3D_IG"


class OrthancServer(orthanc.OrthancServer):
    """Orthanc as the PACS: a DICOM server on a free port that knows the gateway as a C-MOVE target.

    Parameters
    ----------
    workdir : pathlib.Path
        Folder for the configuration, the storage and the log; created if missing.
    gateway_port : int
        Port of the gateway's C-STORE SCP, registered as modality ``GATEWAY_AET``.
    """

    def __init__(self, workdir: Path, gateway_port: int) -> None:
        self.dicom_port = free_port()
        self.gateway_port = gateway_port
        super().__init__(workdir, name="codegraph3d-round-trip", settings={
            "DicomServerEnabled": True,
            "DicomAet": PACS_AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomModalities": {"gateway": {"AET": GATEWAY_AET, "Host": LOOPBACK, "Port": gateway_port}},
            "StableAge": 1,
        })

    def instance_dataset(self, orthanc_id: str) -> Dataset:
        """The stored DICOM file of one instance, read with pydicom."""
        return pydicom.dcmread(BytesIO(self.get(f"/instances/{orthanc_id}/file")))


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
