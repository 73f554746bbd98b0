"""``python -m codegraph3d_research.viewer INPUT OUTPUT``: the results in OHIF, on this machine only.

Starts a throwaway Orthanc (its own storage under a temporary folder, remote access refused, no
DICOM port) with the DICOMweb plugin, uploads the source series under INPUT and the SEGs and SRs
under OUTPUT, serves OHIF and the DICOMweb API on one 127.0.0.1 origin, prints the URL of the
most anomalous study and of each flagged series, and stops everything it started on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from codegraph3d_research.viewer.ohif import DICOMWEB_ROUTE, ensure_ohif
from codegraph3d_research.viewer.orthanc import DICOMWEB_PLUGIN, OrthancServer
from codegraph3d_research.viewer.results import Finding, load_into, read_findings
from codegraph3d_research.viewer.server import ViewerServer


def dicomweb_orthanc(workdir: Path) -> OrthancServer:
    """Orthanc with the DICOMweb plugin answering under ``/dicom-web/``."""
    if not DICOMWEB_PLUGIN.is_file():
        raise FileNotFoundError(f"{DICOMWEB_PLUGIN} not found: apt-get install orthanc-dicomweb")
    return OrthancServer(workdir, name="codegraph3d-viewer", settings={
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROUTE + "/", "EnableWado": True, "Ssl": False},
    })


def print_urls(base: str, findings: list[Finding]) -> None:
    """The most anomalous study first, then every flagged series (flagged ones are marked)."""
    if not findings:
        print("no scored series in the report: nothing to show")
        return
    top = findings[0]
    print(f"most anomalous: {top.patient_id} {top.description} ({top.contrast}), score {top.score:.3f}, "
          f"{'FLAGGED' if top.flagged else 'not flagged'}")
    print(f"  {base}{top.viewer_path()}")
    for finding in findings:
        if finding.flagged and finding is not top:
            print(f"flagged: {finding.patient_id} {finding.description} ({finding.contrast}), score {finding.score:.3f}")
            print(f"  {base}{finding.viewer_path()}")
    shown = set()
    for finding in findings:
        path = finding.key_slice_path()
        if path and finding.study_instance_uid not in shown:
            shown.add(finding.study_instance_uid)
            print(f"findings on key slices (SR): {finding.patient_id}")
            print(f"  {base}{path}")
    print(f"study list: {base}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="view_results", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="the DICOM folder the app read")
    parser.add_argument("output", type=Path, help="the app's output folder (report.json, SEG/, SR/)")
    parser.add_argument("--port", type=int, default=8000, help="viewer port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--ohif", type=Path, default=None, help="unpacked OHIF folder (default: fetched once)")
    args = parser.parse_args(argv)
    if not args.input.is_dir():
        parser.error(f"{args.input} is not a folder: give the DICOM folder the app read")
    findings = read_findings(args.output)
    ohif_folder = ensure_ohif(args.ohif)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="codegraph3d-viewer-") as scratch:
        with dicomweb_orthanc(Path(scratch)) as orthanc:
            loaded = load_into(orthanc, [args.input, args.output / "SEG", args.output / "SR"])
            print(f"loaded {loaded['stored']} DICOM files into Orthanc (pid {orthanc.pid})")
            for line in loaded["refused"][:10]:
                print(f"refused: {line}", file=sys.stderr)
            try:
                viewer = ViewerServer(ohif_folder, orthanc.url, port=args.port)
            except OSError as error:
                print(f"cannot listen on 127.0.0.1:{args.port} ({error.strerror}): pass --port N "
                      f"(0 picks a free port)", file=sys.stderr)
                return 2
            viewer.start()
            try:
                print_urls(viewer.url, findings)
                print("Ctrl-C stops the viewer and Orthanc.")
                stop.wait()
            except KeyboardInterrupt:
                pass
            finally:
                viewer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
