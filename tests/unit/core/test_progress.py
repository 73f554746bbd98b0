"""The clock behind every stage's progress line."""

from __future__ import annotations

import time

import pytest

from codegraph3d.core.progress import StageClock


def test_eta_extrapolates_the_rate_so_far():
    clock = StageClock(4)
    time.sleep(0.05)
    elapsed, remaining = clock.advance()
    assert elapsed >= 0.05
    assert remaining == pytest.approx(3 * elapsed)
    assert clock.fraction == 0.25
    elapsed, remaining = clock.advance(3)
    assert remaining == 0.0 and clock.fraction == 1.0


def test_total_grows_when_more_work_is_done_than_announced():
    clock = StageClock(1)
    clock.advance(2)
    assert clock.total == 2 and clock.fraction == 1.0


def test_no_work_is_complete_and_bad_amounts_are_refused():
    assert StageClock(0).fraction == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        StageClock(-1)
    with pytest.raises(ValueError, match="non-negative"):
        StageClock(1).advance(-1)
