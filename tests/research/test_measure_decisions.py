"""The decision benchmark's study-level count (``tools/measure_decisions.py``)."""

from __future__ import annotations

from types import ModuleType

from fixtures import load_tool


def _tool() -> ModuleType:
    return load_tool("measure_decisions")


def _series(study: str, lesion: bool, flagged: bool) -> dict[str, object]:
    return {"study": study, "lesion": lesion, "flagged": flagged}


def test_a_study_is_flagged_when_any_of_its_series_is() -> None:
    rows = {
        "T1w": {"studies": [_series("a", True, True), _series("b", True, False), _series("c", False, False),
                            _series("d", False, False)]},
        "T2w": {"studies": [_series("a", True, False), _series("b", True, False), _series("c", False, True),
                            _series("e", False, False)]},
    }
    counts = _tool().study_level(rows)
    # a: lesion, flagged on T1w; b: lesion, never flagged; c: normal, flagged on T2w; d, e: normal, clear.
    assert counts == {"lesion_studies_flagged": "1/2", "normal_studies_flagged": "1/3"}


def test_a_study_with_a_lesion_in_one_series_is_a_lesion_study() -> None:
    rows = {"T1w": {"studies": [_series("a", False, False)]}, "T2w": {"studies": [_series("a", True, True)]}}
    assert _tool().study_level(rows) == {"lesion_studies_flagged": "1/1", "normal_studies_flagged": "0/0"}


def test_the_bank_volume_scores_are_kept_largest_first_and_none_without_a_bank() -> None:
    tool = _tool()
    assert tool._largest([0.5, 2.0, 1.25], count=2) == [2.0, 1.25]
    assert tool._largest([]) is None
