"""Paired comparison of two conditions over seeds, with bootstrap confidence intervals.

A condition is one or more evaluated runs (``python -m codegraph3d_research.evaluate`` folders), one per
seed; the other condition has one run per seed too, on the *same subjects* (for example the same
generated cohort rendered with and without heads, or one cohort scored two ways). For each seed
and contrast the two runs are paired by patient, and the difference ``B - A`` of the seed-mean
patient AUROC and voxel Dice-max is reported with a percentile bootstrap interval:

* each resample draws, within every seed, the lesion patients and the normal patients with
  replacement (stratified, so every resample has both classes and patient AUROC is defined);
* the same draw is applied to both conditions (paired), so subject-to-subject variation that
  both share cancels, and only the effect of the condition remains;
* patient AUROC is recomputed from the volume scores, Dice-max from the series' voxel
  histograms (``series_histograms.npz``), per seed; the seed means are differenced.

With 12-subject batches (4 lesions) a single lesion/normal pair swapping order moves patient
AUROC by 0.031; the interval says which differences such batches can resolve.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .evaluate import SERIES_HISTOGRAMS
from .metrics import patient_auroc

__all__ = ["ComparisonError", "SeedRun", "load_seed_run", "paired_bootstrap", "main"]


class ComparisonError(ValueError):
    """The evaluation folders cannot be compared; the message names the folder and the fix."""


@dataclass
class SeedRun:
    """One contrast batch of one evaluated run, indexed by patient.

    Attributes
    ----------
    patients : list of str
        Patient IDs of the scored series, in a fixed order.
    has_lesion : numpy.ndarray
        ``(n,)`` bool.
    scores : numpy.ndarray
        ``(n,)`` volume scores.
    lesion, other : numpy.ndarray
        ``(n, n_bins)`` voxel counts per score bin (lesion voxels, other brain voxels).
    """

    patients: list[str]
    has_lesion: np.ndarray
    scores: np.ndarray
    lesion: np.ndarray
    other: np.ndarray

    def reordered(self, patients: Sequence[str]) -> SeedRun:
        """The same run with its series in the order of ``patients``."""
        index = [self.patients.index(p) for p in patients]
        return SeedRun(list(patients), self.has_lesion[index], self.scores[index], self.lesion[index], self.other[index])


def load_seed_run(folder: str | Path, contrast: str) -> SeedRun:
    """Read one contrast batch of an evaluation folder (``metrics.json`` and its histograms).

    Raises
    ------
    ComparisonError
        When a file is missing, the contrast was not scored, or a patient has several series of
        the contrast (pairing by patient would be ambiguous).
    """
    folder = Path(folder)
    metrics_path, histograms_path = folder / "metrics.json", folder / SERIES_HISTOGRAMS
    for path in (metrics_path, histograms_path):
        if not path.is_file():
            raise ComparisonError(
                f"{path} does not exist: evaluate the run again with this version "
                "(python -m codegraph3d_research.evaluate --run RUN --truth COHORT), which writes both files"
            )
    metrics = json.loads(metrics_path.read_text())
    rows = [r for r in metrics["series"] if r.get("status") == "scored" and r.get("contrast") == contrast]
    if not rows:
        raise ComparisonError(f"{metrics_path}: no scored {contrast} series")
    with np.load(histograms_path) as data:
        if f"{contrast}/uids" not in data:
            raise ComparisonError(f"{histograms_path}: no {contrast} histograms (was the run written with output.fractional?)")
        uids = [str(u) for u in data[f"{contrast}/uids"]]
        lesion_counts, other_counts = data[f"{contrast}/lesion"], data[f"{contrast}/other"]
    position = {uid: i for i, uid in enumerate(uids)}
    patients = [str(r["patient_id"]) for r in rows]
    if len(set(patients)) != len(patients):
        raise ComparisonError(f"{metrics_path}: a patient has several scored {contrast} series; pairing by patient needs one")
    missing = [r["series_instance_uid"] for r in rows if r["series_instance_uid"] not in position]
    if missing:
        raise ComparisonError(f"{histograms_path}: no histogram for {len(missing)} scored series, e.g. {missing[0]}")
    index = [position[r["series_instance_uid"]] for r in rows]
    return SeedRun(
        patients=patients,
        has_lesion=np.array([bool(r["has_lesion"]) for r in rows]),
        scores=np.array([float(r["score"]) for r in rows]),
        lesion=lesion_counts[index].astype(np.int64),
        other=other_counts[index].astype(np.int64),
    )


def _dice_max(lesion: np.ndarray, other: np.ndarray) -> float:
    """Best Dice over bin thresholds of pooled histograms (as StreamingBinaryMetrics.dice_max)."""
    positives = lesion.sum()
    if positives == 0:
        return float("nan")
    tp = np.cumsum(lesion[::-1])[::-1].astype(np.float64)
    fp = np.cumsum(other[::-1])[::-1].astype(np.float64)
    return float(np.max(2 * tp / (tp + fp + positives)))


def _metrics(run: SeedRun, index: np.ndarray) -> tuple[float, float]:
    auroc = patient_auroc(run.scores[index], run.has_lesion[index])
    return float(auroc), _dice_max(run.lesion[index].sum(axis=0), run.other[index].sum(axis=0))


def paired_bootstrap(
    pairs: Sequence[tuple[SeedRun, SeedRun]], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, float]]:
    """Seed-mean patient AUROC and Dice-max of A and B, and the bootstrap interval of ``B - A``.

    Parameters
    ----------
    pairs : sequence of (SeedRun, SeedRun)
        Per seed, condition A's and condition B's run of one contrast, on the same patients.
    n_resamples : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling.
    level : float
        Coverage of the percentile interval.

    Returns
    -------
    dict
        ``{"patient_auroc": {...}, "dice_max": {...}}``, each with ``a``, ``b`` (seed means),
        ``difference`` (``b - a``), ``low`` and ``high`` (the interval), ``n_seeds``.
    """
    if not pairs:
        raise ComparisonError("no seeds to compare")
    if not 0.0 < level < 1.0:
        raise ComparisonError(f"level must lie in (0, 1); got {level}")
    if n_resamples < 100:
        raise ComparisonError(f"n_resamples must be at least 100 for a percentile interval; got {n_resamples}")
    aligned: list[tuple[SeedRun, SeedRun]] = []
    for number, (a, b) in enumerate(pairs):
        if sorted(a.patients) != sorted(b.patients):
            only = sorted(set(a.patients) ^ set(b.patients))
            raise ComparisonError(f"seed {number}: the two runs hold different patients (e.g. {only[:3]}); pair runs of the same subjects")
        b = b.reordered(a.patients)
        if not np.array_equal(a.has_lesion, b.has_lesion):
            raise ComparisonError(f"seed {number}: the runs disagree on which patients have lesions")
        if a.has_lesion.all() or not a.has_lesion.any():
            raise ComparisonError(f"seed {number}: the batch needs both lesion and normal series")
        aligned.append((a, b))

    def seed_means(draws: Sequence[np.ndarray]) -> np.ndarray:
        values = np.array([[_metrics(run, index) for run in pair] for pair, index in zip(aligned, draws)])
        return values.mean(axis=0)  # (2 conditions, 2 metrics)

    observed = seed_means([np.arange(len(a.patients)) for a, _ in aligned])
    rng = np.random.default_rng(seed)
    differences = np.empty((n_resamples, 2))
    for r in range(n_resamples):
        draws = []
        for a, _ in aligned:
            positive, negative = np.flatnonzero(a.has_lesion), np.flatnonzero(~a.has_lesion)
            draws.append(np.concatenate([rng.choice(positive, positive.size), rng.choice(negative, negative.size)]))
        means = seed_means(draws)
        differences[r] = means[1] - means[0]
    tail = (1.0 - level) / 2.0
    result: dict[str, dict[str, float]] = {}
    for column, name in enumerate(("patient_auroc", "dice_max")):
        low, high = np.nanquantile(differences[:, column], [tail, 1.0 - tail])
        result[name] = {
            "a": float(observed[0, column]),
            "b": float(observed[1, column]),
            "difference": float(observed[1, column] - observed[0, column]),
            "low": float(low),
            "high": float(high),
            "n_seeds": len(aligned),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line; prints a Markdown table, returns 0 (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m codegraph3d_research.compare",
        description="Paired bootstrap comparison of two conditions, one evaluated run per seed each.",
    )
    parser.add_argument("--a", nargs="+", required=True, metavar="EVALUATION", help="condition A, one folder per seed")
    parser.add_argument("--b", nargs="+", required=True, metavar="EVALUATION", help="condition B, the same seeds in the same order")
    parser.add_argument("--name-a", default="A")
    parser.add_argument("--name-b", default="B")
    parser.add_argument("--contrasts", nargs="+", default=["T2w", "T1w"])
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if len(args.a) != len(args.b):
        print(f"error: {len(args.a)} runs for A but {len(args.b)} for B; give one per seed, in the same order", file=sys.stderr)
        return 2
    lines = [
        f"| contrast | metric | {args.name_a} | {args.name_b} | difference ({args.name_b} - {args.name_a}) | 95 % bootstrap interval | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    everything: dict[str, dict] = {}
    try:
        for contrast in args.contrasts:
            pairs = [(load_seed_run(a, contrast), load_seed_run(b, contrast)) for a, b in zip(args.a, args.b)]
            result = paired_bootstrap(pairs, args.resamples, args.seed)
            everything[contrast] = result
            for name, label in (("patient_auroc", "patient AUROC"), ("dice_max", "Dice-max")):
                r = result[name]
                lines.append(
                    f"| {contrast} | {label} | {r['a']:.3f} | {r['b']:.3f} | {r['difference']:+.3f} | "
                    f"[{r['low']:+.3f}, {r['high']:+.3f}] | {r['n_seeds']} |"
                )
    except ComparisonError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
