"""Evaluation of a run against truth: hand-computed metrics, edge cases, bad input, outputs, pictures.

The run folder is written here by hand (report.json plus real BINARY and FRACTIONAL SEGs of a
small generated cohort's series, through codegraph3d.io.seg), so every expected value follows from
the truth masks' voxel counts and the scores chosen below; the app's own output is evaluated in
tests/integration/test_app.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from codegraph3d_research.evaluate import (
    EvaluationInputError,
    RunOutputError,
    TruthMismatchError,
    default_out_dir,
    evaluate,
    main,
    write_evaluation,
)
from codegraph3d.io.dicom import load_series_volume, scan_headers
from codegraph3d.io.seg import write_binary_seg, write_fractional_seg
from codegraph3d_research.plots import CaseSlices, case_slices, lps_view, rank_cases
from codegraph3d_research.synthetic import make_cohort
from codegraph3d.core.volume import Volume

# Per contrast: the first lesion series is found exactly ("hit": score map and mask = the lesion),
# the second missed (all zero); the normal series score zero everywhere.
# Patient scores: hit 0.9, miss 0.5, normals 0.1 and 0.5 (a tie with the miss).
NORMAL_SCORES = [0.1, 0.5]
PATIENT_AUROC = 3.5 / 4  # 0.9 beats both normals; 0.5 beats 0.1 and ties 0.5 (half)
PATIENT_AP = 0.5 * 1.0 + 0.5 * 2 / 3  # {0.9}: P 1 R 1/2; {0.9, 0.5, 0.5}: P 2/3 R 1


def _masks(cohort: Path, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    def read(rel: str) -> np.ndarray:
        return np.asarray(nib.load(str(cohort / rel)).dataobj).transpose(2, 1, 0) > 0

    return read(entry["truth"]["lesion"]), read(entry["truth"]["brain"])


def _row(study: dict, uid: str, contrast: str | None, status: str, reason: str = "") -> dict[str, Any]:
    return {
        "study_instance_uid": study["study_instance_uid"], "series_instance_uid": uid,
        "patient_id": study["patient_id"], "series_description": "", "contrast": contrast,
        "status": status, "reason": reason, "score": None, "rank": None, "percentile": None,
        "flagged": None, "anomalous_volume_ml": None, "seg_binary": None, "seg_score": None, "qa": {},
    }


def write_hand_run(cohort: Path, out: Path) -> dict[str, Any]:
    """Write report.json and SEGs for the cohort; return the expected counts per contrast."""
    labels = json.loads((cohort / "labels.json").read_text())
    headers = {s.series_instance_uid: s for s in scan_headers(cohort / "dicom").series}
    (out / "SEG").mkdir(parents=True)
    rows, expected = [], {}
    normal_index: dict[str, int] = {}
    for study in labels["studies"]:
        for distractor in study["distractors"]:
            rows.append(_row(study, distractor["series_instance_uid"], None, "skipped", "localizer (ImageType)"))
        for entry in study["series"]:
            uid, contrast = entry["series_instance_uid"], entry["contrast"]
            counts = expected.setdefault(contrast, {"hit": None, "miss": None, "P_hit": 0, "P_miss": 0, "N": 0,
                                                    "L_hit": 0, "L_miss": 0})
            loaded = load_series_volume(headers[uid])
            lesion, brain = _masks(cohort, entry)
            if entry["has_lesion"] and counts["hit"] is None:
                role, score = "hit", 0.9
            elif entry["has_lesion"]:
                role, score = "miss", 0.5
            else:
                role = "normal"
                score = NORMAL_SCORES[normal_index.setdefault(contrast, 0)]
                normal_index[contrast] += 1
            if role != "normal":
                counts[role] = uid
                counts[f"P_{role}"] = int((lesion & brain).sum())
                counts[f"L_{role}"] = int(lesion.sum())
            counts["N"] += int((brain & ~lesion).sum())
            found = lesion if role == "hit" else np.zeros_like(lesion)
            row = _row(study, uid, contrast, "scored")
            row.update(score=score, flagged=role == "hit", anomalous_volume_ml=0.0,
                       seg_binary=f"SEG/{uid}_binary.dcm", seg_score=f"SEG/{uid}_score.dcm")
            write_binary_seg(loaded.datasets, found, out / row["seg_binary"], encoder_description="test",
                             series_number=9901)
            write_fractional_seg(loaded.datasets, found.astype(np.float32), out / row["seg_score"],
                                 encoder_description="test", series_number=9902)
            rows.append(row)
    report = {
        "schema": "codegraph3d.report/1", "status": "completed",
        "encoder": {"name": "test", "description": "hand-written scores"}, "encoder_warning": None,
        "config": {"output": {"fractional": True}}, "config_sha256": "0",
        "batches": [{"contrast": c, "voxel_threshold": 0.5, "score_to_unit": {"low": 0.0, "high": 1.0}}
                    for c in ("T2w", "T1w")],
        "series": rows,
    }
    (out / "report.json").write_text(json.dumps(report))
    return expected


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four subjects (two with a lesion), T2w + T1w, two localizers, coarse matrices: reads in a second."""
    folder = tmp_path_factory.mktemp("cohort")
    make_cohort(folder, n_subjects=4, lesion_fraction=0.5, matrix_scale=0.2, seed=3,
                with_localizer_fraction=0.5, lesion_radius_mm=(10.0, 15.0))
    return folder


@pytest.fixture(scope="module")
def hand_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("hand_run") / "output"
    return out, write_hand_run(cohort, out)


@pytest.fixture
def copies(hand_run, cohort: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Writable copies of the run and the truth folder."""
    run, truth = tmp_path / "output", tmp_path / "cohort"
    shutil.copytree(hand_run[0], run)
    shutil.copytree(cohort, truth)
    return run, truth


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------
# metrics


def test_hand_computed_metrics(hand_run, cohort: Path):
    run, expected = hand_run
    evaluation = evaluate(run, cohort)
    metrics = evaluation.metrics
    assert set(metrics["batches"]) == {"T2w", "T1w"}
    for contrast, item in metrics["batches"].items():
        e = expected[contrast]
        p_hit, p_miss, n = e["P_hit"], e["P_miss"], e["N"]
        p = p_hit + p_miss
        assert (item["n_series"], item["n_lesion"], item["n_excluded"], item["n_flagged"]) == (4, 2, 0, 1)
        assert item["patient_auroc"] == pytest.approx(PATIENT_AUROC, abs=1e-12)
        assert item["patient_ap"] == pytest.approx(PATIENT_AP, abs=1e-12)
        # Hit lesion voxels (1.0) beat every normal voxel (0); missed ones (0) tie with all: half.
        assert item["voxel_auroc"] == pytest.approx((p_hit + 0.5 * p_miss) / p, abs=1e-12)
        assert item["voxel_ap"] == pytest.approx(p_hit / p + p_miss / p * p / (p + n), abs=1e-12)
        assert item["dice_max"] == pytest.approx(max(2 * p_hit / (p_hit + p), 2 * p / (2 * p + n)), abs=1e-12)
        assert item["n_lesion_voxels"] == p and item["n_brain_voxels"] == p + n
        l_hit, l_miss = e["L_hit"], e["L_miss"]
        assert item["dice_at_product_threshold"] == pytest.approx(2 * l_hit / (2 * l_hit + l_miss), abs=1e-12)
        assert item["iou_at_product_threshold"] == pytest.approx(l_hit / (l_hit + l_miss), abs=1e-12)
        assert item["product_threshold_unit"] == 0.5
        assert item["notes"] == []
        rows = {r["series_instance_uid"]: r for r in metrics["series"]}
        assert rows[e["hit"]]["dice_at_product_threshold"] == 1.0 and rows[e["hit"]]["dice_max"] == 1.0
        assert rows[e["miss"]]["dice_at_product_threshold"] == 0.0
        # Two lesion series per batch were cut for the montage.
        assert len(evaluation.batches[contrast].cases) == 2
    localizers = sum(1 for r in metrics["series"] if r["status"] == "skipped")
    assert metrics["excluded"] == {"n_series": localizers, "n_with_truth": 0,
                                   "by_reason": {"localizer (ImageType)": localizers}}


def test_all_normal_batch_gives_null_with_notes(copies):
    run, truth = copies
    labels = json.loads((truth / "labels.json").read_text())
    for study in labels["studies"]:
        for entry in study["series"]:
            if entry["contrast"] == "T2w" and entry["has_lesion"]:
                path = truth / entry["truth"]["lesion"]
                image = nib.load(str(path))
                nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(path))
                entry["has_lesion"] = False
    (truth / "labels.json").write_text(json.dumps(labels))
    metrics = evaluate(run, truth, keep_cases=False).metrics
    item = metrics["batches"]["T2w"]
    assert item["n_lesion"] == 0
    for key in ("patient_auroc", "patient_ap", "voxel_auroc", "voxel_ap", "dice_max"):
        assert item[key] is None, key
    # The former hit's mask is now all false positive: Dice 0, not undefined.
    assert item["dice_at_product_threshold"] == 0.0
    assert any("all normal" in note for note in item["notes"])
    assert any("no lesion voxel" in note for note in item["notes"])
    # The other batch is untouched.
    assert metrics["batches"]["T1w"]["patient_auroc"] == pytest.approx(PATIENT_AUROC)


def test_all_anomalous_batch(copies):
    run, truth = copies
    labels = json.loads((truth / "labels.json").read_text())
    for study in labels["studies"]:
        for entry in study["series"]:
            if entry["contrast"] == "T1w" and not entry["has_lesion"]:
                lesion_path = truth / entry["truth"]["lesion"]
                brain = nib.load(str(truth / entry["truth"]["brain"]))
                data = np.zeros(brain.shape, np.uint8)
                centre = np.argwhere(np.asarray(brain.dataobj) > 0).mean(axis=0).astype(int)
                data[tuple(centre)] = 1  # one lesion voxel inside the brain
                nib.save(nib.Nifti1Image(data, brain.affine), str(lesion_path))
                entry["has_lesion"] = True
    (truth / "labels.json").write_text(json.dumps(labels))
    item = evaluate(run, truth, keep_cases=False).metrics["batches"]["T1w"]
    assert (item["n_series"], item["n_lesion"]) == (4, 4)
    assert item["patient_auroc"] is None and item["patient_ap"] == pytest.approx(1.0, abs=1e-12)
    assert any("no normal series" in note for note in item["notes"])


def test_skipped_study_is_reported_and_counted(copies, hand_run):
    """A study with no SEG written: both its series skipped by the run, files absent."""
    run, truth = copies
    expected = hand_run[1]
    labels = json.loads((truth / "labels.json").read_text())
    # The normal study whose T2w scored 0.1: without it the T2w patient AUROC is
    # 0.9 > 0.5: 1, 0.5 tie 0.5: 1/2 -> 1.5 / 2.
    report = json.loads((run / "report.json").read_text())
    by_uid = {r["series_instance_uid"]: r for r in report["series"]}
    study = next(s for s in labels["studies"]
                 if any(by_uid[e["series_instance_uid"]]["score"] == 0.1 and e["contrast"] == "T2w" for e in s["series"]))
    reason = "could not be loaded or preprocessed: test"
    for entry in study["series"]:
        row = by_uid[entry["series_instance_uid"]]
        for key in ("seg_binary", "seg_score"):
            (run / row[key]).unlink()
        row.update(status="skipped", reason=reason, score=None, seg_binary=None, seg_score=None)
    (run / "report.json").write_text(json.dumps(report))
    metrics = evaluate(run, truth, keep_cases=False).metrics
    t2 = metrics["batches"]["T2w"]
    assert (t2["n_series"], t2["n_excluded"], t2["excluded_by_reason"]) == (3, 1, {reason: 1})
    assert t2["patient_auroc"] == pytest.approx(1.5 / 2, abs=1e-12)
    # Lesion voxels are unchanged; the normal voxels of the removed series are gone.
    assert t2["n_lesion_voxels"] == expected["T2w"]["P_hit"] + expected["T2w"]["P_miss"]
    assert metrics["excluded"]["n_with_truth"] == 2
    assert metrics["excluded"]["by_reason"][reason] == 2
    skipped = [r for r in metrics["series"] if r["reason"] == reason]
    assert {r["series_instance_uid"] for r in skipped} == {e["series_instance_uid"] for e in study["series"]}
    assert all(r["in_truth"] == "series" and r["status"] == "skipped" for r in skipped)


def test_run_without_fractional_segs(copies):
    run, truth = copies

    def drop(report):
        report["config"]["output"]["fractional"] = False
        for row in report["series"]:
            if row["seg_score"]:
                (run / row["seg_score"]).unlink()
                row["seg_score"] = None

    _edit_json(run / "report.json", drop)
    item = evaluate(run, truth, keep_cases=False).metrics["batches"]["T2w"]
    assert item["voxel_auroc"] is None and item["dice_max"] is None
    assert item["patient_auroc"] == pytest.approx(PATIENT_AUROC) and item["dice_at_product_threshold"] > 0
    assert any("output.fractional" in note for note in item["notes"])


# --------------------------------------------------------------------------------------------
# bad input: each names the series


def _first_series(truth: Path, contrast: str = "T2w", lesion: bool = True) -> dict[str, Any]:
    labels = json.loads((truth / "labels.json").read_text())
    return next(e for s in labels["studies"] for e in s["series"] if e["contrast"] == contrast and e["has_lesion"] == lesion)


def test_scored_series_missing_from_labels(copies):
    run, truth = copies
    uid = _first_series(truth)["series_instance_uid"]
    _edit_json(truth / "labels.json", lambda labels: [
        study["series"].remove(e) for study in labels["studies"] for e in list(study["series"])
        if e["series_instance_uid"] == uid])
    with pytest.raises(TruthMismatchError, match=f"no truth.*{uid}"):
        evaluate(run, truth)


def test_labels_series_absent_from_run(copies):
    run, truth = copies
    uid = _first_series(truth, "T1w", lesion=False)["series_instance_uid"]
    _edit_json(run / "report.json", lambda report: report["series"].remove(
        next(r for r in report["series"] if r["series_instance_uid"] == uid)))
    with pytest.raises(TruthMismatchError, match=f"absent from .*{uid}"):
        evaluate(run, truth)


def test_missing_truth_nifti(copies):
    run, truth = copies
    entry = _first_series(truth)
    (truth / entry["truth"]["brain"]).unlink()
    with pytest.raises(TruthMismatchError, match=f"series {entry['series_instance_uid']}: the brain truth mask .* does not exist"):
        evaluate(run, truth)


def test_truth_shape_mismatch(copies):
    run, truth = copies
    entry = _first_series(truth)
    other = _first_series(truth, "T1w")
    shutil.copy(truth / other["truth"]["lesion"], truth / entry["truth"]["lesion"])
    with pytest.raises(TruthMismatchError, match=f"series {entry['series_instance_uid']}: the lesion truth mask .* shape"):
        evaluate(run, truth)


def test_truth_geometry_mismatch(copies):
    run, truth = copies
    entry = _first_series(truth)
    path = truth / entry["truth"]["lesion"]
    image = nib.load(str(path))
    shifted = image.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), str(path))
    with pytest.raises(TruthMismatchError, match=f"series {entry['series_instance_uid']}.*not on the source series' grid"):
        evaluate(run, truth)


def test_has_lesion_disagrees_with_mask(copies):
    run, truth = copies
    uid = _first_series(truth)["series_instance_uid"]
    _edit_json(truth / "labels.json", lambda labels: [
        e.update(has_lesion=False) for study in labels["studies"] for e in study["series"]
        if e["series_instance_uid"] == uid])
    with pytest.raises(TruthMismatchError, match=f"series {uid}: labels.json says has_lesion=False"):
        evaluate(run, truth)


def test_scored_series_seg_missing(copies):
    run, truth = copies
    report = json.loads((run / "report.json").read_text())
    row = next(r for r in report["series"] if r["status"] == "scored")
    (run / row["seg_score"]).unlink()
    with pytest.raises(RunOutputError, match=row["series_instance_uid"]):
        evaluate(run, truth)


def test_missing_labels_and_report(tmp_path: Path, hand_run):
    with pytest.raises(RunOutputError, match="report.json does not exist"):
        evaluate(tmp_path, tmp_path)
    with pytest.raises(TruthMismatchError, match="labels.json does not exist"):
        evaluate(hand_run[0], tmp_path)


# --------------------------------------------------------------------------------------------
# outputs


def test_outputs_written_beside_the_run_never_in_it(hand_run, cohort: Path, tmp_path: Path):
    run = hand_run[0]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    evaluation = evaluate(run, cohort)
    with pytest.raises(EvaluationInputError, match="inside"):
        write_evaluation(evaluation, run / "evaluation")
    out = tmp_path / "evaluation"
    written = write_evaluation(evaluation, out)
    names = sorted(p.name for p in written)
    assert names == sorted(["metrics.json", "metrics.md", "series_histograms.npz", "roc_pr_patient.png", "roc_pr_voxel.png",
                            "dice_vs_threshold.png", "montage_T2w.png", "montage_T1w.png"])
    for path in written:
        assert path.stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: no NaN anywhere
    assert metrics["schema"] == "codegraph3d.evaluation/1"
    assert metrics["batches"]["T2w"]["patient_auroc"] == pytest.approx(PATIENT_AUROC)
    text = (out / "metrics.md").read_text()
    assert "| T2w | 4 (2) | 0 | 0.875 | 0.833 |" in text and "localizer (ImageType)" in text
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert default_out_dir(run) == run.resolve().parent / "output-evaluation"


def test_cli(hand_run, cohort: Path, tmp_path: Path, capsys):
    run = hand_run[0]
    assert main(["--run", str(run), "--truth", str(cohort), "--out", str(tmp_path / "ev"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| T1w | 4 (2) | 0 | 0.875 |" in printed
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["metrics.json", "metrics.md", "series_histograms.npz"]
    assert main(["--run", str(run), "--truth", str(tmp_path), "--out", str(tmp_path / "ev2")]) == 2
    assert "labels.json does not exist" in capsys.readouterr().err
    assert main(["--run", str(run), "--truth", str(cohort), "--out", str(run / "x")]) == 2


# --------------------------------------------------------------------------------------------
# pictures' geometry


def test_lps_view_orders_axes_superior_posterior_left():
    sagittal = np.array([[0, 1.0, 0], [0, 0, -1.0], [-1.0, 0, 0]]).T  # x -> P, y -> I, z -> R
    perm, flips, index_axes = lps_view(sagittal)
    # view S comes from index y (array axis 1, flipped), P from index x (axis 2), L from z (axis 0, flipped)
    assert perm == (1, 2, 0) and flips == (True, False, True) and index_axes == (1, 0, 2)
    assert lps_view(np.eye(3)) == ((0, 1, 2), (False, False, False), (2, 1, 0))


def test_case_slices_cut_through_the_lesion_centre():
    array = np.zeros((10, 12, 14), np.float32)
    lesion = np.zeros(array.shape, bool)
    lesion[2:5, 6:9, 10:13] = True  # centre (z, y, x) = (3, 7, 11)
    array[lesion] = 1.0
    volume = Volume(array, origin=np.zeros(3), spacing=np.array([1.0, 1.0, 2.0]), direction=np.eye(3))
    case = case_slices(volume, lesion, score=array * 0.5, binary=lesion, uid="1.2", patient_id="P",
                       dice=0.5, dice_max=0.7)
    assert case.centre_zyx == (3, 7, 11)
    axial = case.planes["axial"]
    assert axial["image"].shape == (12, 14) and axial["lesion"].sum() == 9 and axial["score"].max() == 0.5
    assert case.planes["coronal"]["image"].shape == (10, 14)
    # Superior (high z) at the top of coronal and sagittal slices.
    assert np.flatnonzero(case.planes["coronal"]["lesion"].any(axis=1)).tolist() == [5, 6, 7]
    assert case.aspects == {"axial": 1.0, "coronal": 2.0, "sagittal": 2.0}
    with pytest.raises(ValueError, match="empty"):
        case_slices(volume, np.zeros_like(lesion), score=None, binary=None, uid="1.2", patient_id="P",
                    dice=None, dice_max=None)


def test_rank_cases_best_median_worst():
    def case(dice, dice_max, name):
        return CaseSlices(name, name, dice, dice_max)

    cases = [case(0.0, 0.3, "a"), case(0.6, 0.7, "b"), case(0.0, 0.5, "c"), case(None, None, "d")]
    ranked = [(label, c.series_instance_uid) for label, c in rank_cases(cases)]
    assert ranked == [("best", "b"), ("median", "a"), ("worst", "d")]
    assert [label for label, _ in rank_cases(cases[:2])] == ["best", "worst"]
    assert rank_cases([]) == []
