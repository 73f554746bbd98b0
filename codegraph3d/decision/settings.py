"""The ``threshold`` section as a typed, validated record, and the settings a flag depends on.

:class:`ThresholdSettings` is what the run layer hands down to the decision layer: the policy
choice, the lesion policy's bounds and the first version's volume-level bounds, each checked when
the record is made. :class:`DecisionSettings` adds the few settings of other sections that change
what a flag means (scoring rule, brain-fraction rule, registration), so that a measured operating
point (:mod:`codegraph3d.decision.operating_point`) can be matched to the run that asks for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any, Mapping

from codegraph3d.decision.lesion_policy import LesionPolicy

__all__ = [
    "BANK_BOUNDS", "PER_CONTRAST_BOUNDS", "DecisionSettings", "ThresholdPolicy", "ThresholdReference", "ThresholdSettings",
]

# The lesion policy's bounds that a configuration may set per contrast batch (``<name>_by_contrast``),
# with their units for messages: an encoder's standardised scores differ in scale between contrasts.
PER_CONTRAST_BOUNDS: Mapping[str, str] = MappingProxyType(
    {"token_z": "robust SDs", "finding_mass": "z x ml", "finding_excess": "robust SDs", "voxel_z": "robust SDs",
     "small_batch_finding_mass": "z x ml", "rim_finding_mass": "z x ml"}
)
# The fields ``threshold.with_bank`` may set for batches decided against cohort-bank references:
# the bounds a bank's calibration does not replace (and finding_mass, rim_finding_mass: the bound
# of a bank too small for its rate), each with its ``_by_contrast`` mapping.
BANK_BOUNDS: tuple[str, ...] = tuple(
    f"{name}{suffix}" for name in ("token_z", "finding_mass", "finding_excess", "voxel_z", "rim_finding_mass")
    for suffix in ("", "_by_contrast")
) + ("mask_peak_fraction", "shortfall_margin")
# Of those, the ones counted in whole grid steps.
_INTEGER_BANK_FIELDS: tuple[str, ...] = ("shortfall_margin",)


class ThresholdPolicy(StrEnum):
    """How flags and binary masks are decided (``threshold.policy``)."""

    LESION = "lesion"
    ROBUST_Z = "robust_z"
    BANK = "bank"


class ThresholdReference(StrEnum):
    """Which volumes the lesion policy's bounds come from (``threshold.reference``)."""

    AUTO = "auto"  # the cohort bank's volumes when a batch drew some, else the batch
    BATCH = "batch"


def choice(enum: type[Enum], value: Any, name: str) -> Any:
    """``value`` as a member of ``enum``; a ``ValueError`` naming the field and its choices otherwise."""
    try:
        return enum(value)
    except ValueError:
        options = [str(member.value) for member in enum]  # type: ignore[attr-defined]
        listed = ", ".join(options[:-1]) + f" or {options[-1]}"
        raise ValueError(f"{name} must be {listed}; got {value!r}") from None


def _non_negative_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


@dataclass(frozen=True)
class ThresholdSettings:
    """The ``threshold`` section (documented field by field in ``default_config.yaml``).

    Raises
    ------
    ValueError
        On construction, for a choice outside its options, a negative bound, or lesion-policy
        settings :class:`~codegraph3d.decision.lesion_policy.LesionPolicy` refuses; the message
        names the field.
    """

    policy: ThresholdPolicy = ThresholdPolicy.LESION
    reference: ThresholdReference = ThresholdReference.AUTO
    token_z: float = 4.5
    token_z_by_contrast: Mapping[str, float] = field(default_factory=dict)
    finding_mass: float = 30.0
    finding_mass_by_contrast: Mapping[str, float] = field(default_factory=dict)
    finding_excess: float = 0.0
    finding_excess_by_contrast: Mapping[str, float] = field(default_factory=dict)
    voxel_z: float = 10.0
    voxel_z_by_contrast: Mapping[str, float] = field(default_factory=dict)
    prior_volumes: float = 4.0
    bank_prior_volumes: float | None = None
    tail_quantile: float = 0.9
    bank_false_flag_rate: float = 0.1
    bank_confidence: float = 0.9
    mask_peak_fraction: float = 0.0
    volume_z: float = 3.0
    robust_token_z: float = 3.0
    min_finding_ml: float = 0.1
    subtract_volume_level: bool = False
    fit_volume_levels: bool = False
    small_batch_volumes: int = 0
    small_batch_finding_mass: float = 0.0
    small_batch_finding_mass_by_contrast: Mapping[str, float] = field(default_factory=dict)
    rim_finding_mass: float = 0.0
    rim_finding_mass_by_contrast: Mapping[str, float] = field(default_factory=dict)
    shortfall_margin: int = 0
    with_bank: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", choice(ThresholdPolicy, self.policy, "threshold.policy"))
        object.__setattr__(self, "reference", choice(ThresholdReference, self.reference, "threshold.reference"))
        if not _non_negative_number(self.min_finding_ml):
            raise ValueError(f"threshold.min_finding_ml must be >= 0; got {self.min_finding_ml!r}")
        for name, unit in PER_CONTRAST_BOUNDS.items():
            # The evidence and focality bounds may be 0 (any candidate group); z bounds may not.
            positive = name not in ("finding_mass", "finding_excess", "small_batch_finding_mass", "rim_finding_mass")
            for contrast, bound in getattr(self, f"{name}_by_contrast").items():
                if not _non_negative_number(bound) or (positive and bound == 0):
                    raise ValueError(f"threshold.{name}_by_contrast.{contrast} must be a number "
                                     f"{'> 0' if positive else '>= 0'} ({unit}); got {bound!r}")
            # Read-only, so the frozen record cannot change under a decision made from it.
            object.__setattr__(self, f"{name}_by_contrast", MappingProxyType(dict(getattr(self, f"{name}_by_contrast"))))
        for contrast in (None, *self.contrasts_with_own_bounds()):
            try:
                self.lesion_policy(contrast)  # LesionPolicy checks its own bounds, with field names in its messages
            except ValueError as error:
                if contrast is None:
                    raise
                raise ValueError(f"{error} (the bounds in effect for {contrast})") from None
        # Last, so that an error of the section itself is not blamed on with_bank.
        self._check_with_bank()

    def _check_with_bank(self) -> None:
        """``with_bank`` names only :data:`BANK_BOUNDS`, of their types, and makes valid bounds (eagerly)."""
        if not isinstance(self.with_bank, Mapping):
            raise ValueError(f"threshold.with_bank must be a mapping of bounds; got {self.with_bank!r}")
        unknown = sorted(set(self.with_bank) - set(BANK_BOUNDS))
        if unknown:
            raise ValueError(f"threshold.with_bank: {unknown} cannot be set for batches decided against a cohort "
                             f"bank; the fields it may set are {list(BANK_BOUNDS)}")
        frozen: dict[str, Any] = {}
        for name, value in self.with_bank.items():
            if name.endswith("_by_contrast") and not isinstance(value, Mapping):
                raise ValueError(f"threshold.with_bank.{name} must be a mapping of contrast to bound; got {value!r}")
            if not name.endswith("_by_contrast") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"threshold.with_bank.{name} must be a number; got {value!r}")
            if name in _INTEGER_BANK_FIELDS and not isinstance(value, int):
                raise ValueError(f"threshold.with_bank.{name} must be an integer (grid steps); got {value!r}")
            # Read-only to the last level, as the section's own mappings are.
            frozen[name] = MappingProxyType(dict(value)) if isinstance(value, Mapping) else (
                value if name in _INTEGER_BANK_FIELDS else float(value))
        object.__setattr__(self, "with_bank", MappingProxyType(frozen))
        if self.with_bank:
            try:
                self.for_bank()
            except (ValueError, TypeError) as error:
                raise ValueError(f"threshold.with_bank: {error}") from None

    def for_bank(self) -> ThresholdSettings:
        """The section with ``with_bank``'s fields in place: what batches decided against a bank use.

        Each field of ``with_bank`` replaces the section's field of that name (a ``_by_contrast``
        mapping whole), so one configuration serves batches scored alone and studies decided
        against a cohort bank, whose best bounds differ (fitted volume levels, for instance, act
        without a bank only). The small-batch bound, never used with a bank, is left out, so that
        it cannot refuse a bank bound it would never meet.
        """
        if not self.with_bank:
            return self
        return replace(self, with_bank={}, small_batch_volumes=0, small_batch_finding_mass=0.0,
                       small_batch_finding_mass_by_contrast={}, **dict(self.with_bank))

    def contrasts_with_own_bounds(self) -> list[str]:
        """The contrasts named in any ``*_by_contrast`` mapping, sorted."""
        return sorted({c for name in PER_CONTRAST_BOUNDS for c in getattr(self, f"{name}_by_contrast")})

    def bound(self, name: str, contrast: str | None) -> float:
        """The bound ``name`` (a key of :data:`PER_CONTRAST_BOUNDS`) in effect for ``contrast``.

        Its ``<name>_by_contrast`` entry when there is one, else the section-wide value: a bound
        calibrated for one encoder and contrast need not hold for another.
        """
        return float(getattr(self, f"{name}_by_contrast").get(contrast or "", getattr(self, name)))

    def lesion_policy(self, contrast: str | None = None, with_bank: bool = False) -> LesionPolicy:
        """The lesion policy for a contrast batch (its ``*_by_contrast`` entries win).

        ``with_bank``: for a batch decided against cohort-bank references (``threshold.with_bank``'s
        bounds in place).
        """
        if with_bank and self.with_bank:
            return self.for_bank().lesion_policy(contrast)
        return LesionPolicy(
            token_z=self.bound("token_z", contrast), finding_mass=self.bound("finding_mass", contrast),
            voxel_z=self.bound("voxel_z", contrast), prior_volumes=self.prior_volumes,
            bank_prior_volumes=self.bank_prior_volumes, tail_quantile=self.tail_quantile,
            bank_false_flag_rate=self.bank_false_flag_rate, bank_confidence=self.bank_confidence,
            finding_excess=self.bound("finding_excess", contrast), mask_peak_fraction=self.mask_peak_fraction,
            subtract_volume_level=self.subtract_volume_level, fit_volume_levels=self.fit_volume_levels,
            small_batch_volumes=self.small_batch_volumes,
            small_batch_finding_mass=self.bound("small_batch_finding_mass", contrast),
            rim_finding_mass=self.bound("rim_finding_mass", contrast), shortfall_margin=self.shortfall_margin,
        )


@dataclass(frozen=True)
class DecisionSettings:
    """The settings a flag depends on besides the encoder: what an operating point is measured for.

    Attributes
    ----------
    threshold : ThresholdSettings
    k_fraction, window_radius, method
        The scoring rule (``scoring.*``).
    min_brain_fraction : float
        Which tokens exist (``tokens.min_brain_fraction``).
    registration : str
        ``preprocess.registration``: without it the policy standardises batch-wide, not per position.
    resolution_fwhm_mm : float
        ``preprocess.resolution_fwhm_mm``: smoothing every series to one resolution changes the
        spread of normal scores, so a rate measured without it does not hold with it.
    layer_weights : tuple of float, optional
        ``scoring.layer_weights``: how the layers' scores are fused (``None``: their plain mean).
    """

    threshold: ThresholdSettings
    k_fraction: float
    window_radius: int
    method: str
    min_brain_fraction: float
    registration: str
    resolution_fwhm_mm: float = 0.0
    layer_weights: tuple[float, ...] | None = None

    def record(self, contrast: str) -> dict[str, Any]:
        """The settings as an entry of ``operating_points.json`` records them, for ``contrast``.

        The bounds are the ones in effect for the contrast (``*_by_contrast`` or the section-wide
        value), so that another contrast's bounds do not make this one "not measured".
        Only bank-referenced batches use the bank calibration and ``bank_prior_volumes``, and a
        calibrated one reports its own operating point, so those fields are left out (a bank too
        small for its rate is decided with ``finding_mass`` (``rim_finding_mass`` where larger) and
        reports the batch's measured point,
        which ``bank_prior_volumes`` and ``fit_volume_levels``, unused with a bank, may then not
        match), as are the settings that shape only the
        binary mask (``voxel_z``, ``min_finding_ml``, ``mask_peak_fraction``): a flag and its
        false-flag rate do not depend on them, so tuning a mask keeps the rate measured.
        """
        threshold = {
            "policy": self.threshold.policy.value, "reference": self.threshold.reference.value,
            "token_z": self.threshold.bound("token_z", contrast),
            "finding_mass": self.threshold.bound("finding_mass", contrast),
            "finding_excess": self.threshold.bound("finding_excess", contrast),
            "prior_volumes": self.threshold.prior_volumes,
            "tail_quantile": self.threshold.tail_quantile, "volume_z": self.threshold.volume_z,
            "robust_token_z": self.threshold.robust_token_z,
        }
        if self.threshold.subtract_volume_level:
            # Only when on, so that the points measured before the setting existed still match.
            threshold["subtract_volume_level"] = True
        if self.threshold.fit_volume_levels:
            threshold["fit_volume_levels"] = True
        small_batch = self.threshold.bound("small_batch_finding_mass", contrast)
        if self.threshold.small_batch_volumes > 0 and small_batch > 0:
            # Likewise only when a small batch has its own bound for this contrast.
            threshold["small_batch_volumes"] = self.threshold.small_batch_volumes
            threshold["small_batch_finding_mass"] = small_batch
        rim = self.threshold.bound("rim_finding_mass", contrast)
        if rim > self.threshold.bound("finding_mass", contrast):
            # Likewise only when the rim has a bound above the rest's.
            threshold["rim_finding_mass"] = rim
        if self.threshold.shortfall_margin > 0:
            # Likewise only when on: it changes which groups exist, so the rate measured without it does not hold.
            threshold["shortfall_margin"] = int(self.threshold.shortfall_margin)
        scoring: dict[str, Any] = {"k_fraction": self.k_fraction, "window_radius": self.window_radius, "method": self.method}
        if self.layer_weights is not None:
            # Only when set, so that the points measured with the plain mean still match.
            scoring["layer_weights"] = [float(weight) for weight in self.layer_weights]
        return {
            "threshold": {key: threshold[key] for key in sorted(threshold)},
            "scoring": scoring,
            "min_brain_fraction": self.min_brain_fraction,
            "registration": self.registration,
            "resolution_fwhm_mm": float(self.resolution_fwhm_mm),
        }
