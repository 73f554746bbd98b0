#!/usr/bin/env python3
"""Compare statistics a flag could rest on, offline, each held to the same false-flag budget.

The lesion policy flags a volume when a connected group of its standardised tokens carries more
evidence than a bound (:mod:`codegraph3d.decision.lesion_policy`). This benchmark asks whether
another statistic of the same ``z`` maps would flag more lesion series for as many normal ones:

1. every cohort is scored alone with the app's settings (``CODEGRAPH3D_CONFIG``; cached tokens of
   ``tools/make_decision_cohorts.sh``) and each volume's ``z`` as decided is kept (``--cache``
   keeps them between runs, one ``.npz`` per cohort, by name only: empty it when a setting that
   changes ``z`` changes, such as ``prior_volumes``, ``subtract_volume_level`` or
   ``fit_volume_levels``; bounds do not);
2. per contrast, the product's rule at its configured bounds sets the budget: the number of
   tuning normals it flags; every statistic's bound is then the smallest that flags as many
   tuning normals (the calibration of ``tools/calibrate_lesion_bounds.py``);
3. each bound is applied unchanged to the held-out cohorts: lesion series flagged, normal series
   flagged, and the most normal series flagged in any one batch.

It also prints where false findings come from: of the series flagged without a rim bound
(``threshold.rim_finding_mass``), how many have their largest finding peak at the brain's rim
(:func:`codegraph3d.decision.lesion_policy.rim_positions`), and how often a normal volume's token
exceeds ``z`` 4.5 and 6 by its position's depth in the brain (0: positions that fewer than 90 % of
the batch's volumes cover, 1: the outermost layer of the others, 2, 3 and deeper).

Usage::

    CODEGRAPH3D_CONFIG=tools/efficientnet_intensity_config.yaml .venv/bin/python tools/compare_evidence_rules.py \\
        --root work/decisions --cache work/zdump --tune normal12_s14 half16_s23 ... --held normal12_s19 ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_lesion_bounds import evidence_bound  # noqa: E402  (a sibling script)
from measure_decisions import batch_groups, configure, load_pooled, score_series  # noqa: E402

from codegraph3d.decision.lesion_policy import Finding, LesionPolicy, rim_positions, token_findings  # noqa: E402
from codegraph3d.run.config import RunConfig  # noqa: E402
from codegraph3d.run.pipeline import decide_batch, token_volume_ml  # noqa: E402

GRID = (16, 16, 16)
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Volume:
    """One series as decided: its batch, truth, standardised tokens and which of them lie at the rim."""

    batch: str
    contrast: str
    lesion: bool
    z: np.ndarray
    coords: np.ndarray
    token_ml: float
    rim: np.ndarray | None = None


Statistic = Callable[[Volume], float]


def _grid(volume: Volume, fill: float = -np.inf) -> np.ndarray:
    """The volume's ``z`` on the token grid, ``fill`` where it has no token."""
    grid = np.full(GRID, fill)
    grid[tuple(volume.coords.T)] = volume.z
    return grid


def group_mass(volume: Volume, low: float, high: float, excess: float = 0.0) -> float:
    """Largest ``sum(z - low) x ml`` of a group of tokens above ``low`` that peaks above ``high``.

    ``low == high`` is the product's evidence; ``excess`` its focality test (mean ``z - low``).
    """
    grid = _grid(volume)
    labels, n = ndimage.label(grid > low, structure=CONNECTIVITY)
    if not n:
        return 0.0
    index = np.arange(1, n + 1)
    mass = ndimage.sum(grid - low, labels, index)
    size = ndimage.sum(np.ones(GRID), labels, index)
    keep = (ndimage.maximum(grid, labels, index) > high) & (mass / size > excess)
    return float(np.max(mass[keep], initial=0.0)) * volume.token_ml


def _findings(volume: Volume, policy: LesionPolicy) -> list[Finding]:
    """The product's candidate groups of the volume (:func:`token_findings`), each marked at the rim or not.

    Without ``threshold.shortfall_margin``: no token is excluded here (the recorded runs predate it).
    """
    rim = np.zeros(GRID, dtype=bool)
    if volume.rim is not None:
        rim[tuple(volume.coords[volume.rim].T)] = True
    return token_findings(volume.z, volume.z, volume.coords, GRID, policy, volume.token_ml, rim)


def product_evidence(volume: Volume, policy: LesionPolicy) -> float:
    """The product's evidence with its rim bound: flagged exactly when above ``policy.finding_mass``.

    A group at the rim counts its mass less the rim bound's excess over ``finding_mass``.
    """
    shift = policy.rim_bound - policy.finding_mass
    masses = [found.mass - (shift if found.at_rim else 0.0) for found in _findings(volume, policy)
              if policy.qualifies(found)]
    return max([0.0, *masses])


def tfce_peak(volume: Volume, extent_power: float, height_power: float, step: float = 0.2) -> float:
    """Largest threshold-free cluster enhancement of a token (Smith and Nichols, 2009).

    Each token sums, over heights ``h`` below its ``z``, the extent (ml) of its group above ``h``
    to ``extent_power`` times ``h`` to ``height_power``.
    """
    grid = _grid(volume)
    enhanced = np.zeros(GRID)
    for height in np.arange(step, float(np.max(volume.z, initial=0.0)), step):
        labels, n = ndimage.label(grid > height, structure=CONNECTIVITY)
        extent = np.bincount(labels.ravel(), minlength=n + 1) * volume.token_ml
        inside = labels > 0
        enhanced[inside] += extent[labels[inside]] ** extent_power * height**height_power * step
    return float(enhanced.max())


def smoothed_peak(volume: Volume, sigma: float) -> float:
    """Largest ``z`` (negative parts kept) after Gaussian smoothing over the covered positions."""
    grid = _grid(volume, np.nan)
    covered = np.isfinite(grid)
    total = ndimage.gaussian_filter(np.where(covered, grid, 0.0), sigma, mode="constant")
    weight = ndimage.gaussian_filter(covered.astype(float), sigma, mode="constant")
    return float(np.max(np.where(covered & (weight > 0.3), total / np.maximum(weight, 1e-9), -np.inf)))


def statistics(config: RunConfig, contrast: str) -> dict[str, Statistic]:
    """The statistics compared for one contrast, the product's (its configured bounds) first."""
    policy = config.threshold.lesion_policy(contrast)
    token_z, excess = policy.token_z, policy.finding_excess
    rules: dict[str, Statistic] = {
        "product (rim groups held to rim_finding_mass)": lambda v: product_evidence(v, policy),
        "group mass above token_z (no rim bound)": lambda v: group_mass(v, token_z, token_z, excess),
        "largest z": lambda v: float(np.max(v.z, initial=0.0)),
    }
    for low in (3.0, 3.5, 4.0):
        rules[f"group mass above {low:g}, peak above token_z"] = lambda v, low=low: group_mass(v, low, token_z, excess)
    for extent_power in (0.5, 0.66, 1.0):
        rules[f"TFCE E {extent_power:g} H 2"] = lambda v, e=extent_power: tfce_peak(v, e, 2.0)
    for sigma in (0.5, 1.0):
        rules[f"largest z smoothed ({sigma:g} tokens)"] = lambda v, s=sigma: smoothed_peak(v, s)
    return rules


def collect(root: Path, cohorts: Sequence[str], config: RunConfig, cache: Path | None) -> list[Volume]:
    """Every series of the cohorts, each cohort scored and decided alone (``cache``: kept per cohort)."""
    volumes: list[Volume] = []
    for name in cohorts:
        stored = cache / f"{name}.npz" if cache is not None else None
        if stored is None or not stored.exists():
            arrays = _decide_cohort(root, name, config)
            if stored is not None:
                stored.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(stored, **arrays)
        else:
            with np.load(stored) as data:
                arrays = dict(data)
        members = []
        for key in sorted({key.rsplit("/", 1)[0] for key in arrays}, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
            lesion, token_ml = arrays[f"{key}/truth"]
            members.append(Volume(name, key.split("/")[0], bool(lesion), arrays[f"{key}/z"].astype(np.float64),
                                  arrays[f"{key}/coords"].astype(int), float(token_ml)))
        volumes.extend(with_rim(members))
        print(f"{name}: {len(members)} series", file=sys.stderr, flush=True)
    return volumes


def with_rim(volumes: Sequence[Volume]) -> list[Volume]:
    """The volumes with each token's place at the rim, per contrast batch (:func:`rim_positions`)."""
    out = []
    for contrast in sorted({v.contrast for v in volumes}):
        batch = [v for v in volumes if v.contrast == contrast]
        count = np.zeros(GRID, int)
        for volume in batch:
            count[tuple(volume.coords.T)] += 1
        rim = rim_positions(count, len(batch))
        out.extend(replace(volume, rim=rim[tuple(volume.coords.T)]) for volume in batch)
    return out


def _decide_cohort(root: Path, name: str, config: RunConfig) -> dict[str, np.ndarray]:
    """One cohort's series per contrast, scored and decided as one batch: ``z``, grid indices, truth."""
    arrays: dict[str, np.ndarray] = {}
    for contrast, series in sorted(load_pooled(root, [name], config).items()):
        if tuple(series[0].record.tokens.grid_shape) != GRID:
            raise SystemExit(f"{name}: token grid {series[0].record.tokens.grid_shape}; this benchmark reads {GRID}")
        n = len(series)
        scores = score_series(series, config, n)
        coords = [item.record.tokens.coords for item in series]
        ml = token_volume_ml(series[0].record)
        decision = decide_batch(scores, coords, n, series[0].record.tokens.grid_shape, config, ml, contrast,
                                batch_groups(series, n, config))
        for index, item in enumerate(series):
            arrays[f"{contrast}/{index}/z"] = np.asarray(decision.z_values[index], np.float32)
            arrays[f"{contrast}/{index}/coords"] = np.asarray(coords[index], np.int16)
            arrays[f"{contrast}/{index}/truth"] = np.array([float(item.has_lesion), ml])
    return arrays


def flag_counts(volumes: Sequence[Volume], values: np.ndarray, bound: float) -> dict[str, object]:
    """Lesion and normal series above ``bound``, and the most normals flagged in one batch."""
    lesion = np.array([v.lesion for v in volumes], dtype=bool)
    flagged = values > bound
    per_batch: dict[str, int] = {}
    for volume, flag in zip(volumes, flagged):
        if not volume.lesion:
            per_batch[volume.batch] = per_batch.get(volume.batch, 0) + int(flag)
    return {"lesion": f"{int(flagged[lesion].sum())}/{int(lesion.sum())}",
            "normal": f"{int(flagged[~lesion].sum())}/{int((~lesion).sum())}",
            "worst_batch": max(per_batch.values(), default=0)}


def compare(tune: Sequence[Volume], held: Sequence[Volume], rules: Mapping[str, Statistic],
            product_bound: float) -> list[dict[str, object]]:
    """One row per statistic: its bound at the product's tuning budget, tuning and held-out flags."""
    names = list(rules)
    tune_values = {name: np.array([rules[name](v) for v in tune]) for name in names}
    normal = np.array([not v.lesion for v in tune], dtype=bool)
    budget = int(np.sum(tune_values[names[0]][normal] > product_bound))
    rows = []
    for name in names:
        bound = product_bound if name == names[0] else evidence_bound(tune_values[name][normal], budget)
        held_values = np.array([rules[name](v) for v in held])
        rows.append({"statistic": name, "bound": round(bound, 3), "tuning": flag_counts(tune, tune_values[name], bound),
                     "held_out": flag_counts(held, held_values, bound)})
    return rows


def flagged_at_rim(volumes: Sequence[Volume], policy: LesionPolicy, bound: float | None = None) -> dict[str, str]:
    """Of the series flagged without a rim bound, how many have their largest finding peak at the rim.

    ``bound``: the one evidence bound applied everywhere (``None``: ``policy.finding_mass``).
    """
    policy = replace(policy, finding_mass=policy.finding_mass if bound is None else float(bound), rim_finding_mass=0.0)
    counts = {"normal": [0, 0], "lesion": [0, 0]}
    for volume in volumes:
        # token_findings orders groups by mass: the first focal one is the largest.
        largest = next((found for found in _findings(volume, policy) if policy.qualifies(found)), None)
        if largest is not None and largest.mass > policy.finding_mass:
            row = counts["lesion" if volume.lesion else "normal"]
            row[0] += largest.at_rim
            row[1] += 1
    return {kind: f"{at} of {flagged} at the rim" for kind, (at, flagged) in counts.items()}


def depth_exceedance(volumes: Sequence[Volume], thresholds: Sequence[float] = (4.5, 6.0),
                     inside: float = 0.9) -> dict[int, dict[str, float]]:
    """Share of normal volumes' tokens above each threshold, by the position's depth in the brain.

    Depth is the chessboard distance (tokens) from the nearest position that fewer than
    ``inside`` of the batch's volumes cover, capped at 3.
    """
    counts: dict[int, np.ndarray] = {}
    for batch in sorted({v.batch for v in volumes}):
        members = [v for v in volumes if v.batch == batch]
        cover = np.zeros(GRID)
        for volume in members:
            cover[tuple(volume.coords.T)] += 1
        depth = np.minimum(ndimage.distance_transform_cdt(np.pad(cover >= inside * len(members), 1),
                                                          metric="chessboard")[1:-1, 1:-1, 1:-1], 3)
        for volume in (v for v in members if not v.lesion):
            at = depth[tuple(volume.coords.T)]
            for level in range(4):
                z = volume.z[at == level]
                row = counts.setdefault(level, np.zeros(1 + len(thresholds)))
                row += [z.size, *(np.sum(z > t) for t in thresholds)]
    return {level: {"tokens": float(row[0]), **{f"above {t:g}": float(row[1 + i] / max(row[0], 1))
                                                  for i, t in enumerate(thresholds)}}
            for level, row in sorted(counts.items())}


def main(argv: list[str] | None = None) -> int:
    """Print the comparison per contrast (markdown) and the exceedance by depth."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="decision cohorts (cache/ and one folder per cohort)")
    parser.add_argument("--tune", nargs="+", required=True, help="tuning cohorts (each scored alone)")
    parser.add_argument("--held", nargs="+", required=True, help="held-out cohorts (each scored alone)")
    parser.add_argument("--cache", type=Path, help="folder keeping each cohort's decided z (.npz)")
    parser.add_argument("--models", default="models")
    parser.add_argument("--plain-bound", nargs="+", default=[], metavar="CONTRAST=BOUND",
                        help="the one evidence bound (z x ml) at which the rim's share of flagged series is counted "
                             "(default: the contrast's finding_mass)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting of the configuration (as tools/measure_decisions.py --set)")
    args = parser.parse_args(argv)
    plain = {item.split("=", 1)[0]: float(item.split("=", 1)[1]) for item in args.plain_bound}
    config = configure(args.models, args.set)
    tune = collect(args.root, args.tune, config, args.cache)
    held = collect(args.root, args.held, config, args.cache)
    print("| contrast | statistic | bound | tuning lesion | tuning normal | held-out lesion | held-out normal "
          "| most normals in one held-out batch |\n|---|---|---|---|---|---|---|---|")
    for contrast in sorted({v.contrast for v in tune}):
        rows = compare([v for v in tune if v.contrast == contrast], [v for v in held if v.contrast == contrast],
                       statistics(config, contrast), config.threshold.lesion_policy(contrast).finding_mass)
        for row in rows:
            t, h = row["tuning"], row["held_out"]
            print(f"| {contrast} | {row['statistic']} | {row['bound']} | {t['lesion']} | {t['normal']} "  # type: ignore[index]
                  f"| {h['lesion']} | {h['normal']} | {h['worst_batch']} |")  # type: ignore[index]
    for contrast in sorted({v.contrast for v in tune}):
        table = depth_exceedance([v for v in [*tune, *held] if v.contrast == contrast])
        policy = config.threshold.lesion_policy(contrast)
        print(contrast, "flagged series without a rim bound:", flagged_at_rim([v for v in [*tune, *held] if v.contrast == contrast], policy,
                                                                             plain.get(contrast)))
        print(contrast, "normal tokens above z by depth:", {k: {n: f"{x:.2g}" for n, x in row.items()} for k, row in table.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
