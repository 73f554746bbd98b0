"""Batch-based MuSc mutual scoring of token sets (one set per volume, per encoder layer).

MuSc (Li et al., ICLR 2024) scores every token of every volume against the *other* volumes of
the same batch, with no training and no normal reference set:

* the distance from a token ``q`` of volume ``i`` to volume ``j`` is the Euclidean distance to
  the nearest token of ``j``;
* the token's score is the mean of the ``K`` smallest of those distances over the reference
  volumes, ``K = max(1, floor(k_fraction * n_references))``.

Taking the *K smallest* rather than all distances makes the score robust to the minority of
references that happen to be anomalous at the same place; ``max(1, .)`` guards the ``K = 0`` case
that gives NaN in the reference 2D implementation when ``B`` is small.

A volume never serves as a reference for a volume of the same ``group`` (patient or study): two
series of one patient share the patient's lesion, so they would explain each other's anomaly away.

A whole batch (every layer, fused, MuSc or CoDeGraph) is scored by
:func:`codegraph3d.scoring.batch.score_batch`, which sits above this module and CoDeGraph.
Layers are fused by their mean (:func:`fuse_layers`), or a weighted mean where a configuration
weighs one layer more (``scoring.layer_weights``): the shallow blocks of a learnt CNN see little of
a faint lesion that its deepest block sees, and the plain mean dilutes it.

The computation is split in two so that CoDeGraph (:mod:`codegraph3d.scoring.codegraph`) can share it:
:func:`nearest_distances` returns the ``(B, N_total)`` matrix of per-reference nearest distances
(``inf`` where a volume is not a reference), optionally with reference tokens masked out for
chosen (query, reference) pairs, and :func:`musc_from_distances` reduces it to token scores.

Cost and memory
---------------
All tokens of the batch are stacked once (``N_total x D``, float32, centred on the batch mean so
that the ``|q|^2 + |k|^2 - 2 q.k`` expansion loses little to cancellation). Each unordered pair of
eligible volumes is processed once, in ``chunk_size x chunk_size`` blocks: the block's row minima
update the running nearest neighbour of the query volume's tokens in the reference volume, its
column minima those of the reference volume's tokens in the query volume. This halves the matmul
work of the one-sided formulation. A reference block may span several consecutive (small)
volumes, so that small volumes still make large matmuls and few kernel calls. On a GPU the
reference tokens are laid out in slots of the largest volume's size, so that one matmul matches
a volume with many whole volumes and one reduction per direction serves them all (launches,
not memory passes, are what costs there); that layout and the queries with their norms as two
more columns are two more copies of the tokens (``(N_total + B max N_i) x (D + 2)`` float32).
Peak extra memory is a few ``chunk_size^2`` float32 blocks plus the running nearest distances and
indices and the returned distances, ``B x N_total`` (12 bytes each): never all pairwise token
distances. The nearest-neighbour *distances* are then recomputed exactly (difference vectors,
float32 vectorised accumulation) for the chosen neighbours, so float32 cancellation in the
expansion can only affect *which* of two near-equidistant neighbours is chosen, not the
reported distance.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from codegraph3d.features.encoders import resolve_device

__all__ = [
    "BankGroup",
    "SCORER_VERSION",
    "active_selection_precision",
    "check_chunk_size",
    "check_k_fraction",
    "check_layer_token_sets",
    "check_layer_weights",
    "column_argmin",
    "fuse_layers",
    "k_for_references",
    "musc_from_distances",
    "musc_scores",
    "musc_scores_first",
    "musc_scores_windowed",
    "nearest_distances",
    "nearest_distances_with_batch",
    "reference_sets",
    "row_argmin",
    "scoring_memory",
    "selection_error_bound",
    "selection_precision",
    "fit_chunk_size",
    "volume_scores",
]

# Guards floor(k_fraction * n) against binary rounding (0.29 * 100 == 28.999999999999996).
_K_EPS = 1e-9
# Rows per group for column minima on CPU (see column_argmin): 16 was the fastest of 8-64 on a
# 1,000 x 4,096 block (1.4 ms, against 6.9 ms for index-returning minima over slabs of 64 rows).
_COL_GROUP_CPU = 16
# Lanes of the row minima on CPU (see row_argmin): 32-64 were the fastest of 16-256 on 1,000 x
# 1,000 segments (about 0.7 ms against 1.3 ms for index-returning minima along rows, one thread).
_ROW_LANES_CPU = 64
# Reference tokens per block on CPU (at most chunk_size): a 1,000 x 1,536 float32 block (6 MB)
# stays in this CPU's cache between the matmul and the minima, and 1,000-row matmuls ran at
# 140-150 GFLOP/s against 136 at 4,096 columns; the scorer was 15 % faster (B = 30 x 1,000) with
# no loss when two other processes held both cores (tools/profile_scorer.py).
_CPU_COLUMNS = 1536
# Float32 values per step of the exact recomputation (the gathered neighbours): 4 MB steps
# were 5-15 % faster than chunk_size^2 (64 MB) ones.
_EXACT_STEP = 2**20
# The same on GPUs (256 MB): there each step costs kernel launches, not cache misses.
_EXACT_STEP_GPU = 2**26
# Rows per float64 step when centring the stacked tokens (48 MiB of float64 at D = 384).
_CENTRE_ROWS = 2**14
SCORING_METHODS = ("musc", "codegraph")
#: Raised with every change that alters a MuSc score (K, the reduction, matching): scores kept
#: beside a cohort bank (:mod:`codegraph3d.store.bank_scores`) name it, so old ones are not reused.
SCORER_VERSION = 1
_MIN_CHUNK = 256
#: Measured peak resident growth over :func:`scoring_memory`'s count, rounded up (see fit_chunk_size).
ALLOCATOR_FACTOR = 2.0
SELECTION_PRECISIONS = ("float32", "tf32")
_SELECTION_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("selection_precision", default="float32")
# Unit roundoffs: float32 (24-bit significand) and TensorFloat-32 (11-bit: 10 stored bits).
_U_FLOAT32 = 2.0**-24
_U_TF32 = 2.0**-11


def active_selection_precision() -> str:
    """The selection precision in force here (:func:`selection_precision`; ``"float32"`` outside)."""
    return _SELECTION_PRECISION.get()


@contextlib.contextmanager
def selection_precision(precision: str) -> Iterator[None]:
    """Arithmetic of the matmuls that *choose* nearest neighbours inside this block.

    ``"float32"`` (default): IEEE float32 products (on CUDA, TF32 is switched off for the block).
    ``"tf32"``: TensorFloat-32 inputs (10-bit mantissas, float32 accumulation): on CUDA the tensor
    cores' mode (``torch.backends.cuda.matmul.allow_tf32``), several times faster on Ampere and
    later; on CPU the same input rounding is applied before a float32 matmul (no speed-up; it lets
    the error bound be checked without a GPU). Either way the reported distances are recomputed
    from the difference vectors of the chosen neighbours (see ``_exact_norm``); precision only decides *which*
    neighbour is chosen when candidates are nearly equidistant, within
    :func:`selection_error_bound`.
    """
    if precision not in SELECTION_PRECISIONS:
        raise ValueError(f"selection precision must be one of {SELECTION_PRECISIONS}; got {precision!r}")
    token = _SELECTION_PRECISION.set(precision)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    # torch.set_float32_matmul_precision("medium") lets oneDNN run float32 CPU matmuls in bf16
    # (on CPUs with bf16 units), which would round the norms inside the augmented rows far
    # beyond selection_error_bound: the selecting matmuls are pinned to IEEE float32 on CPUs.
    cpu_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    previous_cpu = getattr(cpu_matmul, "fp32_precision", None)
    if previous_cpu is not None:
        cpu_matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
        if previous_cpu is not None:
            cpu_matmul.fp32_precision = previous_cpu
        _SELECTION_PRECISION.reset(token)


def selection_error_bound(query_norm: float, max_reference_norm: float, dim: int, precision: str = "float32") -> float:
    """Largest excess of the chosen neighbour's squared distance over the true nearest one's.

    With centred tokens ``q`` and ``k`` the scorer selects by ``|q|^2 + |k|^2 - 2 q.k``. The dot
    product carries at most ``eta |q| |k|`` error, with ``eta = 2 u_in + u_in^2 + gamma``
    (``u_in``: input rounding, 0 for float32 and ``2^-11`` for TF32; ``gamma = m u / (1 - m u)``,
    ``m = D + 2``, ``u = 2^-24``, float32 accumulation), and the norms and their sum at most
    ``(gamma + 2 u) (|q| + |k|)^2``: with float32 selection the norms are summed inside the same
    accumulation as the products (one matmul of rows augmented with them and zero padding, see
    ``_augmented_keys``), with TF32 after it; the bound covers both. The chosen ``k'`` has a computed value no larger than the
    true nearest ``k*``'s, so ``|q - k'|^2 <= |q - k*|^2 + 2 max_k (2 eta |q| |k| + (gamma + 2 u)
    (|q| + |k|)^2)``. The distance then reported is the exact ``|q - k'|``: it is never below the
    true nearest distance, and exceeds it by at most the square root of this bound's share.

    Parameters
    ----------
    query_norm, max_reference_norm : float
        ``|q|`` and the largest ``|k|`` of the reference (after centring on the batch mean).
    dim : int
        Token width ``D``.
    precision : {"float32", "tf32"}
    """
    if precision not in SELECTION_PRECISIONS:
        raise ValueError(f"precision must be one of {SELECTION_PRECISIONS}; got {precision!r}")
    u_in = _U_TF32 if precision == "tf32" else 0.0
    terms = dim + 2  # the augmented rows' width (the norms are two more terms of the sum)
    gamma = terms * _U_FLOAT32 / (1.0 - terms * _U_FLOAT32)
    eta = 2.0 * u_in + u_in * u_in + gamma
    q, k = float(query_norm), float(max_reference_norm)
    return 2.0 * (2.0 * eta * q * k + (gamma + 2.0 * _U_FLOAT32) * (q + k) ** 2)


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32 (10 mantissa bits, round to nearest even)."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def _selection_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The tokens the selecting matmuls read (TF32-rounded on CPU under ``tf32``)."""
    if _SELECTION_PRECISION.get() == "tf32" and tokens.device.type != "cuda":
        return _round_tf32(tokens)
    return tokens


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak extra memory of scoring one layer (bytes): what grows with the batch, and the blocks."""

    fixed: int  # stacked tokens (or dense windowed grids) + running minima + returned distances
    per_chunk: int  # the chunk-dependent blocks at the given chunk size
    chunk_size: int

    @property
    def total(self) -> int:
        return self.fixed + self.per_chunk


def scoring_memory(
    sizes: Sequence[int],
    dim: int,
    *,
    chunk_size: int = 4096,
    window_radius: int | None = None,
    grid_shape: tuple[int, int, int] | None = None,
    accelerator: bool = False,
) -> MemoryEstimate:
    """Upper estimate of the extra memory :func:`nearest_distances` needs for one layer.

    Global matching: stacked float32 tokens (``N_total x D``) and their norms, the copies that
    the selecting matmuls read (on an ``accelerator`` (GPU) ``(N_total + B x max N_i) x (D + 2)``,
    on a CPU ``2 N_total x (D + 2)`` rounded up to 8 columns), the running minima
    and their indices and the returned distances (``B x N_total``, 4 + 4 + 4 bytes, plus the
    float32 copy handed back), and about four ``chunk_size^2`` float32 blocks (distances, minima,
    gathered neighbours). Windowed matching: the stacked tokens, a padded grid of row
    indices per volume (``B x (g + 2r)^3`` int64), the running minima and their indices and the
    distances (``B x N_total``), gathered tokens, blocks and their updates near ``chunk_size^2``
    values, 12 ``chunk_size^2`` bytes in all. CoDeGraph adds about one more ``B x N_total``
    float32 matrix (the masked rescoring starts from a copy). Grows with ``B^2 N``, never with
    ``B^2 N^2``.
    """
    n_volumes = len(sizes)
    n_total = int(sum(int(n) for n in sizes))
    # Query blocks hold at most one volume's tokens; reference blocks may span several volumes.
    # The exact recomputation gathers about chunk_size^2 / 2 neighbour values (float32, then the
    # float64 difference): 8 chunk_size^2 bytes, in its own phase.
    per_chunk = max(
        4 * 4 * min(chunk_size, max(int(n) for n in sizes)) * min(chunk_size, n_total), 8 * chunk_size * chunk_size,
    )
    distances = 3 * 4 * n_volumes * n_total  # running minima/distances + numpy copy + CoDeGraph base
    if window_radius is None:
        # + the copies the selecting matmuls read: the queries with their norms as two more
        # columns, and the keys, on GPUs (accelerator) in slots of the largest volume's size,
        # on CPUs as stacked rows padded to 8 floats.
        copy = 4 * 2 * n_total * (-(-(dim + 2) // 8) * 8)
        if accelerator:  # the slots, or the stacked rows where a volume is too long for slots
            copy = max(copy, 4 * (n_total + n_volumes * max(int(n) for n in sizes)) * (dim + 2))
        fixed = 4 * n_total * (dim + 1) + copy + 4 * 2 * n_volumes * (n_total + 1) + distances
    else:
        if grid_shape is None:
            raise ValueError("a windowed estimate needs the grid shape")
        padded = int(np.prod([g + 2 * window_radius for g in grid_shape]))
        # + the running minima and their indices (B x (N_total + 1), 4 + 4 bytes).
        fixed = 4 * n_total * (dim + 1) + 8 * n_volumes * padded + 8 * n_volumes * (n_total + 1) + distances
        per_chunk = 12 * chunk_size * chunk_size
    return MemoryEstimate(fixed=int(fixed), per_chunk=int(per_chunk), chunk_size=int(chunk_size))


def fit_chunk_size(
    sizes: Sequence[int],
    dim: int,
    budget_mb: float,
    *,
    chunk_size: int = 4096,
    window_radius: int | None = None,
    grid_shape: tuple[int, int, int] | None = None,
    accelerator: bool = False,
) -> int:
    """The largest chunk size ``<= chunk_size`` whose :func:`scoring_memory`, times
    :data:`ALLOCATOR_FACTOR`, fits ``budget_mb``.

    Raises
    ------
    ValueError
        When even the batch-size-dependent part (or it plus ``256``-token blocks) exceeds the
        budget; the message gives the largest batch size that would fit, so that
        ``scoring.batch_size`` can split the cohort into chunks that do.
    """
    # The budget covers the allocator's slack too: measured peak RSS growth was at most 1.85x
    # (global) and 1.91x (windowed) the estimate, B = 30-180, 2,000 tokens, D = 384 (docs/RESULTS.md).
    budget = float(budget_mb) * 2**20 / ALLOCATOR_FACTOR

    def estimate(volume_sizes: Sequence[int], chunk: int) -> int:
        return scoring_memory(volume_sizes, dim, chunk_size=chunk, window_radius=window_radius,
                              grid_shape=grid_shape, accelerator=accelerator).total

    if estimate(sizes, chunk_size) <= budget:
        return int(chunk_size)
    fitted = int(chunk_size)
    while fitted > _MIN_CHUNK:
        fitted = max(_MIN_CHUNK, int(fitted * 0.8))
        if estimate(sizes, fitted) <= budget:
            return fitted
    n_volumes = len(sizes)
    mean_tokens = max(1.0, sum(sizes) / max(1, n_volumes))
    fit_b = n_volumes
    while fit_b > 2:
        fit_b -= 1
        if estimate([int(mean_tokens)] * fit_b, _MIN_CHUNK) <= budget:
            break
    needed = estimate(sizes, _MIN_CHUNK)
    raise ValueError(
        f"scoring a batch of {n_volumes} volumes ({sum(sizes)} tokens of width {dim}) needs about "
        f"{ALLOCATOR_FACTOR * needed / 2**20:.0f} MB, over the memory budget of {budget_mb:g} MB; split the cohort "
        f"into chunks of at most {fit_b} volumes (scoring.batch_size) or raise scoring.memory_budget_mb"
    )


def k_for_references(n_references: int, k_fraction: float) -> int:
    """Return the number ``K`` of nearest reference distances averaged per token.

    Parameters
    ----------
    n_references : int
        Number of reference volumes available to the scored volume (``B - 1`` without groups).
    k_fraction : float
        Fraction of the references to average, in ``(0, 1]``.

    Returns
    -------
    int
        ``max(1, floor(k_fraction * n_references))``, never more than ``n_references``.
    """
    check_k_fraction(k_fraction)
    if n_references < 1:
        raise ValueError(f"n_references must be >= 1; got {n_references}")
    k = math.floor(k_fraction * n_references + _K_EPS)
    return int(min(n_references, max(1, k)))


@dataclass(frozen=True)
class BankGroup:
    """Group key of a cohort-bank volume: a reference for the batch, scored against the bank only.

    A volume whose group key is a ``BankGroup`` serves as a reference for every volume of another
    group, but its own references are the other bank volumes (of other keys) only. The batch's
    own volumes then never shape a bank volume's score, so what is taken from the bank's scores
    (per-position statistics, a calibrated bound) is the same whatever the batch holds: a query
    cannot move its own bound. Bank volumes come after every other volume of a batch, because
    pairs are visited from the lower index (:func:`reference_sets` checks the order).

    Attributes
    ----------
    key : hashable
        The bank volume's own group (its patient): two bank volumes with equal keys never
        reference each other.
    """

    key: Hashable


def reference_sets(n_volumes: int, groups: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Return, for every volume, the indices of the volumes that may serve as its references.

    Parameters
    ----------
    n_volumes : int
        Batch size ``B``.
    groups : sequence of hashable, optional
        One group key per volume (PatientID, StudyInstanceUID, ...). A volume never references a
        volume with an equal key, and a :class:`BankGroup` volume references only other
        ``BankGroup`` volumes. ``None``: every other volume is a reference.

    Returns
    -------
    list of list of int
        ``refs[i]`` in increasing order; may be empty (the caller decides whether that is an error).

    Raises
    ------
    ValueError
        A wrong number of keys, or a ``BankGroup`` volume before a volume of the batch's own.
    """
    if groups is None:
        return [[j for j in range(n_volumes) if j != i] for i in range(n_volumes)]
    groups = list(groups)
    if len(groups) != n_volumes:
        raise ValueError(f"groups has {len(groups)} entries for {n_volumes} volumes")
    bank = [isinstance(key, BankGroup) for key in groups]
    if any(bank[i] and not bank[i + 1] for i in range(n_volumes - 1)):
        raise ValueError("bank volumes (BankGroup keys) must come after every volume of the batch's own")
    return [
        [j for j in range(n_volumes) if j != i and groups[j] != groups[i] and (bank[j] or not bank[i])]
        for i in range(n_volumes)
    ]


def check_k_fraction(k_fraction: float) -> None:
    if not isinstance(k_fraction, (int, float, np.floating, np.integer)) or isinstance(
        k_fraction, bool
    ):
        raise ValueError(f"k_fraction must be a number in (0, 1]; got {k_fraction!r}")
    if not (0.0 < float(k_fraction) <= 1.0):
        raise ValueError(f"k_fraction must be in (0, 1]; got {k_fraction}")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    return resolve_device("auto" if device is None else device)


def _validated_arrays(token_sets: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Check shapes, dtypes and finiteness; return the arrays as numpy without copying."""
    if isinstance(token_sets, (np.ndarray, torch.Tensor)) or not isinstance(token_sets, Sequence):
        # A 3-D array would silently be accepted as B equal-sized volumes; make it explicit.
        raise ValueError(
            "token_sets must be a sequence (list/tuple) of 2-D arrays, one per volume; "
            f"got {type(token_sets).__name__}"
        )
    if len(token_sets) < 2:
        raise ValueError(f"MuSc scoring needs at least 2 volumes; got {len(token_sets)}")
    arrays: list[np.ndarray] = []
    dim: int | None = None
    for i, tokens in enumerate(token_sets):
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 2:
            raise ValueError(f"token set {i} must be 2-D (N, D); got shape {arr.shape}")
        if arr.dtype == bool or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise ValueError(f"token set {i} must be real numeric; got dtype {arr.dtype}")
        if arr.shape[0] == 0:
            raise ValueError(f"token set {i} is empty (0 tokens)")
        if arr.shape[1] == 0:
            raise ValueError(f"token set {i} has 0 feature dimensions")
        if dim is None:
            dim = arr.shape[1]
        elif arr.shape[1] != dim:
            raise ValueError(
                f"token set {i} has feature dimension {arr.shape[1]}; token set 0 has {dim}"
            )
        if not np.isfinite(arr).all():
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise ValueError(f"token set {i} contains {bad} non-finite value(s)")
        arrays.append(arr)
    return arrays


def check_chunk_size(chunk_size: int) -> int:
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    return int(chunk_size)


def _check_radius(radius: int, name: str) -> int:
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {radius!r}")
    return int(radius)


@dataclass(frozen=True)
class _Batch:
    """Validated token sets with their eligible references and row offsets in the stacked batch."""

    arrays: list[np.ndarray]
    refs: list[list[int]]
    starts: np.ndarray  # (B + 1,) int64; volume v owns rows starts[v]:starts[v + 1]

    @property
    def n_volumes(self) -> int:
        return len(self.arrays)

    @property
    def n_total(self) -> int:
        return int(self.starts[-1])

    @property
    def sizes(self) -> list[int]:
        return [a.shape[0] for a in self.arrays]


def _prepare_batch(
    token_sets: Sequence[np.ndarray], groups: Sequence[Hashable] | None
) -> _Batch:
    arrays = _validated_arrays(token_sets)
    refs = reference_sets(len(arrays), groups)
    for i, r in enumerate(refs):
        if not r:
            label = f" (group {list(groups)[i]!r})" if groups is not None else ""
            raise ValueError(
                f"volume {i}{label} has no eligible reference: every other volume is in its group"
            )
    starts = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64)
    if int(starts[-1]) >= 2**31:
        raise ValueError(f"too many tokens in one batch ({int(starts[-1])}); split the batch")
    return _Batch(arrays, refs, starts)


def _validated_coords(
    coords: Sequence[np.ndarray] | None,
    grid_shape: tuple[int, int, int] | None,
    arrays: list[np.ndarray],
) -> tuple[list[np.ndarray], tuple[int, int, int]]:
    if coords is None or grid_shape is None:
        raise ValueError("windowed matching needs the token coords and the grid shape")
    if len(coords) != len(arrays):
        raise ValueError(f"{len(coords)} coordinate arrays for {len(arrays)} token sets")
    shape = tuple(int(v) for v in grid_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"grid_shape must be 3 positive integers; got {tuple(grid_shape)!r}")
    checked = [np.asarray(c, dtype=np.int64) for c in coords]
    for i, (c, a) in enumerate(zip(checked, arrays)):
        if c.shape != (a.shape[0], 3):
            raise ValueError(
                f"volume {i}: coords shape {c.shape} does not match {a.shape[0]} tokens"
            )
        if c.size and (c.min() < 0 or np.any(c.max(axis=0) >= np.array(shape))):
            raise ValueError(f"volume {i}: coords outside the grid {shape}")
    return checked, shape  # type: ignore[return-value]


def _validated_exclusions(
    excluded: Sequence[np.ndarray | None] | None, batch: _Batch
) -> list[np.ndarray | None]:
    """Per volume: ``None`` (every token usable) or a boolean ``(N_v,)`` mask with a True."""
    if excluded is None:
        return [None] * batch.n_volumes
    if len(excluded) != batch.n_volumes:
        raise ValueError(
            f"excluded has {len(excluded)} entries for {batch.n_volumes} volumes; give one "
            "boolean mask (or None) per volume"
        )
    masks: list[np.ndarray | None] = []
    for v, mask in enumerate(excluded):
        if mask is None:
            masks.append(None)
            continue
        arr = np.asarray(mask)
        if arr.dtype != bool or arr.shape != (batch.sizes[v],):
            raise ValueError(
                f"excluded[{v}] must be a boolean array of shape ({batch.sizes[v]},) (one flag "
                f"per token of volume {v}); got dtype {arr.dtype}, shape {arr.shape}"
            )
        masks.append(arr if arr.any() else None)
    return masks


def _validated_pairs(
    pairs: Sequence[tuple[int, int]], batch: _Batch
) -> list[tuple[int, int]]:
    checked: set[tuple[int, int]] = set()
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"pairs must hold (query, reference) volume index pairs; got {pair!r}")
        q, r = (int(p) for p in pair)
        if not (0 <= q < batch.n_volumes and 0 <= r < batch.n_volumes):
            raise ValueError(f"pair {pair!r} is outside the {batch.n_volumes} volumes")
        if r not in batch.refs[q]:
            raise ValueError(
                f"pair {pair!r}: volume {r} is not an eligible reference of volume {q} (the "
                "same volume or the same group); its distances stay inf"
            )
        checked.add((q, r))
    return sorted(checked)


def nearest_distances(
    token_sets: Sequence[np.ndarray],
    *,
    groups: Sequence[Hashable] | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    window_radius: int | None = None,
    coords: Sequence[np.ndarray] | None = None,
    grid_shape: tuple[int, int, int] | None = None,
    excluded: Sequence[np.ndarray | None] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    base: np.ndarray | None = None,
) -> np.ndarray:
    """Exact distance of every token to its nearest token in every reference volume (one layer).

    Parameters
    ----------
    token_sets : sequence of numpy.ndarray
        One ``(N_i, D)`` real array per volume, as in :func:`musc_scores`.
    groups, device, chunk_size
        As in :func:`musc_scores`.
    window_radius : int, optional
        ``None``: global matching (any token of the reference). An integer: only reference tokens
        within ``window_radius`` grid steps (Chebyshev) of the query token's grid position, as in
        :func:`musc_scores_windowed`; needs ``coords`` and ``grid_shape``.
    coords, grid_shape
        ``(N_i, 3)`` integer grid indices per volume and the grid shape (windowed matching only).
    excluded : sequence of (numpy.ndarray or None), optional
        One entry per volume: ``None`` or a boolean ``(N_j,)`` mask of the tokens of volume ``j``
        that may not serve as nearest neighbours. It applies to the pairs recomputed here:
        ``pairs`` when given, otherwise every (query, reference) pair whose reference has a mask.
    pairs : sequence of (int, int), optional
        ``(query, reference)`` volume pairs to compute; ``reference`` must be an eligible
        reference of ``query``. Only these are computed (one-sided, ``N_query x N_reference``
        each); every other entry comes from ``base`` (or is ``inf`` without it). ``None``: all.
    base : numpy.ndarray, optional
        ``(B, N_total)`` distances to start from (copied, not modified), typically this
        function's unmasked result; only with ``pairs``.

    Returns
    -------
    numpy.ndarray
        ``(B, N_total)`` float32; column ``starts[i] + t`` is token ``t`` of volume ``i`` (volumes
        stacked in input order) and row ``j`` its distance to volume ``j``. ``inf`` where ``j`` is
        ``i`` itself or not an eligible reference of ``i``, where the window holds no (usable)
        token of ``j``, or where every token of ``j`` is excluded.

    Raises
    ------
    ValueError
        As :func:`musc_scores`, plus bad windowed inputs, masks, pairs or ``base``.
    """
    distances, _ = nearest_distances_with_batch(
        token_sets, groups=groups, device=device, chunk_size=chunk_size,
        window_radius=window_radius, coords=coords, grid_shape=grid_shape, excluded=excluded,
        pairs=pairs, base=base,
    )
    return distances


def nearest_distances_with_batch(
    token_sets: Sequence[np.ndarray],
    *,
    groups: Sequence[Hashable] | None,
    device: str | torch.device | None,
    chunk_size: int,
    window_radius: int | None,
    coords: Sequence[np.ndarray] | None,
    grid_shape: tuple[int, int, int] | None,
    excluded: Sequence[np.ndarray | None] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    base: np.ndarray | None = None,
) -> tuple[np.ndarray, _Batch]:
    chunk_size = check_chunk_size(chunk_size)
    radius = None if window_radius is None else _check_radius(window_radius, "window_radius")
    batch = _prepare_batch(token_sets, groups)
    grid = None if radius is None else _validated_coords(coords, grid_shape, batch.arrays)
    masks = _validated_exclusions(excluded, batch)
    dev = _resolve_device(device)
    shape = (batch.n_volumes, batch.n_total)
    if pairs is None:
        if base is not None:
            raise ValueError("base is only used together with pairs (the entries to recompute)")
        with torch.inference_mode():
            if radius is None:
                full = _global_distances(batch, dev, chunk_size)
            else:
                full = _windowed_distances(batch, grid, radius, dev, chunk_size)
            out = full.cpu().numpy()
        todo = [
            (i, j) for i in range(batch.n_volumes) for j in batch.refs[i] if masks[j] is not None
        ]
    else:
        todo = _validated_pairs(pairs, batch)
        if base is None:
            out = np.full(shape, np.inf, dtype=np.float32)
        else:
            base_arr = np.asarray(base)
            if base_arr.shape != shape or not np.issubdtype(base_arr.dtype, np.floating):
                raise ValueError(
                    f"base must be a float array of shape {shape} (volumes x stacked tokens); "
                    f"got dtype {base_arr.dtype}, shape {base_arr.shape}"
                )
            out = base_arr.astype(np.float32, copy=True)
    if todo:
        by_reference: dict[int, list[int]] = {}
        for q, r in todo:
            by_reference.setdefault(r, []).append(q)
        with torch.inference_mode():
            if radius is None:
                _global_pair_distances(batch, by_reference, masks, dev, chunk_size, out)
            else:
                _windowed_pair_distances(
                    batch, grid, radius, by_reference, masks, dev, chunk_size, out
                )
    return out, batch


def _exact_norm(diff: torch.Tensor) -> torch.Tensor:
    """Norms over the last axis of float32 differences (float32, vectorised accumulation).

    The chosen neighbour's distance is computed from the difference itself, not from the
    matmul expansion that chose it, so no cancellation between ``|q|^2 + |k|^2`` and ``2 q.k``
    enters it. Torch's blocked float32 accumulation was within 2.4e-7 relative (3.2 float32
    ulps) of float64 accumulation on 10^6 random vectors of 8-1,536 dims, and 3.6x faster (the
    float64 accumulation had taken 15 % of the global scorer's time at B = 30).
    """
    return torch.linalg.vector_norm(diff, dim=-1)


def _neighbour_differences(tokens: torch.Tensor, queries: slice, nearest: torch.Tensor) -> torch.Tensor:
    """``tokens[queries] - tokens[nearest]`` for ``nearest`` of shape ``(n_ref, rows)``.

    ``index_select`` gathers twice as fast as advanced indexing; the subtraction happens in place
    in the gathered copy (the sign does not matter to a norm).
    """
    gathered = torch.index_select(tokens, 0, nearest.reshape(-1)).view(*nearest.shape, tokens.shape[1])
    return gathered.sub_(tokens[queries].unsqueeze(0))


def _host_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``array``'s memory where it can (float32/float64, positive strides)."""
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)  # integer tokens: exact, as numpy would compute them
    return torch.from_numpy(np.ascontiguousarray(array))


def _stack_centred(batch: _Batch, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked float32 tokens centred on the batch mean, and their squared norms.

    Centring is distance-preserving and shrinks ``|q|^2 + |k|^2`` relative to ``|q - k|^2``,
    which is what limits the float32 accuracy of the expansion. It is done on the device in
    float64 from the input's own precision: float32 tokens (the product's) travel once, as one
    block, and are centred in place; others one volume at a time (numpy on the CPU and a
    transfer per volume had taken a third of a GPU's whole scoring at B = 180).
    """
    arrays, starts, n_total = batch.arrays, batch.starts, batch.n_total
    if all(a.dtype == np.float32 for a in arrays):
        tokens = torch.cat([_host_tensor(a) for a in arrays]).to(dev)
        mean = torch.zeros(tokens.shape[1], dtype=torch.float64, device=dev)
        for a in range(0, n_total, _CENTRE_ROWS):
            mean += tokens[a : a + _CENTRE_ROWS].sum(dim=0, dtype=torch.float64)
        mean /= n_total
        sq_norms = torch.empty(n_total, dtype=torch.float32, device=dev)
        for a in range(0, n_total, _CENTRE_ROWS):
            tokens[a : a + _CENTRE_ROWS] = tokens[a : a + _CENTRE_ROWS].double().sub_(mean)
            # The norms of the float32 tokens the matmuls read, accumulated in float64.
            sq_norms[a : a + _CENTRE_ROWS] = tokens[a : a + _CENTRE_ROWS].double().pow(2).sum(dim=1)
        return tokens, sq_norms
    mean = torch.zeros(arrays[0].shape[1], dtype=torch.float64, device=dev)
    for a in arrays:
        mean += _host_tensor(a).to(dev).sum(dim=0, dtype=torch.float64)
    mean /= n_total
    tokens = torch.empty((n_total, arrays[0].shape[1]), dtype=torch.float32, device=dev)
    sq_norms = torch.empty(n_total, dtype=torch.float32, device=dev)
    for i, a in enumerate(arrays):
        # copy=True: a float64 array on the CPU would otherwise be centred in place, the caller's.
        tokens[starts[i] : starts[i + 1]] = _host_tensor(a).to(dev, torch.float64, copy=True).sub_(mean)
        sq_norms[starts[i] : starts[i + 1]] = tokens[starts[i] : starts[i + 1]].double().pow(2).sum(dim=1)
    return tokens, sq_norms


def _global_distances(batch: _Batch, dev: torch.device, chunk_size: int) -> torch.Tensor:
    """All eligible pairs, global matching: ``(B, N_total)`` float32 exact nearest distances.

    On CPU, cache-sized blocks (:func:`_block_nearest`); elsewhere (CUDA), blocks of many whole
    volumes at once (:func:`_padded_nearest`), since there kernel launches, not memory passes,
    are what costs beside the matmuls, unless a volume is too long for the memory estimate's
    blocks (more than ``4 chunk_size`` tokens).
    """
    tokens, sq_norms = _stack_centred(batch, dev)
    # Re-entering the active precision pins TF32 (CUDA) and bf16 (CPU) on or off for these
    # matmuls, whatever a global flag (torch.set_float32_matmul_precision) says.
    with selection_precision(_SELECTION_PRECISION.get()):
        if dev.type != "cpu" and int(np.diff(batch.starts).max()) <= 4 * chunk_size:
            best_idx = _padded_nearest(batch, tokens, sq_norms, chunk_size)
        else:
            best_idx = _block_nearest(batch, tokens, sq_norms, chunk_size)
    return _exact_distances(batch, tokens, best_idx, chunk_size)


def _block_nearest(batch: _Batch, tokens: torch.Tensor, sq_norms: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chosen neighbour (stacked row) of every token in every eligible reference: ``(B, N_total)``.

    Each unordered pair of volumes is visited once, in blocks of at most ``chunk_size`` query
    and reference tokens (:func:`_update_block_row`); the running minima and their rows are
    updated from each block's row and column minima.
    """
    n_volumes, n_total, refs = batch.n_volumes, batch.n_total, batch.refs
    if _SELECTION_PRECISION.get() == "float32":
        # The norms inside the matmul (:func:`_augmented_keys`): no bias copy and no pass adding
        # the query norms over every block. Rows padded to a multiple of 8 floats keep the
        # matmul kernel on whole vectors (K = 386 was no faster than addmm + a pass; 392 was).
        width = -(-(tokens.shape[1] + 2) // 8) * 8
        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] = (
            _augmented_queries(tokens, sq_norms, width), _augmented_keys(tokens, sq_norms, width), None)
    else:
        # TF32 would round the norms too: they are added in float32 after the matmul.
        selecting = _selection_tokens(tokens)
        pairs = (selecting, selecting, sq_norms)
    # best_d2[j, t]: running min squared distance of token t to volume j; best_idx: argmin row.
    best_d2 = torch.full((n_volumes, n_total), float("inf"), dtype=torch.float32, device=tokens.device)
    best_idx = torch.zeros((n_volumes, n_total), dtype=torch.int32, device=tokens.device)
    for i in range(n_volumes):
        # Each unordered pair is visited once, from i < j: group exclusion is symmetric, and the
        # one one-way exclusion (a bank volume never references the batch's own volumes) has the
        # bank after them, so the pair is visited from the batch's side and serves both.
        for run in _consecutive_runs([j for j in refs[i] if j > i]):
            _update_block_row(pairs, sq_norms, batch.starts, i, run, (best_d2, best_idx), chunk_size)
    return best_idx


def _exact_distances(batch: _Batch, tokens: torch.Tensor, best_idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``(B, N_total)`` exact distances of every token to its chosen neighbour in each reference."""
    n_volumes, n_total, starts, refs = batch.n_volumes, batch.n_total, batch.starts, batch.refs
    dev = tokens.device
    distances = torch.full((n_volumes, n_total), float("inf"), dtype=torch.float32, device=dev)
    step = _EXACT_STEP if dev.type == "cpu" else _EXACT_STEP_GPU
    for i in range(n_volumes):
        n_ref = len(refs[i])
        ref_index = torch.as_tensor(refs[i], dtype=torch.long, device=dev)
        i0, i1 = int(starts[i]), int(starts[i + 1])
        # Gathered neighbours are (n_ref, rows, D) float32.
        rows = max(1, min(chunk_size, step // (n_ref * tokens.shape[1])))
        for a in range(i0, i1, rows):
            b = min(a + rows, i1)
            nearest = best_idx[ref_index, a:b].long()  # (n_ref, rows)
            distances[ref_index, a:b] = _exact_norm(_neighbour_differences(tokens, slice(a, b), nearest))
    return distances


def _padded_nearest(batch: _Batch, tokens: torch.Tensor, sq_norms: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chosen neighbour (stacked row) of every token in every eligible reference: ``(B, N_total)``.

    The reference tokens are laid out in slots of ``n_max`` rows per volume (padding rows have
    an infinite norm, so they are never nearest). One matmul then matches the tokens of volume
    ``i`` with a block of ``M`` consecutive later volumes, and two reductions give every
    nearest neighbour of the pair set: the minimum over each volume's slot (tokens of ``i`` ->
    each ``j``) and the minimum over the rows (tokens of each ``j`` -> ``i``). With ``n_max <=
    4 chunk_size`` (the caller's condition) a block holds at most ``4 min(chunk_size, n_max)
    min(chunk_size, N_total)`` values, the blocks :func:`scoring_memory` counts.
    Device-independent (tested on CPU); used where launches, not memory passes, dominate.
    """
    n_volumes, n_total, starts, refs = batch.n_volumes, batch.n_total, batch.starts, batch.refs
    dev, dim = tokens.device, tokens.shape[1]
    n_max = int(np.diff(starts).max())
    slot_of = _slot_rows(starts, n_max, dev)  # stacked row -> slot (padded) row
    if _SELECTION_PRECISION.get() == "float32":
        # The norms inside the matmul (two fewer passes over every block); a padding slot is
        # [0, ..., 0, 0, inf], whose product with any query is inf. Built in place: no third copy.
        queries = _augmented_queries(tokens, sq_norms)
        keys = tokens.new_zeros((n_volumes * n_max, dim + 2))
        keys[:, :dim].index_copy_(0, slot_of, tokens).mul_(-2.0)  # exact: a power of two
        keys[:, dim].index_fill_(0, slot_of, 1.0)
        keys[:, dim + 1].fill_(float("inf")).index_copy_(0, slot_of, sq_norms)
        key_sq: torch.Tensor | None = None
    else:
        # TF32 would round the norms too: they are added in float32 after the matmul.
        queries = _selection_tokens(tokens)
        keys = queries.new_zeros((n_volumes * n_max, dim)).index_copy_(0, slot_of, queries)
        key_sq = sq_norms.new_full((n_volumes * n_max,), float("inf")).index_copy_(0, slot_of, sq_norms)
    # The stacked row of each slot; padding slots point at a dump column n_total.
    row_of = torch.full((n_volumes * n_max,), n_total, dtype=torch.long, device=dev)
    row_of.index_copy_(0, slot_of, torch.arange(n_total, device=dev))
    best_d2 = torch.full((n_volumes, n_total + 1), float("inf"), dtype=torch.float32, device=dev)
    best_idx = torch.zeros((n_volumes, n_total + 1), dtype=torch.int32, device=dev)
    starts_dev = torch.as_tensor(starts[:-1], device=dev)
    for i in range(n_volumes):
        i0, i1 = int(starts[i]), int(starts[i + 1])
        rows = min(chunk_size, i1 - i0)
        per_block = max(1, 4 * min(chunk_size, n_max) * min(chunk_size, n_total) // (rows * n_max))
        for run in _consecutive_runs([j for j in refs[i] if j > i]):
            for k in range(0, len(run), per_block):
                j0, j1 = run[k], run[min(k + per_block, len(run)) - 1] + 1
                for a in range(i0, i1, rows):
                    b = min(a + rows, i1)
                    d2 = _slot_block(queries, keys, key_sq, sq_norms, (a, b), (j0 * n_max, j1 * n_max))
                    # Tokens a:b -> each volume j0:j1 (each (token, volume) is visited once).
                    local = d2.view(b - a, j1 - j0, n_max).argmin(dim=2)
                    best_idx[j0:j1, a:b] = (local + starts_dev[j0:j1]).T.to(torch.int32)
                    # Tokens of j0:j1 -> volume i: a running minimum over the query chunks.
                    col_val, col_arg = d2.min(dim=0)
                    slots = row_of[j0 * n_max : j1 * n_max]
                    _running_min_at(best_d2[i], best_idx[i], slots, col_val, col_arg + a)
    return best_idx[:, :n_total]


def _slot_block(
    queries: torch.Tensor, keys: torch.Tensor, key_sq: torch.Tensor | None, sq_norms: torch.Tensor,
    rows: tuple[int, int], slots: tuple[int, int],
) -> torch.Tensor:
    """Selecting squared distances of query rows ``a:b`` to key slots ``c:d``.

    Without ``key_sq`` the rows are augmented (:func:`_augmented_queries`,
    :func:`_augmented_keys`) and one plain matmul gives the distances; otherwise the norms are
    added to ``-2 q.k`` after the matmul.
    """
    (a, b), (c, d) = rows, slots
    if key_sq is None:
        return torch.mm(queries[a:b], keys[c:d].T)
    d2 = torch.addmm(key_sq[c:d].unsqueeze(0), queries[a:b], keys[c:d].T, beta=1.0, alpha=-2.0)
    return d2.add_(sq_norms[a:b].unsqueeze(1))


def _slot_rows(starts: np.ndarray, n_max: int, dev: torch.device) -> torch.Tensor:
    """The padded slot row ``v n_max + t`` of every stacked row ``starts[v] + t``."""
    volume = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    within = np.arange(int(starts[-1])) - starts[volume]
    return torch.as_tensor(volume * n_max + within, dtype=torch.long, device=dev)


def _running_min_at(
    cur_val: torch.Tensor, cur_idx: torch.Tensor, at: torch.Tensor, new_val: torch.Tensor, new_idx: torch.Tensor
) -> None:
    """:func:`_running_min` on the entries ``at`` of ``cur_val``/``cur_idx`` (gather, compare, scatter)."""
    val, idx = cur_val.index_select(0, at), cur_idx.index_select(0, at)
    _running_min(val, idx, new_val, new_idx)
    cur_val.index_copy_(0, at, val)
    cur_idx.index_copy_(0, at, idx)


def _global_pair_distances(
    batch: _Batch,
    by_reference: dict[int, list[int]],
    masks: list[np.ndarray | None],
    dev: torch.device,
    chunk_size: int,
    out: np.ndarray,
) -> None:
    """Recompute ``out[j, tokens of i]`` for each (i, j), using only the usable tokens of ``j``.

    One-sided (the masks differ per direction), so each pair costs ``N_i x N_j`` multiply-adds;
    only the requested pairs are touched.
    """
    starts = batch.starts
    tokens, sq_norms = _stack_centred(batch, dev)
    selecting = _selection_tokens(tokens)
    for j, queries in by_reference.items():
        rows_j = torch.arange(int(starts[j]), int(starts[j + 1]), device=dev)
        if masks[j] is not None:
            rows_j = rows_j[torch.from_numpy(~masks[j]).to(dev)]
        ref_tokens, ref_sq, ref_selecting = tokens[rows_j], sq_norms[rows_j], selecting[rows_j]
        n_usable = ref_tokens.shape[0]
        for i in queries:
            i0, i1 = int(starts[i]), int(starts[i + 1])
            if n_usable == 0:
                out[j, i0:i1] = np.inf
                continue
            for a in range(i0, i1, chunk_size):
                b = min(a + chunk_size, i1)
                best_val = torch.full((b - a,), float("inf"), dtype=torch.float32, device=dev)
                best_arg = torch.zeros(b - a, dtype=torch.long, device=dev)
                for c in range(0, n_usable, chunk_size):
                    d = min(c + chunk_size, n_usable)
                    d2 = torch.addmm(
                        ref_sq[c:d].unsqueeze(0), selecting[a:b], ref_selecting[c:d].T,
                        beta=1.0, alpha=-2.0,
                    )
                    d2.add_(sq_norms[a:b].unsqueeze(1))
                    val, arg = d2.min(dim=1)
                    better = val < best_val
                    best_val = torch.where(better, val, best_val)
                    best_arg = torch.where(better, arg + c, best_arg)
                out[j, a:b] = _exact_norm(tokens[a:b] - ref_tokens[best_arg]).cpu().numpy()


@dataclass(frozen=True)
class _Window:
    """Padded token grid geometry: a window is a gather at fixed flat offsets."""

    shape: tuple[int, int, int]
    radius: int

    @property
    def padded(self) -> tuple[int, int, int]:
        return tuple(s + 2 * self.radius for s in self.shape)  # type: ignore[return-value]

    @property
    def n_positions(self) -> int:
        return int(np.prod(self.padded))

    @property
    def offsets(self) -> list[tuple[int, int, int]]:
        r = self.radius
        span = range(-r, r + 1)
        return [(a, b, c) for a in span for b in span for c in span]

    @property
    def flat_offsets(self) -> np.ndarray:
        """What each of :attr:`offsets` adds to a flat padded index."""
        origin = np.zeros((1, 3), dtype=np.int64)
        return np.array([self.flat(origin, o)[0] for o in self.offsets]) - self.flat(origin)[0]

    def flat(self, c: np.ndarray, offset: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
        z, y, x = (c + np.asarray(offset) + self.radius).T
        padded = self.padded
        return (z * padded[1] + y) * padded[2] + x


def _windowed_distances(
    batch: _Batch,
    grid: tuple[list[np.ndarray], tuple[int, int, int]],
    radius: int,
    dev: torch.device,
    chunk_size: int,
) -> torch.Tensor:
    """All eligible pairs, windowed matching: ``(B, N_total)`` float32 exact nearest distances.

    Grouped by grid position and offset: for a set of positions ``p`` and one offset ``o``, the
    tokens of all volumes at ``p`` are matched with those of all volumes at ``p + o`` in one
    batched matmul (``B x D`` by ``D x B`` per position). The block serves both directions (its
    rows: tokens at ``p`` against each volume's token at ``p + o``; its columns: tokens at
    ``p + o`` against each volume's token at ``p``), so only the offsets after ``(0, 0, 0)`` in
    lexicographic order are visited, and each pair of tokens is matched once, as in global
    matching. Running minima per (reference volume, token) choose the neighbour; its distance is
    then recomputed from the difference vector.
    """
    coords, shape = grid
    window = _Window(shape, radius)
    n_volumes, n_total, dim = batch.n_volumes, batch.n_total, batch.arrays[0].shape[1]
    tokens, sq_norms = _stack_centred(batch, dev)
    slot = _window_slots(batch, coords, window, dev)
    selecting = torch.cat([_selection_tokens(tokens), tokens.new_zeros((1, dim))])
    norms = torch.cat([sq_norms, sq_norms.new_full((1,), float("inf"))])  # empty slot: never nearest
    present = (slot < n_total).any(dim=0)
    occupied = torch.nonzero(present).flatten()
    # best_d2[t, j]: running min squared distance of token t to volume j; row n_total collects
    # the writes for empty slots (never read).
    best_d2 = torch.full((n_total + 1, n_volumes), float("inf"), dtype=torch.float32, device=dev)
    best_idx = torch.zeros((n_total + 1, n_volumes), dtype=torch.int32, device=dev)
    centre = len(window.offsets) // 2
    offsets = [int(o) for o in window.flat_offsets[centre:]]  # (0, 0, 0), then one of each +-o pair
    # Positions per step: the two gathered token sets and the blocks stay near chunk_size^2 values.
    step = max(1, chunk_size * chunk_size // (n_volumes * (2 * dim + 6 * n_volumes)))
    for lo in range(0, occupied.numel(), step):
        position = occupied[lo : lo + step]
        rows = slot[:, position].T  # (m, B)
        for offset in offsets:
            other = position + offset
            keep = present[other]
            rows_p, rows_o = rows[keep], slot[:, other[keep]].T
            d2 = torch.baddbmm(
                norms[rows_o].unsqueeze(1), _gather_rows(selecting, rows_p),
                _gather_rows(selecting, rows_o).transpose(1, 2), beta=1.0, alpha=-2.0,
            )  # (m, B, B): token of volume i at p against the token of volume j at p + o
            d2.add_(norms[rows_p].unsqueeze(2))
            _window_update(best_d2, best_idx, rows_p, rows_o, d2)
            if offset != 0:
                _window_update(best_d2, best_idx, rows_o, rows_p, d2.transpose(1, 2))
    return _window_exact(batch, tokens, best_d2[:n_total].T, best_idx[:n_total].T, dev)


def _gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` for 2-D ``rows`` (``index_select``: twice as fast as advanced indexing)."""
    return torch.index_select(table, 0, rows.reshape(-1)).view(*rows.shape, table.shape[1])


def _window_slots(batch: _Batch, coords: list[np.ndarray], window: _Window, dev: torch.device) -> torch.Tensor:
    """``slot[v, p]``: the stacked row of volume ``v``'s token at padded position ``p``, or ``N_total``."""
    starts = batch.starts
    slot = torch.full((batch.n_volumes, window.n_positions), batch.n_total, dtype=torch.long, device=dev)
    for v, c in enumerate(coords):
        slot[v, torch.from_numpy(window.flat(c)).to(dev)] = torch.arange(
            int(starts[v]), int(starts[v + 1]), device=dev
        )
    return slot


def _window_update(
    best_d2: torch.Tensor, best_idx: torch.Tensor, queries: torch.Tensor, references: torch.Tensor,
    d2: torch.Tensor,
) -> None:
    """Running minima of tokens ``queries`` (m, B) against ``references`` (m, B) from ``d2`` (m, B, B).

    ``best_d2[t, j]`` is token ``t``'s running minimum against volume ``j`` (token-major, so a
    token's row is contiguous) and ``d2[m, i, j]`` the squared distance from token
    ``queries[m, i]`` to ``references[m, j]`` (volume ``j``'s token there). Within one offset no
    token appears twice among ``queries`` except the empty slot ``N_total``, whose row is never
    read, so the scatter is well defined.
    """
    n_volumes = best_d2.shape[1]
    rows = queries.reshape(-1)
    new = d2.reshape(-1, n_volumes)  # (m * B_query, B_ref)
    current = torch.index_select(best_d2, 0, rows)
    better = new < current
    best_d2.index_copy_(0, rows, torch.where(better, new, current))
    neighbour = references.unsqueeze(1).expand(-1, queries.shape[1], -1).reshape(-1, n_volumes)
    chosen = torch.where(better, neighbour.to(best_idx.dtype), torch.index_select(best_idx, 0, rows))
    best_idx.index_copy_(0, rows, chosen)


def _window_exact(
    batch: _Batch, tokens: torch.Tensor, best_d2: torch.Tensor, best_idx: torch.Tensor, dev: torch.device
) -> torch.Tensor:
    """Exact distances of the chosen neighbours for the eligible (reference, token) pairs."""
    n_volumes, n_total = batch.n_volumes, batch.n_total
    eligible = torch.zeros((n_volumes, n_volumes), dtype=torch.bool, device=dev)
    for i in range(n_volumes):
        eligible[torch.as_tensor(batch.refs[i], dtype=torch.long, device=dev), i] = True
    volume_of = torch.repeat_interleave(
        torch.arange(n_volumes, device=dev), torch.as_tensor(batch.sizes, device=dev)
    )
    distances = torch.full((n_volumes, n_total), float("inf"), dtype=torch.float32, device=dev)
    rows = max(1, _EXACT_STEP // tokens.shape[1])
    for j in range(n_volumes):  # one reference at a time: the pair indices stay N_total long
        (where_t,) = torch.nonzero(eligible[j, volume_of] & torch.isfinite(best_d2[j]), as_tuple=True)
        for a in range(0, where_t.numel(), rows):
            t = where_t[a : a + rows]
            neighbours = torch.index_select(tokens, 0, best_idx[j, t].long())
            distances[j, t] = _exact_norm(neighbours.sub_(torch.index_select(tokens, 0, t)))
    return distances


def _windowed_pair_distances(
    batch: _Batch,
    grid: tuple[list[np.ndarray], tuple[int, int, int]] | None,
    radius: int,
    by_reference: dict[int, list[int]],
    masks: list[np.ndarray | None],
    dev: torch.device,
    chunk_size: int,
    out: np.ndarray,
) -> None:
    """Windowed :func:`_global_pair_distances`: excluded tokens are absent from ``j``'s grid."""
    assert grid is not None
    coords, shape = grid
    window = _Window(shape, radius)
    arrays, starts = batch.arrays, batch.starts
    dim = arrays[0].shape[1]
    rows = max(1, chunk_size * chunk_size // max(1, dim))
    for j, queries in by_reference.items():
        keep = np.ones(batch.sizes[j], dtype=bool) if masks[j] is None else ~masks[j]
        dense = torch.zeros((window.n_positions, dim), dtype=torch.float32, device=dev)
        present = torch.zeros(window.n_positions, dtype=torch.bool, device=dev)
        index = torch.from_numpy(window.flat(coords[j][keep])).to(dev)
        dense[index] = torch.from_numpy(
            np.ascontiguousarray(arrays[j][keep], dtype=np.float32)
        ).to(dev)
        present[index] = True
        for i in queries:
            q = torch.from_numpy(np.ascontiguousarray(arrays[i], dtype=np.float32)).to(dev)
            best = torch.full((q.shape[0],), float("inf"), dtype=torch.float32, device=dev)
            for offset in window.offsets:
                position = torch.from_numpy(window.flat(coords[i], offset)).to(dev)
                for a in range(0, q.shape[0], rows):
                    where = position[a : a + rows]
                    d2 = (dense[where] - q[a : a + rows]).pow_(2).sum(dim=1)
                    d2 = torch.where(present[where], d2, torch.inf)
                    torch.minimum(best[a : a + rows], d2, out=best[a : a + rows])
            out[j, int(starts[i]) : int(starts[i + 1])] = best.sqrt_().cpu().numpy()


def musc_from_distances(
    distances: np.ndarray,
    sizes: Sequence[int],
    k_fraction: float = 0.3,
    *,
    groups: Sequence[Hashable] | None = None,
) -> list[np.ndarray]:
    """Reduce a :func:`nearest_distances` matrix to MuSc token scores.

    Each token's score is the mean of the finite values among its ``K`` smallest distances to
    its eligible references (``K`` from the number of eligible references, as in
    :func:`k_for_references`); ``inf`` entries (an empty window, a fully excluded reference) do
    not count, and a token with no finite distance among them scores 0. With global matching and
    no exclusions every distance is finite, so this is the plain MuSc mean.

    Parameters
    ----------
    distances : numpy.ndarray
        ``(B, N_total)`` as returned by :func:`nearest_distances`.
    sizes : sequence of int
        Tokens per volume, in the stacking order; they must sum to ``N_total``.
    k_fraction : float, default 0.3
        As in :func:`musc_scores`.
    groups : sequence of hashable, optional
        As in :func:`musc_scores`; must match the groups the distances were computed with.

    Returns
    -------
    list of numpy.ndarray
        One ``(N_i,)`` float32 array per volume.
    """
    check_k_fraction(k_fraction)
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive token counts, one per volume; got {sizes}")
    d = np.asarray(distances, dtype=np.float32)
    n_volumes, n_total = len(sizes), int(np.sum(sizes))
    if d.shape != (n_volumes, n_total):
        raise ValueError(
            f"distances must have shape ({n_volumes}, {n_total}) for {n_volumes} volumes of "
            f"{n_total} tokens in all; got {d.shape}"
        )
    if np.isnan(d).any():
        raise ValueError("distances contain NaN; use inf for references that do not count")
    refs = reference_sets(n_volumes, groups)
    for i in range(n_volumes):
        if not refs[i]:
            raise ValueError(f"volume {i} has no eligible reference: every other volume is in its group")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    with torch.inference_mode():
        return _musc_reduce(torch.from_numpy(d), starts, refs, k_fraction)


def _musc_reduce(
    table: torch.Tensor, starts: np.ndarray, refs: list[list[int]], k_fraction: float
) -> list[np.ndarray]:
    """:func:`musc_from_distances` on a checked ``(B, N_total)`` table, on the table's device.

    On a GPU the table stays there: the top-K of every token is taken where the distances are,
    and only the ``N_total`` scores travel back (copying the table and reducing it on the CPU
    had cost as much as the matching at B = 180).
    """
    results: list[torch.Tensor] = []
    for i in range(len(refs)):
        k = k_for_references(len(refs[i]), k_fraction)
        ref_index = torch.as_tensor(refs[i], dtype=torch.long, device=table.device)
        block = table[ref_index, int(starts[i]) : int(starts[i + 1])]
        smallest = torch.topk(block, k, dim=0, largest=False).values.double()
        finite = torch.isfinite(smallest)
        counts = finite.sum(dim=0)
        sums = torch.where(finite, smallest, 0.0).sum(dim=0)
        results.append(torch.where(counts > 0, sums / counts.clamp(min=1), 0.0).float())
    scores = torch.cat(results).cpu().numpy()
    return [scores[int(starts[i]) : int(starts[i + 1])] for i in range(len(refs))]


def musc_scores(
    token_sets: Sequence[np.ndarray],
    k_fraction: float = 0.3,
    *,
    groups: Sequence[Hashable] | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
) -> list[np.ndarray]:
    """Score every token of every volume against the other volumes of the batch (MuSc).

    Parameters
    ----------
    token_sets : sequence of numpy.ndarray
        One ``(N_i, D)`` real array per volume; ``N_i`` may differ, ``D`` may not.
        ``torch.Tensor`` inputs are accepted and moved to the CPU for validation.
    k_fraction : float, default 0.3
        Fraction of the reference volumes whose distances are averaged, in ``(0, 1]``;
        ``K = max(1, floor(k_fraction * n_references))``.
    groups : sequence of hashable, optional
        One key per volume; a volume is never a reference for a volume with an equal key, and
        ``n_references`` is then the number of volumes in other groups.
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... ``None`` picks CUDA when available.
    chunk_size : int, default 4096
        Tokens per block side; peak block memory is about ``chunk_size**2`` float32 values. On
        CPU the reference side of a block is at most 1,536 tokens whatever ``chunk_size`` is
        (cache-sized blocks were 15 % faster, and no slower with both cores busy elsewhere).

    Returns
    -------
    list of numpy.ndarray
        One ``(N_i,)`` float32 array of token scores per volume, in input order.

    Raises
    ------
    ValueError
        Fewer than 2 volumes, an empty or non-2-D token set, mismatched ``D``, non-finite values,
        ``k_fraction`` outside ``(0, 1]``, a bad ``chunk_size`` or ``groups`` length, or a volume
        with no eligible reference (all other volumes in its group).
    """
    check_k_fraction(k_fraction)
    chunk_size = check_chunk_size(chunk_size)
    batch = _prepare_batch(token_sets, groups)
    with torch.inference_mode():
        distances = _global_distances(batch, _resolve_device(device), chunk_size)
        return _musc_reduce(distances, batch.starts, batch.refs, k_fraction)


def musc_scores_windowed(
    token_sets: Sequence[np.ndarray],
    coords: Sequence[np.ndarray],
    grid_shape: tuple[int, int, int],
    radius: int = 1,
    k_fraction: float = 0.3,
    *,
    groups: Sequence[Hashable] | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
) -> list[np.ndarray]:
    """MuSc with spatially windowed matching: a token only meets tokens near its grid position.

    As :func:`musc_scores`, except that a token's distance to another volume is the distance to
    that volume's nearest token within ``radius`` grid steps (Chebyshev) of the same position.
    Volumes sit on a common, brain-aligned grid, so a ventricle token is compared with ventricle
    tokens, not with any bright cube anywhere. Reference volumes with no token in the window do
    not count; a token with no neighbour in any reference scores 0 (it has nothing to be
    compared with). Cost ``B^2 N (2r+1)^3 D`` instead of ``B^2 N^2 D``.

    Parameters
    ----------
    token_sets : sequence of numpy.ndarray
        ``(N_i, D)`` tokens per volume.
    coords : sequence of numpy.ndarray
        ``(N_i, 3)`` integer grid indices of those tokens.
    grid_shape : tuple of int
        Shape of the token grid.
    radius : int
        Window half-width in grid steps; 0 compares the same position only.
    k_fraction, groups, device, chunk_size
        As in :func:`musc_scores`; ``chunk_size`` bounds the gathered neighbour block to about
        ``chunk_size^2`` values.
    """
    check_k_fraction(k_fraction)
    check_chunk_size(chunk_size)
    radius = _check_radius(radius, "radius")
    distances, batch = nearest_distances_with_batch(
        token_sets, groups=groups, device=device, chunk_size=chunk_size, window_radius=radius,
        coords=coords, grid_shape=grid_shape,
    )
    return musc_from_distances(distances, batch.sizes, k_fraction, groups=groups)


def musc_scores_first(
    token_sets: Sequence[np.ndarray],
    n_scored: int,
    k_fraction: float = 0.3,
    *,
    groups: Sequence[Hashable] | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    window_radius: int | None = None,
    coords: Sequence[np.ndarray] | None = None,
    grid_shape: tuple[int, int, int] | None = None,
) -> list[np.ndarray]:
    """MuSc scores of the first ``n_scored`` volumes only; the others serve as references.

    The scores are those :func:`musc_scores` (``window_radius`` ``None``) or
    :func:`musc_scores_windowed` give the same volumes (the same eligible references and ``K``;
    the nearest distances are recomputed exactly either way, so only which of two
    near-equidistant neighbours is chosen may differ). Each (scored, reference) pair is matched
    once, one-sided: a study scored against 40 cohort-bank volumes whose own scores are known
    (:class:`BankGroup` volumes reference each other only) costs 40 volume pairs instead of the
    820 of the whole batch.

    Parameters
    ----------
    token_sets : sequence of numpy.ndarray
        ``(N_i, D)`` tokens of every volume, the scored ones first.
    n_scored : int
        How many of the leading volumes to score, in ``[1, B]``.
    k_fraction, groups, device, chunk_size
        As in :func:`musc_scores`.
    window_radius, coords, grid_shape
        As in :func:`nearest_distances` (``None``: global matching).

    Returns
    -------
    list of numpy.ndarray
        ``n_scored`` float32 ``(N_i,)`` arrays, in input order.
    """
    check_k_fraction(k_fraction)
    if isinstance(n_scored, bool) or not isinstance(n_scored, (int, np.integer)) or not 1 <= n_scored <= len(token_sets):
        raise ValueError(f"n_scored must be an integer in [1, {len(token_sets)}] (volumes to score); got {n_scored!r}")
    refs = reference_sets(len(token_sets), groups)
    pairs = [(query, reference) for query in range(int(n_scored)) for reference in refs[query]]
    distances, batch = nearest_distances_with_batch(
        token_sets, groups=groups, device=device, chunk_size=chunk_size, window_radius=window_radius,
        coords=coords, grid_shape=grid_shape, pairs=pairs,
    )
    with torch.inference_mode():
        return _musc_reduce(torch.from_numpy(distances), batch.starts, batch.refs[: int(n_scored)], k_fraction)


def _consecutive_runs(indices: list[int]) -> list[list[int]]:
    """Split increasing volume indices into runs of consecutive ones (contiguous token rows)."""
    runs: list[list[int]] = []
    for j in indices:
        if runs and runs[-1][-1] == j - 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs


def _augmented_queries(tokens: torch.Tensor, sq_norms: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Query rows ``[q, |q|^2, 1]``, zero-padded to ``width`` columns (see :func:`_augmented_keys`)."""
    rows = tokens.new_zeros((tokens.shape[0], width or tokens.shape[1] + 2))
    dim = tokens.shape[1]
    rows[:, :dim] = tokens
    rows[:, dim] = sq_norms
    rows[:, dim + 1] = 1.0
    return rows


def _augmented_keys(tokens: torch.Tensor, sq_norms: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Key rows ``[-2 k, 1, |k|^2]``, zero-padded to ``width``: a query row times a key row is ``|q - k|^2``.

    Scaling by -2 is exact in binary floating point, so the augmented product adds the same
    three terms as ``|q|^2 + |k|^2 - 2 q.k`` does, inside one accumulation (zero padding adds
    exact zeros).
    """
    rows = tokens.new_zeros((tokens.shape[0], width or tokens.shape[1] + 2))
    dim = tokens.shape[1]
    torch.mul(tokens, -2.0, out=rows[:, :dim])
    rows[:, dim] = 1.0
    rows[:, dim + 1] = sq_norms
    return rows


def _update_block_row(
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    sq_norms: torch.Tensor,
    starts: np.ndarray,
    i: int,
    run: list[int],
    best: tuple[torch.Tensor, torch.Tensor],
    chunk_size: int,
) -> None:
    """Update nearest neighbours between volume ``i`` and the consecutive volumes ``run``.

    Reference chunks span several (small) volumes at once, so small volumes still give large
    matmuls; the row minima are then split at volume boundaries. ``pairs`` holds the query and
    key rows and, when the rows are not augmented with their norms, the keys' squared norms
    (:func:`_slot_block`); ``best`` the running minimum squared distances ``(B, N_total)`` and
    the rows holding them.
    """
    queries, keys, key_sq = pairs
    best_d2, best_idx = best
    i0, i1 = int(starts[i]), int(starts[i + 1])
    r0, r1 = int(starts[run[0]]), int(starts[run[-1] + 1])
    columns = chunk_size if queries.device.type != "cpu" else min(chunk_size, _CPU_COLUMNS)
    for a in range(i0, i1, chunk_size):
        b = min(a + chunk_size, i1)
        for c in range(r0, r1, columns):
            d = min(c + columns, r1)
            # No clamp at 0: these values only choose the neighbour, whose distance is
            # recomputed exactly later.
            d2 = _slot_block(queries, keys, key_sq, sq_norms, (a, b), (c, d))

            # Tokens c:d (volumes of the run) -> volume i.
            col_val, col_arg = column_argmin(d2)
            _running_min(best_d2[i, c:d], best_idx[i, c:d], col_val, col_arg + a)

            # Tokens a:b of volume i -> each volume j of the run overlapping columns c:d.
            for j in run:
                lo, hi = max(c, int(starts[j])), min(d, int(starts[j + 1]))
                if lo >= hi:
                    continue
                row_val, row_arg = row_argmin(d2[:, lo - c : hi - c])
                _running_min(best_d2[j, a:b], best_idx[j, a:b], row_val, row_arg + lo)


def column_argmin(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum of every column of ``d2`` and the row holding it (what ``d2.min(dim=0)`` returns).

    On CPU an index-returning minimum over dim 0 is several times slower than one over dim 1
    (strided, scalar). Value-only minima over dim 0 stream whole rows (vectorised), so: the
    minimum of each group of ``_COL_GROUP_CPU`` rows (values only), the group holding each
    column's minimum (an index-returning minimum over a block ``_COL_GROUP_CPU`` times smaller),
    then the row within that group (a gather of ``_COL_GROUP_CPU`` rows per column). Ties may
    resolve to another row of equal value, which is as near.

    Parameters
    ----------
    d2 : torch.Tensor
        ``(rows, columns)`` block of squared distances (any device).

    Returns
    -------
    tuple of torch.Tensor
        ``(values, rows)``, each ``(columns,)``.
    """
    if d2.device.type != "cpu":
        return d2.min(dim=0)
    size = _COL_GROUP_CPU
    n_rows, n_cols = d2.shape
    n_full = n_rows // size
    group_min = d2[: n_full * size].view(n_full, size, n_cols).amin(dim=1)
    if n_rows % size:
        group_min = torch.cat([group_min, d2[n_full * size :].amin(dim=0, keepdim=True)])
    group = group_min.min(dim=0).indices
    rows = group.unsqueeze(0) * size + torch.arange(size, device=d2.device).unsqueeze(1)
    rows.clamp_(max=n_rows - 1)  # the last group may be short: repeat its last row
    value, within = d2.gather(0, rows).min(dim=0)
    return value, rows.gather(0, within.unsqueeze(0)).squeeze(0)


def row_argmin(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum of every row of ``d2`` and the column holding it (what ``d2.min(dim=1)`` returns).

    On CPU an index-returning minimum along rows runs scalar; value-only minima over a middle
    dimension stream whole vectors. So the columns are read as ``_ROW_LANES_CPU`` lanes (column
    ``g * lanes + l`` is group ``g`` of lane ``l``): the minimum of every lane over its groups
    (values only, vectorised), the lane holding the row's minimum (a small minimum), then the
    group within that lane (a gather of one column in ``lanes``). Columns past the last whole
    group are compared apart. Ties may resolve to another column of equal value, which is as near.

    Parameters
    ----------
    d2 : torch.Tensor
        ``(rows, columns)`` block of squared distances, or a column slice of one (any device;
        blocks whose columns are not contiguous take ``d2.min(dim=1)``).

    Returns
    -------
    tuple of torch.Tensor
        ``(values, columns)``, each ``(rows,)``.
    """
    lanes = _ROW_LANES_CPU
    n_rows, n_cols = d2.shape
    n_body = n_cols // lanes * lanes
    if d2.device.type != "cpu" or n_body < 2 * lanes or d2.stride(1) != 1:
        return d2.min(dim=1)
    value, lane = d2[:, :n_body].unflatten(1, (n_body // lanes, lanes)).amin(dim=1).min(dim=1)
    columns = lane.unsqueeze(1) + torch.arange(0, n_body, lanes, device=d2.device).unsqueeze(0)
    group = d2.gather(1, columns).argmin(dim=1, keepdim=True)
    index = columns.gather(1, group).squeeze(1)
    if n_body < n_cols:
        tail_value, tail_index = d2[:, n_body:].min(dim=1)
        better = tail_value < value
        value = torch.where(better, tail_value, value)
        index = torch.where(better, tail_index + n_body, index)
    return value, index


def _running_min(
    cur_val: torch.Tensor, cur_idx: torch.Tensor, new_val: torch.Tensor, new_idx: torch.Tensor
) -> None:
    """Keep the smaller of ``cur_val`` and ``new_val`` (in place), and its index."""
    better = new_val < cur_val
    torch.where(better, new_val, cur_val, out=cur_val)
    torch.where(better, new_idx.to(cur_idx.dtype), cur_idx, out=cur_idx)


def check_layer_weights(weights: Sequence[float] | None, n_layers: int | None = None) -> tuple[float, ...] | None:
    """``weights`` as a tuple after checking them (``None``: every layer weighs the same, also for equal weights).

    Parameters
    ----------
    weights : sequence of float, optional
        One non-negative, finite weight per encoder layer, at least one of them positive.
    n_layers : int, optional
        The number of layers the weights must match (unchecked when ``None``).

    Raises
    ------
    ValueError
        For a weight that is not a finite number >= 0, weights that are all 0, or a count that is
        not ``n_layers``; the message names ``scoring.layer_weights``.
    """
    if weights is None:
        return None
    message = (f"scoring.layer_weights must be a list of numbers >= 0, one per encoder layer, at least one of them > 0 "
               f"(or null: every layer weighs the same); got {weights!r}")
    if (isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, (Sequence, np.ndarray))
            or (isinstance(weights, np.ndarray) and weights.ndim != 1)):
        raise ValueError(message)
    values = list(weights)
    try:
        valid = bool(values) and all(not isinstance(w, bool) and isinstance(w, (int, float, np.integer, np.floating))
                                     and math.isfinite(w) and w >= 0 for w in values) and sum(values) > 0
    except OverflowError:  # an integer too large for a float
        valid = False
    if not valid:
        raise ValueError(message)
    if n_layers is not None and len(values) != n_layers:
        raise ValueError(f"scoring.layer_weights has {len(values)} weights but the encoder gives {n_layers} layers; "
                         "give one weight per layer, in the encoder's layer order (or null)")
    if len(set(float(w) for w in values)) == 1:
        # Equal weights are the plain mean: fused, reported and matched to an operating point as null.
        return None
    return tuple(float(w) for w in values)


def fuse_layers(
    per_layer_scores: Sequence[Sequence[np.ndarray]], weights: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Average token scores over encoder layers, volume by volume.

    Parameters
    ----------
    per_layer_scores : sequence of sequence of numpy.ndarray
        ``per_layer_scores[layer][volume]`` is an ``(N_volume,)`` array; every layer must hold the
        same volumes with the same token counts.
    weights : sequence of float, optional
        One weight per layer (:func:`check_layer_weights`); the fused score is the weighted mean.
        ``None``: the plain mean.

    Returns
    -------
    list of numpy.ndarray
        One float32 ``(N_volume,)`` array per volume (weighted mean over layers, accumulated in
        float64).
    """
    if len(per_layer_scores) == 0:
        raise ValueError("fuse_layers needs at least one layer")
    checked = check_layer_weights(weights, len(per_layer_scores))
    share = None if checked is None else np.asarray(checked) / sum(checked)
    n_volumes = len(per_layer_scores[0])
    for layer, scores in enumerate(per_layer_scores):
        if len(scores) != n_volumes:
            raise ValueError(
                f"layer {layer} has {len(scores)} volumes; layer 0 has {n_volumes}"
            )
    fused: list[np.ndarray] = []
    for v in range(n_volumes):
        ref_shape = np.shape(per_layer_scores[0][v])
        if len(ref_shape) != 1:
            raise ValueError(f"layer 0 volume {v}: scores must be 1-D; got shape {ref_shape}")
        total = np.zeros(ref_shape, dtype=np.float64)
        for layer, scores in enumerate(per_layer_scores):
            s = np.asarray(scores[v], dtype=np.float64)
            if s.shape != ref_shape:
                raise ValueError(
                    f"layer {layer} volume {v} has shape {s.shape}; layer 0 has {ref_shape}"
                )
            total += s if share is None else share[layer] * s
        fused.append((total / len(per_layer_scores) if share is None else total).astype(np.float32))
    return fused


def volume_scores(token_scores: Sequence[np.ndarray]) -> np.ndarray:
    """Return each volume's score: the maximum of its token scores (the MuSc image score).

    Parameters
    ----------
    token_scores : sequence of numpy.ndarray
        One non-empty ``(N_i,)`` array per volume.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` float32.
    """
    out = np.empty(len(token_scores), dtype=np.float32)
    for v, s in enumerate(token_scores):
        s = np.asarray(s)
        if s.size == 0:
            raise ValueError(f"volume {v} has no token scores")
        out[v] = np.max(s)
    return out


def check_layer_token_sets(layer_token_sets: Sequence[Sequence[np.ndarray]]) -> int:
    """Check that every layer holds the same volumes with the same token counts; return ``B``."""
    if isinstance(layer_token_sets, (np.ndarray, torch.Tensor)) or not isinstance(
        layer_token_sets, Sequence
    ):
        raise ValueError(  # noqa: TRY004 - every input error of scoring is a ValueError
            "layer_token_sets must be a sequence (one entry per layer) of sequences of 2-D "
            f"arrays (one per volume); got {type(layer_token_sets).__name__}"
        )
    if len(layer_token_sets) == 0:
        raise ValueError("score_batch needs at least one layer")
    n_volumes = len(layer_token_sets[0])
    for layer, sets in enumerate(layer_token_sets):
        if len(sets) != n_volumes:
            raise ValueError(f"layer {layer} has {len(sets)} volumes; layer 0 has {n_volumes}")
        for v in range(n_volumes):
            n0, n = np.shape(layer_token_sets[0][v])[:1], np.shape(sets[v])[:1]
            if n != n0:
                raise ValueError(
                    f"layer {layer} volume {v} has {n[0] if n else 0} tokens; layer 0 has "
                    f"{n0[0] if n0 else 0}"
                )
    return n_volumes
