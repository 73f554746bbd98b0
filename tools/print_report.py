"""Print where a run's outputs are and the per-series scores from its report.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: print_report.py OUTPUT/report.json", file=sys.stderr)
        return 2
    path = Path(argv[1])
    report = json.loads(path.read_text(encoding="utf-8"))
    print(f"\nOutputs: {path.parent.resolve()}  (SEG/ and report.json)")
    print(f"Encoder: {report['encoder']['description'] if report.get('encoder') else 'n/a'}")
    if report.get("status") != "completed":
        print(f"Run failed: {report.get('message')}")
        return 1
    for batch in report["batches"]:
        print(f"Batch {batch['contrast']}: {batch['n_series']} series, threshold {batch.get('threshold', float('nan')):.5g}")
    print(f"{'contrast':8} {'rank':>4} {'score':>9} {'flag':>5} {'ml':>7} {'QA':>7}  series (description)")
    rows = [r for r in report["series"] if r["status"] == "scored"]
    for row in sorted(rows, key=lambda r: (r["contrast"], r["rank"])):
        print(
            f"{row['contrast']:8} {row['rank']:>4} {row['score']:>9.5f} {str(row['flagged']):>5} "
            f"{row['anomalous_volume_ml']:>7.2f} {row['qa'].get('status', '-'):>7}  "
            f"{row['series_instance_uid']} ({row['series_description']})"
        )
    for row in rows:
        for warning in row["qa"].get("warnings", []):
            print(f"QA warning {row['series_instance_uid']}: {warning}")
    skipped = [r for r in report["series"] if r["status"] == "skipped"]
    for row in skipped:
        print(f"skipped  {row['series_instance_uid']} ({row['series_description']}): {row['reason']}")
    print(f"Timings (s): {report['timings_s']}; peak RSS {report['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
