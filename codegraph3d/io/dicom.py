"""Header-first DICOM loading: scan a folder tree, group studies and series, load one series.

Why not the SDK's ``DICOMDataLoaderOperator``: it decodes every pixel of every file up front and
one truncated file can abort the whole load. Here

* :func:`scan_headers` reads headers only (``stop_before_pixels``), never aborts on a bad file
  (it is recorded in :attr:`ScanResult.bad_files` and logged with its path), and checks cheaply,
  from the file size, whether an image file's Pixel Data is truncated;
* :func:`chunk_studies` bounds memory for large cohorts;
* :func:`load_series_volume` decodes the pixels of one series only, sorts and validates the slices
  and returns a :class:`~codegraph3d.core.volume.Volume` plus the per-slice header datasets (in the
  volume's z order, without Pixel Data) that the DICOM-SEG writer references.

Geometry follows DICOM and :mod:`codegraph3d.core.volume`: the first ImageOrientationPatient triplet
(direction along a row, i.e. increasing column index) is the x index axis, the second (increasing
row index) the y axis; PixelSpacing is ``[row spacing (between rows, y), column spacing (x)]``;
slices are sorted by increasing position along ``row x col`` and z points from the first to the
last sorted slice.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from codegraph3d.core.volume import Volume

__all__ = [
    "SliceHeader",
    "SeriesHeader",
    "Study",
    "ScanResult",
    "LoadedSeries",
    "scan_headers",
    "chunk_studies",
    "load_series_volume",
]

logger = logging.getLogger(__name__)

#: Elements larger than this are not read during the header scan (pydicom re-reads on access).
_DEFER_SIZE = "4 KB"
#: Explicit-VR value representations whose length field is 4 bytes (after 2 reserved bytes).
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
#: Tags that carry pixel values; the scan stops right before the first of them.
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_UNDEFINED_LENGTH = 0xFFFFFFFF
_HEADER_TRUNCATED = "image file ends before its Pixel Data (truncated header)"


@dataclass(frozen=True)
class SliceHeader:
    """Header facts of one DICOM file, gathered without reading its pixels.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    sop_instance_uid, sop_class_uid : str
        SOP Instance / Class UID.
    instance_number : int or None
        InstanceNumber, when present and numeric.
    position : tuple of 3 float or None
        ImagePositionPatient (LPS mm of the centre of the first transmitted pixel).
    orientation : tuple of 6 float or None
        ImageOrientationPatient (row direction cosines, then column direction cosines).
    pixel_spacing : tuple of 2 float or None
        PixelSpacing ``(row spacing, column spacing)`` in mm.
    rows, columns : int or None
        Matrix size.
    number_of_frames : int
        NumberOfFrames (1 when absent).
    problem : str or None
        A defect found without decoding (e.g. truncated Pixel Data); the loader skips such a file
        when the remaining slices still form a valid series.
    """

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None
    number_of_frames: int = 1
    problem: str | None = None


@dataclass
class SeriesHeader:
    """One DICOM series, described by headers only.

    Series-level attributes come from the first file in path order; per-file facts are in
    :attr:`slices` (sorted by path, deterministic). Times are in milliseconds; absent values are
    ``None`` (numbers) or ``""`` (text).

    Parameters
    ----------
    study_instance_uid, series_instance_uid, patient_id, modality, series_description : str
        Identity and description of the series.
    series_number : int or None
        SeriesNumber.
    image_type : tuple of str
        ImageType values, upper case (e.g. ``("ORIGINAL", "PRIMARY", "M", "ND")``).
    echo_time, repetition_time, inversion_time : float or None
        EchoTime, RepetitionTime, InversionTime (ms).
    scanning_sequence, sequence_variant : tuple of str
        ScanningSequence / SequenceVariant values (e.g. ``("SE", "IR")``).
    sequence_name : str
        SequenceName (e.g. ``"*tfl3d1_16ns"``).
    contrast_agent : str
        ContrastBolusAgent ("" when absent).
    sop_class_uid : str
        SOP Class UID of the first file.
    frame_of_reference_uid : str
        FrameOfReferenceUID of the first file.
    rows, columns : int or None
        Matrix size of the first file.
    slices : list of SliceHeader
        Every file of the series, sorted by path.
    excluded_files : list of (pathlib.Path, str)
        Files that carried this series' UIDs but could not be used at all (also in
        :attr:`ScanResult.bad_files`); the loader names them when a slice turns out missing.
    """

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = ""
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    image_type: tuple[str, ...] = ()
    echo_time: float | None = None
    repetition_time: float | None = None
    inversion_time: float | None = None
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    sequence_name: str = ""
    contrast_agent: str = ""
    sop_class_uid: str = ""
    frame_of_reference_uid: str = ""
    rows: int | None = None
    columns: int | None = None
    slices: list[SliceHeader] = field(default_factory=list)
    excluded_files: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Paths of the series' files, sorted."""
        return [s.path for s in self.slices]

    @property
    def positions(self) -> list[tuple[float, float, float] | None]:
        """ImagePositionPatient per file (same order as :attr:`files`)."""
        return [s.position for s in self.slices]

    @property
    def orientations(self) -> list[tuple[float, ...] | None]:
        """ImageOrientationPatient per file (same order as :attr:`files`)."""
        return [s.orientation for s in self.slices]

    @property
    def number_of_slices(self) -> int:
        """Number of files (single-frame series: slices) in the series."""
        return len(self.slices)

    @property
    def max_number_of_frames(self) -> int:
        """Largest NumberOfFrames over the files (1 for classic single-frame series)."""
        return max((s.number_of_frames for s in self.slices), default=1)

    def geometry_problem(self, position_tolerance_mm: float = 0.01) -> str | None:
        """Describe why the headers cannot form one 3-D stack, or return ``None``.

        Checks, from headers only: geometry tags present, one orientation, one matrix size,
        one slice per position (several echoes / time points per position mean a 4-D series).

        Parameters
        ----------
        position_tolerance_mm : float
            Slices closer than this along the slice normal share a position.
        """
        if not self.slices:
            return "series has no files"
        missing = [s.path.name for s in self.slices if s.position is None or s.orientation is None]
        if missing:
            return (
                f"{len(missing)} file(s) lack ImagePositionPatient/ImageOrientationPatient "
                f"(e.g. {missing[0]})"
            )
        orientations = np.array([s.orientation for s in self.slices], float)
        if np.abs(orientations - orientations[0]).max() > 1e-3:
            return (
                "files have different ImageOrientationPatient (mixed planes, e.g. a 3-plane series)"
            )
        sizes = {(s.rows, s.columns) for s in self.slices}
        if len(sizes) > 1:
            return f"files have different matrix sizes {sorted(sizes, key=str)}"
        normal = np.cross(orientations[0, :3], orientations[0, 3:])
        along = np.sort(np.array([s.position for s in self.slices], float) @ normal)
        n_unique = 1 + int(np.sum(np.diff(along) > position_tolerance_mm))
        if n_unique < len(self.slices):
            return (
                f"4-D series not supported: {len(self.slices)} files at {n_unique} slice positions "
                "(several echoes/phases/time points per position)"
            )
        return None


@dataclass
class Study:
    """One DICOM study: its series sorted by (SeriesNumber, SeriesInstanceUID)."""

    study_instance_uid: str
    patient_id: str = ""
    study_date: str = ""
    study_description: str = ""
    accession_number: str = ""
    series: list[SeriesHeader] = field(default_factory=list)


@dataclass
class ScanResult:
    """Outcome of :func:`scan_headers`.

    Parameters
    ----------
    studies : list of Study
        Studies sorted by StudyInstanceUID.
    bad_files : list of (pathlib.Path, str)
        Files with a DICOM preamble that could not be used, with the reason.
    ignored_files : list of pathlib.Path
        Files without the DICOM preamble (side files, DICOMDIR-less exports ...), silently skipped.
    """

    studies: list[Study] = field(default_factory=list)
    bad_files: list[tuple[Path, str]] = field(default_factory=list)
    ignored_files: list[Path] = field(default_factory=list)

    @property
    def series(self) -> list[SeriesHeader]:
        """Every series of every study, in study then series order."""
        return [s for study in self.studies for s in study.series]


@dataclass
class LoadedSeries:
    """What :func:`load_series_volume` returns.

    Parameters
    ----------
    volume : Volume
        The voxels (float32, rescaled) and geometry; ``volume.sop_instance_uids`` in z order.
    datasets : list of pydicom.dataset.Dataset
        Header of each slice in the same z order, Pixel Data removed: the source images a
        DICOM-SEG references (highdicom accepts them without pixels).
    files : list of pathlib.Path
        The file of each slice, z order.
    skipped_files : list of (pathlib.Path, str)
        Files of the series left out (unreadable pixels) with the reason.
    """

    volume: Volume
    datasets: list[Dataset]
    files: list[Path]
    skipped_files: list[tuple[Path, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# header scan


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return ()
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(str(v).strip().upper() for v in value)
    return tuple(v.strip().upper() for v in str(value).split("\\"))


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword, None)
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _float(ds, keyword)
    return None if value is None else int(value)


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword, None)
    try:
        values = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(np.isfinite(values)) else None


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _pixel_truncation(fp: Any, file_size: int, ds: Dataset) -> str | None:
    """Check, at the file position where the scan stopped, that Pixel Data fits in the file.

    ``dcmread(stop_before_pixels=True)`` leaves the file at the pixel element's tag, so its
    declared length can be compared with the bytes left, which finds truncated downloads
    without decoding anything.
    """
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        sop_class = _text(ds, "SOPClassUID")
        if "Rows" in ds or "Image Storage" in (UID(sop_class).name if sop_class else ""):
            return _HEADER_TRUNCATED
        return None  # a non-image object (SR, presentation state ...)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    little = True if ts is None else UID(ts).is_little_endian
    implicit = False if ts is None else UID(ts).is_implicit_VR
    fmt = "<" if little else ">"
    group, element = struct.unpack(fmt + "HH", head[:4])
    if (group, element) not in _PIXEL_TAGS:
        return None
    if implicit:
        header_len, length = 8, struct.unpack(fmt + "I", head[4:8])[0]
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            return "file ends inside the Pixel Data element header (truncated)"
        header_len, length = 12, struct.unpack(fmt + "I", head[8:12])[0]
    else:
        header_len, length = 8, struct.unpack(fmt + "H", head[6:8])[0]
    if length == _UNDEFINED_LENGTH:
        return None  # encapsulated (compressed) data: only decoding can tell
    available = file_size - start - header_len
    if available < length:
        return f"Pixel Data truncated: {available} of {length} bytes present"
    return None


def _read_header(path: Path) -> tuple[Dataset, str | None]:
    size = path.stat().st_size
    with open(path, "rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER_SIZE)
        problem = _pixel_truncation(fp, size, ds)
    return ds, problem


def _slice_header(path: Path, ds: Dataset, problem: str | None) -> SliceHeader:
    ipp = _floats(ds, "ImagePositionPatient", 3)
    iop = _floats(ds, "ImageOrientationPatient", 6)
    ps = _floats(ds, "PixelSpacing", 2)
    return SliceHeader(
        path=path,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        instance_number=_int(ds, "InstanceNumber"),
        position=ipp,  # type: ignore[arg-type]
        orientation=iop,  # type: ignore[arg-type]
        pixel_spacing=ps,  # type: ignore[arg-type]
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=_int(ds, "NumberOfFrames") or 1,
        problem=problem,
    )


def _series_header(ds: Dataset) -> SeriesHeader:
    return SeriesHeader(
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality").upper(),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        image_type=_multi(ds, "ImageType"),
        echo_time=_float(ds, "EchoTime"),
        repetition_time=_float(ds, "RepetitionTime"),
        inversion_time=_float(ds, "InversionTime"),
        scanning_sequence=_multi(ds, "ScanningSequence"),
        sequence_variant=_multi(ds, "SequenceVariant"),
        sequence_name=_text(ds, "SequenceName"),
        contrast_agent=_text(ds, "ContrastBolusAgent"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
    )


def _iter_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every file under ``root``, following folder links, each folder and file read once.

    Cohort folders are often trees of symbolic links into an archive, so linked folders are
    followed. A folder is entered once, by its real path: a link back to an ancestor (a loop) or
    a second link to a folder already read adds nothing. A file reached twice through links is
    read once. Returns the files (by path, as laid out under ``root``) and the broken links with
    their reasons.
    """
    if root.is_file():
        return [root], []
    files: dict[str, Path] = {}
    broken: list[tuple[Path, str]] = []
    seen_folders = {os.path.realpath(root)}

    def unreadable(error: OSError) -> None:
        broken.append((Path(error.filename or root), f"folder cannot be read ({error.strerror}); check its permissions"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        entered = []
        for name in sorted(dirnames):  # sorted: a deterministic walk
            real = os.path.realpath(os.path.join(dirpath, name))
            if real not in seen_folders:
                seen_folders.add(real)
                entered.append(name)
        dirnames[:] = entered
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                mode = path.stat().st_mode
            except OSError as error:
                what = f"symbolic link to {os.readlink(path)}" if path.is_symlink() else "file"
                broken.append((path, f"{what} cannot be read ({error.strerror}); fix or remove it"))
                continue
            if stat.S_ISREG(mode):  # not a FIFO or device, whose opening could block the scan
                files.setdefault(os.path.realpath(path), path)
    return sorted(files.values(), key=str), broken


_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class _ScanState:
    """What :func:`scan_headers` accumulates while it walks the files.

    Parameters
    ----------
    result : ScanResult
        Collects the bad and ignored files as they are met.
    series_by_uid : dict
        ``(StudyInstanceUID, SeriesInstanceUID) -> SeriesHeader``, in order of first file.
    study_info : dict
        ``StudyInstanceUID -> Study``, from the first usable file of the study.
    seen_sops : dict
        ``(SeriesInstanceUID, SOPInstanceUID) -> path`` of the instance kept.
    excluded : list
        ``(series key, path, reason)`` of bad files that carried their series' UIDs.
    """

    result: ScanResult = field(default_factory=ScanResult)
    series_by_uid: dict[tuple[str, str], SeriesHeader] = field(default_factory=dict)
    study_info: dict[str, Study] = field(default_factory=dict)
    seen_sops: dict[tuple[str, str], Path] = field(default_factory=dict)
    excluded: list[tuple[tuple[str, str], Path, str]] = field(default_factory=list)

    def bad(self, path: Path, reason: str, key: tuple[str, str] | None = None) -> None:
        """Record an unusable file, logged with its path (and, with ``key``, for its series)."""
        logger.warning("Skipping DICOM file %s: %s", path, reason)
        self.result.bad_files.append((path, reason))
        if key is not None:
            self.excluded.append((key, path, reason))

    def add_instance(self, path: Path, ds: Dataset, problem: str | None) -> None:
        """Add a parsed file that has all three UIDs to its series and study, unless a duplicate."""
        study_uid = _text(ds, "StudyInstanceUID")
        series_uid = _text(ds, "SeriesInstanceUID")
        sop_uid = _text(ds, "SOPInstanceUID")
        key = (study_uid, series_uid)
        series = self.series_by_uid.get(key)
        if series is None:
            series = _series_header(ds)
            self.series_by_uid[key] = series
        if (series_uid, sop_uid) in self.seen_sops:
            self.bad(
                path,
                f"duplicate SOPInstanceUID {sop_uid} "
                f"(same instance as {self.seen_sops[(series_uid, sop_uid)]})",
                key,
            )
            return
        self.seen_sops[(series_uid, sop_uid)] = path
        if problem is not None:
            logger.warning("DICOM file %s: %s", path, problem)
        series.slices.append(_slice_header(path, ds, problem))
        if study_uid not in self.study_info:
            self.study_info[study_uid] = Study(
                study_instance_uid=study_uid,
                patient_id=_text(ds, "PatientID"),
                study_date=_text(ds, "StudyDate"),
                study_description=_text(ds, "StudyDescription"),
                accession_number=_text(ds, "AccessionNumber"),
            )


def _missing_uids(ds: Dataset) -> list[str]:
    """Names of the Study/Series/SOP Instance UIDs that ``ds`` lacks."""
    return [
        keyword
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        if not _text(ds, keyword)
    ]


def _scan_file(path: Path, state: _ScanState) -> None:
    """Read one file's header and file it: ignored, bad, or an instance of its series."""
    if not _has_preamble(path):
        logger.debug("Ignoring non-DICOM file %s (no DICM preamble)", path)
        state.result.ignored_files.append(path)
        return
    try:
        ds, problem = _read_header(path)
    except Exception as exc:  # any parse failure must not abort the scan
        state.bad(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})")
        return
    if problem == _HEADER_TRUNCATED:
        # Its header may lack geometry too: keep it out of the series, but name it there.
        key = (_text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID"))
        state.bad(path, problem, key)
        return
    if _text(ds, "SOPClassUID") == _DICOMDIR_SOP_CLASS:
        state.result.ignored_files.append(path)  # DICOMDIR: an index, not an instance
        return
    missing = _missing_uids(ds)
    if missing:
        state.bad(path, f"missing {', '.join(missing)} (truncated header or not a DICOM instance)")
        return
    state.add_instance(path, ds, problem)


def _sorted_studies(state: _ScanState) -> list[Study]:
    """Attach the series to their studies and sort both; drop series and studies left empty."""
    series_by_uid, study_info = state.series_by_uid, state.study_info
    for key, path, reason in state.excluded:
        if key in series_by_uid:
            series_by_uid[key].excluded_files.append((path, reason))
    for (study_uid, _), series in series_by_uid.items():
        if not series.slices:
            continue  # only duplicates/bad files: nothing to load
        study_info[study_uid].series.append(series)
    for study in study_info.values():
        study.series.sort(
            key=lambda s: (
                s.series_number if s.series_number is not None else 1 << 31,
                s.series_instance_uid,
            )
        )
    return [study_info[uid] for uid in sorted(study_info) if study_info[uid].series]


def scan_headers(root: Path | str) -> ScanResult:
    """Find every DICOM file under ``root`` and group the files into studies and series.

    Only headers are read. Files without the 128-byte preamble and ``DICM`` prefix are ignored
    (listed in :attr:`ScanResult.ignored_files`). A file with the prefix that cannot be parsed,
    lacks Study/Series/SOP Instance UIDs or repeats an already seen SOPInstanceUID of its series
    goes to :attr:`ScanResult.bad_files` with the reason and a logged warning naming it; the scan
    continues. Image files whose Pixel Data is visibly truncated stay in their series with
    :attr:`SliceHeader.problem` set (the loader decides whether the series survives without them).

    Parameters
    ----------
    root : pathlib.Path or str
        A folder (walked recursively, following folder links, each folder and file read once by
        its real path; a broken link is a bad file) or a single file.

    Returns
    -------
    ScanResult
        Studies sorted by StudyInstanceUID; series by (SeriesNumber, SeriesInstanceUID); files
        by path.

    Raises
    ------
    FileNotFoundError
        When ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"DICOM input folder {root} does not exist; check the input path")
    state = _ScanState()
    files, broken = _iter_files(root)
    for path, reason in broken:
        state.bad(path, reason)
    for path in files:
        _scan_file(path, state)
    result = state.result
    result.studies = _sorted_studies(state)
    logger.info(
        "Scanned %s: %d studies, %d series, %d bad files, %d non-DICOM files ignored",
        root,
        len(result.studies),
        len(result.series),
        len(result.bad_files),
        len(result.ignored_files),
    )
    return result


def chunk_studies(studies: Iterable[Study], studies_per_chunk: int) -> Iterator[list[Study]]:
    """Yield consecutive lists of at most ``studies_per_chunk`` studies, to bound memory.

    Parameters
    ----------
    studies : iterable of Study
        E.g. ``scan.studies``.
    studies_per_chunk : int
        Chunk size, at least 1.
    """
    if int(studies_per_chunk) != studies_per_chunk or studies_per_chunk < 1:
        raise ValueError(f"studies_per_chunk must be a positive integer; got {studies_per_chunk!r}")
    chunk: list[Study] = []
    for study in studies:
        chunk.append(study)
        if len(chunk) == studies_per_chunk:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------
# series loading


def _series_name(series: SeriesHeader) -> str:
    desc = f" ({series.series_description!r})" if series.series_description else ""
    return f"series {series.series_instance_uid}{desc}"


def _read_slice(path: Path) -> tuple[Dataset | None, np.ndarray | None, str | None]:
    """Read one file fully; return (header without pixels, rescaled float32 pixels, problem)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        return None, None, f"unreadable ({type(exc).__name__}: {exc})"
    try:
        if (_int(ds, "NumberOfFrames") or 1) > 1:
            raise ValueError("multi-frame instance")  # rejected for the series by the caller
        raw = ds.pixel_array
        if raw.ndim != 2:
            raise ValueError(f"pixel array has shape {raw.shape}; expected a 2-D grayscale slice")
        slope = _float(ds, "RescaleSlope")
        intercept = _float(ds, "RescaleIntercept")
        pixels = raw.astype(np.float32)
        # Rescale is per file: some scanners vary it slice by slice.
        if slope is not None and slope != 1.0:
            pixels *= np.float32(slope)
        if intercept:
            pixels += np.float32(intercept)
        problem = None
    except Exception as exc:
        pixels, problem = None, f"pixel data unreadable ({type(exc).__name__}: {exc})"
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)  # the SEG writer needs headers only; free the bytes
    return ds, pixels, problem


def _check_spacing(
    along: np.ndarray, files: Sequence[Path], tolerance: float, name: str
) -> tuple[float, str | None]:
    """Return (median slice spacing, None) or (median, description of the non-uniformity)."""
    steps = np.diff(along)
    spacing = float(np.median(steps))
    deviation = np.abs(steps - spacing)
    worst = int(np.argmax(deviation))
    if deviation[worst] > tolerance * spacing:
        return spacing, (
            f"{name}: non-uniform slice spacing (steps {steps.min():.4g}-{steps.max():.4g} mm, "
            f"median {spacing:.4g} mm, tolerance {tolerance:.0%}); largest deviation "
            f"{steps[worst]:.4g} mm between {files[worst]} and {files[worst + 1]}"
        )
    return spacing, None


#: One readable file of a series: path, header (Pixel Data dropped), pixels or None, problem.
_ReadSlice = tuple[Path, Dataset, np.ndarray | None, str | None]


@dataclass(frozen=True)
class _InPlaneGrid:
    """The in-plane geometry every slice of a series must share (from its first readable file).

    Parameters
    ----------
    iop : tuple of 6 float
        ImageOrientationPatient.
    ps : tuple of 2 float
        PixelSpacing ``(row spacing, column spacing)``.
    rows, cols : int or None
        Matrix size.
    ref_path : pathlib.Path
        The file these come from, named in error messages.
    """

    iop: tuple[float, ...]
    ps: tuple[float, ...]
    rows: int | None
    cols: int | None
    ref_path: Path


def _check_series_kind(series: SeriesHeader, name: str, require_mr: bool) -> None:
    """Refuse, from the scanned headers alone, a series that cannot be loaded at all."""
    if not series.slices:
        raise ValueError(f"{name} has no files")
    if series.max_number_of_frames > 1:
        # Checked before decoding anything: enhanced/4-D objects would be read in vain.
        raise ValueError(
            f"{name}: multi-frame instances ({series.max_number_of_frames} frames) are not "
            "supported; export the series as single-frame (classic) MR images"
        )
    if require_mr and series.modality != "MR":
        raise ValueError(
            f"{name}: modality {series.modality or 'missing'} is not MR; "
            "only MR series can be loaded"
        )


def _read_series_files(
    series: SeriesHeader, name: str
) -> tuple[list[_ReadSlice], list[tuple[Path, str]]]:
    """Read every file of the series once.

    Returns
    -------
    readable : list
        ``(path, header, pixels or None, problem)`` of each file whose header could be read.
    unreadable : list of (pathlib.Path, str)
        The other files, with the reason.
    """
    readable: list[_ReadSlice] = []
    unreadable: list[tuple[Path, str]] = []
    for s in series.slices:
        ds, pixels, problem = _read_slice(s.path)
        if ds is None:
            unreadable.append((s.path, problem or "unreadable"))
        else:
            readable.append((s.path, ds, pixels, problem))
    if not readable:
        raise ValueError(
            f"{name}: no file could be read; first error: {unreadable[0][0]}: {unreadable[0][1]}"
        )
    return readable, unreadable


def _slice_position(
    path: Path, ds: Dataset, grid: _InPlaneGrid, name: str, require_mr: bool
) -> tuple[float, ...]:
    """Check one slice's header against the series' grid; return its ImagePositionPatient."""
    if require_mr and _text(ds, "Modality").upper() != "MR":
        raise ValueError(f"{name}: {path} has modality {_text(ds, 'Modality')!r}, not MR")
    frames = _int(ds, "NumberOfFrames") or 1
    if frames > 1:
        raise ValueError(
            f"{name}: {path} is a multi-frame instance ({frames} frames); only series of "
            "single-frame slices are supported: export the series as classic MR images"
        )
    if (_int(ds, "SamplesPerPixel") or 1) != 1:
        raise ValueError(f"{name}: {path} is not grayscale (SamplesPerPixel != 1)")
    iop, ps, ref_path = grid.iop, grid.ps, grid.ref_path
    this_iop = _floats(ds, "ImageOrientationPatient", 6)
    if this_iop is None or np.abs(np.subtract(this_iop, iop)).max() > 1e-4:
        raise ValueError(
            f"{name}: {path} has ImageOrientationPatient {this_iop}, {ref_path} has {iop}; "
            "a series must have one orientation"
        )
    if (_int(ds, "Rows"), _int(ds, "Columns")) != (grid.rows, grid.cols):
        raise ValueError(
            f"{name}: {path} is {_int(ds, 'Rows')}x{_int(ds, 'Columns')}, "
            f"{ref_path} is {grid.rows}x{grid.cols}"
        )
    this_ps = _floats(ds, "PixelSpacing", 2)
    if this_ps is None or not np.allclose(this_ps, ps, rtol=1e-4, atol=1e-6):
        raise ValueError(f"{name}: {path} has PixelSpacing {this_ps}, {ref_path} has {ps}")
    ipp = _floats(ds, "ImagePositionPatient", 3)
    if ipp is None:
        raise ValueError(f"{name}: {path} lacks a valid ImagePositionPatient")
    return ipp


def _check_slice_headers(
    readable: Sequence[_ReadSlice], name: str, require_mr: bool
) -> tuple[_InPlaneGrid, list[tuple[float, ...]]]:
    """Check that the readable headers form one grid; return it and each file's position.

    Every file whose header is readable takes part, pixels or not: a bad slice must not hide a
    geometry problem of the series.
    """
    ref_path, ref_ds = readable[0][0], readable[0][1]
    iop = _floats(ref_ds, "ImageOrientationPatient", 6)
    ps = _floats(ref_ds, "PixelSpacing", 2)
    if iop is None or ps is None:
        raise ValueError(
            f"{name}: {ref_path} lacks a valid ImageOrientationPatient or PixelSpacing"
        )
    grid = _InPlaneGrid(iop, ps, _int(ref_ds, "Rows"), _int(ref_ds, "Columns"), ref_path)
    positions = [_slice_position(path, ds, grid, name, require_mr) for path, ds, _, _ in readable]
    if min(ps) <= 0:
        raise ValueError(f"{name}: PixelSpacing {ps} in {ref_path} must be positive")
    return grid, positions


def _slice_axes(grid: _InPlaneGrid, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row and column directions of the slices and their normal ``row x col``."""
    iop = grid.iop
    row_dir = np.asarray(iop[:3], float)
    col_dir = np.asarray(iop[3:], float)
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise ValueError(
            f"{name}: ImageOrientationPatient {iop} in {grid.ref_path} is not two orthonormal "
            "vectors"
        )
    row_dir /= np.linalg.norm(row_dir)
    col_dir /= np.linalg.norm(col_dir)
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _sort_along_normal(
    readable: Sequence[_ReadSlice],
    positions: Sequence[tuple[float, ...]],
    normal: np.ndarray,
    position_tolerance_mm: float,
    name: str,
) -> tuple[list[_ReadSlice], np.ndarray]:
    """Sort the files along the slice normal and refuse coincident slices.

    Returns
    -------
    readable : list
        The files in ascending order along ``normal``.
    pos : numpy.ndarray
        ``(n, 3)`` their ImagePositionPatient, same order.
    """
    pos = np.asarray(positions, float)
    along = pos @ normal
    # Ties broken by path so the order never depends on the file system.
    names = [str(item[0]) for item in readable]
    order = sorted(range(len(names)), key=lambda i: (along[i], names[i]))
    ordered = [readable[i] for i in order]
    pos, along = pos[order], along[order]
    steps = np.diff(along)
    dup = np.flatnonzero(steps < position_tolerance_mm)
    if dup.size:
        i = int(dup[0])
        raise ValueError(
            f"{name}: duplicate slice positions ({dup.size} coincident pair(s)), e.g. "
            f"{ordered[i][0]} and {ordered[i + 1][0]} at {along[i]:.4f} mm along the slice "
            "normal; a series with several echoes/phases per position (4-D) is not supported: "
            "split it or remove the duplicate files"
        )
    return ordered, pos


def _skipped_text(skipped: Sequence[tuple[Path, str]]) -> str:
    """The left-out files and their reasons, as error messages list them."""
    return "; ".join(f"{p}: {r}" for p, r in skipped)


def _kept_slices(
    readable: Sequence[_ReadSlice],
    pos: np.ndarray,
    unreadable: Sequence[tuple[Path, str]],
    name: str,
) -> tuple[list[tuple[Path, Dataset, np.ndarray]], list[tuple[Path, str]], np.ndarray]:
    """Split the sorted files into those with pixels and those left out.

    Returns
    -------
    kept : list of (pathlib.Path, Dataset, numpy.ndarray)
        Files with decoded pixels, in z order.
    skipped : list of (pathlib.Path, str)
        Files whose pixels are unreadable, then the unreadable files, with the reason.
    kept_pos : numpy.ndarray
        ``(len(kept), 3)`` ImagePositionPatient of the kept files.
    """
    skipped = [(p, r) for p, _, px, r in readable if px is None] + list(unreadable)
    kept = [(p, ds, px) for p, ds, px, _ in readable if px is not None]
    if skipped and len(kept) < 2:
        raise ValueError(
            f"{name}: fewer than 2 slices with readable pixels; {_skipped_text(skipped)}"
        )
    if len(kept) < 2:
        raise ValueError(f"{name}: a volume needs at least 2 slices; found {len(kept)}")
    kept_pos = np.asarray([pos[i] for i, item in enumerate(readable) if item[2] is not None])
    return kept, skipped, kept_pos


def _uniform_spacing(
    kept_along: np.ndarray,
    kept_files: Sequence[Path],
    skipped: Sequence[tuple[Path, str]],
    series: SeriesHeader,
    spacing_tolerance: float,
    name: str,
) -> float:
    """Median slice step of the kept slices; a ``ValueError`` naming the missing files if uneven."""
    slice_spacing, spacing_problem = _check_spacing(kept_along, kept_files, spacing_tolerance, name)
    if spacing_problem is not None:
        # Uneven steps are usually slices left out: name them, so the cause is plain.
        context = []
        if skipped:
            context.append(
                f"slices missing because their pixels are unreadable: {_skipped_text(skipped)}"
            )
        if series.excluded_files:
            context.append(
                "files of this series excluded at scan: "
                + "; ".join(f"{p}: {r}" for p, r in series.excluded_files)
            )
        raise ValueError(spacing_problem + ("; " + "; ".join(context) if context else ""))
    for path, reason in skipped:
        logger.warning(
            "%s: skipping %s (%s); the remaining %d slices form a uniform stack",
            name,
            path,
            reason,
            len(kept_files),
        )
    return slice_spacing


def _stack_direction(kept_pos: np.ndarray, normal: np.ndarray, name: str) -> np.ndarray:
    """Unit vector from the first to the last slice, which must run along the slice normal."""
    extent = kept_pos[-1] - kept_pos[0]
    z_dir = extent / np.linalg.norm(extent)
    # Positions must advance along the normal: an oblique offset (gantry tilt) would make the
    # grid sheared, which a direction matrix cannot express.
    if np.linalg.norm(np.cross(z_dir, normal)) > 1e-3:
        raise ValueError(
            f"{name}: slice positions advance along {np.round(z_dir, 4).tolist()}, not along "
            f"the slice normal {np.round(normal, 4).tolist()} (gantry tilt / sheared stack); "
            "resample it first"
        )
    return z_dir


def _stack_slices(
    slices: list[np.ndarray | None], rows: int | None, cols: int | None
) -> np.ndarray:
    """Copy the slices into one array, releasing each entry of ``slices`` once copied.

    The caller must hold no other reference to the slice arrays, so that peak memory stays near
    one volume.
    """
    array = np.empty((len(slices), rows or 0, cols or 0), np.float32)
    for i in range(len(slices)):
        array[i] = slices[i]
        slices[i] = None
    return array


def _volume_metadata(
    series: SeriesHeader,
    datasets: Sequence[Dataset],
    kept_along: np.ndarray,
    skipped: Sequence[tuple[Path, str]],
) -> dict[str, Any]:
    """The ``Volume.metadata`` of a loaded series."""
    return {
        "series_description": series.series_description,
        "series_number": series.series_number,
        "modality": series.modality,
        "image_type": list(series.image_type),
        "echo_time": series.echo_time,
        "repetition_time": series.repetition_time,
        "inversion_time": series.inversion_time,
        "contrast_agent": series.contrast_agent,
        "frame_of_reference_uid": _text(datasets[0], "FrameOfReferenceUID"),
        "slice_step_range_mm": [
            float(np.diff(kept_along).min()),
            float(np.diff(kept_along).max()),
        ],
        "skipped_files": [[str(p), r] for p, r in skipped],
    }


def load_series_volume(
    series: SeriesHeader,
    *,
    spacing_tolerance: float = 0.05,
    position_tolerance_mm: float = 0.01,
    require_mr: bool = True,
) -> LoadedSeries:
    """Decode one series into a volume with full LPS geometry.

    Every file is read once, fully; its Pixel Data is rescaled (RescaleSlope/Intercept) to
    float32 and then dropped from the kept header. Slices are sorted along the slice normal
    ``n = row x col`` (ascending). Validation, each failure a ``ValueError`` that names the series
    and the files: single-frame grayscale MR, one ImageOrientationPatient / Rows / Columns /
    PixelSpacing, unique positions, positions along the normal (no gantry tilt), uniform
    spacing within ``spacing_tolerance``.

    A file whose pixels cannot be decoded (truncated, corrupt) is skipped with a logged warning
    when the remaining slices still form a valid uniform series of at least two slices;
    otherwise the ``ValueError`` names it.

    Geometry: origin = ImagePositionPatient of the first sorted slice; direction columns =
    row cosines (x), column cosines (y), unit vector from the first to the last slice position
    (z); spacing = (PixelSpacing[1], PixelSpacing[0], median slice step).

    Parameters
    ----------
    series : SeriesHeader
        From :func:`scan_headers`.
    spacing_tolerance : float
        Largest allowed deviation of a slice step from the median step, as a fraction of it.
    position_tolerance_mm : float
        Slices closer than this along the normal are duplicates.
    require_mr : bool
        Reject a non-MR modality (the pipeline is for brain MR).

    Returns
    -------
    LoadedSeries
        Volume (``metadata`` holds series description, number, modality, image type, timing,
        contrast agent, frame of reference, slice-step range and skipped files), header datasets
        and files in z order, skipped files.

    Raises
    ------
    ValueError
        On any validation failure listed above.
    """
    name = _series_name(series)
    _check_series_kind(series, name, require_mr)
    readable, unreadable = _read_series_files(series, name)
    grid, positions = _check_slice_headers(readable, name, require_mr)
    row_dir, col_dir, normal = _slice_axes(grid, name)
    readable, pos = _sort_along_normal(readable, positions, normal, position_tolerance_mm, name)
    kept, skipped, kept_pos = _kept_slices(readable, pos, unreadable, name)
    kept_along = kept_pos @ normal
    kept_files = [p for p, _, _ in kept]
    slice_spacing = _uniform_spacing(
        kept_along, kept_files, skipped, series, spacing_tolerance, name
    )
    z_dir = _stack_direction(kept_pos, normal, name)

    # Copy slice by slice, dropping each source slice, so peak memory stays near one volume:
    # ``slices`` must then hold the only references to the pixel arrays.
    slices: list[np.ndarray | None] = [px for _, _, px in kept]
    datasets = [ds for _, ds, _ in kept]
    del kept, readable
    volume = Volume(
        array=_stack_slices(slices, grid.rows, grid.cols),
        origin=kept_pos[0],
        spacing=np.array([grid.ps[1], grid.ps[0], slice_spacing]),
        direction=np.column_stack([row_dir, col_dir, z_dir]),
        series_instance_uid=series.series_instance_uid,
        study_instance_uid=series.study_instance_uid,
        patient_id=series.patient_id,
        sop_instance_uids=[_text(ds, "SOPInstanceUID") for ds in datasets],
        metadata=_volume_metadata(series, datasets, kept_along, skipped),
    )
    return LoadedSeries(volume=volume, datasets=datasets, files=kept_files, skipped_files=skipped)
