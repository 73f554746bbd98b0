"""DICOM input and output: header scan and series loading, series selection, DICOM-SEG writing.

``codegraph3d.io.seg`` (highdicom) is imported on first use of its names, so that scanning and
selection stay light.
"""

from __future__ import annotations

from typing import Any

from codegraph3d.io.dicom import (
    LoadedSeries,
    ScanResult,
    SeriesHeader,
    SliceHeader,
    Study,
    chunk_studies,
    load_series_volume,
    scan_headers,
)
from codegraph3d.io.selection import (
    CONTRASTS,
    DEFAULT_SELECTION_RULES,
    SelectionRules,
    SeriesDecision,
    classify_contrast,
    form_batches,
    select_series,
)

_SEG_NAMES = {"write_binary_seg", "write_fractional_seg"}

__all__ = [
    "CONTRASTS",
    "DEFAULT_SELECTION_RULES",
    "LoadedSeries",
    "ScanResult",
    "SelectionRules",
    "SeriesDecision",
    "SeriesHeader",
    "SliceHeader",
    "Study",
    "chunk_studies",
    "classify_contrast",
    "form_batches",
    "load_series_volume",
    "scan_headers",
    "select_series",
    *sorted(_SEG_NAMES),
]


def __getattr__(name: str) -> Any:
    if name in _SEG_NAMES:
        from codegraph3d.io import seg

        return getattr(seg, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
