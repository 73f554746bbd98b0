"""Broken and unusual DICOM in one batch with good studies: each case is skipped with its reason or
scored, never a crash, and the good studies' results are still written (docs/BAD_INPUT.md).

One run of the real app (tiny ViT, pre-stripped preprocessing) on the tiny cohort plus, each as
its own patient, copies of one good series that were broken or re-encoded on purpose.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from fixtures import TINY_VIT_CONFIG, run_app


def _series_folders(study: Path) -> list[Path]:
    return sorted(p for p in study.iterdir() if p.is_dir())


def _relabel(folder: Path, patient_id: str) -> str:
    """Make the copy a new patient's study and series (fresh UIDs everywhere)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted(folder.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.PatientID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID = patient_id, study_uid, series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(path)
    return series_uid


def _each_file(folder: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    for path in sorted(folder.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        change(dataset)
        dataset.save_as(path, enforce_file_format=True)


def _no_pixels(dataset: pydicom.Dataset) -> None:
    del dataset.PixelData


def _jpeg2000(dataset: pydicom.Dataset) -> None:
    # Pillow's OpenJPEG encodes losslessly (reversible wavelet); pydicom's own J2K encoder needs a
    # plug-in the product does not install.
    buffer = io.BytesIO()
    Image.fromarray(dataset.pixel_array.astype(np.uint16)).save(buffer, format="JPEG2000", irreversible=False, no_jp2=True)
    dataset.PixelData = encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = JPEG2000Lossless


def _utf8_names(dataset: pydicom.Dataset) -> None:
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = "Ødegård^Zoë"
    dataset.SeriesDescription = "T2 TSE ../../etc/passwd ü"


def _tripled_matrix(dataset: pydicom.Dataset) -> None:
    # The same anatomy on a 3x finer in-plane matrix: nine times the voxels of the original.
    pixels = np.kron(dataset.pixel_array, np.ones((3, 3), dtype=dataset.pixel_array.dtype))
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelSpacing = [float(v) / 3 for v in dataset.PixelSpacing]
    dataset.PixelData = pixels.tobytes()


def _voxels(folder: Path) -> int:
    files = sorted(folder.glob("*.dcm"))
    if not files:
        return 0
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return int(first.Rows) * int(first.Columns) * len(files)


def _tilted(dataset: pydicom.Dataset) -> None:
    # Slices no longer stacked along their normal (gantry tilt): each is shifted 0.5 mm per slice.
    position = [float(v) for v in dataset.ImagePositionPatient]
    position[1] += 0.5 * int(dataset.InstanceNumber)
    dataset.ImagePositionPatient = position


@pytest.fixture(scope="module")
def bad_batch(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad_dicom")
    input_folder = root / "input"
    shutil.copytree(tiny_cohort / "dicom", input_folder)
    studies = sorted(p for p in input_folder.iterdir() if p.is_dir())
    good = max(_series_folders(studies[0]), key=lambda p: len(list(p.glob("*.dcm"))))
    cases: dict[str, str] = {}

    def case(name: str) -> Path:
        folder = input_folder / name
        shutil.copytree(good, folder)
        cases[name] = _relabel(folder, f"CASE-{name}")
        return folder

    _each_file(case("no_pixel_data"), _no_pixels)
    _each_file(case("rle"), lambda d: d.compress(RLELossless))
    _each_file(case("jpeg_ls"), lambda d: d.compress(JPEGLSLossless))
    _each_file(case("jpeg2000"), _jpeg2000)
    _each_file(case("utf8_and_path_like_text"), _utf8_names)
    _each_file(case("gantry_tilt"), _tilted)
    duplicate = sorted(case("duplicate_position").glob("*.dcm"))
    first, second = pydicom.dcmread(duplicate[3]), pydicom.dcmread(duplicate[4])
    second.ImagePositionPatient = first.ImagePositionPatient
    second.save_as(duplicate[4])
    echoes = case("multi_echo")
    for path in sorted(echoes.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.EchoTime = 2 * float(dataset.EchoTime)
        dataset.save_as(echoes / f"echo2_{path.name}")
    # Two series in one folder: study 2's second series moved in beside its first.
    mixed = _series_folders(studies[1])
    mixed_uids = {pydicom.dcmread(next(folder.glob("*.dcm"))).SeriesInstanceUID for folder in mixed[:2]}
    for path in mixed[1].glob("*.dcm"):
        shutil.move(str(path), mixed[0] / f"mixed_{path.name}")
    # A very large series: over selection.max_voxels, set here just above the largest good series.
    largest_good = max(_voxels(folder) for study in studies for folder in _series_folders(study))
    very_large = case("very_large")
    _each_file(very_large, _tripled_matrix)
    assert _voxels(very_large) > largest_good
    config = TINY_VIT_CONFIG + f"selection:\n  max_voxels: {largest_good}\n"
    run = run_app(input_folder, root / "output", root / "models", config, root)
    return run, cases, mixed_uids


def _row(run, series_uid: str) -> dict:
    rows = [r for r in run.report["series"] if r["series_instance_uid"] == series_uid]
    assert len(rows) == 1
    return rows[0]


def test_the_run_completes_and_the_good_studies_are_scored(bad_batch, tiny_cohort: Path):
    run, _, _ = bad_batch
    assert run.returncode == 0, run.stderr[-3000:]
    good_patients = {s["patient_id"] for s in run.report["studies"] if not s["patient_id"].startswith("CASE-")}
    assert len(good_patients) == 6
    scored = [r for r in run.report["series"] if r["status"] == "scored" and not r["patient_id"].startswith("CASE-")]
    assert len(scored) == 12
    assert all((run.output / r["seg_binary"]).is_file() for r in scored)


@pytest.mark.parametrize("name", ["rle", "jpeg_ls", "jpeg2000", "utf8_and_path_like_text"])
def test_compressed_and_non_ascii_series_are_scored(bad_batch, name):
    run, cases, _ = bad_batch
    row = _row(run, cases[name])
    assert row["status"] == "scored", row["reason"]
    assert (run.output / row["seg_binary"]).is_file()


def test_compressed_series_score_like_the_uncompressed_original(bad_batch):
    """Lossless is lossless: the same pixels give the same tokens, so the same score."""
    run, cases, _ = bad_batch
    scores = {name: _row(run, cases[name])["score"] for name in ("rle", "jpeg_ls", "jpeg2000")}
    assert max(scores.values()) - min(scores.values()) < 1e-6, scores


def test_files_without_pixel_data_are_listed_as_bad_files(bad_batch):
    run, _, _ = bad_batch
    bad = [entry for entry in run.report["bad_files"] if "/no_pixel_data/" in entry["path"]]
    assert bad and all("Pixel Data" in entry["reason"] for entry in bad)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("duplicate_position", "slice positions"),
        ("multi_echo", "4-D series not supported"),
        ("gantry_tilt", "slice positions advance along"),
        ("very_large", "very large series"),
    ],
)
def test_geometry_problems_and_very_large_series_are_skipped_with_their_reason(bad_batch, name, reason):
    run, cases, _ = bad_batch
    row = _row(run, cases[name])
    assert row["status"] == "skipped" and reason in row["reason"], row["reason"]
    assert f"series={cases[name]}" in run.stdout + run.stderr


def test_a_very_large_series_is_refused_from_its_headers_before_any_pixel_is_decoded(bad_batch):
    run, cases, _ = bad_batch
    reason = _row(run, cases["very_large"])["reason"]
    assert "more than max_voxels=" in reason and "raise selection.max_voxels with the memory request" in reason
    # Skipped by selection (headers only), so it never reached the loader or the preprocessing.
    log = run.stdout + run.stderr
    assert f"series={cases['very_large']} decision=skip" in log


def test_two_series_in_one_folder_are_told_apart(bad_batch):
    run, _, mixed_uids = bad_batch
    assert len(mixed_uids) == 2
    assert all(_row(run, uid)["status"] == "scored" for uid in mixed_uids)


def test_no_output_file_is_named_after_tag_text(bad_batch):
    run, _, _ = bad_batch
    names = [p.name for p in run.output.rglob("*")]
    assert not [n for n in names if "passwd" in n or "Ødegård" in n or ".." in n]
