"""Elapsed time and a linear ETA for the progress lines every long stage logs, and peak memory.

Each stage logs its own line (an operator searching a log greps for the stage's words); this
module only keeps the clock and the arithmetic in one place.
"""

from __future__ import annotations

import resource
import time

__all__ = ["StageClock", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB; children not included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StageClock:
    """Elapsed seconds since construction and the time left at the rate so far.

    Parameters
    ----------
    total : float
        Units of work in the stage (series, or a cost estimate such as pairs of volumes). It may
        grow later (:attr:`total` is writable) when the stage learns more work is coming.
    """

    def __init__(self, total: float) -> None:
        if total < 0:
            raise ValueError(f"total work must be non-negative; got {total!r}")
        self.total = float(total)
        self.done = 0.0
        self._started = time.perf_counter()

    def advance(self, units: float = 1.0) -> tuple[float, float]:
        """Record ``units`` of finished work; return ``(elapsed_s, remaining_s)``.

        ``remaining_s`` extrapolates the rate so far linearly (0 before any work is done or
        once ``done`` reaches ``total``).
        """
        if units < 0:
            raise ValueError(f"finished work must be non-negative; got {units!r}")
        self.done += units
        self.total = max(self.total, self.done)
        elapsed = time.perf_counter() - self._started
        remaining = elapsed / self.done * (self.total - self.done) if self.done > 0 else 0.0
        return elapsed, remaining

    @property
    def fraction(self) -> float:
        """Share of the work done, in [0, 1] (1 for a stage with no work)."""
        return self.done / self.total if self.total > 0 else 1.0
