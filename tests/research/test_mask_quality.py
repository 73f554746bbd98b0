"""Brain mask quality against a synthetic cohort's truth (codegraph3d_research.mask_quality).

One tiny whole-head cohort (2 studies, T2w + T1w, matrix scale 0.3: ~70-90 voxel matrices, 5-9 mm
slices) is measured once, with deepbet and the carried T1w mask, on its first study; the template
method (5-20 s a series here) is left to the command's own runs.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from codegraph3d.io.dicom import load_series_volume, scan_headers
from codegraph3d_research.mask_quality import (
    CohortLabelsError,
    dice,
    load_labels,
    main,
    measure_cohort,
    read_truth_brain,
)
from codegraph3d.preprocess.registration import install_template
from codegraph3d_research.synthetic import make_cohort

# Measured on this cohort (seed 3, N4 on, CPU): T1w deepbet Dice 0.976 (study 1) and 0.981
# (study 2); T2w deepbet 0.875 / 0.801; the T1w mask carried onto T2w 0.971 / 0.974. The floors
# leave room for library drift and still fail on a mask that is off the brain or is the whole head.
T1W_DEEPBET_DICE_FLOOR = 0.90
CARRIED_DICE_FLOOR = 0.90


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the command once: cohort, labels, JSON document, Markdown text and printed output."""
    tmp = tmp_path_factory.mktemp("mask_quality")
    cohort = tmp / "cohort"
    labels = make_cohort(cohort, n_subjects=2, contrasts=("T2w", "T1w"), matrix_scale=0.3, head_fraction=1.0,
                         with_localizer_fraction=0.0, seed=3)
    models = tmp / "models"
    install_template(models)
    md, js = tmp / "out" / "results.md", tmp / "out" / "results.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main([str(cohort), "--models", str(models), "--methods", "deepbet", "carried", "--limit", "1",
                       "--out", str(md), "--out", str(js)])
    assert status == 0, printed.getvalue()
    return {
        "cohort": cohort, "models": models, "labels": labels, "printed": printed.getvalue(),
        "document": json.loads(js.read_text(encoding="utf-8")), "markdown": md.read_text(encoding="utf-8"),
    }


def test_one_row_per_series_and_method_of_the_first_study_only(measured: dict[str, Any]) -> None:
    first = measured["labels"]["studies"][0]["series"]
    rows = measured["document"]["rows"]
    expected = {(s["series_instance_uid"], method) for s in first for method in ("deepbet", "carried")}
    assert len(rows) == len(expected) == 4
    assert {(row["series_instance_uid"], row["method"]) for row in rows} == expected
    # Progress: one line per series of the first study.
    assert sum(line.startswith("[") for line in measured["printed"].splitlines()) == len(first)
    assert measured["document"]["settings"]["n_studies"] == 1


def test_dice_volumes_and_carry_against_the_truth(measured: dict[str, Any]) -> None:
    contrasts = {s["series_instance_uid"]: s for s in measured["labels"]["studies"][0]["series"]}
    rows = {(row["contrast"], row["method"]): row for row in measured["document"]["rows"]}
    for row in rows.values():
        assert row["input"] == "head"
        if row["status"] == "ok":
            assert 0.0 <= row["dice"] <= 1.0
            # The truth read back on the series grid has the volume the generator recorded.
            expected_ml = contrasts[row["series_instance_uid"]]["brain_volume_ml"]
            assert row["truth_ml"] == pytest.approx(expected_ml, abs=0.1)
            assert row["volume_error_ml"] == pytest.approx(row["mask_ml"] - row["truth_ml"], abs=0.02)
            assert row["seconds"] > 0 and row["n4_seconds"] > 0
    assert rows[("T1w", "deepbet")]["status"] == "ok"
    assert rows[("T1w", "deepbet")]["dice"] > T1W_DEEPBET_DICE_FLOOR
    assert rows[("T1w", "carried")]["status"] == "n/a" and rows[("T1w", "carried")]["dice"] is None
    carried = rows[("T2w", "carried")]
    assert carried["status"] == "ok" and isinstance(carried["doubtful"], bool)
    assert carried["dice"] > CARRIED_DICE_FLOOR
    assert rows[("T2w", "deepbet")]["doubtful"] is None


def test_summary_groups_and_markdown(measured: dict[str, Any]) -> None:
    summary = {(g["contrast"], g["input"], g["method"]): g for g in measured["document"]["summary"]}
    # The T1w carried row is n/a, so it forms no group.
    assert set(summary) == {("T1w", "head", "deepbet"), ("T2w", "head", "deepbet"), ("T2w", "head", "carried")}
    rows = {(row["contrast"], row["method"]): row for row in measured["document"]["rows"]}
    for (contrast, _, method), group in summary.items():
        assert group["n"] == 1 and group["failed"] == 0
        assert group["mean_dice"] == group["min_dice"] == rows[(contrast, method)]["dice"]
    markdown = measured["markdown"]
    assert "| contrast | input | method | n | failed | mean Dice | min Dice | mean volume error (ml) |" in markdown
    assert "subarachnoid CSF" in markdown
    assert f"| T1w | head | deepbet | 1 | 0 | {rows[('T1w', 'deepbet')]['dice']:.3f} |" in markdown


def test_missing_labels_json_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dicom").mkdir()
    with pytest.raises(CohortLabelsError, match=r"labels\.json does not exist.*make_demo_cohort"):
        load_labels(tmp_path)
    assert main([str(tmp_path), "--methods", "deepbet"]) == 2
    assert str(tmp_path / "labels.json") in capsys.readouterr().err


def test_template_method_without_the_template_names_the_install_command(
    measured: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=r"registration template not found.*template install"):
        measure_cohort(measured["cohort"], models=tmp_path, methods=["template"], limit=1)


def test_truth_on_another_grid_and_bad_arguments_are_refused(measured: dict[str, Any]) -> None:
    studies = load_labels(measured["cohort"])
    first, second = studies[0].series[0], studies[1].series[0]
    headers = {h.series_instance_uid: h for h in scan_headers(measured["cohort"] / "dicom").series}
    volume = load_series_volume(headers[first.series_instance_uid]).volume
    assert read_truth_brain(first.brain_path, volume).shape == volume.array.shape
    with pytest.raises(CohortLabelsError, match="another series or grid"):
        read_truth_brain(second.brain_path, volume)
    with pytest.raises(ValueError, match="methods must be distinct"):
        measure_cohort(measured["cohort"], methods=["deepbet", "deepbet"])
    with pytest.raises(ValueError, match="limit must be >= 1"):
        measure_cohort(measured["cohort"], methods=["deepbet"], limit=0)
    with pytest.raises(SystemExit):
        main([str(measured["cohort"]), "--out", "results.csv"])


def test_dice() -> None:
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        dice(a, b[:3])
