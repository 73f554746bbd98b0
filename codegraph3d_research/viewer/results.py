"""Load a run's source series and results into Orthanc, and name the viewer URLs worth opening."""

from __future__ import annotations

import json
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pydicom

from codegraph3d_research.viewer.orthanc import OrthancServer


@dataclass(frozen=True)
class Finding:
    """One scored series as the report gives it, with its binary SEG's series UID and its study's
    key-slice SR's series UID (``None`` where the study has no findings)."""

    patient_id: str
    description: str
    contrast: str
    score: float
    rank: int
    flagged: bool
    study_instance_uid: str
    seg_series_instance_uid: str | None
    seg_binary: Path | None
    key_slice_sr_series_instance_uid: str | None = None

    def key_slice_path(self) -> str | None:
        """The viewer's path for this study opened on its key-slice SR (findings drawn as rectangles)."""
        if not self.key_slice_sr_series_instance_uid:
            return None
        return "/viewer?" + urlencode({"StudyInstanceUIDs": self.study_instance_uid,
                                       "initialSeriesInstanceUID": self.key_slice_sr_series_instance_uid})

    def viewer_path(self) -> str:
        """The viewer's path for this study, opened on the binary SEG (OHIF draws it only then)."""
        query = {"StudyInstanceUIDs": self.study_instance_uid}
        if self.seg_series_instance_uid:
            query["initialSeriesInstanceUID"] = self.seg_series_instance_uid
        return "/viewer?" + urlencode(query)


def read_findings(output: Path) -> list[Finding]:
    """Scored series of ``output/report.json``, highest score first.

    Raises
    ------
    FileNotFoundError
        No ``report.json`` in ``output`` (not an output folder of the app).
    """
    report_path = Path(output) / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found: give the app's output folder (it holds report.json)")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    key_slice_srs = {}
    for study in report.get("studies", []):
        sr = study.get("sr_key_slices")
        if sr and (Path(output) / sr).is_file():
            key_slice_srs[study["study_instance_uid"]] = str(
                pydicom.dcmread(Path(output) / sr, stop_before_pixels=True).SeriesInstanceUID)
    findings = []
    for series in report["series"]:
        if series.get("status") != "scored":
            continue
        seg = series.get("seg_binary")
        seg_uid = None
        if seg and (Path(output) / seg).is_file():
            seg_uid = str(pydicom.dcmread(Path(output) / seg, stop_before_pixels=True).SeriesInstanceUID)
        findings.append(Finding(
            patient_id=str(series.get("patient_id", "")), description=str(series.get("series_description", "")),
            contrast=str(series.get("contrast", "")), score=float(series["score"]), rank=int(series["rank"]),
            flagged=bool(series.get("flagged")), study_instance_uid=str(series["study_instance_uid"]),
            seg_series_instance_uid=seg_uid, seg_binary=Path(output) / seg if seg_uid else None,
            key_slice_sr_series_instance_uid=key_slice_srs.get(str(series["study_instance_uid"])),
        ))
    return sorted(findings, key=lambda f: -f.score)


def dicom_files(folder: Path) -> list[Path]:
    """Files under ``folder`` that carry a DICOM preamble (``DICM`` at byte 128)."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.stat().st_size > 132:
            with open(path, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    found.append(path)
    return found


def load_into(orthanc: OrthancServer, folders: list[Path]) -> dict[str, Any]:
    """Upload every DICOM file under ``folders``; counts of files stored and refused (with reasons)."""
    stored, refused = 0, []
    for folder in folders:
        for path in dicom_files(folder):
            try:
                orthanc.upload(path)
                stored += 1
            except urllib.error.HTTPError as error:
                refused.append(f"{path}: HTTP {error.code}")
    return {"stored": stored, "refused": refused}
