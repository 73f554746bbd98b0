"""One contrast batch scored end to end: MuSc (or CoDeGraph-filtered MuSc) on every layer, fused.

This sits above both scorers: :mod:`codegraph3d.scoring.musc` (nearest distances, MuSc, layer
fusion) and :mod:`codegraph3d.scoring.codegraph` (consistent-anomaly filtering, built on the former), so
neither has to import the other's caller.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from codegraph3d.features.encoders import resolve_device
from codegraph3d.scoring.musc import (
    SCORING_METHODS,
    active_selection_precision,
    check_chunk_size,
    check_layer_token_sets,
    check_layer_weights,
    fit_chunk_size,
    fuse_layers,
    k_for_references,
    musc_scores,
    musc_scores_first,
    musc_scores_windowed,
    reference_sets,
    selection_precision,
    volume_scores,
)

if TYPE_CHECKING:
    from codegraph3d.scoring.codegraph import CoDeGraphConfig, CoDeGraphDiagnostics

__all__ = ["BatchScores", "known_scores_pay", "score_batch"]

# What one scored volume's one-sided match with one reference costs (musc_scores_first), in units
# of what the whole-batch scorer spends per ordered pair of volumes, on this CPU (2 cores; 1,600
# tokens x 384 dims, 4 layers; tools/benchmark_bank_scores.py): global matching 2.5-3 (the whole
# batch visits each unordered pair once, in larger blocks), windowed matching about 8 (the whole
# batch matches every volume at a position in one batched matmul; a pair gathers its window
# alone). Known scores are used only where the scored volumes' pairs cost less than the batch.
_PAIR_COST_GLOBAL = 3.0
_PAIR_COST_WINDOWED = 8.0


@dataclass
class BatchScores:
    """MuSc (or CoDeGraph-filtered MuSc) scores of one contrast batch.

    Attributes
    ----------
    token_scores : list of numpy.ndarray
        Layer-fused ``(N_i,)`` float32 token scores, one array per volume.
    volume_scores : numpy.ndarray
        ``(B,)`` float32, the maximum fused token score of each volume.
    per_layer : list of list of numpy.ndarray
        ``per_layer[layer][volume]``, the unfused scores.
    n_references : numpy.ndarray
        ``(B,)`` int, reference volumes used for each volume (after group exclusion).
    k : numpy.ndarray
        ``(B,)`` int, the ``K`` used for each volume.
    codegraph : CoDeGraphDiagnostics, optional
        Communities, graph and token counts when scored with ``method="codegraph"``; else None.
    """

    token_scores: list[np.ndarray]
    volume_scores: np.ndarray
    per_layer: list[list[np.ndarray]]
    n_references: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    k: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    codegraph: CoDeGraphDiagnostics | None = None


def _check_options(
    method: str,
    codegraph: CoDeGraphConfig | None,
    window_radius: int | None,
    coords: Sequence[np.ndarray] | None,
    grid_shape: tuple[int, int, int] | None,
) -> None:
    """Refuse an unknown method, a CoDeGraph config without it, or a window without its grid."""
    if not isinstance(method, str) or method not in SCORING_METHODS:
        raise ValueError(f"method must be one of {SCORING_METHODS}; got {method!r}")
    if method != "codegraph" and codegraph is not None:
        raise ValueError(
            f"a CoDeGraph configuration was given with method={method!r}; pass "
            "method='codegraph' to use it, or leave codegraph=None"
        )
    if window_radius is not None and (coords is None or grid_shape is None):
        raise ValueError("windowed scoring needs the token coords and the grid shape")


def _budgeted_chunk_size(
    layer_token_sets: Sequence[Sequence[np.ndarray]],
    chunk_size: int,
    memory_budget_mb: float,
    window_radius: int | None,
    grid_shape: tuple[int, int, int] | None,
    device: str | torch.device | None = None,
) -> int:
    """``chunk_size`` lowered to fit ``memory_budget_mb`` (:func:`fit_chunk_size`) on ``device``."""
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be positive; got {memory_budget_mb!r}")
    return fit_chunk_size(
        [a.shape[0] for a in layer_token_sets[0]],
        max(int(np.asarray(sets[0]).shape[1]) for sets in layer_token_sets),
        memory_budget_mb, chunk_size=check_chunk_size(chunk_size), window_radius=window_radius,
        grid_shape=grid_shape, accelerator=resolve_device("auto" if device is None else device).type != "cpu",
    )


def _k_per_volume(n_refs: np.ndarray, k_fraction: float) -> np.ndarray:
    """``(B,)`` int, the ``K`` of each volume from its number of references."""
    return np.array([k_for_references(int(n), k_fraction) for n in n_refs], dtype=int)


def _codegraph_batch(
    layer_token_sets: Sequence[Sequence[np.ndarray]],
    codegraph: CoDeGraphConfig | None,
    n_refs: np.ndarray,
    k_fraction: float,
    groups: Sequence[Hashable] | None,
    device: str | torch.device | None,
    chunk_size: int,
    window_radius: int | None,
    coords: Sequence[np.ndarray] | None,
    grid_shape: tuple[int, int, int] | None,
    on_layer_done: Callable[[int, int], None] | None,
    layer_weights: Sequence[float] | None = None,
) -> BatchScores:
    """The batch scored by :func:`codegraph3d.scoring.codegraph.codegraph_scores`."""
    # Loaded here: igraph and leidenalg are needed by CoDeGraph only (a MuSc-only benchmark
    # on a bare GPU machine runs without them).
    from codegraph3d.scoring.codegraph import CoDeGraphConfig, codegraph_scores

    result = codegraph_scores(
        layer_token_sets, CoDeGraphConfig() if codegraph is None else codegraph,
        k_fraction=k_fraction, groups=groups, device=device, chunk_size=chunk_size,
        window_radius=window_radius, coords=coords, grid_shape=grid_shape, on_layer_done=on_layer_done,
        layer_weights=layer_weights,
    )
    return BatchScores(
        token_scores=result.token_scores,
        volume_scores=result.volume_scores,
        per_layer=result.per_layer,
        n_references=n_refs,
        k=_k_per_volume(n_refs, k_fraction),
        codegraph=result.diagnostics,
    )


def _musc_per_layer(
    layer_token_sets: Sequence[Sequence[np.ndarray]],
    k_fraction: float,
    groups: Sequence[Hashable] | None,
    device: str | torch.device | None,
    chunk_size: int,
    window_radius: int | None,
    coords: Sequence[np.ndarray] | None,
    grid_shape: tuple[int, int, int] | None,
    on_layer_done: Callable[[int, int], None] | None,
) -> list[list[np.ndarray]]:
    """``[layer][volume]`` MuSc token scores, global or windowed."""
    per_layer = []
    for sets in layer_token_sets:
        if window_radius is None:
            per_layer.append(musc_scores(sets, k_fraction, groups=groups, device=device, chunk_size=chunk_size))
        else:
            per_layer.append(
                musc_scores_windowed(
                    sets, coords, grid_shape, window_radius, k_fraction, groups=groups, device=device,
                    chunk_size=chunk_size,
                )
            )
        if on_layer_done is not None:
            on_layer_done(len(per_layer), len(layer_token_sets))
    return per_layer


def _check_known(
    known_scores: Sequence[Sequence[np.ndarray]], layer_token_sets: Sequence[Sequence[np.ndarray]],
    refs: list[list[int]], method: str,
) -> int:
    """Refuse known scores that cannot stand for a fresh scoring; return how many volumes lead them.

    Known scores stand for the trailing volumes only when none of those volumes references a
    leading one (cohort-bank volumes, :class:`~codegraph3d.scoring.musc.BankGroup`), and only
    with MuSc: CoDeGraph's communities span the whole batch.
    """
    if method != "musc":
        raise ValueError(f"known scores are reused with method 'musc' only (CoDeGraph's communities span the "
                         f"whole batch); got method={method!r}")
    n_volumes = len(layer_token_sets[0])
    if len(known_scores) != len(layer_token_sets) or len({len(layer) for layer in known_scores}) != 1:
        raise ValueError(f"known scores must hold one list per layer ({len(layer_token_sets)}), each with the same "
                         f"number of volumes; got {[len(layer) for layer in known_scores]}")
    n_known = len(known_scores[0])
    if not 1 <= n_known < n_volumes:
        raise ValueError(f"known scores for {n_known} of {n_volumes} volumes; give them for 1 to {n_volumes - 1} "
                         "trailing volumes (at least one volume must be scored)")
    n_scored = n_volumes - n_known
    for layer, (scores, sets) in enumerate(zip(known_scores, layer_token_sets)):
        for offset, values in enumerate(scores):
            expected = (np.asarray(sets[n_scored + offset]).shape[0],)
            if np.shape(values) != expected:
                raise ValueError(f"known scores of layer {layer}, volume {n_scored + offset}: shape "
                                 f"{np.shape(values)}, its tokens need {expected}")
    leaning = [i for i in range(n_scored, n_volumes) if min(refs[i], default=n_scored) < n_scored]
    if leaning:
        raise ValueError(f"volume(s) {leaning} reference volumes being scored, so scores known beforehand "
                         "cannot stand for theirs (only BankGroup volumes, which reference each other only, can)")
    return n_scored


def known_scores_pay(n_scored: int, n_volumes: int, window_radius: int | None) -> bool:
    """Whether scoring only ``n_scored`` of ``n_volumes`` volumes (known scores for the rest) is cheaper.

    One study against 40 bank volumes: 15 x faster with global matching, 6 x windowed; 12 studies
    against 40: 2.3 x global, but windowed twice as slow as scoring the whole batch, which is what
    a windowed batch with more than an eighth of its volumes to score then does.
    """
    cost = _PAIR_COST_GLOBAL if window_radius is None else _PAIR_COST_WINDOWED
    return cost * n_scored < n_volumes


def _musc_with_known(
    layer_token_sets: Sequence[Sequence[np.ndarray]], known_scores: Sequence[Sequence[np.ndarray]],
    n_scored: int, k_fraction: float, groups: Sequence[Hashable] | None, device: str | torch.device | None,
    chunk_size: int, window_radius: int | None, coords: Sequence[np.ndarray] | None,
    grid_shape: tuple[int, int, int] | None, on_layer_done: Callable[[int, int], None] | None,
) -> list[list[np.ndarray]]:
    """``[layer][volume]`` MuSc scores: the leading volumes scored, the trailing ones' known scores.

    Where that would cost more than scoring every volume (:func:`known_scores_pay`), every volume
    is scored (the known scores would be the same, up to the choice between near-equidistant
    neighbours).
    """
    if not known_scores_pay(n_scored, len(layer_token_sets[0]), window_radius):
        return _musc_per_layer(layer_token_sets, k_fraction, groups, device, chunk_size, window_radius, coords,
                               grid_shape, on_layer_done)
    per_layer = []
    for sets, known in zip(layer_token_sets, known_scores):
        scored = musc_scores_first(
            sets, n_scored, k_fraction, groups=groups, device=device, chunk_size=chunk_size,
            window_radius=window_radius, coords=coords, grid_shape=grid_shape,
        )
        per_layer.append(scored + [np.asarray(values, np.float32) for values in known])
        if on_layer_done is not None:
            on_layer_done(len(per_layer), len(layer_token_sets))
    return per_layer


def score_batch(
    layer_token_sets: Sequence[Sequence[np.ndarray]],
    *,
    k_fraction: float = 0.3,
    groups: Sequence[Hashable] | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    window_radius: int | None = None,
    coords: Sequence[np.ndarray] | None = None,
    grid_shape: tuple[int, int, int] | None = None,
    method: str = "musc",
    codegraph: CoDeGraphConfig | None = None,
    memory_budget_mb: float | None = None,
    precision: str = "float32",
    on_layer_done: Callable[[int, int], None] | None = None,
    known_scores: Sequence[Sequence[np.ndarray]] | None = None,
    layer_weights: Sequence[float] | None = None,
) -> BatchScores:
    """Run MuSc on every layer of a batch, fuse the layers and take volume scores.

    Parameters
    ----------
    layer_token_sets : sequence of sequence of numpy.ndarray
        ``layer_token_sets[layer][volume]`` is an ``(N_volume, D_layer)`` array. ``N_volume`` must
        agree across layers (the same tokens, seen at different depths); ``D`` may differ.
    k_fraction, groups, device, chunk_size
        As in :func:`musc_scores`.
    window_radius : int, optional
        ``None`` (default, the paper's global matching): :func:`musc_scores`. An integer: spatially
        windowed matching, :func:`musc_scores_windowed`, which needs ``coords`` and ``grid_shape``.
    method : {"musc", "codegraph"}, default "musc"
        ``"codegraph"``: MuSc with consistent-anomaly filtering,
        :func:`codegraph3d.scoring.codegraph.codegraph_scores` (its diagnostics in the result's
        ``codegraph``; with no community the scores equal ``"musc"`` exactly).
    codegraph : CoDeGraphConfig, optional
        Settings for ``method="codegraph"`` (``None``: the defaults); must be ``None`` otherwise.
    memory_budget_mb : float, optional
        Bound on the scorer's extra memory (device memory on CUDA): ``chunk_size`` is lowered to
        fit (:func:`fit_chunk_size`; results do not depend on it), and a batch that cannot fit
        at all is refused with the largest batch size that would. ``None``: no bound.
    precision : {"float32", "tf32"}, default "float32"
        Arithmetic of the neighbour-choosing matmuls (:func:`selection_precision`); distances
        are exact either way, within :func:`selection_error_bound` of the true nearest.
    on_layer_done : callable, optional
        Called as ``on_layer_done(layers_done, n_layers)`` after each layer's nearest-neighbour
        pass (the bulk of the work), for progress reporting.
    known_scores : sequence of sequence of numpy.ndarray, optional
        ``[layer][m]``: MuSc scores of the last volumes, computed before (cohort-bank volumes,
        which reference none of the others: ``BankGroup`` keys); only the leading volumes are
        then scored (:func:`~codegraph3d.scoring.musc.musc_scores_first`) where that is cheaper
        (:func:`known_scores_pay`). MuSc only.
    layer_weights : sequence of float, optional
        One per layer, checked first: the fused score is their weighted mean (``None``: the plain
        mean; :func:`~codegraph3d.scoring.musc.fuse_layers`).

    Returns
    -------
    BatchScores
    """
    if precision != active_selection_precision():
        # Enter the precision once for every layer and pass (CoDeGraph rescoring included).
        with selection_precision(precision):
            return score_batch(
                layer_token_sets, k_fraction=k_fraction, groups=groups, device=device, chunk_size=chunk_size,
                window_radius=window_radius, coords=coords, grid_shape=grid_shape, method=method, codegraph=codegraph,
                memory_budget_mb=memory_budget_mb, precision=precision, on_layer_done=on_layer_done,
                known_scores=known_scores, layer_weights=layer_weights)
    _check_options(method, codegraph, window_radius, coords, grid_shape)
    n_volumes = check_layer_token_sets(layer_token_sets)
    check_layer_weights(layer_weights, len(layer_token_sets))
    if memory_budget_mb is not None:
        chunk_size = _budgeted_chunk_size(
            layer_token_sets, chunk_size, memory_budget_mb, window_radius, grid_shape, device
        )
    refs = reference_sets(n_volumes, groups)
    n_refs = np.array([len(r) for r in refs], dtype=int)
    if known_scores is not None:
        n_scored = _check_known(known_scores, layer_token_sets, refs, method)
        per_layer = _musc_with_known(
            layer_token_sets, known_scores, n_scored, k_fraction, groups, device, chunk_size, window_radius,
            coords, grid_shape, on_layer_done,
        )
    elif method == "codegraph":
        return _codegraph_batch(
            layer_token_sets, codegraph, n_refs, k_fraction, groups, device, chunk_size,
            window_radius, coords, grid_shape, on_layer_done, layer_weights,
        )
    else:
        per_layer = _musc_per_layer(
            layer_token_sets, k_fraction, groups, device, chunk_size, window_radius, coords, grid_shape,
            on_layer_done,
        )
    fused = fuse_layers(per_layer, layer_weights)
    return BatchScores(
        token_scores=fused,
        volume_scores=volume_scores(fused),
        per_layer=per_layer,
        n_references=n_refs,
        k=_k_per_volume(n_refs, k_fraction),
    )
