"""Sweep CoDeGraph settings on cached tokens of generated cohorts (docs/RESULTS.md, "CoDeGraph").

For each cohort, the tokens that ``tools/measure_codegraph.sh`` cached are scored with MuSc, with
CoDeGraph at the defaults and at one-at-a-time variations of its settings, and with an *oracle*:
MuSc rescored with every true lesion token removed from the other lesion volumes' references,
which is what filtering consistent anomalies could achieve at best. Printed per setting: patient
AUROC (volume score = max token score), lesion-token AUROC (tokens over 30 % inside the lesion
against all other brain tokens), the median lesion-token score, and the communities found (how
many volumes, how many of them with a lesion). Token scores only (no SEG, no Dice): the sweep
ranks settings in seconds; ``measure_codegraph.sh`` measures the chosen ones end to end.

Usage::

    python tools/sweep_codegraph.py demo/codegraph --appearances striped varied --seeds 11 12 13 \
        [--radius -1] [--json demo/codegraph/sweep.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from codegraph3d.store.cache import read_entry
from codegraph3d.scoring.codegraph import CoDeGraphConfig
from codegraph3d.run.config import default_config
from codegraph3d_research.metrics import patient_auroc
from codegraph3d.preprocess.chain import resample_from_source
from codegraph3d.scoring.batch import score_batch
from codegraph3d.scoring.musc import musc_from_distances, nearest_distances
from codegraph3d.features.tokens import project

#: One-at-a-time variations around the defaults; each entry changes the named fields.
VARIATIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("defaults", {}),
    ("min_jump_ratio 1.5", {"min_jump_ratio": 1.5}),
    ("min_jump_ratio 1.3", {"min_jump_ratio": 1.3}),
    ("false_alarm_rate 1e-2", {"false_alarm_rate": 1e-2}),
    ("member_distance_ratio 0 (burnout only)", {"member_distance_ratio": 0.0}),
    ("member_distance_ratio 0.6", {"member_distance_ratio": 0.6}),
    ("member_distance_ratio 0.9", {"member_distance_ratio": 0.9}),
    ("graph 4 / 2 / 2 (edge, resolution, size)", {"min_edge_weight": 4.0, "resolution": 2.0, "min_community_size": 2}),
    ("graph 2 / 1 / 2", {"min_community_size": 2}),
    ("previous defaults (1.5, 4 / 2 / 2, 0.6)", {"min_jump_ratio": 1.5, "min_edge_weight": 4.0, "resolution": 2.0,
                                                 "min_community_size": 2, "member_distance_ratio": 0.6}),
)

#: A token counts as a lesion token when this fraction of its voxels lies in the lesion.
LESION_TOKEN_FRACTION = 0.3


@dataclasses.dataclass
class CohortTokens:
    """The cached tokens of one cohort's series, with per-token lesion truth."""

    layer_sets: list[list[np.ndarray]]
    coords: list[np.ndarray]
    grid_shape: tuple[int, int, int]
    has_lesion: np.ndarray
    lesion_tokens: list[np.ndarray]


def load_cohort_tokens(cohort: Path, cache: Path, projection_dim: int, projection_seed: int) -> CohortTokens:
    """Read a cohort's cached tokens (keyed by series UID) and its lesion truth on the token grid."""
    labels = json.loads((cohort / "labels.json").read_text(encoding="utf-8"))
    truth = {s["series_instance_uid"]: s for st in labels["studies"] for s in st["series"]}
    paths = {p.stem: p for p in cache.glob("*/*.npz") if p.stem in truth}
    missing = sorted(set(truth) - set(paths))
    if missing:
        raise SystemExit(
            f"{cohort}: {len(missing)} of {len(truth)} series have no cached tokens in {cache} (first: "
            f"{missing[0]}); run tools/measure_codegraph.sh first"
        )
    layer_sets: list[list[np.ndarray]] = []
    coords, has_lesion, lesion_tokens = [], [], []
    grid_shape: tuple[int, int, int] = (0, 0, 0)
    for uid in sorted(paths):
        entry = read_entry(paths[uid])[1]
        tokens = project(entry.encoded, projection_dim=projection_dim, projection_seed=projection_seed)
        if not layer_sets:
            layer_sets = [[] for _ in tokens.tokens]
        for layer, array in enumerate(tokens.tokens):
            layer_sets[layer].append(array)
        coords.append(tokens.coords)
        grid_shape = tuple(tokens.grid_shape)
        record = truth[uid]
        has_lesion.append(bool(record["has_lesion"]))
        if not record["has_lesion"]:
            lesion_tokens.append(np.zeros(len(tokens.coords), dtype=bool))
            continue
        # NIfTI (x, y, z) -> the pipeline's (z, y, x), then onto the working grid.
        lesion = np.transpose(np.asarray(nib.load(cohort / record["truth"]["lesion"]).dataobj, dtype=np.float32),
                              (2, 1, 0))
        grid = resample_from_source(lesion, entry.prepared, order=1)
        g = grid_shape[0]
        p = grid.shape[0] // g
        fraction = grid.reshape(g, p, g, p, g, p).mean(axis=(1, 3, 5))
        lesion_tokens.append(fraction[tuple(tokens.coords.T)] > LESION_TOKEN_FRACTION)
    return CohortTokens(layer_sets, coords, grid_shape, np.array(has_lesion), lesion_tokens)


def _summary(tokens: CohortTokens, token_scores: list[np.ndarray], communities: list[list[int]] | None) -> dict[str, Any]:
    volume = np.array([s.max() for s in token_scores])
    flat = np.concatenate(token_scores)
    truth = np.concatenate(tokens.lesion_tokens)
    members = [v for group in communities or [] for v in group]
    return {
        "patient_auroc": patient_auroc(volume, tokens.has_lesion),
        "lesion_token_auroc": patient_auroc(flat, truth) if truth.any() else None,  # rank AUROC over tokens
        "lesion_token_median": float(np.median(flat[truth])) if truth.any() else None,
        "communities": [len(group) for group in communities or []],
        "members_with_lesion": int(sum(bool(tokens.has_lesion[v]) for v in members)),
        "members": len(members),
    }


def oracle_scores(tokens: CohortTokens, window: dict[str, Any]) -> list[np.ndarray]:
    """MuSc with every lesion token hidden from the other lesion volumes (layer-averaged)."""
    lesion_volumes = [int(v) for v in np.flatnonzero(tokens.has_lesion)]
    pairs = [(q, r) for q in lesion_volumes for r in lesion_volumes if q != r]
    excluded = [tokens.lesion_tokens[v] if tokens.has_lesion[v] else None for v in range(len(tokens.coords))]
    per_layer = []
    for sets in tokens.layer_sets:
        sizes = [len(s) for s in sets]
        base = nearest_distances(sets, **window)
        rescored = nearest_distances(sets, excluded=excluded, pairs=pairs, base=base, **window) if pairs else base
        per_layer.append(musc_from_distances(rescored, sizes))
    # The plain mean of the layers, as every row of this sweep (scoring.layer_weights is not applied here).
    return [np.mean([layer[v] for layer in per_layer], axis=0) for v in range(len(tokens.coords))]


def sweep_cohort(tokens: CohortTokens, radius: int) -> list[dict[str, Any]]:
    """Rows of (setting, summary) for MuSc, the oracle and every variation."""
    window: dict[str, Any] = (
        {"window_radius": radius, "coords": tokens.coords, "grid_shape": tokens.grid_shape} if radius >= 0 else {}
    )
    musc = score_batch(tokens.layer_sets, method="musc", **window)
    rows = [{"setting": "MuSc", **_summary(tokens, musc.token_scores, None)}]
    rows.append({"setting": "oracle (true lesion tokens hidden)", **_summary(tokens, oracle_scores(tokens, window), None)})
    for name, changes in VARIATIONS:
        result = score_batch(tokens.layer_sets, method="codegraph", codegraph=CoDeGraphConfig(**changes), **window)
        assert result.codegraph is not None
        rows.append({"setting": f"CoDeGraph {name}",
                     **_summary(tokens, result.token_scores, result.codegraph.communities)})
    return rows


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the output folder of tools/measure_codegraph.sh")
    parser.add_argument("--appearances", nargs="+", default=["striped", "varied"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[11, 12, 13])
    parser.add_argument("--radius", type=int, default=-1, help="window radius; -1 (default) is global matching")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    config = default_config()
    dim, seed = int(config["tokens"]["projection_dim"]), int(config["tokens"]["projection_seed"])
    results: dict[str, Any] = {"radius": args.radius, "cohorts": {}}
    print(f"## CoDeGraph settings, {'global matching' if args.radius < 0 else f'window radius {args.radius}'}")
    print("| lesions | seed | setting | patient AUROC | lesion-token AUROC | median lesion-token score | communities (members with lesion / members) |")
    print("|---|---|---|---|---|---|---|")
    for appearance in args.appearances:
        for s in args.seeds:
            cohort = args.folder / f"cohort_{appearance}_{s}"
            tokens = load_cohort_tokens(cohort, args.folder / "token_cache", dim, seed)
            rows = sweep_cohort(tokens, args.radius)
            results["cohorts"][cohort.name] = rows
            for row in rows:
                groups = "+".join(map(str, row["communities"])) or "-"
                found = f"{groups} ({row['members_with_lesion']}/{row['members']})" if row["setting"].startswith("CoDeGraph") else ""
                print(f"| {appearance} | {s} | {row['setting']} | {_fmt(row['patient_auroc'])} | "
                      f"{_fmt(row['lesion_token_auroc'])} | {_fmt(row['lesion_token_median'])} | {found} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
