"""The decision policy's operating point: its false-flag rate per normal series, where measured.

A flag is only as useful as its false-flag rate is known. ``operating_points.json`` beside this
module lists the rates measured by ``tools/measure_decisions.py`` on all-normal batches (synthetic
cohorts, held-out seeds), for one encoder, contrast and set of the settings a flag depends on each
(not the bounds that only shape the binary mask: :meth:`DecisionSettings.record`).
A run whose settings match an entry reports that rate (report.json and the SR); any other run
(DINOv2 today: no weights here to measure it with) reports ``not measured`` and says why.

A batch scored against a cohort bank with ``threshold.bank_false_flag_rate`` set has its bound
calibrated on the bank's own volumes in that very batch (:func:`codegraph3d.decision.lesion_policy.bank_calibration`):
its operating point is that calibration's bound, for any encoder (:func:`bank_operating_point`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from codegraph3d.decision.settings import DecisionSettings

__all__ = ["NOT_MEASURED", "TABLE", "bank_operating_point", "entries", "operating_point"]

NOT_MEASURED = "not measured"
#: The measured operating points shipped with the package.
TABLE = Path(__file__).with_name("operating_points.json")


@lru_cache(maxsize=4)
def entries(table: Path = TABLE) -> tuple[dict[str, Any], ...]:
    """The entries of an operating-point table (read once per file and process)."""
    with table.open(encoding="utf-8") as handle:
        return tuple(json.load(handle)["entries"])


def operating_point(
    policy: str, encoder: str, contrast: str, settings: DecisionSettings, table: Path = TABLE,
) -> dict[str, Any]:
    """The measured false-flag rate of this policy, encoder, contrast and settings, or ``not measured``.

    Parameters
    ----------
    policy : str
        Policy name and version (``ThresholdDecision.policy``).
    encoder : str
        Encoder name (report.json ``encoder.name``).
    contrast : str
    settings : DecisionSettings
        The run's settings a flag depends on (:meth:`DecisionSettings.record` is what is matched).
    table : Path, optional
        The table of measured operating points; the package's by default.

    Returns
    -------
    dict
        ``false_flag_rate_per_normal_series`` (a fraction, or ``"not measured"``), and either
        ``normal_series``, ``flagged`` and ``measured_on`` or ``why_not``.
    """
    wanted = json.loads(json.dumps(settings.record(contrast)))
    candidates = [e for e in entries(table) if (e["policy"], e["encoder"], e["contrast"]) == (policy, encoder, contrast)]
    for entry in candidates:
        if entry["settings"] == wanted:
            return {
                "false_flag_rate_per_normal_series": entry["flagged"] / entry["normal_series"],
                "normal_series": entry["normal_series"],
                "flagged": entry["flagged"],
                "measured_on": entry["measured_on"],
            }
    why = (
        "measured for this policy, encoder and contrast with other settings" if candidates
        else f"never measured for policy {policy} with the {encoder} encoder on {contrast}"
    )
    return {"false_flag_rate_per_normal_series": NOT_MEASURED, "why_not": why}


def bank_operating_point(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The operating point of a bank-calibrated batch, from its ``threshold_params``; else ``None``.

    Returns
    -------
    dict or None
        ``false_flag_rate_per_normal_series`` (the bound ``rank / (n + 1)``: an upper bound, not a
        count of flags), ``normal_series`` (the bank volumes it rests on), ``bound_rank`` and
        ``measured_on``.
    """
    calibration = params.get("bank_calibration")
    if not isinstance(calibration, Mapping):
        return None
    confidence = float(calibration.get("confidence", 0.0))
    held = (f"at most {calibration['false_flag_bound']:g} with confidence {confidence:g} for this bank"
            if confidence > 0 else
            f"at most about {calibration['rank']}/{calibration['n_reference_volumes'] + 1} on average over banks")
    n_queries = int(calibration.get("n_queries", 1))
    shared = (f"; the run's {n_queries} series decided against the bank share the rate, so a normal study's "
              "series together are flagged no more often than one series alone would be (about "
              f"{calibration.get('expected_false_flags_per_batch', n_queries * calibration['false_flag_bound']):g} "
              "false flags per all-normal run on average)" if n_queries > 1 else "")
    return {
        "false_flag_rate_per_normal_series": calibration["false_flag_bound"],
        "normal_series": calibration["n_reference_volumes"],
        "bound_rank": calibration["rank"],
        "confidence": confidence,
        "measured_on": (
            f"this batch's {calibration['n_reference_volumes']} cohort-bank volumes, each scored against the "
            f"others (leave one patient out); the bound is their {calibration['rank']}-th largest evidence, so a "
            f"normal series is flagged with probability {held}{shared}"
        ),
    }
