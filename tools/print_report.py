"""Print a run's findings from its report.json: flagged series first, then the rest.

Usage: ``print_report.py OUTPUT/report.json``. One line per scored series with the patient ID,
the series description, score, rank in its contrast batch, the flag, the anomalous volume and the
number of findings; then each flagged series' findings (volume, centroid, peak score), the
decision policy and its operating point per batch, QA warnings and skipped series.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _series_line(row: dict[str, Any]) -> str:
    flag = "FLAGGED" if row["flagged"] else "-"
    return (
        f"{flag:7} {row['patient_id'][:14]:14} {row['contrast']:5} {(row['series_description'] or '')[:22]:22} "
        f"{row['score']:>8.4f} {row['rank']:>3}/{row['batch_size']:<3} {row['anomalous_volume_ml']:>8.2f} "
        f"{row.get('n_findings') or 0:>4}  {row['qa'].get('status', '-')}"
    )


def _rate_text(point: dict[str, Any]) -> str:
    """A batch's operating point in words: measured on all-normal batches, or calibrated on its cohort bank."""
    rate = point.get("false_flag_rate_per_normal_series", "not measured")
    if isinstance(rate, str):
        return rate
    if "bound_rank" in point:  # calibrated on the bank's own volumes in this run: a bound, not a count
        held = f"with confidence {point['confidence']:g}" if point.get("confidence") else "on average over banks"
        rank = int(point["bound_rank"])
        which = "largest" if rank == 1 else f"{rank}{ {2: 'nd', 3: 'rd'}.get(rank, 'th')} largest"
        return (f"at most {100 * rate:.1f}% of normal series {held} (bound: the {which} evidence of "
                f"{point['normal_series']} bank volumes)")
    return f"{100 * rate:.1f}% of normal series ({point['flagged']}/{point['normal_series']})"


def _batch_line(batch: dict[str, Any]) -> str:
    if "error" in batch:
        return f"Batch {batch['contrast']}: not scored: {batch['error']}"
    rate_text = _rate_text(batch.get("operating_point", {}))
    return (
        f"Batch {batch['contrast']}: {batch['n_series']} series, {batch['n_flagged']} flagged; policy "
        f"{batch.get('threshold_policy', '?')}; false-flag rate {rate_text}"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the report named on the command line; 2 on bad usage or an unreadable file, 1 when the run failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a run's OUTPUT/report.json")
    path = parser.parse_args(argv).report
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"{path}: cannot read the report ({error}); name a run's OUTPUT/report.json", file=sys.stderr)
        return 2
    print(f"\nOutputs: {path.parent.resolve()}  (SEG/, SR/, report.json)")
    print(f"Encoder: {report['encoder']['description'] if report.get('encoder') else 'n/a'}")
    if report.get("status") != "completed":
        print(f"Run failed: {report.get('message')}")
        return 1
    for batch in report["batches"]:
        print(_batch_line(batch))
    rows = [r for r in report["series"] if r["status"] == "scored"]
    flagged = sum(bool(r["flagged"]) for r in rows)
    print(f"\n{flagged} of {len(rows)} scored series flagged (flagged first, then by contrast and rank):")
    print(f"{'flag':7} {'patient':14} {'contr':5} {'description':22} {'score':>8} {'rank':>7} {'anom. ml':>8} {'find':>4}  QA")
    for row in sorted(rows, key=lambda r: (not r["flagged"], r["contrast"], r["rank"])):
        print(_series_line(row))
    for row in (r for r in rows if r["flagged"]):
        for number, finding in enumerate(row.get("findings") or [], start=1):
            x, y, z = finding["centroid_lps_mm"]
            print(f"  {row['patient_id']} {row['contrast']} finding {number}: {finding['volume_ml']:.2f} ml at LPS "
                  f"({x:.0f}, {y:.0f}, {z:.0f}) mm, peak score {finding['peak_score']:.4f}")
        if row.get("preview"):
            print(f"  preview: {path.parent / row['preview']}")
    for row in rows:
        for warning in row["qa"].get("warnings", []):
            print(f"QA warning {row['patient_id']} {row['series_instance_uid']}: {warning}")
    for row in (r for r in report["series"] if r["status"] == "skipped"):
        print(f"skipped  {row['series_instance_uid']} ({row['series_description']}): {row['reason']}")
    print(f"Timings (s): {report['timings_s']}; peak RSS {report['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
