"""PACS round trip: studies in a PACS (Orthanc on loopback), pulled the way the Informatics Gateway
lays them out, scored by the real app, and the SEG and SR pushed back and checked in the PACS.

Needs the ``Orthanc`` binary (Debian package ``orthanc``). Without it the module is skipped, unless
``CODEGRAPH3D_REQUIRE_PACS=1`` (set by CI, which installs it), where a missing binary is a failure.
Orthanc 1.10 listens on every interface, so the module runs itself again inside its own network
namespace (only loopback exists there) and the outer run checks that run; where namespaces are not
available (and not required) the tests run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from fixtures import LOOPBACK_ONLY, ROOT, TINY_VIT_CONFIG, AppRun, loopback_only_available, run_app
from pacs import PACS_AET, Gateway, OrthancServer, find_orthanc, free_port

if find_orthanc() is None:
    if os.environ.get("CODEGRAPH3D_REQUIRE_PACS") == "1":
        raise RuntimeError("CODEGRAPH3D_REQUIRE_PACS=1 but Orthanc is not installed: apt-get install orthanc")
    pytest.skip("Orthanc not installed (apt-get install orthanc) for the PACS round trip", allow_module_level=True)

_NAMESPACE_FLAG = "CODEGRAPH3D_PACS_IN_NAMESPACE"
_OUTER = os.environ.get(_NAMESPACE_FLAG) != "1" and loopback_only_available()
if not _OUTER and os.environ.get(_NAMESPACE_FLAG) != "1" and os.environ.get("CODEGRAPH3D_REQUIRE_PACS") == "1":
    raise RuntimeError("CODEGRAPH3D_REQUIRE_PACS=1 needs a network namespace (unshare --net --map-root-user, ip)")


def test_the_round_trip_runs_in_its_own_network_namespace():
    """Every other test of this module, run again where only loopback exists; all must pass there."""
    if not _OUTER:
        pytest.skip("this run is the one inside the namespace, or namespaces are not available here")
    done = subprocess.run(
        [*LOOPBACK_ONLY, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=dict(os.environ, **{_NAMESPACE_FLAG: "1"}), cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary and " passed" in summary, summary


@pytest.fixture(autouse=True)
def _inside_the_namespace(request: pytest.FixtureRequest) -> None:
    if _OUTER and request.node.name != "test_the_round_trip_runs_in_its_own_network_namespace":
        pytest.skip("run inside its own network namespace by test_the_round_trip_runs_in_its_own_network_namespace")


@dataclass
class RoundTrip:
    pacs: OrthancServer
    source_files: list[Path]
    inbox: Path
    received: list[Path]
    move_statuses: dict[str, int]
    run: AppRun
    result_files: list[Path]
    store_statuses: list[int]


@pytest.fixture(scope="module")
def round_trip(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("pacs")
    source_files = sorted((tiny_cohort / "dicom").rglob("*.dcm"))
    with Gateway(tmp / "gateway" / "dcm") as gateway:
        pacs = OrthancServer(tmp / "orthanc", gateway.port)
        pacs.start()
        try:
            # The modality sends the studies to the PACS.
            assert set(gateway.store(pacs, source_files)) == {0}, pacs.log_tail()
            # The gateway pulls each study, as a routing rule would, into the MAP input layout.
            studies = [pacs.get(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"] for sid in pacs.get("/studies")]
            move_statuses = {uid: gateway.move_study(pacs, uid) for uid in studies}
            run = run_app(gateway.inbox, tmp / "output", tmp / "models", TINY_VIT_CONFIG, tmp)
            assert run.returncode == 0, run.stderr[-3000:]
            # The gateway exports the results back to the PACS.
            result_files = sorted((run.output / "SEG").glob("*.dcm")) + sorted((run.output / "SR").glob("*.dcm"))
            store_statuses = gateway.store(pacs, result_files)
            yield RoundTrip(
                pacs, source_files, gateway.inbox, list(gateway.received), move_statuses, run, result_files,
                store_statuses,
            )
        finally:
            pacs.stop()


def test_the_pacs_stores_every_study_and_the_gateway_pulls_them_all(round_trip: RoundTrip):
    pacs = round_trip.pacs
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in round_trip.source_files]
    assert set(round_trip.move_statuses.values()) == {0}, round_trip.move_statuses
    assert len(round_trip.move_statuses) == len({d.StudyInstanceUID for d in sources}) == 6
    assert sorted(p.stem for p in round_trip.received) == sorted(str(d.SOPInstanceUID) for d in sources)
    assert pacs.get("/statistics")["CountStudies"] == 6


def test_received_instances_are_laid_out_as_the_informatics_gateway_does(round_trip: RoundTrip):
    """``<study>/<series>/<sop>.dcm`` with a DICOM JSON side file holding everything but the pixels."""
    for path in round_trip.received:
        dataset = pydicom.dcmread(path)
        assert path.relative_to(round_trip.inbox).parts == (
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID, f"{dataset.SOPInstanceUID}.dcm"
        )
        side = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
        assert side["00080018"]["Value"] == [dataset.SOPInstanceUID]
        assert "7FE00010" not in side
    assert not round_trip.run.report["bad_files"]  # side files are not mistaken for broken DICOM


def test_every_study_from_the_pacs_is_scored(round_trip: RoundTrip, tiny_cohort: Path):
    labels = json.loads((tiny_cohort / "labels.json").read_text())
    expected = {s["series_instance_uid"] for study in labels["studies"] for s in study["series"]}
    scored = {row["series_instance_uid"] for row in round_trip.run.report["series"] if row["status"] == "scored"}
    assert scored == expected


def test_the_pacs_accepts_every_seg_and_sr(round_trip: RoundTrip):
    report = round_trip.run.report
    assert round_trip.store_statuses == [0] * len(round_trip.result_files)
    scored = sum(row["status"] == "scored" for row in report["series"])
    key_slice_srs = sum(bool(study["sr_key_slices"]) for study in report["studies"])
    # Binary + fractional SEG per series, one SR per study, a key-slice SR per study with findings.
    assert len(round_trip.result_files) == 2 * scored + len(report["studies"]) + key_slice_srs


def _study_instances(pacs: OrthancServer, study_instance_uid: str) -> dict[str, dict]:
    """SOPInstanceUID -> {series UID, modality, Orthanc id} of every instance the PACS holds in a study."""
    (study_id,) = pacs.find("Study", {"StudyInstanceUID": study_instance_uid})
    instances = {}
    for series_id in pacs.get(f"/studies/{study_id}")["Series"]:
        series = pacs.get(f"/series/{series_id}")
        for instance_id in series["Instances"]:
            tags = pacs.get(f"/instances/{instance_id}")["MainDicomTags"]
            instances[tags["SOPInstanceUID"]] = {
                "series": series["MainDicomTags"]["SeriesInstanceUID"],
                "modality": series["MainDicomTags"].get("Modality"),
                "id": instance_id,
            }
    return instances


def test_results_are_stored_under_the_source_study_with_references_the_pacs_resolves(round_trip: RoundTrip):
    """Each SEG and SR sits in its source study and patient, and every instance it references is there."""
    pacs = round_trip.pacs
    report = round_trip.run.report
    rows_by_study: dict[str, list[dict]] = {}
    for row in report["series"]:
        if row["status"] == "scored":
            rows_by_study.setdefault(row["study_instance_uid"], []).append(row)
    for study in report["studies"]:
        study_uid = study["study_instance_uid"]
        held = _study_instances(pacs, study_uid)
        modalities = Counter(entry["modality"] for entry in held.values())
        n_srs = 2 if study["sr_key_slices"] else 1
        assert modalities["SEG"] == 2 * len(rows_by_study[study_uid]) and modalities["SR"] == n_srs, modalities
        (patient_id,) = pacs.find("Patient", {"PatientID": study["patient_id"]})
        assert pacs.get(f"/instances/{next(iter(held.values()))['id']}/patient")["ID"] == patient_id

        segs = [pacs.instance_dataset(e["id"]) for e in held.values() if e["modality"] == "SEG"]
        source_series = {row["series_instance_uid"] for row in rows_by_study[study_uid]}
        assert {seg.ReferencedSeriesSequence[0].SeriesInstanceUID for seg in segs} == source_series
        for seg in segs:
            assert seg.StudyInstanceUID == study_uid and seg.PatientID == study["patient_id"]
            (reference,) = seg.ReferencedSeriesSequence
            for item in reference.ReferencedInstanceSequence:
                assert held[item.ReferencedSOPInstanceUID]["series"] == reference.SeriesInstanceUID
                assert held[item.ReferencedSOPInstanceUID]["modality"] == "MR"

        srs = [pacs.instance_dataset(e["id"]) for e in held.values() if e["modality"] == "SR"]
        evidence = {}
        for sr in srs:
            assert sr.StudyInstanceUID == study_uid
            evidence.update({
                item.ReferencedSOPInstanceUID: series.SeriesInstanceUID
                for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence
            })
        for sop_uid, series_uid in evidence.items():
            assert held[sop_uid]["series"] == series_uid  # every piece of evidence resolves in the PACS
        binary_segs = {seg.SOPInstanceUID for seg in segs if seg.SegmentationType == "BINARY"}
        assert binary_segs <= set(evidence)


def test_the_server_is_started_and_stopped_by_process_id(tmp_path: Path):
    pacs = OrthancServer(tmp_path, gateway_port=free_port())
    pacs.start()
    pid = pacs.pid
    assert pacs.get("/system")["DicomAet"] == PACS_AET
    os.kill(pid, 0)  # alive
    assert pacs.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
