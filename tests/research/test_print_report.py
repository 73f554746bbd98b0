"""The report printer's batch lines (``tools/print_report.py``)."""

from __future__ import annotations

from types import ModuleType

from fixtures import load_tool


def _tool() -> ModuleType:
    return load_tool("print_report")


def _batch(point: dict[str, object]) -> dict[str, object]:
    return {"contrast": "T2w", "n_series": 2, "n_flagged": 1, "threshold_policy": "lesion/3", "operating_point": point}


def test_a_measured_operating_point_is_printed_as_a_count() -> None:
    line = _tool()._batch_line(_batch({"false_flag_rate_per_normal_series": 0.025, "normal_series": 80, "flagged": 2}))
    assert line.endswith("false-flag rate 2.5% of normal series (2/80)")


def test_a_bank_calibrated_operating_point_is_printed_as_a_bound() -> None:
    # A study decided against a cohort bank: the rate is the calibration's bound, with no count of flags.
    point = {"false_flag_rate_per_normal_series": 0.05, "normal_series": 48, "bound_rank": 1, "confidence": 0.9}
    line = _tool()._batch_line(_batch(point))
    assert line.endswith("at most 5.0% of normal series with confidence 0.9 (bound: the largest evidence of 48 bank volumes)")
    average = _tool()._batch_line(_batch({**point, "confidence": 0.0, "false_flag_rate_per_normal_series": 1 / 41}))
    assert "at most 2.4% of normal series on average over banks" in average
    second = _tool()._batch_line(_batch({**point, "bound_rank": 2, "false_flag_rate_per_normal_series": 0.1}))
    assert "(bound: the 2nd largest evidence of 48 bank volumes)" in second
    assert _tool()._batch_line(_batch({"false_flag_rate_per_normal_series": "not measured"})).endswith("not measured")
