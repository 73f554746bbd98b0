"""One origin for the viewer and its DICOMweb API: OHIF's files, and ``/dicom-web`` forwarded to Orthanc.

Orthanc 1.10 sends no CORS headers, so the viewer must load its images from its own origin; OHIF
is a single-page application, so every path that is not a file is answered with ``index.html``
(its router reads the path). The server binds 127.0.0.1 only.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from codegraph3d_research.viewer.ohif import DICOMWEB_ROUTE, app_config
from codegraph3d_research.viewer.orthanc import LOOPBACK

#: Request headers passed on to Orthanc (the rest, cookies included, are not).
_FORWARDED = ("Accept", "Content-Type", "Range")
#: Response headers passed back.
_RETURNED = ("Content-Type", "Content-Length", "Content-Range", "Accept-Ranges")


class _Handler(SimpleHTTPRequestHandler):
    """Static files with an ``index.html`` fallback; ``/dicom-web/...`` forwarded to Orthanc."""

    def __init__(self, *args: Any, orthanc_url: str, config_js: bytes, **kwargs: Any) -> None:
        self.orthanc_url = orthanc_url
        self.config_js = config_js
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # the viewer makes hundreds of requests per study; errors still reach the browser

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path.startswith(DICOMWEB_ROUTE + "/") or path == DICOMWEB_ROUTE:
            self._forward()
        elif path == "/app-config.js":
            self._send(200, "application/javascript", self.config_js)
        elif Path(self.translate_path(path)).is_file():
            super().do_GET()
        else:
            self.path = "/index.html"
            super().do_GET()

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        headers = {name: self.headers[name] for name in _FORWARDED if self.headers.get(name)}
        request = urllib.request.Request(self.orthanc_url + self.path, headers=headers, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, reply, body = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, reply, body = error.code, error.headers, error.read()
        except urllib.error.URLError as error:
            self._send(502, "text/plain", f"Orthanc did not answer: {error.reason}".encode())
            return
        self.send_response(status)
        for name in _RETURNED:
            if reply.get(name) and name != "Content-Length":
                self.send_header(name, reply[name])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ViewerServer:
    """OHIF and the forwarded DICOMweb API on ``http://127.0.0.1:<port>``, in a background thread.

    Parameters
    ----------
    ohif_folder : pathlib.Path
        The unpacked viewer (:func:`codegraph3d_research.viewer.ohif.ensure_ohif`).
    orthanc_url : str
        Orthanc's REST root, e.g. ``http://127.0.0.1:8042``; its DICOMweb plugin answers under
        ``/dicom-web``.
    port : int, default 0
        0 picks a free port.
    """

    def __init__(self, ohif_folder: Path, orthanc_url: str, port: int = 0) -> None:
        handler = partial(
            _Handler, directory=str(ohif_folder), orthanc_url=orthanc_url.rstrip("/"),
            config_js=app_config().encode("utf-8"),
        )
        self.httpd = ThreadingHTTPServer((LOOPBACK, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="viewer", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.httpd.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
