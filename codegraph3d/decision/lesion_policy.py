"""The decision policy: findings from position-standardised token scores (``threshold.policy: lesion``).

What reaches a PACS is a flag and a BINARY mask, so this module turns one contrast batch's fused
token scores into both.

The rule
--------
1. **Standardise per grid position.** Every volume of a batch is registered to the same template,
   so grid position ``p`` holds the same anatomy in every volume. A token's score is compared with
   the scores of the *reference volumes* at the same position:
   ``z = (s - m_p) / sigma_p``, with ``m_p`` the median and ``sigma_p`` a robust standard deviation
   (1.4826 x MAD) of the reference scores at ``p``, shrunk towards the batch-wide robust spread of
   the residuals with the weight of ``prior_volumes`` volumes (few references at a position give a
   noisy spread: on Gaussian scores and a weight of 4, a token exceeds ``z`` 4.5 with probability
   1.6e-4 in a batch of 12 and 1.1e-5 in one of 48; the learnt encoder's configuration weighs the
   batch-wide spread as 64 volumes, docs/RESULTS.md, "Position spreads from few volumes"; with
   cohort-bank references the weight is ``bank_prior_volumes``, where set). Anatomical hot spots
   that every brain shares (ventricle edges, the brain's rim)
   then stop competing with lesions, and ``z`` has the same meaning in batches of 8 or 180.
   The MAD sees only the core of a position's spread; where normal anatomy varies more than
   registration removes (a ventricle's edge a few mm further out in some brains), the tail is
   heavier than a Gaussian's, and normal brains were flagged there. The spread is therefore at
   least the ``tail_quantile`` (0.9) of the absolute residuals divided by the Gaussian quantile it
   matches, with the largest residual at each position left out so that a single abnormal volume
   cannot widen its own bound (in bank mode too: a bank grown from unflagged studies may hold a
   missed lesion). It is a lower bound, never the estimate: with few volumes at a position (under
   about 12) it falls below the MAD's and changes nothing, and several lesions sharing one
   position in a batch (over a tenth of its volumes) widen it.
   The reference volumes are the batch itself (its median is not moved by a minority of lesions
   at any one position), or, when cohort-bank volumes (prior studies added to the bank as normal
   looking: ``bank.add_scored: unflagged``, or curated) were scored in the same batch, those
   volumes only: bounds from volumes assumed normal do not depend on how many of the input's
   volumes are abnormal. Fewer than ``min_reference_volumes`` (3) references flag nothing.
   With a cohort bank, the evidence bound is calibrated on the bank's own volumes
   (``bank_false_flag_rate``; :func:`bank_calibration`): each is standardised against the others
   as the query is against all of them, and the bound is the k-th largest of their evidence, k
   chosen so that a normal query is flagged with probability at most ``bank_false_flag_rate``
   (for this bank with ``bank_confidence``) whatever the encoder. The app scores bank volumes
   against the other bank volumes only (``codegraph3d.scoring.musc.BankGroup``): with the query
   among their references, one query had moved the bound of its own run 2.5-fold (T2w, a bank of
   48), so a query could loosen or tighten its own test; now the statistics and the bound are the
   same for every query against one bank. The series decided against the bank in one run share
   the rate (each is held to ``bank_false_flag_rate / m`` for ``m`` of them, every contrast's,
   down to the bank's largest evidence), so a normal study of a T1w and a T2w series is flagged
   with probability at most the rate (held per series, it had been flagged up to twice as often:
   8 of 72 normal studies, docs/RESULTS.md, "A study's series share the bank's rate"), and an
   all-normal batch of 12 expects as few false flags as a single study would, or as few as the
   bank can promise.
   With ``subtract_volume_level`` and the batch as reference, each volume's ``z`` is then
   measured from the volume's own level: its median ``z`` over its tokens, subtracted where
   positive. A series acquired unlike most of its batch (thick slices in a direction few others
   share) is unusual at every position (the three coronal T2w series of a batch of 24: median
   ``z`` 2.6-3.3, the others' -0.6 to 1.3), and many small excesses summed over a broad group
   rival a lesion's evidence, while a lesion is a local excess over its own volume (its tokens, a
   small share of some 1600, barely move the median). A ``z`` is never raised, so bounds
   calibrated without the subtraction stay conservative. Not with cohort-bank references: the
   bank's calibrated bound already carries its normal volumes' whole-series offsets, and with
   them subtracted it fell (1.41 -> 0.75, T2w, a bank of 48) so that one more normal study
   crossed it (docs/RESULTS.md, "Each volume measured from its own level").
   With ``fit_volume_levels`` and the batch as reference, the levels are fitted before any
   spread is measured: each volume's level and each position's median in one robust two-way fit
   (:func:`fitted_levels`, median polish), the spreads from what is left, and ``z`` from the
   volume's own level in both directions. Otherwise the levels' differences are part of every
   position's spread and of the batch-wide one (T2w, a 50 %-lesioned batch of 16: batch-wide
   spread 0.086 with them, 0.044 without, single volumes' own spreads 0.03-0.06), so every ``z``
   is compressed 1.3-2-fold, and a lesion in a volume whose level is low loses more. Bounds
   calibrated without the fit do not carry over to it (docs/RESULTS.md, "Volume levels fitted
   with the position medians").
2. **Findings, not single tokens.** Tokens with ``z > token_z`` are grouped into connected
   components on the token grid (26-connectivity). A component's *evidence* is its mass above
   the bound, ``sum(z - token_z)`` over its tokens times a token's volume (z x ml, so that it
   means the same on any token grid): a large mildly abnormal region and a small very abnormal
   one both count, a lone noisy token does not. A component is a *finding* when its evidence
   exceeds ``finding_mass`` (each of the bounds may be set per contrast, ``*_by_contrast``,
   for bounds calibrated per encoder and contrast); a volume is flagged when it has a finding.
   Optionally (``finding_excess`` > 0) a group must also be *focal*: the mean of ``z - token_z``
   over its tokens must exceed ``finding_excess``. With a learnt encoder, some normal T1w brains
   carry broad groups of mildly raised tokens (a region that registration left slightly out of
   place, 10-40 tokens averaging 0.5-1.7 above ``token_z``) whose summed evidence rivals a small
   lesion's; lesions average 2.4 and more (docs/RESULTS.md, "Focal findings"). Many such groups
   belong to series whose thick slices run in a direction few others of the batch share;
   smoothing every series to one resolution (``preprocess.resolution_fwhm_mm``) removes that
   cause upstream (docs/RESULTS.md, "Broad findings follow the slice direction").
   Optionally (``rim_finding_mass`` above ``finding_mass``) a group whose peak lies at the
   brain's rim (:func:`rim_positions`: the outermost layer of the positions that 90 % of the
   reference volumes cover, and the positions fewer cover) is held to that higher bound. With the
   learnt encoder every normal series flagged on the tuning and held-out batches scored alone
   peaked there (T1w 5 of 5, T2w 13 of 13, against 24 of 99 and 18 of 84 lesion series), where
   the brain's edge, skull stripping and registration vary most between brains: a normal
   token exceeds ``z`` 6 in the rim's layer 6-25 times (T1w) and 5 times or more (T2w) as often
   as two or more positions deeper (docs/RESULTS.md, "Findings at the brain's rim"). One bound for both
   regions is set by the rim's false findings: raised to stop them, it misses lesions inside;
   kept low, it flags normal brains at the rim. Not with cohort-bank references: the bank's
   bound is calibrated on its own volumes' findings wherever they lie (an uncalibrated bank holds
   every group to the larger bound).
   Optionally (``shortfall_margin`` > 0) tokens near where a volume's brain stops short of the
   references' common brain are not candidates (:func:`shortfall_tokens`): at a position that
   90 % of the references cover and this volume does not, the references hold tissue that lies
   deeper inside their brains than anything this volume has there, so this volume's tokens next
   to it are compared with anatomy they do not share. An affine registration cannot match a
   brain's shape: a brain-only series whose vertex stops short of its batch's was flagged there
   in both contrasts (evidence 6.6 times the rim bound in its batch of 12). The references are
   the positions' statistics' volumes: in a batch scored alone the volume is one of them, so in
   batches of under 10 volumes no position qualifies (the rule is off) and in batches of 10-19
   every other volume must cover it. A notch that the brain mask cuts at a surface lesion marks
   the tissue beside it too (the one lesion series the margin lost, below). With a margin of one grid step
   the learnt encoder's tuning batches keep every flag, while the other batches lost 12 normal
   series' flags (9 distinct series) and one cortical lesion series' (docs/RESULTS.md, "Where a
   brain stops short of the others'"). With cohort-bank references the positions are the bank's, in its
   calibration too (each left-out volume against the others).
   Lesion-level evidence replaces the single maximum token of the first policy, whose volume gate (median + 3 robust
   SD of the batch's maxima) moved with the prevalence of lesions in the batch.
   A batch of few volumes scored as its own reference is held to a bound of its own
   (``small_batch_finding_mass`` for batches of at most ``small_batch_volumes``; :meth:`LesionPolicy.for_batch`).
   Its tokens are matched against few other brains, so a normal brain's region that is unlike the
   others' finds no close match: the normals flagged in batches of 12 (learnt encoder, T2w) each
   stood 6-10 robust SDs above a position whose other eleven volumes lay within 1.5 of the median,
   and one of them (8.4 z x ml alone) stayed under 0.7 in a batch of 48. The ``z`` cannot tell
   this apart from a small lesion; only the bound can, calibrated so that every all-normal batch
   of the small size flags at most one series (``tools/calibrate_lesion_bounds.py --per-batch``).
   With cohort-bank references it is not used: the bound is the bank's calibrated one, or
   ``finding_mass`` (``rim_finding_mass`` where larger) where the bank is not calibrated. Off by
   default and in every shipped configuration: for the learnt encoder such a bound (T2w 5.1
   against 1.9) kept held-out all-normal batches of 12 at one flag each, but missed lesions
   whose evidence lay among those normals' (docs/RESULTS.md, "A bound of their own for small
   batches"); small batches are better decided against a cohort bank.
3. **Masks.** In a flagged volume, the voxels of the upsampled ``z`` map above each finding's own
   bound form the mask: ``voxel_z``, or a quarter of the way from ``token_z`` to the finding's
   peak when that is lower (a faint finding gets a mask too); with ``mask_peak_fraction`` ``r``
   > 0 the bound is raised to ``r`` x the peak where that is higher (never above the quarter-way
   point), so a bright finding is cut at a fixed fraction of its own peak rather than at a bound
   that fits fainter ones (T2w masks of bright lesions were 2-4 times their volume). Masks stay
   restricted to the findings: tokens outside every finding are clamped to the bound before
   upsampling, so they can shape a finding's edge but never start a mask of their own; a
   finding's neighbours are scaled as its tokens are, so its edge lies where ``z`` crosses its
   own bound. An unflagged volume gets an empty mask.

The bounds are in robust standard deviations, so they carry over between batch sizes; their false
flag rate per normal series still depends on the encoder and contrast and is measured on
all-normal batches (``tools/measure_decisions.py``; the product reports it as the operating point).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "LESION_POLICY_NAME",
    "BankCalibration",
    "Finding",
    "LesionPolicy",
    "LesionDecision",
    "PositionStatistics",
    "bank_calibration",
    "calibration_rank",
    "decide_lesions",
    "position_statistics",
    "standardise",
    "relative_z",
    "rim_positions",
    "shortfall_tokens",
    "volume_level",
    "fitted_levels",
    "tail_spread",
    "token_findings",
]

LESION_POLICY_NAME = "position-z-findings/2"
MAD_TO_SIGMA = 1.4826
# The rim (rim_positions): the outermost layer of positions that 90 % of the references cover, and
# the positions fewer cover. Every normal series flagged on the learnt encoder's tuning and
# held-out batches peaked there (docs/RESULTS.md, "Findings at the brain's rim").
RIM_COVERAGE = 0.9
RIM_DEPTH = 1


@dataclass(frozen=True)
class LesionPolicy:
    """Settings of the lesion policy (``threshold`` section; the module docstring says why).

    Attributes
    ----------
    token_z : float
        A token is a candidate when its position-standardised score exceeds this.
    finding_mass : float
        A connected group of candidates is a finding when ``sum(z - token_z)`` over it, times a
        token's volume in ml, exceeds this (units: z x ml).
    voxel_z : float
        Mask bound on the upsampled ``z`` map inside flagged volumes' findings.
    prior_volumes : float
        Weight, in volumes, of the batch-wide spread in each position's spread.
    bank_prior_volumes : float or None
        The same weight with cohort-bank references (``None``: ``prior_volumes``). A bank's normal
        volumes (at least 20 for its calibration; 40-48 in the measurements) give each position a
        steadier spread than a small batch's, and its bound is calibrated on them, so a weight
        chosen for small batches need not serve it.
    min_reference_volumes : int
        Fewer reference volumes flag nothing: with two, a volume is half of its own reference and
        its ``z`` can never exceed about 1.2.
    tail_quantile : float
        Each position's spread is at least this quantile of its absolute residuals (the largest
        left out) over the matching Gaussian quantile; 0 turns the tail bound off (MAD only).
        Unused with ``by_position=False``.
    bank_false_flag_rate : float
        With cohort-bank references: the evidence bound is calibrated on the bank's own normal
        volumes (:func:`bank_calibration`) so that a normal study is flagged with probability at
        most about this (its series, and a run's other studies' series, share it); 0 keeps ``finding_mass`` (``rim_finding_mass`` where larger) with a bank too.
    bank_confidence : float
        In (0, 1): the calibration holds ``bank_false_flag_rate`` for this bank with this
        confidence (over the draw of the bank's volumes), not only on average over banks; 0: on
        average (the plain conformal rank).
    finding_excess : float
        A group is a finding only when the mean of ``z - token_z`` over its tokens exceeds this
        (robust SDs); 0: any group (every candidate exceeds ``token_z``).
    mask_peak_fraction : float
        In [0, 1): a passed finding's mask bound is at least this fraction of its peak ``z``
        (never above the quarter-way point); 0: ``voxel_z`` or the quarter-way point.
    subtract_volume_level : bool
        With the batch as reference, measure each volume's ``z`` from its own level
        (:func:`relative_z`; module docstring, rule 1); ignored with cohort-bank references.
    fit_volume_levels : bool
        With the batch as reference, fit each volume's level together with the position medians
        (:func:`fitted_levels`) and measure every spread and ``z`` from it (module docstring,
        rule 1); ignored with cohort-bank references.
    small_batch_volumes : int
        With the batch as reference, batches of at most this many volumes are held to
        ``small_batch_finding_mass`` instead of ``finding_mass`` (:meth:`for_batch`; module
        docstring, rule 2); 0: every batch to ``finding_mass``.
    small_batch_finding_mass : float
        The evidence bound of small batches (z x ml), at least ``finding_mass`` (checked when
        ``small_batch_volumes`` > 0); 0: ``finding_mass``.
    rim_finding_mass : float
        The evidence bound of groups that peak at the brain's rim (:func:`rim_positions`), where
        normal brains' findings come from (module docstring, rule 2), in z x ml; the larger of it
        and ``finding_mass`` applies there, so 0 (or any value up to ``finding_mass``) holds every
        group to ``finding_mass``. Not with cohort-bank references: there the larger of the two
        holds everywhere until the bank's calibrated bound replaces it.
    shortfall_margin : int
        Tokens within this many grid steps (chessboard distance) of a position that
        ``RIM_COVERAGE`` of the references cover and the volume does not are not candidates
        (:func:`shortfall_tokens`; module docstring, rule 2; the volume counts among a batch's
        own references, so batches of under 10 volumes are unaffected); 0: off.
    by_position : bool
        Standardise per grid position (volumes registered to one template). ``False``: by the
        batch-wide median and spread only, for grids that are not anatomically aligned
        (``preprocess.registration: none``), where a grid position holds different anatomy in
        every volume.
    """

    token_z: float = 4.5
    finding_mass: float = 30.0
    voxel_z: float = 10.0
    prior_volumes: float = 4.0
    bank_prior_volumes: float | None = None
    by_position: bool = True
    min_reference_volumes: int = 3
    tail_quantile: float = 0.9
    bank_false_flag_rate: float = 0.0
    bank_confidence: float = 0.0
    finding_excess: float = 0.0
    mask_peak_fraction: float = 0.0
    subtract_volume_level: bool = False
    fit_volume_levels: bool = False
    small_batch_volumes: int = 0
    small_batch_finding_mass: float = 0.0
    rim_finding_mass: float = 0.0
    shortfall_margin: int = 0

    def __post_init__(self) -> None:
        for name in ("token_z", "finding_mass", "voxel_z", "prior_volumes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and np.isfinite(value)):
                raise ValueError(f"threshold.{name} must be a finite number; got {value!r}")
        if not self.token_z > 0:
            raise ValueError(f"threshold.token_z must be > 0 (robust SDs above the position's median); got {self.token_z!r}")
        if isinstance(self.min_reference_volumes, bool) or not isinstance(self.min_reference_volumes, int) \
                or self.min_reference_volumes < 3:
            raise ValueError(f"min_reference_volumes must be an integer >= 3; got {self.min_reference_volumes!r}")
        if not self.voxel_z > 0:
            raise ValueError(f"threshold.voxel_z must be > 0 (outside the brain the map is 0); got {self.voxel_z!r}")
        if not self.finding_mass >= 0:
            raise ValueError(f"threshold.finding_mass must be >= 0; got {self.finding_mass!r}")
        if not self.prior_volumes >= 0:
            raise ValueError(f"threshold.prior_volumes must be >= 0; got {self.prior_volumes!r}")
        bank_prior = self.bank_prior_volumes
        if bank_prior is not None and (isinstance(bank_prior, bool)
                                       or not isinstance(bank_prior, (int, float, np.floating))
                                       or not (np.isfinite(bank_prior) and bank_prior >= 0)):
            raise ValueError(f"threshold.bank_prior_volumes must be null (= prior_volumes) or a number >= 0; "
                             f"got {bank_prior!r}")
        tail = self.tail_quantile
        if isinstance(tail, bool) or not isinstance(tail, (int, float, np.floating)) or not 0.0 <= tail < 1.0:
            raise ValueError(f"threshold.tail_quantile must lie in [0, 1) (0 = MAD only); got {tail!r}")
        rate = self.bank_false_flag_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0.0 <= rate < 0.5:
            raise ValueError(f"threshold.bank_false_flag_rate must lie in [0, 0.5) (0 = finding_mass with a bank too); "
                             f"got {rate!r}")
        confidence = self.bank_confidence
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float, np.floating)) \
                or not 0.0 <= confidence < 1.0:
            raise ValueError(f"threshold.bank_confidence must lie in [0, 1) (0 = on average over banks); got {confidence!r}")
        excess = self.finding_excess
        if isinstance(excess, bool) or not isinstance(excess, (int, float, np.floating)) or not (
                np.isfinite(excess) and excess >= 0):
            raise ValueError(f"threshold.finding_excess must be a number >= 0 (robust SDs; 0 = any group); got {excess!r}")
        fraction = self.mask_peak_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"threshold.mask_peak_fraction must lie in [0, 1) (0 = voxel_z only); got {fraction!r}")
        if not isinstance(self.subtract_volume_level, bool):
            raise ValueError(f"threshold.subtract_volume_level must be true or false; got {self.subtract_volume_level!r}")
        if not isinstance(self.fit_volume_levels, bool):
            raise ValueError(f"threshold.fit_volume_levels must be true or false; got {self.fit_volume_levels!r}")
        self._check_small_batch()
        rim = self.rim_finding_mass
        if isinstance(rim, bool) or not isinstance(rim, (int, float, np.floating)) or not (np.isfinite(rim) and rim >= 0):
            raise ValueError(f"threshold.rim_finding_mass must be a number >= 0 (z x ml; 0 = finding_mass); got {rim!r}")
        margin = self.shortfall_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
            raise ValueError(f"threshold.shortfall_margin must be an integer >= 0 (grid steps; 0 = off); got {margin!r}")

    def _check_small_batch(self) -> None:
        volumes, mass = self.small_batch_volumes, self.small_batch_finding_mass
        if isinstance(volumes, bool) or not isinstance(volumes, int) or volumes < 0:
            raise ValueError(f"threshold.small_batch_volumes must be an integer >= 0 (0 = off); got {volumes!r}")
        if isinstance(mass, bool) or not isinstance(mass, (int, float, np.floating)) or not (np.isfinite(mass) and mass >= 0):
            raise ValueError(f"threshold.small_batch_finding_mass must be a number >= 0 (z x ml; 0 = finding_mass); "
                             f"got {mass!r}")
        if volumes > 0 and 0 < mass < self.finding_mass:
            # A batch with fewer references is noisier, never cleaner: a looser bound would be a slip.
            raise ValueError(f"threshold.small_batch_finding_mass ({mass:g}) must be at least finding_mass "
                             f"({self.finding_mass:g}), or 0 to keep finding_mass for small batches too")

    def for_batch(self, volumes: int) -> LesionPolicy:
        """The policy for a batch of ``volumes`` volumes that is its own reference.

        Batches of at most ``small_batch_volumes`` volumes are held to ``small_batch_finding_mass``
        when it is set (module docstring, rule 2); every other batch keeps this policy.
        """
        if self.small_batch_finding_mass > 0 and 0 < volumes <= self.small_batch_volumes:
            return replace(self, finding_mass=float(self.small_batch_finding_mass))
        return self

    def qualifies(self, finding: Finding) -> bool:
        """Whether a candidate group is focal enough to be a finding (its mass is not yet compared)."""
        return finding.excess > self.finding_excess

    @property
    def rim_bound(self) -> float:
        """The evidence bound of groups that peak at the brain's rim: never below ``finding_mass``."""
        return max(self.finding_mass, float(self.rim_finding_mass))

    def passes(self, finding: Finding) -> bool:
        """Whether a candidate group is a finding: focal enough, and its mass above its region's bound."""
        bound = self.rim_bound if finding.at_rim else self.finding_mass
        return finding.mass > bound and self.qualifies(finding)

    def evidence(self, findings: Sequence[Finding]) -> float:
        """A volume's evidence: the largest mass of its groups that :meth:`qualifies` (0 if none)."""
        return max((finding.mass for finding in findings if self.qualifies(finding)), default=0.0)

    def mask_bound(self, peak_z: float) -> float:
        """The ``z`` bound a passed finding with this peak is masked at (module docstring, rule 3)."""
        quarter = self.token_z + 0.25 * (peak_z - self.token_z)
        return min(max(self.voxel_z, self.mask_peak_fraction * peak_z), quarter)


@dataclass
class PositionStatistics:
    """Per-position median and robust spread of the reference volumes' scores.

    Attributes
    ----------
    median, sigma : numpy.ndarray
        Token-grid arrays; positions no reference volume covers hold the batch-wide values.
    count : numpy.ndarray
        Token-grid int array, reference volumes with a token at each position.
    global_median, global_sigma : float
        Median of all reference scores and robust spread of the residuals about ``median``.
    """

    median: np.ndarray
    sigma: np.ndarray
    count: np.ndarray
    global_median: float
    global_sigma: float


@dataclass
class Finding:
    """One connected group of candidate tokens in one volume.

    Attributes
    ----------
    tokens : numpy.ndarray
        Indices into the volume's token array.
    peak_z : float
        Largest standardised score of the group.
    mass : float
        Its evidence, ``sum(z - token_z)`` over its tokens times a token's volume (z x ml).
    peak_score : float
        Largest raw (fused) score of the group.
    passed : bool
        Whether it is a finding: its mass exceeds ``finding_mass`` (``rim_finding_mass`` where
        larger, at the rim) and its mean excess ``finding_excess`` (only passed findings flag and
        mask).
    excess : float
        Mean of ``z - token_z`` over its tokens (how focal it is).
    at_rim : bool
        Whether its peak token lies at the brain's rim (:func:`rim_positions`).
    """

    tokens: np.ndarray
    peak_z: float
    mass: float
    peak_score: float
    passed: bool
    excess: float
    at_rim: bool = False

    @property
    def n_tokens(self) -> int:
        """Number of tokens in the group."""
        return int(self.tokens.size)


@dataclass
class LesionDecision:
    """Outcome of the lesion policy for one batch (query volumes only, in batch order).

    Attributes
    ----------
    flagged : numpy.ndarray
        ``(B,)`` bool.
    z : list of numpy.ndarray
        Standardised token scores per volume.
    mask_values : list of numpy.ndarray
        Per-token values the voxel bound ``voxel_z`` applies to: inside passed findings ``z``
        scaled so that the finding's own bound lands on ``voxel_z`` (:func:`_mask_values`), at
        most ``voxel_z`` elsewhere.
    findings : list of list of Finding
        Candidate groups per volume, passed or not.
    policy : LesionPolicy
    statistics : PositionStatistics
    reference : str
        ``"batch"`` or ``"bank"``: which volumes gave the position statistics.
    params : dict
        Settings and statistics for report.json (``not_decided`` when too few references).
    """

    flagged: np.ndarray
    z: list[np.ndarray]
    mask_values: list[np.ndarray]
    findings: list[list[Finding]]
    policy: LesionPolicy
    statistics: PositionStatistics
    reference: str = "batch"
    params: dict[str, Any] = field(default_factory=dict)


def _dense(scores: Sequence[np.ndarray], coords: Sequence[np.ndarray], grid_shape: tuple[int, int, int]) -> np.ndarray:
    """``(V, G)`` float64 scores on the flattened grid, NaN where a volume has no token."""
    size = int(np.prod(grid_shape))
    dense = np.full((len(scores), size), np.nan)
    for row, (values, where) in enumerate(zip(scores, coords)):
        dense[row, np.ravel_multi_index(tuple(np.asarray(where).T), grid_shape)] = values
    return dense


def position_statistics(
    scores: Sequence[np.ndarray],
    coords: Sequence[np.ndarray],
    grid_shape: tuple[int, int, int],
    prior_volumes: float = 4.0,
    *,
    by_position: bool = True,
    tail_quantile: float = 0.9,
) -> PositionStatistics:
    """Median and shrunk robust spread per grid position over reference volumes (module docstring).

    Parameters
    ----------
    scores, coords : sequence of numpy.ndarray
        The reference volumes' ``(N_i,)`` token scores and ``(N_i, 3)`` grid indices.
    grid_shape : tuple of int
    prior_volumes : float
        Weight of the batch-wide spread, in volumes.
    by_position : bool
        ``False``: every position gets the batch-wide median and spread (unaligned grids).
    tail_quantile : float
        Lower bound of each position's spread from this quantile of its absolute residuals, the
        largest left out (:func:`tail_spread`); 0: the MAD alone.
    """
    if not len(scores):
        raise ValueError("position statistics need at least one reference volume")
    dense = _dense(scores, coords, grid_shape)
    count = np.sum(~np.isnan(dense), axis=0)
    covered = count > 0
    median = np.full(dense.shape[1], float(np.median(np.concatenate([np.ravel(s) for s in scores]))))
    if by_position:
        median[covered] = np.nanmedian(dense[:, covered], axis=0)
    residual = np.abs(dense - median)
    global_sigma = MAD_TO_SIGMA * float(np.nanmedian(residual))
    # Tied scores (identical volumes) would give a zero spread: floor it at float32 resolution.
    global_sigma = max(global_sigma, float(np.spacing(np.float32(abs(median).max()))) * 16)
    sigma = np.full(dense.shape[1], global_sigma)
    if by_position:
        local = MAD_TO_SIGMA * np.nanmedian(residual[:, covered], axis=0)
        if tail_quantile > 0:
            local = np.maximum(local, tail_spread(residual[:, covered], tail_quantile))
        n = count[covered]
        sigma[covered] = np.sqrt((n * local**2 + prior_volumes * global_sigma**2) / np.maximum(n + prior_volumes, 1e-12))
        sigma = np.maximum(sigma, global_sigma * 1e-3)
    return PositionStatistics(
        median=median.reshape(grid_shape), sigma=sigma.reshape(grid_shape), count=count.reshape(grid_shape),
        global_median=float(np.median(median[covered])) if covered.any() else float(median[0]),
        global_sigma=global_sigma,
    )


def tail_spread(residual: np.ndarray, quantile: float) -> np.ndarray:
    """Spread implied by a high quantile of absolute residuals, each column's largest left out.

    Parameters
    ----------
    residual : numpy.ndarray
        ``(V, P)`` absolute residuals about each position's median, NaN where a volume has no token.
    quantile : float
        In (0, 1). For Gaussian residuals of many volumes the result approaches their standard
        deviation, as the MAD's does (with the largest left out it is low for few volumes: about
        0.74 of it for 12, 0.93 for 48); it exceeds the MAD's where the tail is heavier.

    Returns
    -------
    numpy.ndarray
        ``(P,)`` spreads; 0 where fewer than two residuals remain.

    Raises
    ------
    ValueError
        If ``quantile`` is not in (0, 1).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1); got {quantile!r}")
    n = np.sum(~np.isnan(residual), axis=0) - 1  # the largest is left out
    spread = np.zeros(residual.shape[1])
    usable = np.flatnonzero(n >= 2)
    rest = residual[:, usable].copy()
    rest[np.nanargmax(rest, axis=0), np.arange(usable.size)] = np.nan
    value = np.nanquantile(rest, quantile, axis=0)
    spread[usable] = value / float(stats.norm.ppf(0.5 + quantile / 2))
    return spread


def common_brain(count: np.ndarray, n_reference: int, coverage: float = RIM_COVERAGE) -> np.ndarray:
    """The positions at least ``coverage`` of the references have a token at (boolean token grid)."""
    return np.asarray(count) >= coverage * max(int(n_reference), 1)


def rim_positions(count: np.ndarray, n_reference: int, coverage: float = RIM_COVERAGE, depth: int = RIM_DEPTH) -> np.ndarray:
    """The brain's rim on the token grid: positions within ``depth`` tokens of its edge.

    Parameters
    ----------
    count : numpy.ndarray
        Token-grid int array, reference volumes with a token at each position
        (:attr:`PositionStatistics.count`).
    n_reference : int
        Number of reference volumes.
    coverage : float
        A position is inside the brain when at least this share of the references has a token there
        (a token needs 90 % brain in its cube, so brains of different shapes cover the edge unevenly).
    depth : int
        Positions whose chessboard distance from the nearest position not inside (or the grid's
        border) is at most this are the rim; so are the positions not inside.

    Returns
    -------
    numpy.ndarray
        Boolean token-grid array.
    """
    inside = np.pad(common_brain(count, n_reference, coverage), 1)
    distance = ndimage.distance_transform_cdt(inside, metric="chessboard")[1:-1, 1:-1, 1:-1]
    return distance <= depth


def shortfall_tokens(
    coords: np.ndarray, count: np.ndarray, n_reference: int, margin: int, coverage: float = RIM_COVERAGE,
) -> np.ndarray:
    """Which of one volume's tokens lie near where its brain stops short of the references' common brain.

    Parameters
    ----------
    coords : numpy.ndarray
        The volume's ``(N, 3)`` token grid indices.
    count : numpy.ndarray
        Token-grid int array, reference volumes with a token at each position
        (:attr:`PositionStatistics.count`).
    n_reference : int
        Number of reference volumes; in a batch scored alone the volume itself is one of them (as
        for :func:`rim_positions`), so a batch of under 10 marks nothing at 90 % coverage.
    margin : int
        Grid steps (chessboard distance) from a shortfall position within which a token is marked;
        0 marks none.
    coverage : float
        A position belongs to the common brain when at least this share of the references has a
        token there (as for :func:`rim_positions`).

    Returns
    -------
    numpy.ndarray
        ``(N,)`` bool: tokens within ``margin`` steps of a position of the common brain at which the
        volume has no token (module docstring, rule 2).
    """
    where = tuple(np.asarray(coords).T)
    if margin < 1 or not np.size(coords):
        return np.zeros(len(coords), dtype=bool)
    own = np.zeros(count.shape, dtype=bool)
    own[where] = True
    short = common_brain(count, n_reference, coverage) & ~own
    near = ndimage.binary_dilation(short, structure=np.ones((3, 3, 3), dtype=bool), iterations=int(margin))
    return near[where]


def standardise(scores: np.ndarray, coords: np.ndarray, statistics: PositionStatistics) -> np.ndarray:
    """Position-standardised scores ``(s - m_p) / sigma_p`` of one volume's tokens (float32)."""
    where = tuple(np.asarray(coords).T)
    return ((np.asarray(scores, np.float64) - statistics.median[where]) / statistics.sigma[where]).astype(np.float32)


def volume_level(z: np.ndarray) -> float:
    """The level one volume's ``z`` is measured from: the median of its tokens' ``z`` if positive, else 0."""
    return max(float(np.median(z)), 0.0) if np.size(z) else 0.0


def relative_z(z: np.ndarray, policy: LesionPolicy) -> np.ndarray:
    """One volume's ``z`` as the policy decides on it: less the volume's level with ``subtract_volume_level``.

    Never above ``z`` (:func:`volume_level` is at least 0), so bounds calibrated without the
    subtraction stay conservative (module docstring, rule 1).
    """
    if not policy.subtract_volume_level:
        return z
    return (np.asarray(z, np.float64) - volume_level(z)).astype(np.float32)


def fitted_levels(
    scores: Sequence[np.ndarray], coords: Sequence[np.ndarray], grid_shape: tuple[int, int, int],
    *, by_position: bool = True, rounds: int = 2,
) -> np.ndarray:
    """Each volume's level in a two-way robust fit of a batch's scores: level plus position median.

    Rounds of median polish: the position medians of the scores less the current levels, then
    each volume's level as the median of its scores less those medians. Without it, the
    differences between volumes' levels (a series acquired or registered unlike the rest sits
    higher or lower at every position) are part of every position's spread and of the
    batch-wide one, and compress every ``z`` (module docstring, rule 1).

    Parameters
    ----------
    scores, coords : sequence of numpy.ndarray
        The batch's ``(N_i,)`` token scores and ``(N_i, 3)`` grid indices.
    grid_shape : tuple of int
    by_position : bool
        ``False``: one batch-wide median instead of one per position (unaligned grids).
    rounds : int
        Rounds of the fit (>= 1); two bring the levels within a few per cent of their limit.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` float64 levels, in score units (0 for a volume without tokens).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds!r}")
    levels = np.zeros(len(scores))
    wheres = [tuple(np.asarray(where).T) for where in coords]
    for _ in range(rounds):
        # Only the medians are used: the tail bound is not needed and costs a sort per position.
        medians = position_statistics([np.asarray(s, np.float64) - level for s, level in zip(scores, levels)],
                                      coords, grid_shape, by_position=by_position, tail_quantile=0.0).median
        levels = np.array([float(np.median(np.asarray(s, np.float64) - medians[where])) if np.size(s) else 0.0
                           for s, where in zip(scores, wheres)])
    return levels


def token_findings(
    z: np.ndarray, scores: np.ndarray, coords: np.ndarray, grid_shape: tuple[int, int, int], policy: LesionPolicy,
    token_ml: float = 1.0, rim: np.ndarray | None = None, excluded: np.ndarray | None = None,
) -> list[Finding]:
    """Connected groups (26-connectivity) of the tokens with ``z > token_z``, largest mass first.

    ``rim``: a boolean token-grid array of the rim's positions (:func:`rim_positions`); a group
    whose peak lies there is held to the policy's rim bound. ``None``: no rim.
    ``excluded``: ``(N,)`` bool, tokens that are never candidates (:func:`shortfall_tokens`).
    """
    candidate = z > policy.token_z
    if excluded is not None:
        candidate &= ~np.asarray(excluded, dtype=bool)
    if not candidate.any():
        return []
    grid = np.zeros(grid_shape, dtype=bool)
    where = np.asarray(coords)
    grid[tuple(where[candidate].T)] = True
    labels, _ = ndimage.label(grid, structure=np.ones((3, 3, 3), dtype=bool))
    token_labels = labels[tuple(where.T)]
    findings = []
    for label in np.unique(token_labels[candidate]):
        members = np.flatnonzero(token_labels == label)
        excess = float(np.mean(z[members] - policy.token_z))
        mass = excess * members.size * token_ml
        peak = members[np.argmax(z[members])]
        finding = Finding(tokens=members, peak_z=float(z[peak]), mass=mass, peak_score=float(np.max(scores[members])),
                          passed=False, excess=excess, at_rim=bool(rim is not None and rim[tuple(where[peak])]))
        finding.passed = policy.passes(finding)
        findings.append(finding)
    return sorted(findings, key=lambda finding: -finding.mass)


@dataclass(frozen=True)
class BankCalibration:
    """The evidence bound calibrated on a cohort bank's normal volumes (:func:`bank_calibration`).

    Attributes
    ----------
    finding_mass : float
        The bound: the ``rank``-th largest of the reference volumes' leave-one-out evidence.
    rank : int
        Which largest evidence is the bound (:func:`calibration_rank`).
    n_reference : int
        Reference (bank) volumes.
    false_flag_bound : float
        The false-flag rate the bound keeps for a normal series like the bank's volumes: the
        configured rate's share (``bank_false_flag_rate / n_queries``) when calibrated with a
        confidence, else ``rank / (n_reference + 1)`` (on average over banks; :func:`bank_calibration`).
    confidence : float
        The confidence of ``false_flag_bound`` over the draw of the bank (0: on average).
    expected_false_flag_rate : float
        ``rank / (n_reference + 1)``, the rate on average over banks like this one.
    evidence : tuple of float
        Each reference volume's largest finding evidence (z x ml), scored against the other
        references only, largest first.
    n_queries : int
        Series decided together against the bank, every contrast's (they share the rate:
        ``false_flag_bound`` is per series, ``n_queries`` times it per run).
    """

    finding_mass: float
    rank: int
    n_reference: int
    false_flag_bound: float
    evidence: tuple[float, ...]
    confidence: float = 0.0
    expected_false_flag_rate: float = 0.0
    n_queries: int = 1

    def record(self) -> dict[str, Any]:
        """The calibration as report.json's ``threshold_params.bank_calibration`` holds it."""
        return {"finding_mass": self.finding_mass, "rank": self.rank, "n_reference_volumes": self.n_reference,
                "false_flag_bound": self.false_flag_bound, "confidence": self.confidence,
                "expected_false_flag_rate": self.expected_false_flag_rate, "n_queries": self.n_queries,
                # Per run (every series sharing the rate); the name is kept (fields are only added).
                "expected_false_flags_per_batch": round(self.n_queries * self.expected_false_flag_rate, 4),
                "largest_evidence": [round(value, 4) for value in self.evidence[:max(self.rank, 8)]]}


def calibration_rank(n: int, rate: float, confidence: float = 0.0) -> int:
    """Which largest of ``n`` normal evidence values bounds a new normal one at ``rate`` (0: none).

    A new value exceeds the ``k``-th largest of ``n`` exchangeable ones with probability
    ``k / (n + 1)`` on average over draws, but for one draw that probability is itself random:
    Beta(k, n + 1 - k) distributed (the conformal coverage of an order statistic). With
    ``confidence`` 0 the rank is ``floor(rate * (n + 1))`` (right on average); otherwise it is the
    largest ``k`` whose probability stays at most ``rate`` with that confidence,
    ``P(Beta(k, n + 1 - k) <= rate) >= confidence`` (right for this bank with that confidence;
    0.1 at 0.9 needs at least 22 volumes and gives k = 2 for 40 or 48).
    """
    if confidence <= 0:
        return int(np.floor(rate * (n + 1) + 1e-9))
    rank = 0
    while rank + 1 <= n and stats.beta.cdf(rate, rank + 1, n - rank) >= confidence:
        rank += 1
    return rank


def bank_calibration(
    reference_scores: Sequence[np.ndarray],
    reference_coords: Sequence[np.ndarray],
    grid_shape: tuple[int, int, int],
    policy: LesionPolicy,
    token_ml: float = 1.0,
    groups: Sequence[Hashable] | None = None,
    n_queries: int = 1,
) -> BankCalibration | None:
    """Evidence bound from a cohort bank's volumes, each scored against the others (leave one out).

    The bank's volumes are normal-looking studies scored against each other (in the query's
    batch, but never against the query: ``BankGroup``), so each is, to the policy, what a normal
    query would be: standardised against the references of *other* patients (as a query is
    against the whole bank, which never holds its own patient),
    its largest finding's evidence is a draw from the evidence of normal studies. With ``n`` such
    draws, a normal query exceeds the ``k``-th largest with probability at most about
    ``k / (n + 1)`` (the conformal argument for exchangeable draws; approximate here, since the
    query's statistics rest on one patient's volumes more than each left-out volume's, which makes
    the bound, if anything, conservative), so ``k = floor(bank_false_flag_rate * (n + 1))`` states
    the false-flag rate without assuming a distribution, for this encoder, contrast and bank; with
    ``bank_confidence`` the rank is lowered so that the rate holds for this bank with that
    confidence (:func:`calibration_rank`). The rate is per decided run: the ``n_queries`` series
    decided against the bank in it, every contrast's, share it (each is held to
    ``bank_false_flag_rate / n_queries``, so a normal study of several series, or a run of normal
    studies, has at most that many flags on average, as a single series would), down to the
    bank's largest evidence when the bank is too small for that share (then a run expects
    ``n_queries / (n + 1)`` false flags). A
    missed lesion in the bank only raises the bound. A bank grown with ``bank.add_scored:
    unflagged`` keeps only studies below its bound, which lowers the bound over time: calibrate on
    banks of curated normal studies.

    Parameters
    ----------
    reference_scores, reference_coords : sequence of numpy.ndarray
        The bank volumes' fused token scores and grid indices, from the query's batch.
    grid_shape : tuple of int
    policy : LesionPolicy
    token_ml : float
    groups : sequence of hashable, optional
        Patient (or study) of each bank volume: a volume is left out with every volume of its
        group. ``None``: each volume is its own group.
    n_queries : int, default 1
        Series decided against this bank in one run, every contrast's (they share the rate).

    Returns
    -------
    BankCalibration or None
        ``None`` when the rate asks for no bound (``k < 1``: too few bank volumes for the rate and
        confidence) or too few volumes of other groups remain to standardise one against.
    """
    n = len(reference_scores)
    groups = list(range(n)) if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} bank volumes")
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1; got {n_queries!r}")
    rank = calibration_rank(n, policy.bank_false_flag_rate, policy.bank_confidence)
    if rank < 1 or n - max(groups.count(g) for g in set(groups)) < policy.min_reference_volumes:
        return None
    # A batch shares the rate; the bank's largest evidence is the strictest bound it can give.
    share = policy.bank_false_flag_rate / n_queries
    shared_rank = calibration_rank(n, share, policy.bank_confidence)
    rank = max(1, shared_rank)
    evidence = _left_out_evidence(reference_scores, reference_coords, grid_shape, policy, token_ml, groups)
    ordered = tuple(sorted((float(value) for value in evidence), reverse=True))
    expected = rank / (n + 1)
    # The share holds with the stated confidence only when the bank could give it a rank of its own.
    held = policy.bank_confidence > 0 and shared_rank >= 1
    return BankCalibration(
        finding_mass=ordered[rank - 1], rank=rank, n_reference=n, evidence=ordered,
        false_flag_bound=share if held else expected,
        confidence=policy.bank_confidence if held else 0.0, expected_false_flag_rate=expected,
        n_queries=n_queries,
    )


def _left_out_evidence(
    scores: Sequence[np.ndarray], coords: Sequence[np.ndarray], grid_shape: tuple[int, int, int],
    policy: LesionPolicy, token_ml: float, groups: Sequence[Hashable],
) -> list[float]:
    """Each volume's evidence, standardised against the volumes of the other groups only."""
    evidence = []
    for left_out, group in enumerate(groups):
        others = [index for index, other in enumerate(groups) if other != group]
        statistics = position_statistics(
            [scores[i] for i in others], [coords[i] for i in others], grid_shape,
            policy.prior_volumes, by_position=policy.by_position, tail_quantile=policy.tail_quantile,
        )
        values, where = np.asarray(scores[left_out]), coords[left_out]
        # Counted against the other volumes, as a query's are against the whole bank.
        excluded = shortfall_tokens(where, statistics.count, len(others), policy.shortfall_margin)
        found = token_findings(standardise(values, where, statistics), values, where, grid_shape, policy, token_ml,
                               excluded=excluded)
        evidence.append(policy.evidence(found))
    return evidence


def _mask_values(
    z: np.ndarray, findings: Sequence[Finding], policy: LesionPolicy, coords: np.ndarray,
    grid_shape: tuple[int, int, int],
) -> np.ndarray:
    """Per-token values whose upsampled map is thresholded at ``voxel_z`` to make the mask.

    Inside a passed finding, ``z`` is scaled so that the finding's own bound
    (:meth:`LesionPolicy.mask_bound`) lands on ``voxel_z``. Every other token is clamped to at
    most ``voxel_z``: it can shape a finding's edge, never start a mask. A finding's neighbours on
    the grid are scaled as it is before the clamp (down where its bound lies above ``voxel_z``,
    up where a faint finding's lies below), so that its edge is cut at its own bound: unscaled
    neighbours pulled a faint finding's edge towards its centre (T1w metastasis masks, learnt
    encoder; docs/RESULTS.md, "Small metastases and cortical lesions").
    """
    passed = [f for f in findings if f.passed]
    scales = [policy.voxel_z / policy.mask_bound(f.peak_z) for f in passed]
    grid_coords = np.asarray(coords)
    # A neighbour of several findings takes the smallest of its scaled values (the tighter edge).
    scaled = np.full(z.shape, np.inf)
    for finding, scale in zip(passed, scales):
        near = _neighbours(finding.tokens, grid_coords, grid_shape)
        scaled[near] = np.minimum(scaled[near], z[near] * scale)
    values = np.minimum(np.where(np.isinf(scaled), z, scaled), policy.voxel_z).astype(np.float64)
    for finding, scale in zip(passed, scales):
        values[finding.tokens] = z[finding.tokens] * scale
    return values.astype(np.float32)


def _neighbours(tokens: np.ndarray, coords: np.ndarray, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Indices of the tokens within one grid step (26-connectivity) of ``tokens``, outside them."""
    grid = np.zeros(grid_shape, dtype=bool)
    grid[tuple(coords[tokens].T)] = True
    near = ndimage.binary_dilation(grid, structure=np.ones((3, 3, 3), dtype=bool)) & ~grid
    return np.flatnonzero(near[tuple(coords.T)])


def _bank_policy(
    policy: LesionPolicy, reference_scores: Sequence[np.ndarray], reference_coords: Sequence[np.ndarray],
    grid_shape: tuple[int, int, int], token_ml: float, reference_groups: Sequence[Hashable] | None,
    n_queries: int,
) -> tuple[LesionPolicy, dict[str, Any]]:
    """The policy a batch decided against a cohort bank is held to, and its calibration's record.

    The bank's calibrated bound already carries its normal volumes' whole-series offsets (rule 1),
    and a bank is no small batch (rule 2): the bank's bound (:func:`bank_calibration`), or
    ``finding_mass`` (``rim_finding_mass`` where larger) uncalibrated where the rate is 0 or the bank
    too small for it. Its positions'
    spreads are weighted with ``bank_prior_volumes`` where set. The rim has no bound of its own
    here: the stricter of the two holds everywhere until the bank's calibration replaces it.
    """
    prior = policy.prior_volumes if policy.bank_prior_volumes is None else float(policy.bank_prior_volumes)
    policy = replace(policy, subtract_volume_level=False, fit_volume_levels=False, small_batch_volumes=0,
                     small_batch_finding_mass=0.0, prior_volumes=prior, finding_mass=policy.rim_bound, rim_finding_mass=0.0)
    if not policy.bank_false_flag_rate > 0:
        return policy, {}
    calibration = bank_calibration(reference_scores, reference_coords, grid_shape, policy, token_ml,
                                   reference_groups, n_queries=n_queries)
    if calibration is None:
        return policy, {"bank_calibration": f"not calibrated: {len(reference_scores)} bank volume(s) are too few "
                                            f"for a false-flag rate of {policy.bank_false_flag_rate:g}"}
    return replace(policy, finding_mass=calibration.finding_mass), {"bank_calibration": calibration.record()}


def _check_decision_inputs(
    token_scores: Sequence[np.ndarray], coords: Sequence[np.ndarray], token_ml: float,
    reference_scores: Sequence[np.ndarray] | None, reference_coords: Sequence[np.ndarray] | None,
    shared_by: int | None,
) -> None:
    """:func:`decide_lesions`' arguments, checked before anything is computed (the message names the fix)."""
    if len(token_scores) != len(coords) or not len(token_scores):
        raise ValueError(f"{len(token_scores)} score arrays for {len(coords)} coordinate arrays; need >= 1 of each")
    if not token_ml > 0:
        raise ValueError(f"token_ml must be > 0; got {token_ml!r}")
    if reference_scores is not None and len(reference_scores) and (
            reference_coords is None or len(reference_coords) != len(reference_scores)):
        raise ValueError("reference_scores need one coordinate array each (reference_coords)")
    if shared_by is not None and shared_by < len(token_scores):
        raise ValueError(f"shared_by counts the run's series decided against the bank, these "
                         f"{len(token_scores)} queries among them; got {shared_by!r}")


def decide_lesions(
    token_scores: Sequence[np.ndarray],
    coords: Sequence[np.ndarray],
    grid_shape: tuple[int, int, int],
    policy: LesionPolicy,
    *,
    token_ml: float = 1.0,
    reference_scores: Sequence[np.ndarray] | None = None,
    reference_coords: Sequence[np.ndarray] | None = None,
    reference_groups: Sequence[Hashable] | None = None,
    shared_by: int | None = None,
) -> LesionDecision:
    """Flag volumes and choose mask values by the lesion policy (module docstring).

    Parameters
    ----------
    token_scores, coords : sequence of numpy.ndarray
        The query volumes' fused ``(N_i,)`` scores and ``(N_i, 3)`` grid indices.
    grid_shape : tuple of int
    policy : LesionPolicy
    token_ml : float, default 1.0
        Volume of one token's cube in ml (a finding's evidence is in z x ml).
    reference_scores, reference_coords : sequence of numpy.ndarray, optional
        Reference volumes scored in the same batch (a cohort bank's studies, assumed normal); at
        least ``min_reference_volumes`` of them alone give the position statistics (fewer join
        the queries'). ``None``: the query volumes themselves.
    reference_groups : sequence of hashable, optional
        Patient of each reference volume, for the bank calibration's leave-one-patient-out.
    shared_by : int, optional
        Series decided against the bank in the same run: these queries and those of the run's
        other contrasts (every series of every study). They share ``bank_false_flag_rate``, so
        that a normal study of two series is flagged no more often than the rate, not up to
        twice as often. ``None``: these queries alone.
    """
    _check_decision_inputs(token_scores, coords, token_ml, reference_scores, reference_coords, shared_by)
    n_bank = 0 if reference_scores is None else len(reference_scores)
    banked = n_bank >= policy.min_reference_volumes
    if 0 < n_bank < policy.min_reference_volumes:
        # Too few bank volumes for statistics of their own: they join the queries' (and are
        # decided too, after the queries, so callers keep the first len(queries) results).
        token_scores, coords = [*token_scores, *reference_scores], [*coords, *reference_coords]  # type: ignore[misc]
    if banked:
        policy, calibration_record = _bank_policy(
            policy, reference_scores, reference_coords, grid_shape, token_ml, reference_groups,  # type: ignore[arg-type]
            n_queries=len(token_scores) if shared_by is None else shared_by,
        )
    else:
        policy, calibration_record = policy.for_batch(len(token_scores)), {}
    levelled = token_scores
    if policy.fit_volume_levels and not banked:
        levels = fitted_levels(token_scores, coords, grid_shape, by_position=policy.by_position)
        levelled = [np.asarray(scores, np.float64) - level for scores, level in zip(token_scores, levels)]
    statistics = position_statistics(
        reference_scores if banked else levelled, reference_coords if banked else coords,  # type: ignore[arg-type]
        grid_shape, policy.prior_volumes, by_position=policy.by_position, tail_quantile=policy.tail_quantile,
    )
    n_reference = n_bank if banked else len(token_scores)
    # The rim is only looked up where it has a bound of its own.
    rim = rim_positions(statistics.count, n_reference) if policy.rim_bound > policy.finding_mass else None
    z_all, mask_values, findings = [], [], []
    for scores, levelled_scores, where in zip(token_scores, levelled, coords):
        z = relative_z(standardise(levelled_scores, where, statistics), policy)
        excluded = shortfall_tokens(where, statistics.count, n_reference, policy.shortfall_margin)
        found = token_findings(z, np.asarray(scores), where, grid_shape, policy, token_ml, rim, excluded)
        z_all.append(z)
        mask_values.append(_mask_values(z, found, policy, where, grid_shape))
        findings.append(found)
    enough = n_reference >= policy.min_reference_volumes
    flagged = np.array([enough and any(f.passed for f in found) for found in findings], dtype=bool)
    return LesionDecision(
        flagged=flagged, z=z_all, mask_values=mask_values, findings=findings, policy=policy,
        statistics=statistics, reference="bank" if banked else "batch",
        params={**asdict(policy), "reference": "bank" if banked else "batch",
                "n_reference_volumes": n_reference,
                **({} if enough else {"not_decided": f"{n_reference} reference volume(s); at least "
                                                    f"{policy.min_reference_volumes} are needed to flag"}),
                "token_ml": float(token_ml), **calibration_record,
                "global_median": statistics.global_median, "global_sigma": statistics.global_sigma},
    )
