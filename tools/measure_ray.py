#!/usr/bin/env python3
"""Benchmark of the execution backends (docs/SCALE.md): local workers against an embedded Ray instance.

On a generated cohort (the demo's kind: whole heads on half the subjects, full preprocessing,
the weight-free intensity encoder of ``tools/demo_config.yaml``), the app runs three times:

* ``local`` with 1 preprocessing worker, and with 2 (the speed-up of a second worker);
* ``ray`` with an embedded instance and 2 studies in flight (the overhead of Ray per series).

The Ray run goes inside a network namespace of its own (``unshare --net --map-root-user``; only
loopback exists there), since Ray's servers listen on every interface. It prints the wall time and the stage timings of each run, checks that the Ray run wrote what
the local run wrote (``codegraph3d.run.diff``), and measures what travels through Ray's object
store per series: a study's preprocessing outcome with its working image (what the encoder actor
receives) and after encoding (what the app receives: tokens, brain mask, headers).

Usage::

    .venv/bin/python tools/measure_ray.py [--subjects 6] [--folder demo/scale] [--json OUT.json]

About 10 minutes for 6 subjects (12 series) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from codegraph3d.features.tokens import encode_volume
from codegraph3d.preprocess.workers import PreprocessModels, SeriesJob
from codegraph3d.run.config import load_config
from codegraph3d.run.diff import compare_runs
from codegraph3d.run.pipeline import build_encoder, preprocess_setup, scan_input, select_input

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_ONLY = ("unshare", "--net", "--map-root-user", "sh", "-c", 'ip link set lo up && exec "$@"', "sh")
VARIANTS = {
    "local, 1 worker": {"preprocess": {"workers": 1}},
    "local, 2 workers": {"preprocess": {"workers": 2}},
    "ray (embedded), 2 in flight": {"preprocess": {"workers": 2}, "execution": {"backend": "ray"}},
}


def _cohort(folder: Path, subjects: int) -> Path:
    """The generated cohort (made once): the demo's kind of subjects, another seed."""
    if not (folder / "labels.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_cohort.py"), str(folder), "--subjects",
                        str(subjects), "--seed", "7", "--head-fraction", "0.5", "--mass-effect-fraction", "1.0",
                        "--vary-fov", "--quiet"], check=True)
    return folder / "dicom"


def _run(name: str, override: dict[str, Any], dicom: Path, folder: Path, models: Path) -> dict[str, Any]:
    """Run the app with the demo configuration plus ``override``; wall time and report timings."""
    config = yaml.safe_load((ROOT / "tools" / "demo_config.yaml").read_text())
    for section, values in override.items():
        config.setdefault(section, {}).update(values)
    config.setdefault("output", {})["previews"] = False
    slug = name.split(",")[0].split(" ")[0] + "_" + str(override["preprocess"]["workers"])
    output, config_file = folder / f"out_{slug}", folder / f"{slug}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    output.mkdir(parents=True, exist_ok=True)
    # Ray's servers listen on every interface, even for an embedded instance: the Ray run gets a
    # network namespace of its own, where only loopback exists.
    wrapper = LOOPBACK_ONLY if override.get("execution", {}).get("backend") == "ray" else ()
    start = time.perf_counter()
    completed = subprocess.run([*wrapper, sys.executable, str(ROOT / "app.py"), "-i", str(dicom), "-o", str(output), "-m",
                                str(models)], env=dict(os.environ, CODEGRAPH3D_CONFIG=str(config_file)),
                               capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{name}: exit {completed.returncode}\n{completed.stderr[-3000:]}")
    report = json.loads((output / "report.json").read_text())
    return {"name": name, "output": str(output), "wall_s": round(wall, 1), "series": len(report["series"]),
            "timings_s": report["timings_s"], "peak_rss_mb": report.get("peak_rss_mb")}


def _traffic(dicom: Path, models: Path) -> dict[str, float]:
    """Megabytes per series that Ray moves: a study's outcome with its working image, then after encoding."""
    config = load_config(models, override={"encoder": {"name": "intensity"}})
    selection = select_input(scan_input(dicom), config)
    study = selection.taken[0].study_instance_uid
    jobs = [SeriesJob(d.series, d.contrast, d.series_instance_uid) for d in selection.taken
            if d.study_instance_uid == study]
    outcomes = PreprocessModels(preprocess_setup(config, models, 1)).run(jobs)
    preprocessed = len(pickle.dumps(outcomes, protocol=5)) / len(jobs) / 1e6
    encoder = build_encoder(config, models)
    for outcome in outcomes:
        prepared = outcome.prepared
        outcome.encoded = encode_volume(prepared.image, prepared.brain_mask, encoder,
                                        grid_size=config.tokens.grid_size,
                                        min_brain_fraction=config.tokens.min_brain_fraction,
                                        batch_size=config.encoder.batch_size)
        prepared.image = prepared.image[:0, :0, :0]
    encoded = len(pickle.dumps(outcomes, protocol=5)) / len(jobs) / 1e6
    return {"preprocessed_mb_per_series": round(preprocessed, 1), "encoded_mb_per_series": round(encoded, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--folder", type=Path, default=ROOT / "demo" / "scale")
    parser.add_argument("--models", type=Path, default=ROOT / "demo" / "models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    dicom = _cohort(args.folder, args.subjects)
    runs = [_run(name, override, dicom, args.folder, args.models) for name, override in VARIANTS.items()]
    for run in runs:
        t = run["timings_s"]
        print(f"{run['name']:30s} wall {run['wall_s']:6.1f} s  {run['wall_s'] / run['series']:5.1f} s/series  "
              f"preprocess+tokenise {t.get('preprocess_and_tokenise', 0):6.1f}  score {t.get('score', 0):5.1f}  "
              f"write {t.get('write', 0):5.1f}  peak RSS {run['peak_rss_mb']} MB")
    difference = compare_runs(Path(runs[1]["output"]), Path(runs[2]["output"]), score_tolerance=1e-4,
                              mask_tolerance=0.0)
    print(f"ray against local: agree={difference.agree}, largest score difference "
          f"{difference.max_score_difference:.2e}, mask difference {difference.max_mask_fraction:.2e}")
    traffic = _traffic(dicom, args.models)
    print(f"object store per series: {traffic['preprocessed_mb_per_series']} MB preprocessed (to the encoder "
          f"actor), {traffic['encoded_mb_per_series']} MB encoded (to the app)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "agree": difference.agree, "traffic": traffic}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
