"""CoDeGraph: MuSc with consistent-anomaly filtering.

MuSc (:mod:`codegraph3d.scoring.musc`) assumes that anomalies are rare and unlike each other. When
several volumes of a batch carry near-identical lesions, a lesion token finds close matches in
the other lesion volumes and scores low. CoDeGraph detects such groups and rescores them:

1. **Neighbour burnout** (per layer, :func:`detect_burnout`). For a token, sort its nearest
   distances to the eligible references, ``d(1) <= d(2) <= ... <= d(m)``, after adding a small
   distance floor. For a normal token the scaled log-spacings ``g_i = i * ln(d(i+1) / d(i))`` are
   roughly iid exponential (exactly so, by Renyi's representation of order statistics, when the
   distance distribution behaves like ``d^dim`` near 0; ``mean(g)`` is then ``1/dim``, the Hill /
   Levina-Bickel intrinsic-dimension estimator). A token of a consistent anomaly stays close to
   the few volumes that share it and jumps once they are used up. The endurance statistic is
   ``max_{i <= i_max} g_i / theta``, with ``theta = median(g) / ln 2`` the token's own robust
   exponential scale and ``i_max = floor(max_group_fraction * m)``; a burnout is declared when
   it exceeds the threshold at which ``i_max`` iid unit exponentials exceed it with probability
   ``false_alarm_rate`` *and* the jump itself is a real ratio ``d(i+1)/d(i) >= min_jump_ratio``.
2. **Volume graph** (:func:`volume_graph`). A burnout token links its volume to the references
   it matched before the jump. Edge weight ``W[u, v]``: number of such links between ``u`` and
   ``v`` in either direction, summed over layers.
3. **Communities** (:func:`find_communities`). Edges lighter than ``min_edge_weight`` are dropped
   (noise-level links), then Leiden with the Constant Potts Model (``resolution`` = the least
   mean link weight a volume needs to the members of its community) partitions the volumes;
   communities of fewer than ``min_community_size`` volumes are ignored.
4. **Rescoring** (:func:`codegraph_scores`). In each community, the implicated tokens of a
   member (its burnout tokens, in any layer, linked to another member) are removed from its
   reference set for the other members; the distances between members are recomputed against
   the remaining tokens, every layer, and all tokens of members are rescored with MuSc. Other
   volumes keep their MuSc scores; with no community the result is MuSc exactly.

See ``docs/CODEGRAPH.md`` for the defaults and their reasons.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import igraph
import leidenalg
import numpy as np
import torch

from codegraph3d.scoring.musc import (
    check_k_fraction,
    check_layer_token_sets,
    fuse_layers,
    musc_from_distances,
    nearest_distances,
    nearest_distances_with_batch,
    reference_sets,
    volume_scores,
)

__all__ = [
    "closer_to_members",
    "CoDeGraphConfig",
    "CoDeGraphDiagnostics",
    "CoDeGraphResult",
    "LayerBurnout",
    "burnout_threshold",
    "codegraph_scores",
    "detect_burnout",
    "find_communities",
    "volume_graph",
]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class CoDeGraphConfig:
    """Parameters of CoDeGraph; every value is checked when the object is made.

    Attributes
    ----------
    false_alarm_rate : float, default 1e-3
        Probability, under the exponential model of a normal token's log-spacings, that a token
        is declared burnt out; sets the endurance threshold. In ``(0, 1)``.
    max_group_fraction : float, default 0.5
        Largest consistent group searched for, as a fraction of a token's references with a
        finite distance: the jump must come within the first ``floor(fraction * m)`` neighbours.
        A pattern shared by more than half the batch is the batch's norm, not an anomaly.
        In ``(0, 1]``.
    min_jump_ratio : float, default 1.1
        The jump ``d(i+1) / d(i)`` (with the distance floor) must be at least this; guards tokens
        whose distances are so concentrated that a tiny relative step looks significant. > 1.
        Lesions that are alike but not identical step up gradually (measured: 1.1-1.3), so a
        high value misses them.
    distance_floor_fraction : float, default 0.05
        Added to every distance before taking ratios, as a fraction of the layer's median
        positive nearest-reference distance; identical tokens (distance 0) and sub-noise
        differences then give ratios near 1, not huge ones. >= 0.
    min_references : int, default 5
        Tokens with fewer finite reference distances are not tested (too few spacings for a
        scale). >= 3.
    min_edge_weight : float, default 2.0
        Volume-graph edges lighter than this (token links, both directions, summed over layers)
        are dropped before community detection. > 0.
    resolution : float, default 1.0
        CPM resolution of Leiden: a volume belongs to a community only if its mean link weight
        to the members exceeds it. > 0.
    min_community_size : int, default 3
        Smaller communities are ignored. Pairs are ignored by default: noise links pair volumes
        at random, and a single twin is one of MuSc's ``K`` references, so it barely lowers a
        score unless the batch is tiny. >= 2.
    seed : int, default 0
        Seed of Leiden's random node order, so partitions are reproducible. >= 0.
    n_iterations : int, default -1
        Leiden iterations; -1 iterates until the partition no longer changes. -1 or >= 1.
    member_distance_ratio : float, default 0.8
        Also implicate, in each community member, the tokens whose median nearest distance to the
        other members is below this fraction of their median distance to the volumes outside the
        community (at least three of them), in any layer: the parts of a shared anomaly that do
        not burn out on their own (tokens only partly covered by the lesion). 0 turns it off
        (burnout tokens only). In [0, 1).
    """

    false_alarm_rate: float = 1e-3
    max_group_fraction: float = 0.5
    min_jump_ratio: float = 1.1
    distance_floor_fraction: float = 0.05
    min_references: int = 5
    min_edge_weight: float = 2.0
    resolution: float = 1.0
    min_community_size: int = 3
    seed: int = 0
    n_iterations: int = -1
    member_distance_ratio: float = 0.8

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float, low_open: bool, high_open: bool) -> None:
            value = getattr(self, name)
            low_ok = (value > low if low_open else value >= low) if _is_number(value) else False
            high_ok = (value < high if high_open else value <= high) if _is_number(value) else False
            if not (_is_number(value) and math.isfinite(float(value)) and low_ok and high_ok):
                lo = "(" if low_open else "["
                hi = ")" if high_open else "]"
                raise ValueError(
                    f"CoDeGraphConfig.{name} must be a finite number in {lo}{low}, {high}{hi}; "
                    f"got {value!r}"
                )

        number("false_alarm_rate", 0.0, 1.0, True, True)
        number("max_group_fraction", 0.0, 1.0, True, False)
        number("min_jump_ratio", 1.0, math.inf, True, True)
        number("distance_floor_fraction", 0.0, math.inf, False, True)
        number("min_edge_weight", 0.0, math.inf, True, True)
        number("resolution", 0.0, math.inf, True, True)
        number("member_distance_ratio", 0.0, 1.0, False, True)
        if not _is_integer(self.min_references) or self.min_references < 3:
            raise ValueError(
                "CoDeGraphConfig.min_references must be an integer >= 3 (two spacings at least "
                f"for a scale); got {self.min_references!r}"
            )
        if not _is_integer(self.min_community_size) or self.min_community_size < 2:
            raise ValueError(
                "CoDeGraphConfig.min_community_size must be an integer >= 2; got "
                f"{self.min_community_size!r}"
            )
        if not _is_integer(self.seed) or self.seed < 0:
            raise ValueError(f"CoDeGraphConfig.seed must be an integer >= 0; got {self.seed!r}")
        if not _is_integer(self.n_iterations) or not (
            self.n_iterations == -1 or self.n_iterations >= 1
        ):
            raise ValueError(
                "CoDeGraphConfig.n_iterations must be -1 (until stable) or an integer >= 1; got "
                f"{self.n_iterations!r}"
            )


def burnout_threshold(false_alarm_rate: float, n_positions: np.ndarray | int) -> np.ndarray:
    """Endurance threshold ``c`` with ``P(max of n iid Exp(1) >= c) = false_alarm_rate``.

    Parameters
    ----------
    false_alarm_rate : float
        In ``(0, 1)``.
    n_positions : int or numpy.ndarray
        Number of jump positions searched (``i_max``), >= 1.

    Returns
    -------
    numpy.ndarray
        ``-ln(1 - (1 - alpha)^(1/n))``, about ``ln(n / alpha)`` for small ``alpha``.
    """
    if not (_is_number(false_alarm_rate) and 0.0 < float(false_alarm_rate) < 1.0):
        raise ValueError(f"false_alarm_rate must be in (0, 1); got {false_alarm_rate!r}")
    n = np.asarray(n_positions, dtype=np.float64)
    if np.any(n < 1):
        raise ValueError("n_positions must be >= 1")
    # expm1/log1p keep (1 - alpha)^(1/n) accurate when alpha / n is tiny.
    return -np.log(-np.expm1(np.log1p(-float(false_alarm_rate)) / n))


@dataclass(frozen=True)
class LayerBurnout:
    """Neighbour burnout of one layer.

    Attributes
    ----------
    burnout : list of numpy.ndarray
        Per volume, ``(N_v,)`` bool: the token's sorted distances jump significantly.
    jump_rank : list of numpy.ndarray
        Per volume, ``(N_v,)`` int: references matched before the jump (0 without burnout).
    statistic : list of numpy.ndarray
        Per volume, ``(N_v,)`` float64: the endurance ``max_{i <= i_max} g_i / theta`` (0 for
        untested tokens; ``inf`` when the token's spacing scale is 0).
    links : list of numpy.ndarray
        Per volume ``u``, ``(n_links, 2)`` int64 rows ``(token, volume)``: burnout token
        ``token`` of ``u`` matched reference ``volume`` before its jump. Sparse, because only
        burnout tokens link (a dense ``N x B`` mask per layer would rival the distances).
    distance_floor : float
        The floor added to the distances of this layer.
    """

    burnout: list[np.ndarray]
    jump_rank: list[np.ndarray]
    statistic: list[np.ndarray]
    links: list[np.ndarray]
    distance_floor: float

    @property
    def link_counts(self) -> np.ndarray:
        """``(B, B)`` float64: ``[u, v]`` = burnout tokens of ``u`` linked to ``v``."""
        n_volumes = len(self.links)
        return np.stack(
            [np.bincount(lk[:, 1], minlength=n_volumes) for lk in self.links]
        ).astype(np.float64)

    def linked_tokens(self, volume: int, partners: Sequence[int]) -> np.ndarray:
        """``(N_volume,)`` bool: burnout tokens of ``volume`` linked to any of ``partners``."""
        lk = self.links[volume]
        mask = np.zeros(self.burnout[volume].shape[0], dtype=bool)
        mask[lk[np.isin(lk[:, 1], np.asarray(partners, dtype=np.int64)), 0]] = True
        return mask

    @property
    def burnout_counts(self) -> np.ndarray:
        """``(B,)`` int: burnout tokens per volume."""
        return np.array([int(b.sum()) for b in self.burnout], dtype=int)


def _distance_floor(distances: np.ndarray, fraction: float) -> float:
    nearest = distances.min(axis=0)
    positive = nearest[np.isfinite(nearest) & (nearest > 0)]
    if positive.size == 0 or fraction == 0:
        return 0.0
    return float(fraction * np.median(positive))


def closer_to_members(
    distances: np.ndarray, members: Sequence[int], outsiders: Sequence[int], ratio: float, min_outsiders: int = 3,
) -> np.ndarray:
    """Tokens of one volume much nearer to the other community members than to the rest.

    Parameters
    ----------
    distances : numpy.ndarray
        ``(B, N_u)``: the volume's columns of a :func:`~codegraph3d.scoring.musc.nearest_distances`
        matrix (``inf`` where no distance exists).
    members, outsiders : sequence of int
        Eligible references inside and outside the community.
    ratio : float
        A token is returned when its median finite distance to ``members`` is below ``ratio``
        times its median finite distance to ``outsiders``, and that outsider median exceeds
        the volume's typical one (the median over its tokens) divided by ``ratio``: the token
        must also stand out from the volumes outside the community, as a shared anomaly does.
        Without this second test, normal tokens whose member medians fall low by chance (a few
        members, tightly structured data) were implicated too (measured: 24 % at ratio 0.8 in
        a 20-volume test batch, against none with it).
    min_outsiders : int, default 3
        With fewer outsiders (or no member), nothing is returned: no reference level to compare.

    Returns
    -------
    numpy.ndarray
        ``(N_u,)`` bool.
    """
    n_tokens = distances.shape[1]
    if not members or len(outsiders) < min_outsiders:
        return np.zeros(n_tokens, dtype=bool)

    def finite_median(rows: Sequence[int]) -> np.ndarray:
        block = np.asarray(distances[list(rows)], dtype=np.float64)
        block = np.where(np.isfinite(block), block, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns: no window content
            return np.nanmedian(block, axis=0)

    inside, outside = finite_median(members), finite_median(outsiders)
    if not np.isfinite(outside).any():
        return np.zeros(n_tokens, dtype=bool)
    typical = float(np.nanmedian(np.where(np.isfinite(outside), outside, np.nan)))
    with np.errstate(invalid="ignore", divide="ignore"):
        closer = (inside < ratio * outside) & (outside > typical / ratio)
        return np.nan_to_num(closer, nan=False).astype(bool)


def _volume_burnout(
    block: np.ndarray, ref: np.ndarray, floor: float, config: CoDeGraphConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One volume's burnt tokens, jump ranks, endurance statistics and links (:func:`detect_burnout`).

    ``block`` is its ``(n_ref, N_u)`` distances to its eligible references ``ref``; with fewer
    than ``config.min_references`` of them nothing burns out.
    """
    n_tokens = block.shape[1]
    if ref.size < config.min_references:
        return (np.zeros(n_tokens, dtype=bool), np.zeros(n_tokens, dtype=np.int64), np.zeros(n_tokens),
                np.zeros((0, 2), dtype=np.int64))
    order = np.argsort(block, axis=0, kind="stable")
    ordered = np.take_along_axis(block, order, axis=0) + floor
    finite = np.isfinite(ordered).sum(axis=0)  # m per token
    # Spacing k (0-based) is between sorted ranks k + 1 and k + 2 (1-based): g = (k+1) ln.
    position = np.arange(1, ref.size)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ordered[1:] / ordered[:-1]
        g = position * np.log(ratio)
    valid = position <= (finite - 1)[None, :]
    g = np.where(valid, g, np.nan)
    i_max = np.minimum(np.floor(config.max_group_fraction * finite), finite - 1)
    tested = (finite >= config.min_references) & (i_max >= 1)
    scale = np.full(n_tokens, np.nan)
    if tested.any():  # tested tokens have >= min_references - 1 >= 2 valid spacings
        scale[tested] = np.nanmedian(g[:, tested], axis=0) / math.log(2)
    with np.errstate(all="ignore"):
        endurance = np.where(scale[None, :] > 0, g / scale[None, :], np.where(g > 0, np.inf, 0.0))
    window = valid & (position <= i_max[None, :]) & tested[None, :]
    endurance = np.where(window, endurance, -np.inf)
    threshold = burnout_threshold(config.false_alarm_rate, np.maximum(i_max, 1))
    qualifies = window & (endurance >= threshold[None, :]) & (np.where(window, ratio, 0.0) >= config.min_jump_ratio)
    burnt = qualifies.any(axis=0)
    stat = np.where(tested, endurance.max(axis=0), 0.0)
    best = np.argmax(np.where(qualifies, endurance, -np.inf), axis=0)
    rank = np.where(burnt, best + 1, 0)
    before = np.arange(ref.size)[:, None] < rank[None, :]  # (n_ref, N_u), sorted order
    sorted_volumes = ref[order]
    rows, cols = np.nonzero(before.T)  # token-major: rows are tokens, cols ranks
    link = np.stack([rows, sorted_volumes[cols, rows]], axis=1).astype(np.int64)
    return burnt, rank, stat, link


def detect_burnout(
    distances: np.ndarray,
    sizes: Sequence[int],
    config: CoDeGraphConfig,
    *,
    groups: Sequence[Hashable] | None = None,
) -> LayerBurnout:
    """Find the tokens of one layer whose nearest-reference distances burn out.

    Parameters
    ----------
    distances : numpy.ndarray
        ``(B, N_total)`` from :func:`codegraph3d.scoring.musc.nearest_distances` (``inf`` where a
        volume is no reference or the window is empty).
    sizes : sequence of int
        Tokens per volume, in stacking order.
    config : CoDeGraphConfig
    groups : sequence of hashable, optional
        As for the distances; only eligible references are sorted and linked.

    Returns
    -------
    LayerBurnout
    """
    if not isinstance(config, CoDeGraphConfig):
        raise ValueError(  # noqa: TRY004 - every input error of scoring is a ValueError
            f"config must be a CoDeGraphConfig; got {type(config).__name__}"
        )
    sizes = [int(s) for s in sizes]
    d = np.asarray(distances)
    n_volumes, n_total = len(sizes), int(np.sum(sizes))
    if d.shape != (n_volumes, n_total):
        raise ValueError(
            f"distances must have shape ({n_volumes}, {n_total}) for these sizes; got {d.shape}"
        )
    if np.isnan(d).any():
        raise ValueError("distances contain NaN; use inf for references that do not count")
    refs = reference_sets(n_volumes, groups)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    floor = _distance_floor(d, float(config.distance_floor_fraction))
    burnout, jump_rank, statistic, links = [], [], [], []
    for u in range(n_volumes):
        ref = np.asarray(refs[u], dtype=np.int64)
        block = d[ref, starts[u] : starts[u + 1]].astype(np.float64)  # (n_ref, N_u)
        burnt, rank, stat, link = _volume_burnout(block, ref, floor, config)
        burnout.append(burnt)
        jump_rank.append(rank.astype(np.int64))
        statistic.append(stat.astype(np.float64))
        links.append(link)
    return LayerBurnout(burnout, jump_rank, statistic, links, floor)


def volume_graph(layer_link_counts: Sequence[np.ndarray]) -> np.ndarray:
    """Sum token links into symmetric volume-graph edge weights.

    Parameters
    ----------
    layer_link_counts : sequence of numpy.ndarray
        Per layer, ``(B, B)`` counts ``[u, v]`` of burnout tokens of ``u`` linked to ``v``
        (:attr:`LayerBurnout.link_counts`).

    Returns
    -------
    numpy.ndarray
        ``(B, B)`` float64, ``W[u, v] = sum_layers (C[u, v] + C[v, u])``, zero diagonal.
    """
    if len(layer_link_counts) == 0:
        raise ValueError("volume_graph needs the link counts of at least one layer")
    first = np.asarray(layer_link_counts[0])
    if first.ndim != 2 or first.shape[0] != first.shape[1]:
        raise ValueError(f"link counts must be square (B, B); layer 0 has shape {first.shape}")
    total = np.zeros(first.shape, dtype=np.float64)
    for layer, counts in enumerate(layer_link_counts):
        c = np.asarray(counts, dtype=np.float64)
        if c.shape != first.shape:
            raise ValueError(
                f"layer {layer} link counts have shape {c.shape}; layer 0 has {first.shape}"
            )
        if not np.isfinite(c).all() or (c < 0).any():
            raise ValueError(f"layer {layer} link counts must be finite and non-negative")
        total += c + c.T
    np.fill_diagonal(total, 0.0)
    return total


def find_communities(edge_weights: np.ndarray, config: CoDeGraphConfig) -> list[list[int]]:
    """Leiden (CPM) communities of volumes that share consistent anomalies.

    Parameters
    ----------
    edge_weights : numpy.ndarray
        ``(B, B)`` symmetric, non-negative, from :func:`volume_graph`.
    config : CoDeGraphConfig
        ``min_edge_weight``, ``resolution``, ``min_community_size``, ``seed``, ``n_iterations``.

    Returns
    -------
    list of list of int
        Communities of at least ``min_community_size`` volumes, each sorted, ordered by their
        first volume; empty when no edge survives the weight cut.
    """
    if not isinstance(config, CoDeGraphConfig):
        raise ValueError(  # noqa: TRY004 - every input error of scoring is a ValueError
            f"config must be a CoDeGraphConfig; got {type(config).__name__}"
        )
    w = np.asarray(edge_weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"edge_weights must be square (B, B); got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or not np.array_equal(w, w.T):
        raise ValueError("edge_weights must be finite, non-negative and symmetric")
    upper = np.triu(w, k=1)
    u, v = np.nonzero(upper >= config.min_edge_weight)
    if u.size == 0:
        return []
    graph = igraph.Graph(
        n=w.shape[0],
        edges=list(zip(u.tolist(), v.tolist())),
        edge_attrs={"weight": upper[u, v].tolist()},
    )
    partition = leidenalg.find_partition(
        graph,
        leidenalg.CPMVertexPartition,
        weights="weight",
        resolution_parameter=float(config.resolution),
        n_iterations=int(config.n_iterations),
        seed=int(config.seed),
    )
    communities = [
        sorted(int(x) for x in c) for c in partition if len(c) >= config.min_community_size
    ]
    return sorted(communities, key=lambda c: c[0])


@dataclass
class CoDeGraphDiagnostics:
    """What CoDeGraph found in a batch.

    Attributes
    ----------
    communities : list of list of int
        Volume indices of each community (may be empty).
    edge_weights : numpy.ndarray
        ``(B, B)`` volume-graph weights summed over layers (before the weight cut).
    layer_edge_weights : numpy.ndarray
        ``(L, B, B)`` the same per layer.
    burnout_counts : numpy.ndarray
        ``(L, B)`` int, burnout tokens per layer and volume.
    implicated_counts : numpy.ndarray
        ``(L, B)`` int, per layer, burnout tokens linked to another member of their community.
    implicated : list of numpy.ndarray
        Per volume, ``(N_v,)`` bool: implicated in any layer (excluded from the other members'
        references, every layer).
    distance_floors : numpy.ndarray
        ``(L,)`` the distance floor of each layer.
    rescored_pairs : list of tuple of int
        ``(query, reference)`` volume pairs whose distances were recomputed.
    """

    communities: list[list[int]]
    edge_weights: np.ndarray
    layer_edge_weights: np.ndarray
    burnout_counts: np.ndarray
    implicated_counts: np.ndarray
    implicated: list[np.ndarray]
    distance_floors: np.ndarray
    rescored_pairs: list[tuple[int, int]]

    @property
    def implicated_totals(self) -> np.ndarray:
        """``(B,)`` int, implicated tokens per volume (union over layers)."""
        return np.array([int(m.sum()) for m in self.implicated], dtype=int)


@dataclass
class CoDeGraphResult:
    """Scores of :func:`codegraph_scores`.

    Attributes
    ----------
    token_scores : list of numpy.ndarray
        Layer-fused ``(N_i,)`` float32 token scores after filtering.
    volume_scores : numpy.ndarray
        ``(B,)`` float32, maximum fused token score per volume.
    per_layer : list of list of numpy.ndarray
        ``per_layer[layer][volume]`` after filtering.
    musc_token_scores : list of numpy.ndarray
        The layer-fused MuSc scores before filtering, for comparison.
    diagnostics : CoDeGraphDiagnostics
    """

    token_scores: list[np.ndarray]
    volume_scores: np.ndarray
    per_layer: list[list[np.ndarray]]
    musc_token_scores: list[np.ndarray]
    diagnostics: CoDeGraphDiagnostics


@dataclass(frozen=True)
class _MuscPass:
    """The first (MuSc) pass over every layer of a batch.

    Parameters
    ----------
    distances : list of numpy.ndarray
        Per layer, the ``(B, N_total)`` nearest distances (the base of the rescoring).
    musc_per_layer : list of list of numpy.ndarray
        ``[layer][volume]`` MuSc token scores.
    burnout : list of LayerBurnout
        Per layer, the burnout tokens and their links.
    sizes : list of int
        Tokens per volume.
    """

    distances: list[np.ndarray]
    musc_per_layer: list[list[np.ndarray]]
    burnout: list[LayerBurnout]
    sizes: list[int]


def _checked_config(
    config: CoDeGraphConfig | None,
    k_fraction: float,
    window_radius: int | None,
    coords: Sequence[np.ndarray] | None,
    grid_shape: tuple[int, int, int] | None,
    layer_token_sets: Sequence[Sequence[np.ndarray]],
) -> tuple[CoDeGraphConfig, int]:
    """Validate the inputs of :func:`codegraph_scores`; return the config and the batch size."""
    if config is None:
        config = CoDeGraphConfig()
    if not isinstance(config, CoDeGraphConfig):
        raise ValueError(  # noqa: TRY004 - every input error of scoring is a ValueError
            f"config must be a CoDeGraphConfig; got {type(config).__name__}"
        )
    check_k_fraction(k_fraction)
    if window_radius is not None and (coords is None or grid_shape is None):
        raise ValueError("windowed scoring needs the token coords and the grid shape")
    return config, check_layer_token_sets(layer_token_sets)


def _musc_pass(
    layer_token_sets: Sequence[Sequence[np.ndarray]],
    config: CoDeGraphConfig,
    k_fraction: float,
    groups: Sequence[Hashable] | None,
    search: dict[str, Any],
    on_layer_done: Callable[[int, int], None] | None,
) -> _MuscPass:
    """Nearest distances, MuSc scores and burnout detection of every layer.

    ``search`` holds the keyword arguments of :func:`nearest_distances_with_batch`.
    """
    layer_distances: list[np.ndarray] = []
    musc_per_layer: list[list[np.ndarray]] = []
    layer_burnout: list[LayerBurnout] = []
    sizes: list[int] = []
    for sets in layer_token_sets:
        distances, batch = nearest_distances_with_batch(sets, **search)
        sizes = batch.sizes
        layer_distances.append(distances)
        musc_per_layer.append(musc_from_distances(distances, sizes, k_fraction, groups=groups))
        layer_burnout.append(detect_burnout(distances, sizes, config, groups=groups))
        if on_layer_done is not None:
            on_layer_done(len(layer_distances), len(layer_token_sets))
    return _MuscPass(layer_distances, musc_per_layer, layer_burnout, sizes)


def _implicated_tokens(
    communities: Sequence[Sequence[int]],
    first: _MuscPass,
    refs: Sequence[Sequence[int]],
    n_volumes: int,
    config: CoDeGraphConfig,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The tokens of each community member that the other members must not match.

    Returns
    -------
    implicated_counts : numpy.ndarray
        ``(L, B)`` int, implicated tokens per layer and volume.
    implicated : list of numpy.ndarray
        Per volume, ``(N_v,)`` bool, implicated in any layer.
    """
    implicated_counts = np.zeros((len(first.burnout), n_volumes), dtype=int)
    implicated = [np.zeros(n, dtype=bool) for n in first.sizes]
    starts = np.concatenate([[0], np.cumsum(first.sizes)]).astype(np.int64)
    for community in communities:
        for u in community:
            others = [v for v in community if v != u]
            for layer, burn in enumerate(first.burnout):
                mask = burn.linked_tokens(u, others)
                if config.member_distance_ratio > 0:
                    mask = mask | closer_to_members(
                        first.distances[layer][:, starts[u]:starts[u + 1]],
                        [v for v in others if v in refs[u]],
                        [v for v in refs[u] if v not in community],
                        config.member_distance_ratio,
                    )
                implicated_counts[layer, u] = int(mask.sum())
                implicated[u] |= mask
    return implicated_counts, implicated


def _rescored_pairs(
    communities: Sequence[Sequence[int]],
    refs: Sequence[Sequence[int]],
    implicated: Sequence[np.ndarray],
) -> list[tuple[int, int]]:
    """``(query, reference)`` member pairs whose distances change: the reference lost tokens."""
    return [
        (q, r)
        for community in communities
        for q in community
        for r in community
        if r != q and r in refs[q] and implicated[r].any()
    ]


def _rescored_per_layer(
    layer_token_sets: Sequence[Sequence[np.ndarray]],
    pairs: list[tuple[int, int]],
    implicated: Sequence[np.ndarray],
    first: _MuscPass,
    search: dict[str, Any],
    k_fraction: float,
    groups: Sequence[Hashable] | None,
) -> list[list[np.ndarray]]:
    """``[layer][volume]`` MuSc scores, members rescored without the implicated tokens."""
    n_volumes = len(implicated)
    members = sorted({q for q, _ in pairs})
    excluded = [m if m.any() else None for m in implicated]
    per_layer: list[list[np.ndarray]] = []
    for layer, sets in enumerate(layer_token_sets):
        rescored_distances = nearest_distances(
            sets, **search, excluded=excluded, pairs=pairs, base=first.distances[layer],
        )
        rescored = musc_from_distances(rescored_distances, first.sizes, k_fraction, groups=groups)
        # Non-members keep their MuSc arrays as they are: their distances did not change.
        per_layer.append(
            [
                rescored[v] if v in members else first.musc_per_layer[layer][v]
                for v in range(n_volumes)
            ]
        )
    return per_layer


def codegraph_scores(
    layer_token_sets: Sequence[Sequence[np.ndarray]],
    config: CoDeGraphConfig | None = None,
    *,
    k_fraction: float = 0.3,
    groups: Sequence[Hashable] | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    window_radius: int | None = None,
    coords: Sequence[np.ndarray] | None = None,
    grid_shape: tuple[int, int, int] | None = None,
    on_layer_done: Callable[[int, int], None] | None = None,
    layer_weights: Sequence[float] | None = None,
) -> CoDeGraphResult:
    """MuSc scores of a batch with consistent anomalies filtered out (CoDeGraph).

    Parameters
    ----------
    layer_token_sets : sequence of sequence of numpy.ndarray
        ``[layer][volume]`` ``(N_volume, D_layer)`` arrays, as in
        :func:`codegraph3d.scoring.batch.score_batch`.
    config : CoDeGraphConfig, optional
        ``None``: the defaults.
    k_fraction, groups, device, chunk_size, window_radius, coords, grid_shape, on_layer_done
        As in :func:`codegraph3d.scoring.batch.score_batch`; ``on_layer_done`` follows the first
        (MuSc) pass, whose nearest-neighbour searches dominate the cost.
    layer_weights : sequence of float, optional
        As in :func:`codegraph3d.scoring.batch.score_batch`: how the layers' scores are fused
        (communities are found on every layer's burnout alike).

    Returns
    -------
    CoDeGraphResult
        With no community, the scores are bitwise those of ``score_batch`` (MuSc).

    Raises
    ------
    ValueError
        Bad inputs, as :func:`codegraph3d.scoring.batch.score_batch`, or a config of the wrong type.
    """
    config, n_volumes = _checked_config(
        config, k_fraction, window_radius, coords, grid_shape, layer_token_sets
    )
    search = {
        "groups": groups, "device": device, "chunk_size": chunk_size,
        "window_radius": window_radius, "coords": coords, "grid_shape": grid_shape,
    }
    first = _musc_pass(layer_token_sets, config, k_fraction, groups, search, on_layer_done)

    layer_edges = np.stack([volume_graph([b.link_counts]) for b in first.burnout])
    weights = volume_graph([b.link_counts for b in first.burnout])
    communities = find_communities(weights, config)
    refs = reference_sets(n_volumes, groups)
    implicated_counts, implicated = _implicated_tokens(communities, first, refs, n_volumes, config)

    pairs = _rescored_pairs(communities, refs, implicated)
    if pairs:
        per_layer = _rescored_per_layer(
            layer_token_sets, pairs, implicated, first, search, k_fraction, groups
        )
    else:
        per_layer = first.musc_per_layer
    fused = fuse_layers(per_layer, layer_weights)
    musc_fused = fused if per_layer is first.musc_per_layer else fuse_layers(first.musc_per_layer, layer_weights)
    diagnostics = CoDeGraphDiagnostics(
        communities=communities,
        edge_weights=weights,
        layer_edge_weights=layer_edges,
        burnout_counts=np.stack([b.burnout_counts for b in first.burnout]),
        implicated_counts=implicated_counts,
        implicated=implicated,
        distance_floors=np.array([b.distance_floor for b in first.burnout]),
        rescored_pairs=pairs,
    )
    return CoDeGraphResult(
        token_scores=fused,
        volume_scores=volume_scores(fused),
        per_layer=per_layer,
        musc_token_scores=musc_fused,
        diagnostics=diagnostics,
    )
