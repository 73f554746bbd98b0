"""Binary decision policy and score-to-unit mapping for one contrast batch.

Why a per-batch robust outlier rule
-----------------------------------
MuSc scores have no absolute scale: they are nearest-neighbour distances in an encoder's feature
space, and they move with the encoder, the layer set, the contrast, the batch size ``B`` (through
``K``) and the batch's heterogeneity. A fixed threshold calibrated on one cohort would therefore
flag everything or nothing on another. What *is* stable is the batch-relative picture MuSc itself
relies on: most volumes of a batch are normal, and an anomalous volume is one whose score stands
out from the others. The policy is thus a robust outlier bound computed on the batch itself.

Two levels:

1. **Volume level.** A volume is flagged when its volume score exceeds
   ``median + z_volume * 1.4826 * MAD`` of the batch's volume scores (``1.4826 * MAD`` estimates
   the standard deviation of a normal distribution and, unlike it, is not inflated by the anomalous
   volumes themselves). Because the bound sits strictly above the median, at most half of the
   volumes of any batch can be flagged, and **fewer than half** once ``z_volume >= 1.35``
   (``1.4826 * z >= 2`` puts the bound above the smallest upper-half value of an even batch): the
   rule can never flag most volumes of an all-normal batch, whatever the score distribution.
   Under the all-normal null the flag rate is small: volume
   scores are maxima over tokens (right-skewed, Gumbel-like); for a Gumbel distribution the default
   ``z_volume = 3`` bound is exceeded with probability about 2 %, and
   :func:`simulate_all_normal_flag_rate` measures it on synthetic batches. When the MAD is 0 (ties),
   it is floored at ``mad_floor_fraction * |median|`` so that tiny numerical differences do not
   flag. Batches smaller than ``min_volumes`` flag nothing: with 2 volumes "outlier" is undefined.
2. **Voxel level.** Within flagged volumes, tokens (or upsampled voxels) whose score exceeds the
   voxel threshold form the binary mask; unflagged volumes get an empty mask. The voxel threshold is
   ``median + z_token * 1.4826 * MAD`` of the pooled token scores of the *unflagged* volumes (the
   batch's own estimate of the normal token distribution, free of the lesions that made the
   flagged volumes stand out), capped at the volume threshold. The cap guarantees that every
   flagged volume has a non-empty mask (its maximum exceeds the volume threshold), and that a voxel
   above the volume threshold is never left out of the mask of its flagged volume.

Limitations: the policy is relative, so a batch in which *most* volumes carry similar anomalies
flags few of them (MuSc itself cannot score such a batch well either); and the flag rate under the
null depends on ``z_volume`` and on how heavy the upper tail of volume scores is for the encoder in
use: measure it on a normal cohort before clinical use.

Bank-referenced thresholds (:func:`decide_thresholds_from_reference`): when the batch's
references come from a cohort bank of prior studies (``threshold.policy: bank``), both bounds are
computed on the bank volumes' scores in the same batch (scored alongside, so on the same scale)
and applied to the input's volumes. A batch of one study then has a threshold at all, and the
bound no longer depends on how many of the input's own studies are anomalous.

FRACTIONAL maps use one linear mapping per contrast batch (:func:`score_to_unit_mapping`):
``low`` is the median pooled token score (a typical normal token maps to 0) and ``high`` is the
largest volume score of the batch (the batch's most anomalous token maps to 1). Every map of the
batch shares the mapping, so equal unit values mean equal raw scores across its series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ThresholdDecision",
    "binary_token_masks",
    "decide_thresholds",
    "decide_thresholds_from_reference",
    "robust_upper_bound",
    "score_to_unit_mapping",
    "simulate_all_normal_flag_rate",
    "to_unit",
]

POLICY_NAME = "robust-mad-two-level/1"
BANK_POLICY_NAME = "bank-robust-mad-two-level/1"
MAD_TO_SIGMA = 1.4826


@dataclass
class ThresholdDecision:
    """Outcome of the binary policy for one contrast batch.

    Attributes
    ----------
    volume_threshold : float
        A volume is flagged when its volume score is strictly greater than this value.
    voxel_threshold : float
        Within a flagged volume, a token or voxel is in the mask when its score is strictly greater
        than this value. Always ``<= volume_threshold``.
    flagged : numpy.ndarray
        ``(B,)`` bool, in the order of the batch.
    policy : str
        Policy name and version, for the report.
    params : dict
        Parameters and intermediate statistics (medians, MADs) for the report.
    mask_values : list of numpy.ndarray, optional
        Per-token values the voxel threshold applies to, one array per volume (the lesion policy's
        clamped standardised scores, :mod:`codegraph3d.decision.lesion_policy`); ``None``: the token scores.
    z_values : list of numpy.ndarray, optional
        The lesion policy's position-standardised token scores per volume (unclamped).
    findings : list, optional
        The lesion policy's token-level findings per volume (:class:`codegraph3d.decision.lesion_policy.Finding`).
    units : str
        ``"score"`` (thresholds on the fused score scale) or ``"z"`` (robust standard deviations
        above the position's reference median).
    rim_threshold : float, optional
        The lesion policy's evidence bound for findings that peak at the brain's rim, where it is
        above ``volume_threshold`` (``threshold.rim_finding_mass``); ``None``: one bound everywhere.
    """

    volume_threshold: float
    voxel_threshold: float
    flagged: np.ndarray
    policy: str = POLICY_NAME
    params: dict[str, Any] = field(default_factory=dict)
    mask_values: list[np.ndarray] | None = None
    z_values: list[np.ndarray] | None = None
    findings: list[list[Any]] | None = None
    units: str = "score"
    rim_threshold: float | None = None


def robust_upper_bound(
    values: np.ndarray, z: float, *, mad_floor_fraction: float = 0.01
) -> tuple[float, float, float]:
    """Return ``(bound, median, mad)`` with ``bound = median + z * 1.4826 * max(MAD, floor)``.

    Parameters
    ----------
    values : numpy.ndarray
        Finite values, any shape (flattened), at least one.
    z : float
        Number of robust standard deviations above the median; ``>= 0``.
    mad_floor_fraction : float, default 0.01
        The MAD is at least ``mad_floor_fraction * |median|`` (and at least the float32 resolution
        at the median), so that a batch of (nearly) tied values does not flag its rounding noise.

    Returns
    -------
    tuple of float
        The bound, the median and the (unfloored) MAD.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("robust_upper_bound needs at least one value")
    if not np.isfinite(v).all():
        raise ValueError("robust_upper_bound got non-finite values")
    if not z >= 0:
        raise ValueError(f"z must be >= 0; got {z}")
    if not mad_floor_fraction >= 0:
        raise ValueError(f"mad_floor_fraction must be >= 0; got {mad_floor_fraction}")
    median = float(np.median(v))
    mad = float(np.median(np.abs(v - median)))
    floor = max(mad_floor_fraction * abs(median), float(np.spacing(np.float32(abs(median)))))
    return median + z * MAD_TO_SIGMA * max(mad, floor), median, mad


def _validated_token_scores(token_scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    flat = isinstance(token_scores, np.ndarray) and token_scores.ndim < 2
    if flat and token_scores.dtype != object:
        # A flat array would be read as one-token volumes.
        raise ValueError("token_scores must be a sequence of arrays, one per volume")
    out = []
    for v, s in enumerate(token_scores):
        a = np.asarray(s, dtype=np.float64).ravel()
        if a.size == 0:
            raise ValueError(f"volume {v} has no token scores")
        if not np.isfinite(a).all():
            raise ValueError(f"volume {v} has non-finite token scores")
        out.append(a)
    if not out:
        raise ValueError("token_scores is empty (no volumes)")
    return out


def decide_thresholds(
    token_scores: Sequence[np.ndarray],
    volume_scores: np.ndarray | None = None,
    *,
    z_volume: float = 3.0,
    z_token: float = 3.0,
    mad_floor_fraction: float = 0.01,
    min_volumes: int = 3,
) -> ThresholdDecision:
    """Apply the two-level robust policy (see the module docstring) to one contrast batch.

    Parameters
    ----------
    token_scores : sequence of numpy.ndarray
        Fused token scores, one ``(N_i,)`` array per volume (background tokens excluded).
    volume_scores : numpy.ndarray, optional
        ``(B,)`` volume scores; default: each volume's maximum token score. With another volume
        score rule a flagged volume's mask may be empty (the cap argument needs the maximum).
    z_volume : float, default 3.0
        Robust standard deviations above the median volume score for a volume to be flagged.
    z_token : float, default 3.0
        Robust standard deviations above the median normal-token score for a token to be masked.
    mad_floor_fraction : float, default 0.01
        See :func:`robust_upper_bound`.
    min_volumes : int, default 3
        Batches with fewer volumes flag nothing (thresholds are still reported).

    Returns
    -------
    ThresholdDecision
    """
    scores = _validated_token_scores(token_scores)
    n = len(scores)
    if volume_scores is None:
        vol = np.array([s.max() for s in scores])
    else:
        vol = np.asarray(volume_scores, dtype=np.float64).ravel()
        if vol.shape != (n,):
            raise ValueError(f"volume_scores has shape {vol.shape}; expected ({n},)")
        if not np.isfinite(vol).all():
            raise ValueError("volume_scores has non-finite values")
    if min_volumes < 1:
        raise ValueError(f"min_volumes must be >= 1; got {min_volumes}")

    volume_threshold, vol_median, vol_mad = robust_upper_bound(
        vol, z_volume, mad_floor_fraction=mad_floor_fraction
    )
    if n < min_volumes:
        flagged = np.zeros(n, dtype=bool)
    else:
        flagged = vol > volume_threshold

    # Normal-token reference: the unflagged volumes (never empty: fewer than half are flagged).
    normal_tokens = np.concatenate([s for s, f in zip(scores, flagged) if not f])
    token_bound, tok_median, tok_mad = robust_upper_bound(
        normal_tokens, z_token, mad_floor_fraction=mad_floor_fraction
    )
    voxel_threshold = min(token_bound, volume_threshold)
    return ThresholdDecision(
        volume_threshold=float(volume_threshold),
        voxel_threshold=float(voxel_threshold),
        flagged=flagged,
        policy=POLICY_NAME,
        params={
            "z_volume": float(z_volume),
            "z_token": float(z_token),
            "mad_floor_fraction": float(mad_floor_fraction),
            "min_volumes": int(min_volumes),
            "n_volumes": n,
            "volume_median": vol_median,
            "volume_mad": vol_mad,
            "token_median": tok_median,
            "token_mad": tok_mad,
            "token_bound": float(token_bound),
        },
    )


def decide_thresholds_from_reference(
    token_scores: Sequence[np.ndarray],
    volume_scores: np.ndarray,
    reference_token_scores: Sequence[np.ndarray],
    reference_volume_scores: np.ndarray,
    *,
    z_volume: float = 3.0,
    z_token: float = 3.0,
    mad_floor_fraction: float = 0.01,
    min_volumes: int = 3,
) -> ThresholdDecision:
    """Thresholds from reference volumes (a cohort bank's), applied to the query volumes.

    The two-level policy of :func:`decide_thresholds` runs on the reference scores; the query
    volumes are flagged when their volume score exceeds its volume threshold, and the voxel
    threshold (from the references' unflagged volumes) applies to them unchanged.

    Parameters
    ----------
    token_scores, volume_scores
        The query volumes' fused token scores and volume scores.
    reference_token_scores, reference_volume_scores
        The reference volumes' scores, from the same scoring run (the same scale).
    z_volume, z_token, mad_floor_fraction
        As in :func:`decide_thresholds`.
    min_volumes : int, default 3
        Fewer reference volumes than this flag nothing.
    """
    queries = _validated_token_scores(token_scores)
    vol = np.asarray(volume_scores, dtype=np.float64).ravel()
    if vol.shape != (len(queries),) or not np.isfinite(vol).all():
        raise ValueError(f"volume_scores must be ({len(queries)},) finite values; got shape {vol.shape}")
    reference = decide_thresholds(
        reference_token_scores, reference_volume_scores, z_volume=z_volume, z_token=z_token,
        mad_floor_fraction=mad_floor_fraction, min_volumes=1,
    )
    n_reference = len(reference.flagged)
    enough = n_reference >= min_volumes
    flagged = vol > reference.volume_threshold if enough else np.zeros(len(queries), dtype=bool)
    return ThresholdDecision(
        volume_threshold=reference.volume_threshold,
        voxel_threshold=reference.voxel_threshold,
        flagged=flagged,
        policy=BANK_POLICY_NAME,
        params={**reference.params, "min_volumes": int(min_volumes), "n_reference_volumes": n_reference,
                "n_reference_flagged": int(reference.flagged.sum())},
    )


def binary_token_masks(
    token_scores: Sequence[np.ndarray], decision: ThresholdDecision
) -> list[np.ndarray]:
    """Return one boolean mask per volume: ``score > voxel_threshold`` if flagged, else all False.

    The same rule applies to upsampled voxel maps: pass them instead of token scores.
    """
    if len(token_scores) != len(decision.flagged):
        raise ValueError(
            f"{len(token_scores)} score arrays for a decision on {len(decision.flagged)} volumes"
        )
    masks = []
    for s, f in zip(token_scores, decision.flagged):
        s = np.asarray(s)
        masks.append(s > decision.voxel_threshold if f else np.zeros(s.shape, dtype=bool))
    return masks


def score_to_unit_mapping(token_scores: Sequence[np.ndarray]) -> tuple[float, float]:
    """Return ``(low, high)`` mapping one contrast batch's scores to ``[0, 1]``.

    ``low`` is the median of the pooled token scores, ``high`` the largest token score of the batch
    (its largest volume score). When all scores are equal, ``high`` is nudged above ``low`` so the
    mapping stays defined.
    """
    scores = _validated_token_scores(token_scores)
    pooled = np.concatenate(scores)
    low = float(np.median(pooled))
    high = float(pooled.max())
    if not high > low:
        high = low + max(abs(low) * 1e-6, 1e-12)
    return low, high


def to_unit(x: np.ndarray | float, low: float, high: float) -> np.ndarray:
    """Map scores linearly so that ``low -> 0`` and ``high -> 1``; clip to ``[0, 1]``; float32."""
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise ValueError(f"to_unit needs finite low < high; got low={low}, high={high}")
    x = np.asarray(x, dtype=np.float64)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


def simulate_all_normal_flag_rate(
    *,
    n_batches: int = 5,
    n_volumes: int = 20,
    n_tokens: int = 200,
    dim: int = 16,
    k_fraction: float = 0.3,
    seed: int = 0,
    **policy_kwargs: Any,
) -> float:
    """Measure the fraction of volumes the policy flags in all-normal synthetic batches.

    Every volume's tokens are drawn from the same distribution (a shared random mixture of
    Gaussian "tissue" clusters, so token scores vary within a volume as in real data, but no
    volume differs from the others in distribution). Each batch is MuSc-scored on the CPU and
    passed to :func:`decide_thresholds`.

    Parameters
    ----------
    n_batches, n_volumes, n_tokens, dim : int
        Simulation size.
    k_fraction : float
        As in :func:`codegraph3d.scoring.musc.musc_scores`.
    seed : int
        Seed of the generator.
    **policy_kwargs
        Passed to :func:`decide_thresholds`.

    Returns
    -------
    float
        Flagged volumes / all volumes.
    """
    from codegraph3d.scoring.musc import musc_scores  # local: keeps this module import-light

    rng = np.random.default_rng(seed)
    n_clusters = 8
    centres = rng.normal(size=(n_clusters, dim))
    spreads = rng.uniform(0.2, 0.6, size=n_clusters)
    weights = rng.dirichlet(np.ones(n_clusters))
    flagged = 0
    for _ in range(n_batches):
        token_sets = []
        for _ in range(n_volumes):
            labels = rng.choice(n_clusters, size=n_tokens, p=weights)
            tokens = centres[labels] + spreads[labels, None] * rng.normal(size=(n_tokens, dim))
            token_sets.append(tokens.astype(np.float32))
        scores = musc_scores(token_sets, k_fraction, device="cpu")
        flagged += int(decide_thresholds(scores, **policy_kwargs).flagged.sum())
    return flagged / (n_batches * n_volumes)
