"""Series selection and contrast classification (codegraph3d.io.selection) on header objects."""

from __future__ import annotations

import dataclasses

import logging
from pathlib import Path

import pytest

from codegraph3d.io.dicom import ScanResult, SeriesHeader, SliceHeader, Study
from codegraph3d.io.selection import (
    DEFAULT_SELECTION_RULES,
    SelectionRules,
    classify_contrast,
    form_batches,
    select_series,
)

MR = "1.2.840.10008.5.1.4.1.1.4"


def header(
    description: str = "",
    *,
    n: int = 24,
    modality: str = "MR",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    te: float | None = None,
    tr: float | None = None,
    ti: float | None = None,
    agent: str = "",
    frames: int = 1,
    sop_class: str = MR,
    positions_per_slice: int = 1,
    uid: str | None = None,
) -> SeriesHeader:
    slices = [
        SliceHeader(
            path=Path(f"/x/{i}.dcm"),
            sop_instance_uid=f"1.2.{i}",
            sop_class_uid=sop_class,
            instance_number=i,
            position=(0.0, 0.0, float(i // positions_per_slice)),
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            pixel_spacing=(1.0, 1.0),
            rows=16,
            columns=16,
            number_of_frames=frames,
        )
        for i in range(n)
    ]
    return SeriesHeader(
        study_instance_uid="1.2.3",
        series_instance_uid=uid or f"1.2.3.{abs(hash(description)) % 10**6}",
        patient_id="P1",
        modality=modality,
        series_description=description,
        image_type=image_type,
        echo_time=te,
        repetition_time=tr,
        inversion_time=ti,
        contrast_agent=agent,
        sop_class_uid=sop_class,
        rows=16,
        columns=16,
        slices=slices,
    )


@pytest.mark.parametrize(
    ("description", "kwargs", "contrast", "rule_start"),
    [
        ("T2 TSE AX", {}, "T2w", "description:T2w"),
        ("t2_tse_tra", {}, "T2w", "description:T2w"),
        ("AX T2 FLAIR", {}, "FLAIR", "description:FLAIR"),
        ("t2_tirm_tra_dark-fluid", {}, "FLAIR", "description:FLAIR"),
        ("Dark Fluid", {}, "FLAIR", "description:FLAIR"),
        ("AX T1 FLAIR", {}, "T1w", "description:T1w"),
        ("t1_mprage_sag", {}, "T1w", "description:T1w"),
        ("Sag 3D BRAVO", {}, "T1w", "description:T1w"),
        ("FSPGR 3D", {}, "T1w", "description:T1w"),
        ("t1_mprage_sag_post", {}, "T1w-CE", "description:T1w+description:enhanced"),
        ("T1 +C AX", {}, "T1w-CE", "description:T1w+description:enhanced"),
        ("T1 SE GAD", {}, "T1w-CE", "description:T1w+description:enhanced"),
        ("t1_se_tra_ce", {}, "T1w-CE", "description:T1w+description:enhanced"),
        ("T1 pre-contrast", {}, "T1w", "description:T1w+description:non-enhanced"),
        ("T1 SE AX", {"agent": "Gadovist"}, "T1w-CE", "description:T1w+ContrastBolusAgent"),
        ("T1 SE AX", {"agent": "NONE"}, "T1w", "description:T1w"),
        ("t2_star_gre", {}, "other", "description:other"),
        ("PD TSE", {}, "other", "description:other"),
        ("series 7", {"te": 120.0, "tr": 9000.0, "ti": 2500.0}, "FLAIR", "timing:TI>"),
        ("series 8", {"te": 95.0, "tr": 5000.0}, "T2w", "timing:TE>="),
        ("series 9", {"te": 12.0, "tr": 500.0}, "T1w", "timing:TE<="),
        ("series 10", {"te": 3.0, "tr": 2300.0, "ti": 900.0}, "T1w", "timing:TI in"),
        (
            "series 11",
            {"te": 3.0, "tr": 2300.0, "ti": 900.0, "agent": "gd"},
            "T1w-CE",
            "timing:TI in",
        ),
        ("series 12", {"te": 40.0, "tr": 1500.0}, "other", "no description"),
        ("", {}, "other", "no description"),
    ],
)
def test_classification_table(
    description: str, kwargs: dict, contrast: str, rule_start: str
) -> None:
    got, rule = classify_contrast(header(description, **kwargs))
    assert got == contrast, rule
    assert rule.startswith(rule_start)


@pytest.mark.parametrize(
    ("series", "reason_part"),
    [
        (header("CT head", modality="CT"), "modality CT"),
        (header("T2", sop_class="1.2.840.10008.5.1.4.1.1.7"), "secondary capture"),
        (header("T2", frames=30), "multi-frame"),
        (header("AAHead_Scout"), "localizer"),
        (header("3-plane loc"), "localizer"),
        (header("Survey_SHC"), "localizer"),
        (header("t2_loc"), "localizer"),
        (header("T2", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "localizer (ImageType)"),
        (header("T2 MPR", image_type=("DERIVED", "PRIMARY", "MPR")), "derived"),
        (header("T2", image_type=("ORIGINAL", "SECONDARY")), "secondary"),
        (header("ep2d_diff_3scan_trace"), "excluded series type DWI"),
        (header("DWI b1000"), "excluded series type DWI"),
        (header("ADC map"), "excluded series type ADC"),
        (header("ep2d_perf"), "excluded series type perfusion"),
        (header("SWI_Images"), "excluded series type SWI"),
        (header("T2 TSE", n=12), "fewer than min_slices=20"),
        (header("T2 multi-echo", positions_per_slice=2, n=40), "4-D series not supported"),
        (header("AX FLAIR"), "contrast FLAIR not in scored contrasts"),
        (header("T1 post gd"), "contrast T1w-CE not in scored contrasts"),
        # Output files are named by UIDs: a UID that is a path never gets that far.
        (header("T2 TSE", uid="1.2.3/../../../etc/cron.d/x"), "SeriesInstanceUID '1.2.3/../../../etc/cron.d/x' is not a valid"),
        (header("T2 TSE", uid="1." + "2" * 70), "is not a valid DICOM UID"),
        (header("T2 TSE", uid="1.2.3\x00"), "is not a valid DICOM UID"),
    ],
)
def test_skip_reasons(series: SeriesHeader, reason_part: str) -> None:
    (decision,) = select_series([series])
    assert not decision.taken
    assert reason_part in decision.reason
    assert decision.batch is None


def test_selection_logs_and_batches_never_mix(caplog) -> None:
    series = [
        header("T2 TSE AX", uid="1.1"),
        header("t1_mprage", uid="1.2"),
        header("T2 FLAIR", uid="1.3"),
        header("T2 TSE COR", uid="1.4"),
        header("localizer", uid="1.5"),
    ]
    scan = ScanResult(studies=[Study(study_instance_uid="1.2.3", series=series)])
    with caplog.at_level(logging.INFO, logger="codegraph3d.io.selection"):
        decisions = select_series(scan)
    assert [d.taken for d in decisions] == [True, True, False, True, False]
    assert len(caplog.records) == 5
    line = caplog.records[0].getMessage()
    assert (
        "study=1.2.3" in line
        and "series=1.1" in line
        and "decision=take" in line
        and "batch=T2w" in line
    )
    assert "decision=skip" in caplog.records[2].getMessage()
    batches = form_batches(decisions)
    assert list(batches) == ["T1w", "T2w"]
    assert [d.series_instance_uid for d in batches["T2w"]] == ["1.1", "1.4"]
    assert all({d.contrast for d in batch} == {c} for c, batch in batches.items())
    assert decisions[0].series is series[0]


def test_rules_override_and_validation() -> None:
    rules = SelectionRules.from_dict(
        {"scored_contrasts": ["FLAIR"], "min_slices": 5, "timing": {"t2_min_te": 60}}
    )
    assert (
        rules.timing["t2_min_te"] == 60
        and rules.timing["t1_max_tr"] == DEFAULT_SELECTION_RULES["timing"]["t1_max_tr"]
    )
    decisions = select_series(
        [header("AX FLAIR", n=6), header("T2", n=6)],
        {"scored_contrasts": ["FLAIR"], "min_slices": 5},
    )
    assert [d.taken for d in decisions] == [True, False]
    with pytest.raises(ValueError, match="unknown selection rule 'min_slice'"):
        SelectionRules.from_dict({"min_slice": 3})
    with pytest.raises(ValueError, match="scored_contrasts"):
        SelectionRules.from_dict({"scored_contrasts": ["T3w"]})
    with pytest.raises(ValueError, match="invalid regular expression"):
        SelectionRules.from_dict({"localizer_patterns": ["("]})
    with pytest.raises(ValueError, match="modalities must be a list"):
        SelectionRules.from_dict({"modalities": "MR"})
    with pytest.raises(ValueError, match="unknown selection timing"):
        SelectionRules.from_dict({"timing": {"t2_te": 1}})
    for bad in (0, -5, 1.5, True, "big"):
        with pytest.raises(ValueError, match="max_voxels must be"):
            SelectionRules.from_dict({"max_voxels": bad})


def test_series_over_max_voxels_is_skipped_from_its_headers() -> None:
    """16 x 16 x 24 = 6,144 voxels: taken at the limit, skipped one voxel below it."""
    at_limit, below = select_series([header("T2 TSE", uid="1.1")], {"max_voxels": 6144}), select_series(
        [header("T2 TSE", uid="1.2")], {"max_voxels": 6143}
    )
    assert at_limit[0].taken
    assert not below[0].taken
    assert below[0].reason.startswith("very large series: 16x16x24 = 6,144 voxels, more than max_voxels=6,143")
    assert DEFAULT_SELECTION_RULES["max_voxels"] == 512 * 512 * 384


def test_a_study_uid_that_is_not_a_uid_is_skipped() -> None:
    series = dataclasses.replace(header("T2 TSE"), study_instance_uid="..\\..\\windows")
    (decision,) = select_series([series])
    assert not decision.taken and "StudyInstanceUID" in decision.reason and "not a valid DICOM UID" in decision.reason
