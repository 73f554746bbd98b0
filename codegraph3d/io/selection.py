"""Brain MR series selection and contrast classification by documented, configurable rules.

Every series of every study gets one :class:`SeriesDecision`: taken (with its contrast, which
names its scoring batch) or skipped with a reason. Checks run in this order; the first that fires
decides:

0. a Study or Series Instance UID that is not a valid UID (output files are named by them);
1. modality not in ``modalities``;
2. SOP class is secondary capture (``secondary_capture_sop_classes``);
3. multi-frame instances (NumberOfFrames > 1: enhanced MR / 4-D), not supported;
4. localizer: ImageType contains a ``localizer_image_types`` value, or the description matches
   ``localizer_patterns``;
5. derived: ImageType[0] in ``derived_image_type_values`` or ImageType[1] in
   ``secondary_image_type_values``;
6. excluded series type (DWI, ADC, perfusion, SWI ...): description matches
   ``excluded_series_types``;
7. header geometry cannot form one 3-D stack (missing geometry, mixed planes, several slices per
   position = 4-D);
8. fewer than ``min_slices`` slices;
9. more than ``max_voxels`` voxels (Rows x Columns x slices), judged from headers before any
   pixel is decoded, so one huge series cannot exhaust a run's memory;
10. contrast (see :func:`classify_contrast`) not in ``scored_contrasts``.

Rules are the plain dict :data:`DEFAULT_SELECTION_RULES`; a configuration file overrides any of
its keys through :meth:`SelectionRules.from_dict`. Patterns are Python regular expressions,
matched case-insensitively with ``re.search`` against SeriesDescription (lower-cased, with ``_``
read as a space so that word boundaries work in names like ``t1_mprage_post``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from codegraph3d.io.dicom import ScanResult, SeriesHeader, Study

__all__ = [
    "CONTRASTS",
    "DEFAULT_SELECTION_RULES",
    "SelectionRules",
    "SeriesDecision",
    "classify_contrast",
    "select_series",
    "form_batches",
]

logger = logging.getLogger(__name__)

#: Contrast labels the classifier can return.
CONTRASTS: tuple[str, ...] = ("T1w", "T1w-CE", "T2w", "FLAIR", "other")

#: Default rules. Each key, and what it does:
DEFAULT_SELECTION_RULES: dict[str, Any] = {
    # Modalities that may be scored (DICOM Modality, upper case).
    "modalities": ["MR"],
    # Fewest slices (files) a series needs; thick-slab or partial-coverage series are skipped.
    "min_slices": 20,
    # Largest series loaded, in voxels (Rows x Columns x slices; 512 x 512 x 384, a 0.5 mm
    # whole-head 3-D acquisition); larger ones are skipped with the size in the reason. Each
    # preprocessing worker needs about 0.5 GB + 30 bytes per voxel: two workers on series of this
    # size peaked at 8.2 GB for the whole run, inside app.yaml's 8Gi (docs/RESULTS.md).
    "max_voxels": 100_663_296,
    # Contrasts that are scored; every other contrast is skipped with
    # "contrast X not in scored contrasts". Each scored contrast forms its own batch.
    "scored_contrasts": ["T2w", "T1w"],
    # SOP Class UIDs of secondary capture images (screenshots, reports burnt into pixels).
    "secondary_capture_sop_classes": [
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    ],
    # ImageType values (any position) that mark a localizer.
    "localizer_image_types": ["LOCALIZER"],
    # Description patterns of localizers / scouts / survey scans.
    "localizer_patterns": [
        r"locali[sz]er",
        r"scout",
        r"survey",
        r"3[- ]?plane",
        r"tri[- ]?pilot",
        r"(?<![a-z0-9])loc(?![a-z0-9])",
        r"(?<![a-z0-9])aa[- ]?head",
    ],
    # ImageType[0] values of derived images (reformats, MIPs, maps).
    "derived_image_type_values": ["DERIVED"],
    # ImageType[1] values of secondary images.
    "secondary_image_type_values": ["SECONDARY"],
    # Series types that are never scored: label -> description pattern. The label is the reason.
    "excluded_series_types": {
        "DWI": r"dwi|diffusion|(?<![a-z0-9])(dti|trace|tensor|ep2d[- ]?diff|resolve)(?![a-z0-9])",
        "ADC": r"(?<![a-z0-9])adc(?![a-z0-9])|apparent diffusion|(?<![a-z0-9])fa(?![a-z0-9])",
        "perfusion": r"perf|(?<![a-z0-9])(dsc|dce|asl|pcasl|pasl|cbf|cbv|mtt|ttp)(?![a-z0-9])",
        "SWI": r"swi|swan|susceptib|(?<![a-z0-9])(mip|minip|pha|phase)(?![a-z0-9])",
    },
    # Contrast from description, tried in this order; the first label whose pattern matches wins.
    # "other" first so that T2* / PD / angiography names are not read as T2w or T1w.
    "contrast_patterns": {
        "other": (
            r"t2\s*\*|t2[- ]?star|proton density"
            r"|(?<![a-z0-9])(pd|pdw|tof|mra|angio)(?![a-z0-9])"
        ),
        # T1-FLAIR (GE) is T1-weighted: left to the T1w pattern.
        "FLAIR": r"(?<!t1)(?<!t1 )(?<!t1-)flair|dark[- ]?fluid|tirm",
        "T2w": r"t2",
        "T1w": r"t1|mp[- ]?rage|spgr|bravo|tfl|mp2rage|(?<![a-z0-9])(tfe|vibe|fspgr)(?![a-z0-9])",
    },
    # Description patterns meaning contrast-enhanced (turn T1w into T1w-CE).
    "contrast_enhanced_pattern": (
        r"\+\s*c(?![a-z0-9])|(?<![a-z0-9])c\+"
        r"|(?<![a-z0-9])post(?![a-z])|post[- ]?(contrast|gad|gd|c)"
        r"|(?<![a-z0-9])(gad|gado|gd|ce|enh)(?![a-z])|contrast|enhanc"
    ),
    # Description patterns meaning explicitly without contrast (checked first; win over the above).
    "non_enhanced_pattern": (
        r"pre[- ]?(contrast|gad|gd|c(?![a-z]))"
        r"|(?<![a-z0-9])(pre|nativ|native|non[- ]?contrast)(?![a-z])"
    ),
    # ContrastBolusAgent values that mean no agent was given.
    "no_agent_values": ["", "NONE", "NO", "N/A", "NA", "0", "-"],
    # Timing fallbacks (ms) when no description pattern matched; tried in this order.
    "timing": {
        # FLAIR: long inversion and long echo.
        "flair_min_ti": 1500.0,
        "flair_min_te": 70.0,
        # T2w: long echo and long repetition.
        "t2_min_te": 70.0,
        "t2_min_tr": 1800.0,
        # T1w (spin echo / spoiled gradient echo): short echo and short repetition.
        "t1_max_te": 30.0,
        "t1_max_tr": 1000.0,
        # T1w (MPRAGE-like inversion recovery): inversion in this range and a short echo.
        "t1_ir_ti_range": [700.0, 1200.0],
        "t1_ir_max_te": 10.0,
    },
}


def _merged_rules(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`DEFAULT_SELECTION_RULES` with ``overrides`` applied (``timing`` merged key by key)."""
    raw: dict[str, Any] = {k: v for k, v in DEFAULT_SELECTION_RULES.items()}
    raw["timing"] = dict(DEFAULT_SELECTION_RULES["timing"])
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_SELECTION_RULES:
            raise ValueError(
                f"unknown selection rule {key!r}; "
                f"valid keys: {', '.join(DEFAULT_SELECTION_RULES)}"
            )
        default = DEFAULT_SELECTION_RULES[key]
        expected = (list, tuple) if isinstance(default, list) else type(default)
        # A YAML scalar where a list belongs ("modalities: MR") would be split into letters.
        if not isinstance(value, expected) or isinstance(value, bool) != isinstance(
            default, bool
        ):
            raise ValueError(
                f"selection rule {key} must be a {type(default).__name__} like the default "
                f"{default!r}; got {value!r}"
            )
        if key == "timing":
            unknown = set(value) - set(DEFAULT_SELECTION_RULES["timing"])
            if unknown:
                raise ValueError(
                    f"unknown selection timing rule(s) {sorted(unknown)}; valid: "
                    f"{', '.join(DEFAULT_SELECTION_RULES['timing'])}"
                )
            raw["timing"].update(value)
        else:
            raw[key] = value
    return raw


def _compile_rule(key: str, pattern: str) -> re.Pattern[str]:
    """Compile one rule's pattern, case-insensitive; a ``ValueError`` naming the rule if invalid."""
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(
            f"selection rule {key}: invalid regular expression {pattern!r}: {exc}"
        ) from exc


def _checked_scored_contrasts(raw: Mapping[str, Any]) -> tuple[str, ...]:
    """Validate the non-pattern values of merged rules; return the scored contrasts."""
    scored = tuple(raw["scored_contrasts"])
    bad = [c for c in scored if c not in CONTRASTS]
    if bad or not scored:
        raise ValueError(
            f"selection rule scored_contrasts: {bad or 'empty'}; "
            f"choose from {', '.join(CONTRASTS)}"
        )
    if not isinstance(raw["min_slices"], int) or raw["min_slices"] < 1:
        raise ValueError(
            f"selection rule min_slices must be a positive integer; got {raw['min_slices']!r}"
        )
    if isinstance(raw["max_voxels"], bool) or not isinstance(raw["max_voxels"], int) or raw["max_voxels"] < 1:
        raise ValueError(
            f"selection rule max_voxels must be a positive integer; got {raw['max_voxels']!r}"
        )
    unknown_labels = set(raw["contrast_patterns"]) - set(CONTRASTS)
    if unknown_labels:
        raise ValueError(
            f"selection rule contrast_patterns: unknown label(s) {sorted(unknown_labels)}; "
            f"choose from {', '.join(CONTRASTS)}"
        )
    return scored


@dataclass(frozen=True)
class SelectionRules:
    """Compiled selection rules; build with :meth:`from_dict` (defaults when called without args).

    Attributes mirror the keys of :data:`DEFAULT_SELECTION_RULES`; patterns are compiled.
    """

    raw: dict[str, Any]
    modalities: frozenset[str]
    min_slices: int
    max_voxels: int
    scored_contrasts: tuple[str, ...]
    secondary_capture_sop_classes: frozenset[str]
    localizer_image_types: frozenset[str]
    localizer_patterns: tuple[re.Pattern[str], ...]
    derived_image_type_values: frozenset[str]
    secondary_image_type_values: frozenset[str]
    excluded_series_types: dict[str, re.Pattern[str]]
    contrast_patterns: dict[str, re.Pattern[str]]
    contrast_enhanced_pattern: re.Pattern[str]
    non_enhanced_pattern: re.Pattern[str]
    no_agent_values: frozenset[str]
    timing: dict[str, Any]

    @classmethod
    def from_dict(cls, overrides: Mapping[str, Any] | None = None) -> SelectionRules:
        """Merge ``overrides`` onto :data:`DEFAULT_SELECTION_RULES`, validate and compile.

        Top-level keys replace the default value, except ``timing``, whose keys are merged.

        Raises
        ------
        ValueError
            Unknown key, bad value or invalid regular expression (the message names the key).
        """
        raw = _merged_rules(overrides)
        scored = _checked_scored_contrasts(raw)
        return cls(
            raw=raw,
            modalities=frozenset(str(m).upper() for m in raw["modalities"]),
            min_slices=int(raw["min_slices"]),
            max_voxels=int(raw["max_voxels"]),
            scored_contrasts=scored,
            secondary_capture_sop_classes=frozenset(raw["secondary_capture_sop_classes"]),
            localizer_image_types=frozenset(str(v).upper() for v in raw["localizer_image_types"]),
            localizer_patterns=tuple(
                _compile_rule("localizer_patterns", p) for p in raw["localizer_patterns"]
            ),
            derived_image_type_values=frozenset(
                str(v).upper() for v in raw["derived_image_type_values"]
            ),
            secondary_image_type_values=frozenset(
                str(v).upper() for v in raw["secondary_image_type_values"]
            ),
            excluded_series_types={
                k: _compile_rule("excluded_series_types", p)
                for k, p in raw["excluded_series_types"].items()
            },
            contrast_patterns={
                k: _compile_rule("contrast_patterns", p)
                for k, p in raw["contrast_patterns"].items()
            },
            contrast_enhanced_pattern=_compile_rule(
                "contrast_enhanced_pattern", raw["contrast_enhanced_pattern"]
            ),
            non_enhanced_pattern=_compile_rule(
                "non_enhanced_pattern", raw["non_enhanced_pattern"]
            ),
            no_agent_values=frozenset(str(v).strip().upper() for v in raw["no_agent_values"]),
            timing=raw["timing"],
        )


@dataclass
class SeriesDecision:
    """The selection outcome for one series.

    Parameters
    ----------
    study_instance_uid, series_instance_uid, patient_id, series_description : str
        Identity of the series.
    taken : bool
        Whether the series is scored.
    contrast : str or None
        One of :data:`CONTRASTS`; ``None`` when the series was skipped before classification.
    reason : str
        Why it was skipped, or ``"selected"``.
    rule : str
        Which classification rule decided the contrast (``""`` when not classified).
    series : SeriesHeader or None
        The series itself (for loading); not part of equality.
    """

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    series_description: str
    taken: bool
    contrast: str | None
    reason: str
    rule: str = ""
    series: SeriesHeader | None = field(default=None, repr=False, compare=False)

    @property
    def batch(self) -> str | None:
        """Name of the scoring batch (the contrast) for a taken series, else ``None``."""
        return self.contrast if self.taken else None


def _normalise(description: str) -> str:
    # Underscores are word characters for \b; scanners use them as separators.
    return description.lower().replace("_", " ")


def classify_contrast(series: SeriesHeader, rules: SelectionRules | None = None) -> tuple[str, str]:
    """Classify a series' contrast and say which rule decided.

    Description patterns (``contrast_patterns``, in order) first; else timing fallbacks:
    TI > ``flair_min_ti`` and TE > ``flair_min_te`` -> FLAIR; TE >= ``t2_min_te`` and
    TR >= ``t2_min_tr`` -> T2w; TE <= ``t1_max_te`` and TR <= ``t1_max_tr`` -> T1w; TI within
    ``t1_ir_ti_range`` and TE <= ``t1_ir_max_te`` -> T1w; else ``"other"``. A T1w series is
    T1w-CE when the description says so (``contrast_enhanced_pattern``, unless
    ``non_enhanced_pattern`` matches) or ContrastBolusAgent names an agent.

    Returns
    -------
    (str, str)
        The contrast (one of :data:`CONTRASTS`) and the deciding rule, e.g.
        ``"description:T2w"``, ``"timing:TE>=70,TR>=1800"``,
        ``"description:T1w+ContrastBolusAgent"``.
    """
    rules = rules or SelectionRules.from_dict()
    desc = _normalise(series.series_description)
    contrast, rule = None, ""
    for label, pattern in rules.contrast_patterns.items():
        if desc and pattern.search(desc):
            contrast, rule = label, f"description:{label}"
            break
    if contrast is None:
        t = rules.timing
        te, tr, ti = series.echo_time, series.repetition_time, series.inversion_time
        lo, hi = t["t1_ir_ti_range"]
        if ti is not None and te is not None and ti > t["flair_min_ti"] and te > t["flair_min_te"]:
            contrast, rule = "FLAIR", f"timing:TI>{t['flair_min_ti']:g},TE>{t['flair_min_te']:g}"
        elif te is not None and tr is not None and te >= t["t2_min_te"] and tr >= t["t2_min_tr"]:
            contrast, rule = "T2w", f"timing:TE>={t['t2_min_te']:g},TR>={t['t2_min_tr']:g}"
        elif te is not None and tr is not None and te <= t["t1_max_te"] and tr <= t["t1_max_tr"]:
            contrast, rule = "T1w", f"timing:TE<={t['t1_max_te']:g},TR<={t['t1_max_tr']:g}"
        elif ti is not None and te is not None and lo <= ti <= hi and te <= t["t1_ir_max_te"]:
            contrast, rule = "T1w", f"timing:TI in [{lo:g},{hi:g}],TE<={t['t1_ir_max_te']:g}"
        else:
            return "other", "no description pattern or timing rule matched"
    if contrast in ("T1w", "T1w-CE"):
        if desc and rules.non_enhanced_pattern.search(desc):
            return "T1w", rule + "+description:non-enhanced"
        if contrast == "T1w-CE":
            return contrast, rule
        if desc and rules.contrast_enhanced_pattern.search(desc):
            return "T1w-CE", rule + "+description:enhanced"
        if series.contrast_agent.strip().upper() not in rules.no_agent_values:
            return "T1w-CE", rule + "+ContrastBolusAgent"
    return contrast, rule


# PS3.5 9.1: digits and dots, at most 64 characters. Output file names are built from UIDs, so a
# series whose UID is anything else (a path, say) is never scored.
_VALID_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a DICOM UID: digits separated by dots, at most 64 characters."""
    return isinstance(uid, str) and len(uid) <= 64 and _VALID_UID.match(uid) is not None


def _skip_reason(series: SeriesHeader, rules: SelectionRules) -> str | None:
    for keyword, uid in (("StudyInstanceUID", series.study_instance_uid), ("SeriesInstanceUID", series.series_instance_uid)):
        if not is_valid_uid(uid):
            shown = repr(uid) if len(uid) <= 70 else repr(uid[:67]) + "..."
            return f"{keyword} {shown} is not a valid DICOM UID (output files are named by it)"
    desc = _normalise(series.series_description)
    if series.modality not in rules.modalities:
        return (
            f"modality {series.modality or 'missing'} is not {'/'.join(sorted(rules.modalities))}"
        )
    if series.sop_class_uid in rules.secondary_capture_sop_classes:
        return "secondary capture image"
    if series.max_number_of_frames > 1:
        return (
            f"multi-frame instances ({series.max_number_of_frames} frames; enhanced MR or 4-D) "
            "not supported: export the series as single-frame slices"
        )
    image_type = series.image_type
    if rules.localizer_image_types & set(image_type):
        return "localizer (ImageType)"
    for pattern in rules.localizer_patterns:
        if desc and pattern.search(desc):
            return f"localizer (description matches {pattern.pattern!r})"
    if image_type[:1] and image_type[0] in rules.derived_image_type_values:
        return f"derived image (ImageType {'/'.join(image_type)})"
    if image_type[1:2] and image_type[1] in rules.secondary_image_type_values:
        return f"secondary image (ImageType {'/'.join(image_type)})"
    for label, pattern in rules.excluded_series_types.items():
        if desc and pattern.search(desc):
            return f"excluded series type {label}"
    problem = series.geometry_problem()
    if problem is not None:
        return problem
    if series.number_of_slices < rules.min_slices:
        return f"{series.number_of_slices} slices, fewer than min_slices={rules.min_slices}"
    voxels = (series.rows or 0) * (series.columns or 0) * series.number_of_slices
    if voxels > rules.max_voxels:
        return (
            f"very large series: {series.rows}x{series.columns}x{series.number_of_slices} = "
            f"{voxels:,} voxels, more than max_voxels={rules.max_voxels:,}; raise selection.max_voxels "
            "with the memory request (each preprocessing worker needs about 0.5 GB + 30 bytes per voxel)"
        )
    return None


def _iter_series(
    source: ScanResult | Iterable[Study] | Iterable[SeriesHeader],
) -> Iterable[SeriesHeader]:
    items = source.studies if isinstance(source, ScanResult) else source
    for item in items:
        if isinstance(item, Study):
            yield from item.series
        elif isinstance(item, SeriesHeader):
            yield item
        else:
            raise TypeError(
                "select_series expects a ScanResult, Studies or SeriesHeaders; "
                f"got {type(item).__name__}"
            )


def select_series(
    source: ScanResult | Iterable[Study] | Iterable[SeriesHeader],
    rules: SelectionRules | Mapping[str, Any] | None = None,
) -> list[SeriesDecision]:
    """Decide, for every series, whether it is scored, its contrast and the reason.

    Logs one INFO line per series: study UID, series UID, decision, reason, batch.

    Parameters
    ----------
    source : ScanResult or iterable of Study or iterable of SeriesHeader
        What :func:`~codegraph3d.io.dicom.scan_headers` found.
    rules : SelectionRules or mapping or None
        Rules, or overrides of :data:`DEFAULT_SELECTION_RULES`; ``None`` for the defaults.

    Returns
    -------
    list of SeriesDecision
        In input order (studies, then series).
    """
    if not isinstance(rules, SelectionRules):
        rules = SelectionRules.from_dict(rules)
    decisions = []
    for series in _iter_series(source):
        reason = _skip_reason(series, rules)
        contrast, rule = (None, "") if reason is not None else classify_contrast(series, rules)
        if reason is None and contrast not in rules.scored_contrasts:
            reason = (
                f"contrast {contrast} not in scored contrasts ({', '.join(rules.scored_contrasts)})"
            )
        decision = SeriesDecision(
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            patient_id=series.patient_id,
            series_description=series.series_description,
            taken=reason is None,
            contrast=contrast,
            reason=reason or "selected",
            rule=rule,
            series=series,
        )
        logger.info(
            "study=%s series=%s decision=%s reason=%s batch=%s description=%r rule=%s",
            decision.study_instance_uid,
            decision.series_instance_uid,
            "take" if decision.taken else "skip",
            decision.reason,
            decision.batch or "-",
            decision.series_description,
            decision.rule or "-",
        )
        decisions.append(decision)
    return decisions


def form_batches(decisions: Iterable[SeriesDecision]) -> dict[str, list[SeriesDecision]]:
    """Group taken series by contrast; a batch never mixes contrasts.

    Returns
    -------
    dict
        Contrast -> decisions in input order; keys in :data:`CONTRASTS` order, only non-empty.
    """
    batches: dict[str, list[SeriesDecision]] = {}
    for decision in decisions:
        if decision.taken:
            if decision.contrast is None:
                raise ValueError(f"taken series {decision.series_instance_uid} has no contrast")
            batches.setdefault(decision.contrast, []).append(decision)
    return {
        c: batches[c]
        for c in sorted(
            batches, key=lambda c: CONTRASTS.index(c) if c in CONTRASTS else len(CONTRASTS)
        )
    }
