"""The viewer's one-origin server and the results it points at, without a browser or Orthanc.

A stand-in DICOMweb server on loopback plays Orthanc; a folder with an ``index.html`` plays OHIF.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pydicom
import pytest

from codegraph3d_research.viewer.ohif import app_config, integrity_of
from codegraph3d_research.viewer.orthanc import free_port
from codegraph3d_research.viewer.results import dicom_files, read_findings
from codegraph3d_research.viewer.server import ViewerServer


class _Upstream(BaseHTTPRequestHandler):
    """Answers ``/dicom-web/...`` with what it was asked (path and Accept), 404 elsewhere."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        if not self.path.startswith("/dicom-web/"):
            self.send_error(404)
            return
        body = json.dumps({"path": self.path, "accept": self.headers.get("Accept"),
                           "cookie": self.headers.get("Cookie")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def viewer(tmp_path: Path):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    ohif = tmp_path / "ohif"
    ohif.mkdir()
    (ohif / "index.html").write_text("<html>viewer</html>")
    (ohif / "app.bundle.js").write_text("bundle")
    server = ViewerServer(ohif, f"http://127.0.0.1:{upstream.server_address[1]}")
    server.start()
    yield server
    server.stop()
    upstream.shutdown()
    upstream.server_close()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get_content_type(), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read().decode()


def test_files_the_spa_fallback_and_the_configuration(viewer: ViewerServer) -> None:
    assert viewer.url.startswith("http://127.0.0.1:")
    assert _get(viewer.url + "/app.bundle.js")[2] == "bundle"
    # Any path that is not a file is the viewer's route: index.html, whatever the query.
    assert _get(viewer.url + "/viewer?StudyInstanceUIDs=1.2.3")[2] == "<html>viewer</html>"
    status, kind, config = _get(viewer.url + "/app-config.js")
    assert status == 200 and kind == "application/javascript" and config == app_config()
    assert '"qidoRoot": "/dicom-web"' in config and '"option": "never"' in config


def test_dicomweb_is_forwarded_with_accept_and_without_cookies(viewer: ViewerServer) -> None:
    status, kind, body = _get(viewer.url + "/dicom-web/studies?limit=1",
                              {"Accept": "application/dicom+json", "Cookie": "session=secret"})
    seen = json.loads(body)
    assert status == 200 and kind == "application/dicom+json"
    assert seen == {"path": "/dicom-web/studies?limit=1", "accept": "application/dicom+json", "cookie": None}


def test_upstream_errors_and_a_missing_upstream_come_back_as_http_errors(viewer: ViewerServer, tmp_path: Path) -> None:
    assert _get(viewer.url + "/dicom-web")[0] == 404  # the stand-in's own answer, passed on
    lonely = ViewerServer(tmp_path / "ohif", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    lonely.start()
    try:
        status, _, body = _get(lonely.url + "/dicom-web/studies")
        assert status == 502 and "Orthanc did not answer" in body
    finally:
        lonely.stop()


def test_findings_are_read_from_the_report_most_anomalous_first(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="report.json"):
        read_findings(tmp_path)
    rows = [
        {"status": "scored", "patient_id": "A", "series_description": "T1", "contrast": "T1w", "score": 1.2,
         "rank": 2, "flagged": False, "study_instance_uid": "1.2.1", "seg_binary": "SEG/missing.dcm"},
        {"status": "skipped", "patient_id": "B"},
        {"status": "scored", "patient_id": "C", "series_description": "T2", "contrast": "T2w", "score": 1.9,
         "rank": 1, "flagged": True, "study_instance_uid": "1.2.2", "seg_binary": None},
    ]
    # Study 1.2.2 has a key-slice SR (any DICOM file with a series UID serves here); 1.2.1 none.
    sr = pydicom.Dataset()
    sr.SeriesInstanceUID, sr.SOPInstanceUID, sr.SOPClassUID = "1.2.2.9", "1.2.2.9.1", "1.2.840.10008.5.1.4.1.1.88.34"
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    (tmp_path / "SR").mkdir()
    sr.save_as(tmp_path / "SR" / "key.dcm", enforce_file_format=True)
    studies = [{"study_instance_uid": "1.2.2", "sr_key_slices": "SR/key.dcm"},
               {"study_instance_uid": "1.2.1", "sr_key_slices": None}]
    (tmp_path / "report.json").write_text(json.dumps({"series": rows, "studies": studies}))
    findings = read_findings(tmp_path)
    assert [f.patient_id for f in findings] == ["C", "A"]
    query = parse_qs(urlparse(findings[0].viewer_path()).query)
    assert urlparse(findings[0].viewer_path()).path == "/viewer" and query == {"StudyInstanceUIDs": ["1.2.2"]}
    key = parse_qs(urlparse(findings[0].key_slice_path()).query)
    assert key == {"StudyInstanceUIDs": ["1.2.2"], "initialSeriesInstanceUID": ["1.2.2.9"]}
    assert findings[1].key_slice_path() is None


def test_dicom_files_are_found_by_their_preamble_and_integrity_is_npms(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 8)
    (tmp_path / "a" / "notes.txt").write_bytes(b"\0" * 128 + b"TEXT" + b"\0" * 8)
    (tmp_path / "short").write_bytes(b"DICM")
    assert dicom_files(tmp_path) == [tmp_path / "a" / "x.dcm"]
    (tmp_path / "blob").write_bytes(b"abc")
    # npm's integrity of "abc": sha512, base64.
    assert integrity_of(tmp_path / "blob") == (
        "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw==")
