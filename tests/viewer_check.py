"""What OHIF draws for the app's SEGs: run inside its own network namespace by ``test_viewer.py``.

``python tests/viewer_check.py INPUT OUTPUT RESULTS`` starts Orthanc (DICOMweb) and the viewer on
127.0.0.1, loads the source series, the SEGs and the SRs, plus a copy of the most anomalous
flagged series' binary SEG with its frames blanked (new UIDs: the negative control). For that
flagged SEG, the blanked copy and one unflagged series' SEG it opens the viewer on the SEG,
accepts loading it, shows the source image of the SEG's fullest frame, and compares the pixels
drawn in the anomaly's colour (the image is grey) with where that frame's marked pixels fall on
the canvas (count and Dice overlap); the blanked copy and the unflagged SEG must draw nothing.
It also opens the flagged study's key-slice SR and measures how much of its first finding's
rectangle is drawn (green) where the SR puts it, and of the same rectangle moved where no
outline or label of that slice can be (the control). It writes
``RESULTS/result.json`` and one screenshot per case; every browser request that does not go to
127.0.0.1 is refused. Stops everything it started.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from codegraph3d_research.viewer.__main__ import dicomweb_orthanc
from codegraph3d_research.viewer.ohif import ensure_ohif
from codegraph3d_research.viewer.results import Finding, load_into, read_findings
from codegraph3d_research.viewer.server import ViewerServer

#: A pixel is drawn in colour when its channels differ by more than this (grey: 0).
CHROMA = 40
#: Seconds allowed for the viewer to show a series and list its segmentation.
LOAD_TIMEOUT_S = 90

_VIEWPORT_JS = """
const engines = window.cornerstone ? window.cornerstone.getRenderingEngines() : [];
const viewports = engines.length ? engines[0].getViewports() : [];
return viewports.length ? viewports[0] : null;
"""
_STATE_JS = """
const vp = (function () {""" + _VIEWPORT_JS + """})();
const seg = window.services && window.services.segmentationService;
return {images: vp && vp.getImageIds ? vp.getImageIds().length : 0,
        segmentations: seg ? seg.getSegmentations().length : 0};
"""
_SHOW_JS = """
const vp = (function () {""" + _VIEWPORT_JS + """})();
const ids = vp.getImageIds();
const index = ids.findIndex(id => id.includes('/instances/' + arguments[0] + '/'));
const target = index >= 0 ? index : Math.floor(ids.length / 2);
await vp.setImageIdIndex(target);
vp.render();
const data = vp.getImageData();
const at = (i, j) => vp.worldToCanvas(data.imageData.indexToWorld([i, j, 0]));
const o = at(0, 0), c = at(1, 0), r = at(0, 1);
return {index: target, found: index >= 0, zoom: Math.hypot(c[0] - o[0], c[1] - o[1]),
        origin: o, column_step: [c[0] - o[0], c[1] - o[1]], row_step: [r[0] - o[0], r[1] - o[1]],
        ratio: window.devicePixelRatio || 1};
"""


def fullest_frame(seg_path: Path) -> tuple[str | None, np.ndarray | None]:
    """The source SOP Instance UID of the SEG frame with most marked pixels, and that frame.

    Only frames that start on a byte boundary are candidates: OHIF 3.13.2 misplaces the pixels
    of BINARY frames that start inside a byte (rows x columns not a multiple of 8; docs/VIEWER.md).
    """
    seg = pydicom.dcmread(seg_path)
    n_frames = int(getattr(seg, "NumberOfFrames", 0))
    if n_frames == 0 or "PixelData" not in seg:
        return None, None
    frames = seg.pixel_array.reshape(n_frames, int(seg.Rows), int(seg.Columns))
    size = int(seg.Rows) * int(seg.Columns)
    aligned = [k for k in range(n_frames) if (k * size) % 8 == 0]
    best = max(aligned, key=lambda k: int((frames[k] > 0).sum()))
    groups = seg.PerFrameFunctionalGroupsSequence[best]
    source = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    return str(source), frames[best] > 0


def expected_overlay(mask: np.ndarray, shown: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """Where ``mask`` (rows x columns) falls on the viewport canvas (``shape``: height x width)."""
    ratio = float(shown["ratio"])
    steps = np.array([shown["column_step"], shown["row_step"]], dtype=float).T * ratio  # canvas = origin + steps @ (col, row)
    origin = np.asarray(shown["origin"], dtype=float) * ratio
    v, u = np.mgrid[0 : shape[0], 0 : shape[1]]
    index = np.linalg.solve(steps, np.stack([u.ravel() + 0.5 - origin[0], v.ravel() + 0.5 - origin[1]]))
    col, row = np.floor(index + 0.5).astype(int)  # image index k covers [k - 0.5, k + 0.5)
    inside = (col >= 0) & (col < mask.shape[1]) & (row >= 0) & (row < mask.shape[0])
    out = np.zeros(col.shape, dtype=bool)
    out[inside] = mask[row[inside], col[inside]]
    return out.reshape(shape)


def blanked_copy(seg_path: Path, folder: Path) -> Path:
    """The SEG with every frame set to 0, as a new series and instance of the same study."""
    seg = pydicom.dcmread(seg_path)
    seg.PixelData = bytes(len(seg.PixelData))
    seg.SeriesInstanceUID = generate_uid()
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.SeriesDescription = "blanked control"
    seg.SeriesNumber = 9911
    path = folder / "blanked_seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path


def browser() -> webdriver.Chrome:
    """Headless Debian chromium, software WebGL, every host but 127.0.0.1 unresolvable."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1400,900", "--use-gl=swiftshader",
                     "--enable-unsafe-swiftshader", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    # The onboarding tour would cover the image.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
        "source": "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"})
    return driver


def wait_loaded(driver: webdriver.Chrome) -> dict[str, int]:
    """Poll until the viewport holds images and, for up to 20 s more, a segmentation is listed.

    Bounded by :data:`LOAD_TIMEOUT_S`; an empty SEG may never be listed (OHIF skips SEGs
    without marked pixels), which the caller reports rather than waits for.
    """
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    state: dict[str, int] = {}
    images_since = None
    while time.monotonic() < deadline:
        state = driver.execute_script(_STATE_JS)
        if state["images"] and state["segmentations"]:
            return state
        if state["images"]:
            images_since = images_since or time.monotonic()
            if time.monotonic() - images_since > 20:
                return state
        time.sleep(1)
    raise TimeoutError(f"the viewer did not show the series in {LOAD_TIMEOUT_S} s: {state}")


def accept_segmentation(driver: webdriver.Chrome) -> bool:
    """Answer the viewer's "open this segmentation?" prompt with Yes, if it asks."""
    for _ in range(10):
        try:
            # The viewer re-renders while it loads: a button found may be gone when it is read or
            # clicked, so look again rather than fail.
            buttons = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Yes"]
            if buttons:
                buttons[0].click()
                time.sleep(3)
                return True
        except StaleElementReferenceException:
            pass
        time.sleep(0.5)
    return False


def drawn_pixels(png: bytes) -> np.ndarray:
    """Pixels drawn in the anomaly's colour: red over blue by more than :data:`CHROMA`.

    The image is grey (R = G = B); yellow and red overlays raise R over B; the viewer's own
    marks on the canvas (orientation letters, the active border, icons) are grey or blue.
    """
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    return (rgb[..., 0] - rgb[..., 2]) > CHROMA


def look(driver: webdriver.Chrome, base: str, finding: Finding, shot: Path, *, seg: Path | None = None,
         frame_from: Path | None = None) -> dict[str, Any]:
    """Open the viewer on a SEG of ``finding``'s study (its own binary SEG unless ``seg``), show
    the source image of the fullest frame (of ``frame_from``'s SEG if given), compare what is drawn."""
    seg = seg or finding.seg_binary
    assert seg is not None
    source_uid, mask = fullest_frame(frame_from or seg)
    if frame_from is not None and mask is not None:
        mask = np.zeros_like(mask)  # the blanked copy marks nothing on that frame
    seg_uid = str(pydicom.dcmread(seg, stop_before_pixels=True).SeriesInstanceUID)
    driver.get(base + Finding(**{**finding.__dict__, "seg_series_instance_uid": seg_uid}).viewer_path())
    try:
        state = wait_loaded(driver)
    except TimeoutError as error:
        driver.save_screenshot(str(shot))  # the whole page, to see what the viewer shows instead
        return {"series": f"{finding.patient_id} {finding.description}", "seg": seg.name, "error": str(error),
                "screenshot": shot.name}
    prompted = accept_segmentation(driver)
    shown = driver.execute_script(_SHOW_JS, source_uid or "")
    time.sleep(2)
    canvas = driver.execute_script("return (function () {" + _VIEWPORT_JS + "})().canvas;")
    png = canvas.screenshot_as_png
    shot.write_bytes(png)
    drawn = drawn_pixels(png)
    expected = expected_overlay(mask, shown, drawn.shape) if mask is not None else np.zeros_like(drawn)
    overlap = int((drawn & expected).sum())
    dice = 2 * overlap / max(1, int(drawn.sum() + expected.sum()))
    return {"series": f"{finding.patient_id} {finding.description}", "seg": seg.name, "prompted": prompted,
            "segmentation_listed": bool(state["segmentations"]),
            "frame_shown": shown["found"], "frame_marked_pixels": int(mask.sum()) if mask is not None else 0,
            "zoom": shown["zoom"], "expected_pixels": int(expected.sum()), "drawn_pixels": int(drawn.sum()),
            "dice": dice, "screenshot": shot.name}


def green_pixels(png: bytes) -> np.ndarray:
    """Pixels drawn in OHIF's colour for SR measurements: green over red and blue by :data:`CHROMA`."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    return (rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2])) > CHROMA


def outline_coverage(green: np.ndarray, corners: np.ndarray, reach: int = 3) -> float:
    """Fraction of points along a closed polyline (canvas pixels) with a green pixel within ``reach``."""
    points = np.concatenate([np.linspace(a, b, 50, endpoint=False) for a, b in zip(corners[:-1], corners[1:])])
    hits = 0
    for x, y in np.round(points).astype(int):
        window = green[max(0, y - reach): y + reach + 1, max(0, x - reach): x + reach + 1]
        hits += bool(window.any())
    return hits / len(points)


def key_slice_regions(sr_path: Path) -> tuple[str, list[np.ndarray]]:
    """The image of the key-slice SR's first (largest) finding and the (column, row) polylines of
    every finding drawn on that image, the first one's first."""
    import highdicom as hd

    groups = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(sr_path)]).get_planar_roi_measurement_groups()
    images = [str(g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for g in groups]
    return images[0], [np.asarray(g.roi.value) for g, image in zip(groups, images) if image == images[0]]


def control_place(rectangles: list[np.ndarray], size: tuple[int, int]) -> np.ndarray | None:
    """The first rectangle's corners moved where no outline or label of ``rectangles`` can be.

    Candidates: mirrored through the canvas centre, then moved by its size plus a margin left,
    right, up or down; kept if it lies on the canvas and clear of every rectangle's box widened
    by 30 px (250 px to the right and 80 px below, where OHIF writes the labels).
    """
    width, height = size
    first = rectangles[0]
    extent = first.max(axis=0) - first.min(axis=0)
    centre = np.array([width, height], dtype=float) / 2
    candidates = [2 * centre - first] + [first + np.array(shift) for shift in (
        (-(extent[0] + 300), 0), (extent[0] + 300, 0), (0, -(extent[1] + 120)), (0, extent[1] + 120))]
    for candidate in candidates:
        low, high = candidate.min(axis=0), candidate.max(axis=0)
        if (low < 0).any() or high[0] >= width or high[1] >= height:
            continue
        clear = all(high[0] < r[:, 0].min() - 30 or low[0] > r[:, 0].max() + 250
                    or high[1] < r[:, 1].min() - 30 or low[1] > r[:, 1].max() + 80 for r in rectangles)
        if clear:
            return candidate
    return None


def look_key_slices(driver: webdriver.Chrome, base: str, finding: Finding, sr_path: Path, shot: Path) -> dict[str, Any]:
    """Open the viewer on the study's key-slice SR and check the first finding's rectangle is drawn
    on its key slice where the SR puts it; the same rectangle moved across the image is the control."""
    image_uid, polylines = key_slice_regions(sr_path)
    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    driver.get(f"{base}/viewer?StudyInstanceUIDs={sr.StudyInstanceUID}&initialSeriesInstanceUID={sr.SeriesInstanceUID}")
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not driver.execute_script(_STATE_JS)["images"]:
        if time.monotonic() > deadline:
            driver.save_screenshot(str(shot))
            return {"error": f"the viewer showed no image in {LOAD_TIMEOUT_S} s", "screenshot": shot.name}
        time.sleep(1)
    time.sleep(5)  # the SR's annotations are drawn after the image
    for button in driver.find_elements(By.TAG_NAME, "button"):
        if button.text.strip() == "No":  # "continue tracking measurements?": keep the SR's read-only view
            button.click()
            time.sleep(2)
            break
    shown = driver.execute_script(_SHOW_JS, image_uid)
    time.sleep(2)
    canvas = driver.execute_script("return (function () {" + _VIEWPORT_JS + "})().canvas;")
    png = canvas.screenshot_as_png
    shot.write_bytes(png)
    green = green_pixels(png)
    ratio = float(shown["ratio"])
    steps = np.array([shown["column_step"], shown["row_step"]], dtype=float).T * ratio
    origin = np.asarray(shown["origin"], dtype=float) * ratio
    # SCOORD (0, 0) is the top left corner of the top left pixel; canvas positions are of centres.
    rectangles = [origin + (polyline - 0.5) @ steps.T for polyline in polylines]
    control = control_place(rectangles, (green.shape[1], green.shape[0]))
    return {"series": f"{finding.patient_id}", "sr": sr_path.name, "frame_shown": shown["found"],
            "rectangle_canvas": rectangles[0].round(1).tolist(), "coverage": outline_coverage(green, rectangles[0]),
            "control_canvas": None if control is None else control.round(1).tolist(),
            "control_coverage": None if control is None else outline_coverage(green, control),
            "green_pixels": int(green.sum()), "screenshot": shot.name}


def key_slice_sr(output: Path, finding: Finding) -> Path:
    """The key-slice SR of ``finding``'s study (report.json's ``sr_key_slices``)."""
    report = json.loads((output / "report.json").read_text())
    study = next(s for s in report["studies"] if s["study_instance_uid"] == finding.study_instance_uid)
    return output / study["sr_key_slices"]


def main(input_folder: Path, output: Path, results: Path) -> int:
    results.mkdir(parents=True, exist_ok=True)
    findings = read_findings(output)
    flagged = next(f for f in findings if f.flagged and f.seg_series_instance_uid)
    quiet = next(f for f in findings if not f.flagged and f.seg_series_instance_uid)
    with tempfile.TemporaryDirectory() as scratch:
        assert flagged.seg_binary is not None
        control = Path(scratch) / "control"
        control.mkdir()
        blank = blanked_copy(flagged.seg_binary, control)
        with dicomweb_orthanc(Path(scratch) / "orthanc") as orthanc:
            loaded = load_into(orthanc, [input_folder, output / "SEG", output / "SR", control])
            viewer = ViewerServer(ensure_ohif(), orthanc.url)
            viewer.start()
            driver = browser()
            try:
                cases = {
                    "flagged": look(driver, viewer.url, flagged, results / "flagged.png"),
                    "blanked": look(driver, viewer.url, flagged, results / "blanked.png", seg=blank,
                                    frame_from=flagged.seg_binary),
                    "unflagged": look(driver, viewer.url, quiet, results / "unflagged.png"),
                    "key_slices": look_key_slices(driver, viewer.url, flagged, key_slice_sr(output, flagged),
                                                  results / "key_slices.png"),
                }
            finally:
                driver.quit()
                viewer.stop()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    interfaces = [line.split(":")[1].strip() for line in links.splitlines() if line.strip()]
    (results / "result.json").write_text(json.dumps({"loaded": loaded, "cases": cases, "interfaces": interfaces}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
