#!/usr/bin/env python3
"""Generate the synthetic demo cohort: DICOM studies, NIfTI ground truth and labels.json.

Usage (from the repository root)::

    .venv/bin/python tools/make_demo_cohort.py demo/cohort
    .venv/bin/python tools/make_demo_cohort.py /tmp/tiny --subjects 6 --matrix-scale 0.2
    .venv/bin/python tools/make_demo_cohort.py /tmp/heads --subjects 4 --head-fraction 1 \
        --mass-effect-fraction 0.5

With ``--head-fraction`` the chosen subjects are rendered as whole heads (skull, scalp, face,
neck, noisy air) instead of skull-stripped brains, on scanner-like fields of view (200-260 mm)
and matrices (192-320, times ``--matrix-scale``); ``--vary-fov`` plans the skull-stripped
series that way too. The defaults write the same cohort as before these options existed.

Nothing is downloaded: the anatomy is the MNI152 2009 template that nilearn ships.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


from codegraph3d_research.synthetic import CONTRASTS, LESION_PLACEMENTS, make_cohort


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1; got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a synthetic brain MR cohort (DICOM studies with T2w/T1w series, "
        "lesion ground truth as NIfTI, labels.json) from the MNI152 template.",
    )
    parser.add_argument("out", type=Path, help="output folder (gets dicom/, truth/, labels.json)")
    parser.add_argument("--subjects", type=_positive_int, default=12,
                        help="number of subjects = studies (default 12)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="random seed; the same seed writes identical files (default 0)")
    parser.add_argument("--lesion-fraction", type=_fraction, default=1.0 / 3.0,
                        help="fraction of subjects with lesions (default 1/3)")
    parser.add_argument("--localizer-fraction", type=_fraction, default=0.5,
                        help="fraction of studies with a localizer distractor series (default 0.5)")
    parser.add_argument("--contrasts", nargs="+", choices=CONTRASTS, default=list(CONTRASTS),
                        help="series per study (default: T2w T1w)")
    parser.add_argument("--matrix-scale", type=float, default=1.0,
                        help="scale of every matrix size; 0.2 gives ~40-voxel data (default 1)")
    parser.add_argument("--head-fraction", type=_fraction, default=0.0,
                        help="fraction of subjects rendered as whole heads with skull, scalp, "
                        "face and neck instead of skull-stripped brains; their fields of view "
                        "and matrices always vary (default 0)")
    parser.add_argument("--mass-effect-fraction", type=_fraction, default=0.0,
                        help="fraction of the lesioned subjects whose lesions push the "
                        "surrounding anatomy outwards (mass effect) (default 0)")
    parser.add_argument("--vary-fov", action="store_true",
                        help="plan skull-stripped series with a 200-260 mm field of view and a "
                        "192-320 matrix (times --matrix-scale) too, so pixel spacing varies")
    parser.add_argument("--lesion-appearance", choices=("typical", "varied", "distinct", "striped"),
                        default="typical",
                        help="typical: the contrast's lesion intensities; varied: each lesion draws its "
                        "own; distinct: one uniform look for every lesion, unlike any normal tissue; striped: "
                        "one laminated texture for every lesion, unlike normal tissue also to the intensity "
                        "encoder (default typical)")
    parser.add_argument("--lesion-radius-mm", type=float, nargs=2, default=(6.0, 15.0), metavar=("LOW", "HIGH"),
                        help="range of the lesions' mean semi-axis in mm (default 6 15)")
    parser.add_argument("--lesions-per-subject", type=_positive_int, nargs=2, default=(1, 1),
                        metavar=("LOW", "HIGH"),
                        help="range of the number of lesions per lesioned subject, e.g. 3 5 with "
                        "--lesion-radius-mm 5 9 for clusters of small metastases (default 1 1)")
    parser.add_argument("--lesion-placement", choices=LESION_PLACEMENTS, default="deep",
                        help="deep: every lesion lies wholly in brain tissue; cortical: lesions "
                        "are centred in grey matter 0.3-0.8 of their extent below the brain's "
                        "surface, so they reach it (cortical / juxtacortical lesions, cortical "
                        "metastases) (default deep)")
    parser.add_argument("--voxel-mm", type=float, default=None,
                        help="isotropic acquisition voxel size in mm for every series (e.g. 0.5 for "
                        "very large series); default: 1-1.2 mm in-plane, 1.5-3 mm slices")
    parser.add_argument("--no-eyes", action="store_true",
                        help="heads without eyes and orbits")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a cohort already in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def _folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        labels = make_cohort(
            args.out, n_subjects=args.subjects, seed=args.seed,
            lesion_fraction=args.lesion_fraction, with_localizer_fraction=args.localizer_fraction,
            contrasts=tuple(args.contrasts), matrix_scale=args.matrix_scale,
            head_fraction=args.head_fraction, mass_effect_fraction=args.mass_effect_fraction,
            vary_fov=args.vary_fov, eyes=not args.no_eyes, lesion_appearance=args.lesion_appearance,
            lesion_radius_mm=tuple(args.lesion_radius_mm), overwrite=args.overwrite,
            lesions_per_subject=tuple(args.lesions_per_subject),
            lesion_placement=args.lesion_placement,
            **({} if args.voxel_mm is None else {"in_plane_mm": (args.voxel_mm,) * 2, "slice_mm": (args.voxel_mm,) * 2}),
        )
    except FileExistsError:
        print(f"error: {args.out} already holds a cohort; pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start

    series = [s for study in labels["studies"] for s in study["series"]]
    n_files = sum(s["n_files"] for s in series) + sum(
        d["n_files"] for study in labels["studies"] for d in study["distractors"])
    print(f"cohort written to {args.out} in {elapsed:.1f} s")
    print(f"  studies: {labels['n_studies']} ({labels['n_lesion_studies']} with lesions, "
          f"{labels['n_head_studies']} whole heads, "
          f"{labels['n_mass_effect_studies']} with mass effect), "
          f"series: {len(series)} scored + "
          f"{sum(len(s['distractors']) for s in labels['studies'])} localizer, "
          f"DICOM files: {n_files}")
    print(f"  dicom/: {_folder_size_mb(args.out / 'dicom'):.1f} MB, "
          f"truth/: {_folder_size_mb(args.out / 'truth'):.1f} MB")
    for study in labels["studies"]:
        parts = ", ".join(
            f"{s['contrast']} {s['orientation'][:3]} {'x'.join(map(str, s['shape_zyx'][::-1]))}"
            for s in study["series"])
        lesion = f"lesion {study['lesion_volume_ml']:.1f} ml" if study["has_lesion"] else "healthy"
        if study["has_mass_effect"]:
            lesion += " +mass"
        kind = "head" if study["has_head"] else "brain"
        print(f"  {study['folder']}  {study['patient_id']:<12} {kind:<5} {lesion:<24} {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
