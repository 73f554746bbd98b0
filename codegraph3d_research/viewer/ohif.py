"""The OHIF viewer's prebuilt files (npm ``@ohif/app``), fetched once and checked, and its configuration.

The npm package ships a complete production build in ``package/dist``; nothing is built here.
``npm pack`` fetches the one tarball (about 50 MB, no dependencies), its SHA-512 is compared with
the integrity the registry published for this version, and ``dist`` is unpacked into a cache
folder. The services and selectors the browser test relies on are internal to OHIF, so the
version is pinned.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
#: ``npm view @ohif/app@3.13.2 dist.integrity``
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
#: Route of the DICOMweb API on the viewer's own origin (forwarded to Orthanc's ``/dicom-web``).
DICOMWEB_ROUTE = "/dicom-web"


def default_folder() -> Path:
    """Where the unpacked viewer is kept: ``.cache/ohif-<version>`` at the repository root."""
    return Path(__file__).resolve().parents[2] / ".cache" / f"ohif-{OHIF_VERSION}"


def integrity_of(path: Path) -> str:
    """npm's ``sha512-<base64>`` integrity string of a file."""
    digest = hashlib.sha512(Path(path).read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode("ascii")


def ensure_ohif(folder: Path | None = None) -> Path:
    """The folder holding OHIF's ``index.html``: unpacked from the npm registry on first use.

    Raises
    ------
    RuntimeError
        When ``npm`` is missing or fails (no registry), or the tarball's integrity differs from
        the pinned one; nothing is left half-unpacked.
    """
    folder = Path(folder) if folder is not None else default_folder()
    if (folder / "index.html").is_file():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: install Node.js and npm (apt-get install npm) to fetch the OHIF viewer")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        spec = f"{OHIF_PACKAGE}@{OHIF_VERSION}"
        done = subprocess.run([npm, "pack", spec, "--silent"], cwd=scratch, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {spec} failed (is the npm registry reachable?):\n{done.stderr[-2000:]}")
        tarball = Path(scratch) / done.stdout.strip().splitlines()[-1]
        if integrity_of(tarball) != OHIF_INTEGRITY:
            raise RuntimeError(f"{tarball.name}: integrity {integrity_of(tarball)} is not the pinned {OHIF_INTEGRITY}")
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(scratch, members=members, filter="data")
        # Rename whole: a folder with index.html is always complete.
        (Path(scratch) / "package" / "dist").rename(folder)
    return folder


def app_config(dicomweb_route: str = DICOMWEB_ROUTE) -> str:
    """``app-config.js`` for one DICOMweb source on the viewer's own origin.

    The investigational-use dialog is switched off (the results are labelled as research
    output in the SEG and SR themselves); the rest follows OHIF's own defaults for a DICOMweb
    server that is not a static one (Orthanc's plugin answers QIDO-RS with ``includefield``).
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (codegraph3d results)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_route,
            "qidoRoot": dicomweb_route,
            "wadoRoot": dicomweb_route,
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"
