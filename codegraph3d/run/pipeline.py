"""The stages of a run, as plain functions the SDK operators call one by one.

``scan_input -> select_input -> tokenise_selected -> score_batches -> write_results``

Each stage takes and returns plain objects, so the whole chain runs (and is tested) without the
MONAI Deploy SDK. Series-level problems (a corrupt series, an empty brain mask, a contrast batch
of one) skip that series with a recorded reason; run-level problems (nothing to score) raise
:class:`CohortError`, which the app turns into exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from codegraph3d.store.cache import CachedSeries, CacheEntryError, TokenCache, key_material, read_source_headers
from codegraph3d.features.encoders import SliceEncoder, load_encoder
from codegraph3d.io.dicom import ScanResult, chunk_studies, scan_headers
from codegraph3d.io.selection import SeriesDecision, select_series
from codegraph3d.run.config import RunConfig, ScoringSettings
from codegraph3d.decision.lesion_policy import LESION_POLICY_NAME, LesionPolicy, decide_lesions
from codegraph3d.scoring.maps import token_voxel_map
from codegraph3d.preprocess.workers import PreprocessSetup, SeriesJob, SeriesOutcome, StudyPreprocessor, available_cpus, resolve_workers
from codegraph3d.preprocess.chain import PreprocessedVolume, resample_to_source
from codegraph3d.core.progress import StageClock
from codegraph3d.core.ray_runtime import RETRIES, ClusterError, alive_nodes, capped_memory, ray_runtime
from codegraph3d.scoring.batch import BatchScores, known_scores_pay, score_batch
from codegraph3d.scoring.musc import BankGroup
from codegraph3d.store.bank_scores import keep_bank_scores, load_bank_scores
from codegraph3d.decision.thresholds import (
    ThresholdDecision,
    decide_thresholds,
    decide_thresholds_from_reference,
    score_to_unit_mapping,
    to_unit,
)
from codegraph3d.features.tokens import TokenSet, encode_volume, project
from codegraph3d.core.volume import index_to_physical_matrix

__all__ = [
    "CohortError",
    "Selection",
    "TokenisedSeries",
    "Tokenisation",
    "ScoredBatch",
    "Scoring",
    "StageTimer",
    "build_encoder",
    "open_cache",
    "scan_input",
    "select_input",
    "tokenise_selected",
    "bank_groups",
    "bank_scores_reusable",
    "decided_against_bank",
    "series_sharing_the_bank",
    "scoring_work",
    "batch_chunks",
    "open_bank",
    "score_batches",
    "series_outputs",
    "update_bank",
]

logger = logging.getLogger(__name__)


class CohortError(RuntimeError):
    """The input as a whole cannot be scored (exit code 2); the message says why and what to do."""


class StageTimer:
    """Wall-clock seconds per stage, accumulated across calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str) -> "_Timing":
        return _Timing(self, stage)


class _Timing:
    def __init__(self, timer: StageTimer, stage: str) -> None:
        self.timer, self.stage = timer, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timer.seconds[self.stage] += time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------
# load and select


def scan_input(input_path: str | Path) -> ScanResult:
    """Read every DICOM header under ``input_path`` (pixels are read later, per chunk).

    Raises
    ------
    CohortError
        When the folder does not exist or holds no readable DICOM file.
    """
    root = Path(input_path)
    if not root.exists():
        raise CohortError(f"input folder {root} does not exist; pass an existing folder with -i")
    scan = scan_headers(root)
    for path, reason in scan.bad_files:
        logger.warning("skipped file %s: %s", path, reason)
    if not scan.studies:
        detail = f"; {len(scan.bad_files)} file(s) could not be read" if scan.bad_files else ""
        raise CohortError(
            f"no readable DICOM study found under {root}{detail}; put DICOM studies "
            "(<study>/<series>/<instance>.dcm or any nesting) in the input folder"
        )
    logger.info(
        "found %d studies, %d series (%d unreadable, %d non-DICOM files ignored) under %s",
        len(scan.studies), len(scan.series), len(scan.bad_files), len(scan.ignored_files), root,
    )
    return scan


@dataclass
class Selection:
    """What the selector decided for every series of the input."""

    scan: ScanResult
    decisions: list[SeriesDecision]

    @property
    def taken(self) -> list[SeriesDecision]:
        return [d for d in self.decisions if d.taken]


def select_input(scan: ScanResult, config: RunConfig) -> Selection:
    """Apply the selection rules (``config.selection``) to every series.

    Raises
    ------
    CohortError
        When no series qualifies (no MR brain series of a scored contrast).
    """
    rules = config.selection
    decisions = select_series(scan, rules)
    selection = Selection(scan=scan, decisions=decisions)
    if not selection.taken:
        reasons = sorted({d.reason for d in decisions})
        raise CohortError(
            "no brain MR series to score: every series was skipped ("
            + "; ".join(reasons[:5])
            + f"). The product scores {', '.join(rules.scored_contrasts)} MR series of at least "
            f"{rules.min_slices} slices; check the input or the selection rules."
        )
    return selection


# ---------------------------------------------------------------------------------------------
# preprocess and tokenise


def build_encoder(config: RunConfig, model_path: str | Path | None) -> SliceEncoder:
    """Create the encoder the configuration names; missing weights are a :class:`CohortError`."""
    settings = config.encoder
    name = settings.name
    options: dict[str, Any] = {"device": settings.device}
    if name == "intensity":
        options["patch_size"] = settings.patch_size
    else:
        options["layers"] = list(settings.layers)
        options["seed"] = settings.seed
        if name == "untrained-tiny":
            options["patch_size"] = settings.patch_size
        if name == "dinov2" and settings.weights:
            options["weights"] = settings.weights
    try:
        encoder = load_encoder(name, model_path, **options)
    except FileNotFoundError as error:
        raise CohortError(str(error)) from error
    except ValueError as error:
        raise CohortError(f"encoder {name!r} cannot be loaded: {error}") from error
    weights = config.scoring.layer_weights
    if weights is not None and len(weights) != len(encoder.layer_names):
        raise CohortError(
            f"scoring.layer_weights has {len(weights)} weights but encoder {name!r} gives {len(encoder.layer_names)} "
            f"layers ({', '.join(map(str, encoder.layer_names))}); give one weight per layer, in that order, or null"
        )
    expected = settings.family_patch_size
    if encoder.patch_size != expected:
        raise CohortError(
            f"encoder {name!r} has patch size {encoder.patch_size}, not the {expected} its family has; "
            "the working grid would not match its tokens. Use DINOv2 weights of a /14 model."
        )
    banner = "=" * 78
    if not encoder.pretrained:
        logger.warning("%s\nENCODER: %s\n%s", banner, encoder.description, banner)
    else:
        logger.info("encoder: %s (weights sha256 %s)", encoder.description, encoder.weights_sha256)
    return encoder


@dataclass
class TokenisedSeries:
    """A selected series after preprocessing and tokenisation: all later stages need."""

    decision: SeriesDecision
    datasets: list[Dataset]
    prepared: PreprocessedVolume
    tokens: TokenSet
    qa: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tokenisation:
    """Outcome of :func:`tokenise_selected`."""

    series: list[TokenisedSeries]
    skipped: dict[str, str]  # series UID -> reason
    encoder: dict[str, Any]
    skipped_qa: dict[str, dict[str, Any]] = field(default_factory=dict)  # QA of series that failed it
    landmarks: dict[str, Any] | None = None  # Nyul references in effect (part of token identity)


def open_cache(config: RunConfig) -> TokenCache | None:
    """The token cache ``cache.folder`` names, or ``None`` when it is off (``""``).

    Raises
    ------
    CohortError
        When the folder cannot be used (a file of that name, not writable).
    """
    if not config.cache.folder:
        return None
    try:
        return TokenCache(config.cache.folder)
    except ValueError as error:
        raise CohortError(str(error)) from error


def _series_info(decision: SeriesDecision) -> dict[str, Any]:
    return {
        "study_instance_uid": decision.study_instance_uid,
        "patient_id": decision.patient_id,
        "series_description": decision.series_description,
        "contrast": decision.contrast,
    }


def _from_cache(
    decision: SeriesDecision, cache: TokenCache, material: Mapping[str, Any]
) -> tuple[CachedSeries | None, list[Dataset], str]:
    """A verified entry and its source headers, or ``(None, [], status)`` when it must be built."""
    lookup = cache.load(material)
    if lookup.entry is None:
        return None, [], "rebuilt" if lookup.status == "invalid" else "miss"
    try:
        # The SEG writer needs the source headers in z order; pixels are not read on a hit.
        datasets = read_source_headers(decision.series, lookup.entry.sop_instance_uids)
    except CacheEntryError as error:
        logger.warning("token cache entry of series %s not used, rebuilding it: %s", decision.series_instance_uid, error)
        return None, [], "rebuilt"
    return lookup.entry, datasets, "hit"


def _encode_outcome(
    decision: SeriesDecision,
    outcome: SeriesOutcome,
    config: RunConfig,
    encoder: SliceEncoder,
    cache: TokenCache | None,
    material: Mapping[str, Any] | None,
) -> CachedSeries:
    """Encode a preprocessed series and store it in the cache (when one is configured)."""
    start = time.perf_counter()
    prepared = outcome.prepared
    encoded = outcome.encoded  # encoded where it was preprocessed (the Ray backend's actors)
    if encoded is None:
        encoded = encode_volume(
            prepared.image,
            prepared.brain_mask,
            encoder,
            grid_size=config.tokens.grid_size,
            min_brain_fraction=config.tokens.min_brain_fraction,
            batch_size=config.encoder.batch_size,
        )
    # The scorer and writer need only the mask and geometry: drop the image to bound memory.
    prepared.image = np.zeros((0, 0, 0), np.float32)
    entry = CachedSeries(
        encoded=encoded,
        prepared=prepared,
        sop_instance_uids=outcome.sop_instance_uids,
        files=outcome.files,
        skipped_files=outcome.skipped_files,
        series=_series_info(decision),
    )
    if cache is not None and material is not None:
        try:
            cache.store(material, entry, build_seconds=outcome.seconds + outcome.seconds_encode + time.perf_counter() - start)
        except (OSError, ValueError) as error:
            # The cache only saves time: a full disk must not fail the run.
            logger.warning("token cache: could not store series %s (%s)", decision.series_instance_uid, error)
    return entry


def _finish(
    decision: SeriesDecision, entry: CachedSeries, datasets: list[Dataset], status: str, config: RunConfig
) -> TokenisedSeries:
    """Project a series' tokens and assemble its QA record."""
    tokens = project(
        entry.encoded, projection_dim=config.tokens.projection_dim, projection_seed=config.tokens.projection_seed,
    )
    qa = {
        "brain_volume_ml": round(entry.prepared.brain_volume_ml, 2),
        "tokens_kept": tokens.n_tokens,
        "skipped_files": [f"{path}: {reason}" for path, reason in entry.skipped_files],
        "geometry": entry.prepared.to_dict(),
        "token_cache": status,
        **entry.prepared.qa,
    }
    return TokenisedSeries(decision=decision, datasets=datasets, prepared=entry.prepared, tokens=tokens, qa=qa)


def preprocess_setup(
    config: RunConfig, model_path: str | Path | None, workers: int = 1
) -> PreprocessSetup:
    """The worker settings of a run: preprocessing, model folder, device, threads per worker.

    Threads are set explicitly for worker processes and for every Ray actor (Ray would otherwise
    leave each one ``OMP_NUM_THREADS`` = its CPUs); a single local worker keeps the libraries' own.
    """
    ray = config.execution.backend == "ray"
    threads = max(1, available_cpus() // workers) if workers > 1 or ray else 0
    return PreprocessSetup(
        config=config.preprocess.chain,
        model_path=None if model_path is None else str(model_path),
        device=str(config.encoder.device),
        threads=threads,
        contrasts=tuple(config.selection.scored_contrasts),
    )


def _start_preprocessor(
    config: RunConfig, setup: PreprocessSetup, workers: int, encoder: SliceEncoder, model_path: str | Path | None,
) -> StudyPreprocessor:
    """The entered study preprocessor of ``execution.backend``: local worker processes, or Ray.

    On Ray, studies are preprocessed as tasks and encoded by encoder actors inside the cluster
    (:mod:`codegraph3d.features.ray_encoders`); locally this process encodes.
    """
    if config.execution.backend != "ray":
        return StudyPreprocessor(setup, workers).__enter__()
    from codegraph3d.features.ray_encoders import RayEncoders
    from codegraph3d.preprocess.ray_workers import RayStudyPreprocessor

    pool = RayStudyPreprocessor(setup, workers, address=config.execution.ray_address).__enter__()
    try:
        encoders = RayEncoders(
            pool.ray, functools.partial(build_encoder, config, model_path), encoder.identity(),
            grid_size=config.tokens.grid_size, min_brain_fraction=config.tokens.min_brain_fraction,
            batch_size=config.encoder.batch_size, threads=setup.threads,
        )
    except BaseException:
        pool.__exit__(None, None, None)
        raise
    pool.follow_with(encoders.follow, encoders.stop)
    logger.info("ray: %s", encoders.where)
    return pool


def landmark_material(config: RunConfig, model_path: str | Path | None) -> dict[str, Any] | None:
    """The Nyul references a run uses per scored contrast (part of the token cache key), or None."""
    from codegraph3d.preprocess.intensity import load_reference_landmarks

    chain = config.preprocess.chain
    if chain.intensity_scaling != "landmarks":
        return None
    try:
        return {
            contrast: load_reference_landmarks(contrast, model_path, chain.landmark_percentiles).to_dict()
            for contrast in config.selection.scored_contrasts
        }
    except (ValueError, OSError) as error:
        raise CohortError(f"intensity reference landmarks cannot be loaded: {error}") from error


@dataclass
class _TokenisationRun:
    """State of one :func:`tokenise_selected` call: the result so far, the cache and the progress count."""

    config: RunConfig
    encoder: SliceEncoder
    timer: StageTimer
    progress: Callable[[int, int], None] | None
    cache: TokenCache | None
    result: Tokenisation
    total: int
    done: int = 0
    plans: dict[str, tuple[SeriesDecision, Mapping[str, Any] | None, str]] = field(default_factory=dict)

    def advance(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def skip(self, decision: SeriesDecision, reason: str) -> None:
        logger.warning(
            "study=%s series=%s decision=skip reason=%s",
            decision.study_instance_uid, decision.series_instance_uid, reason,
        )
        self.result.skipped[decision.series_instance_uid] = reason

    def jobs_of(self, decisions: Sequence[SeriesDecision], pool: StudyPreprocessor) -> list[SeriesJob]:
        """A study's series to preprocess; those the cache holds are finished here, without pixels."""
        jobs: list[SeriesJob] = []
        for decision in decisions:
            status, material, entry, datasets = "off", None, None, []
            if self.cache is not None and decision.series is not None:
                material = key_material(
                    decision.series_instance_uid, [s.sop_instance_uid for s in decision.series.slices],
                    self.config.token_recipe(), self.encoder, self.result.landmarks,
                )
                entry, datasets, status = _from_cache(decision, self.cache, material)
            if entry is not None:
                self.result.series.append(_finish(decision, entry, datasets, status, self.config))
                pool.clock.total -= 1
                self.advance()
                continue
            self.plans[decision.series_instance_uid] = (decision, material, status)
            jobs.append(SeriesJob(decision.series, decision.contrast, decision.series_instance_uid))
        return jobs

    def take(self, outcome: SeriesOutcome) -> None:
        """Encode a preprocessed series (and cache it), or record why it was skipped."""
        decision, material, status = self.plans[outcome.series_instance_uid]
        if outcome.error is not None or outcome.prepared is None:
            self.skip(decision, outcome.error or "could not be preprocessed")
            if outcome.qa:
                self.result.skipped_qa[decision.series_instance_uid] = outcome.qa
        else:
            start = time.perf_counter()
            with self.timer("tokenise"):
                entry = _encode_outcome(decision, outcome, self.config, self.encoder, self.cache, material)
            record = _finish(decision, entry, outcome.datasets, status, self.config)
            record.qa["seconds"] = round(outcome.seconds + outcome.seconds_encode + time.perf_counter() - start, 2)
            record.qa["seconds_preprocess"] = round(outcome.seconds, 2)
            for warning in record.qa.get("warnings", []):
                logger.warning(
                    "study=%s series=%s qa=warning reason=%s",
                    decision.study_instance_uid, decision.series_instance_uid, warning,
                )
            self.result.series.append(record)
        self.advance()


def _log_cache_use(result: Tokenisation, cache: TokenCache | None) -> None:
    if cache is None:
        return
    counts: dict[str, int] = defaultdict(int)
    for record in result.series:
        counts[record.qa["token_cache"]] += 1
    logger.info(
        "token cache %s: %d hit(s), %d miss(es), %d rebuilt", cache.folder,
        counts["hit"], counts["miss"], counts["rebuilt"],
    )


def tokenise_selected(
    selection: Selection,
    config: RunConfig,
    encoder: SliceEncoder,
    timer: StageTimer | None = None,
    progress: Callable[[int, int], None] | None = None,
    model_path: str | Path | None = None,
) -> Tokenisation:
    """Load, preprocess and tokenise every taken series, one chunk of studies at a time.

    Pixels are read only here, chunk by chunk, and only tokens, masks and headers are kept, so
    memory grows with the number of series by megabytes, not by volumes. Studies are loaded and
    preprocessed in ``preprocess.workers`` processes (:mod:`codegraph3d.preprocess.workers`) while this
    process encodes. With ``cache.folder`` set, a series whose verified entry exists skips
    pixels, preprocessing and the encoder (its headers are still read, without pixels, for the
    SEG writer); ``qa.token_cache`` says ``hit``, ``miss`` (built and stored), ``rebuilt`` (a bad
    entry was replaced) or ``off``.

    Raises
    ------
    CohortError
        When nothing could be preprocessed, or a model file preprocessing needs is missing.
    """
    timer = timer or StageTimer()
    taken_by_study: dict[str, list[SeriesDecision]] = defaultdict(list)
    for decision in selection.taken:
        taken_by_study[decision.study_instance_uid].append(decision)
    studies = [study for study in selection.scan.studies if study.study_instance_uid in taken_by_study]
    landmarks = landmark_material(config, model_path)
    run = _TokenisationRun(
        config, encoder, timer, progress, open_cache(config),
        Tokenisation(series=[], skipped={}, encoder=encoder.identity(), landmarks=landmarks), len(selection.taken),
    )
    workers = resolve_workers(int(config.preprocess.workers), len(studies))
    setup = preprocess_setup(config, model_path, workers)
    try:
        pool = _start_preprocessor(config, setup, workers, encoder, model_path)
    except (FileNotFoundError, ValueError, ImportError, OSError, ClusterError) as error:
        raise CohortError(f"preprocessing cannot start: {error}") from error
    try:
        pool.expect(run.total)
        with timer("preprocess_and_tokenise"):
            for chunk in chunk_studies(studies, config.loading.studies_per_chunk):
                pending = [run.jobs_of(taken_by_study[study.study_instance_uid], pool) for study in chunk]
                for _, outcomes in pool.map(pending):
                    for outcome in outcomes:
                        run.take(outcome)
    except ClusterError as error:
        raise CohortError(f"preprocessing on Ray failed: {error}") from error
    finally:
        pool.__exit__(None, None, None)
    result = run.result
    # Cache hits come back before the series built alongside them: restore the selection order.
    order = {decision.series_instance_uid: i for i, decision in enumerate(selection.taken)}
    result.series.sort(key=lambda record: order[record.decision.series_instance_uid])
    _log_cache_use(result, run.cache)
    if not result.series:
        raise CohortError(
            "no selected series could be loaded and preprocessed: "
            + "; ".join(f"{uid}: {reason}" for uid, reason in list(result.skipped.items())[:3])
        )
    return result


# ---------------------------------------------------------------------------------------------
# scoring


def reference_groups(decisions: Sequence[SeriesDecision], exclude_same: str) -> list[Hashable]:
    """Group label per volume: volumes sharing a label never reference each other.

    ``patient_id`` links volumes with the same PatientID or the same study (connected components,
    so a patient's repeat studies and all their series form one group); ``study`` links series
    of one study only; ``none`` links nothing.
    """
    n = len(decisions)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def link(keys: Sequence[str]) -> None:
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            if not key:
                continue
            if key in first:
                parent[find(index)] = find(first[key])
            else:
                first[key] = index

    if exclude_same in ("patient_id", "study"):
        link([d.study_instance_uid for d in decisions])
    if exclude_same == "patient_id":
        link([d.patient_id for d in decisions])
    return [find(i) for i in range(n)]


@dataclass
class ScoredBatch:
    """One scored batch (a contrast, or one chunk of it) after thresholding.

    ``scores`` and ``decision`` cover the input's ``members`` only (in their order); cohort-bank
    volumes that joined the batch as references are listed in ``bank_references`` and, after the
    members, in ``volume_uids`` (the indices CoDeGraph's diagnostics use).
    """

    contrast: str
    members: list[TokenisedSeries]
    scores: BatchScores
    decision: ThresholdDecision
    unit_low: float
    unit_high: float
    chunk: int = 0
    n_chunks: int = 1
    bank_references: list[str] = field(default_factory=list)
    volume_uids: list[str] = field(default_factory=list)
    mask_interpolation: str = "masked"  # output.mask_interpolation: the map the binary mask is cut from
    score_interpolation: str = "zero"  # output.score_interpolation: the raw score map
    min_finding_ml: float = 0.0  # threshold.min_finding_ml: smaller mask components are dropped


@dataclass
class Scoring:
    """Outcome of :func:`score_batches`."""

    batches: list[ScoredBatch]
    skipped: dict[str, str]
    tokenisation: Tokenisation
    errors: dict[str, str] = field(default_factory=dict)  # contrast -> why the batch failed
    bank: dict[str, Any] = field(default_factory=dict)  # folder, settings id, series used (report.json)


def batch_chunks(n_volumes: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Random, seeded, non-overlapping chunks covering ``range(n_volumes)``.

    ``batch_size <= 0`` or ``>= n_volumes``: one chunk of everything (in order). Otherwise
    ``ceil(n / batch_size)`` chunks of near-equal size (sizes differ by at most one, so no chunk is
    a small remainder), drawn from one seeded permutation; each chunk is sorted.
    """
    if batch_size <= 0 or n_volumes <= batch_size:
        return [np.arange(n_volumes)]
    n_chunks = -(-n_volumes // batch_size)
    order = np.random.default_rng(seed).permutation(n_volumes)
    return [np.sort(part) for part in np.array_split(order, n_chunks)]


def _slice_scores(scores: BatchScores, n: int) -> BatchScores:
    """The first ``n`` volumes' part of a batch's scores (the input's members)."""
    return BatchScores(
        token_scores=scores.token_scores[:n],
        volume_scores=scores.volume_scores[:n],
        per_layer=[layer[:n] for layer in scores.per_layer],
        n_references=scores.n_references[:n],
        k=scores.k[:n],
        codegraph=scores.codegraph,
    )


def open_bank(config: RunConfig, tokenisation: Tokenisation, create: bool = False) -> Any:
    """The configured cohort bank, checked against this run's settings; None when off.

    Raises
    ------
    CohortError
        When the bank is missing (and not to be created) or was built with other settings.
    """
    from codegraph3d.store.bank import BankError, CohortBank, bank_settings

    if not config.bank.folder:
        return None
    settings = bank_settings(config.token_recipe(), tokenisation.encoder, tokenisation.landmarks)
    try:
        return CohortBank(config.bank.folder, settings, create=create)
    except BankError as error:
        raise CohortError(str(error)) from error


def _lesion_decision(
    scores: BatchScores, coords: list[np.ndarray], n: int, grid_shape: tuple[int, int, int],
    config: RunConfig, token_ml: float, contrast: str | None = None,
    groups: Sequence[Hashable] | None = None, shared_by: int | None = None,
) -> ThresholdDecision:
    """The lesion policy on a batch's first ``n`` volumes; bank volumes after them, if any, as references.

    ``contrast`` selects the bounds (``threshold.*_by_contrast``); ``None`` or an unlisted
    contrast takes the section-wide ``token_z``, ``finding_mass`` and ``voxel_z``.

    With ``threshold.reference: auto`` the bank volumes (studies added to the bank as normal
    looking) alone give the per-position statistics; without bank volumes, or with ``batch``,
    every volume of the batch does, and only the input's volumes are decided. Where the bank's
    volumes give the statistics, ``threshold.with_bank``'s bounds replace the section's.
    """
    banked = config.threshold.reference == "auto" and len(scores.token_scores) > n
    # threshold.with_bank's bounds where the bank's volumes give the statistics (too few join the batch).
    with_bank = decided_against_bank(len(scores.token_scores) - n, config)
    # Without registration a grid position holds different anatomy in every volume.
    policy = dataclasses.replace(config.threshold.lesion_policy(contrast, with_bank=with_bank),
                                 by_position=config.preprocess.chain.registration != "none")
    if banked:
        outcome = decide_lesions(
            scores.token_scores[:n], coords[:n], grid_shape, policy, token_ml=token_ml,
            reference_scores=scores.token_scores[n:], reference_coords=coords[n:],
            reference_groups=None if groups is None else list(groups)[n:], shared_by=shared_by if with_bank else None,
        )
    else:
        outcome = decide_lesions(scores.token_scores, coords, grid_shape, policy, token_ml=token_ml)
    return ThresholdDecision(
        # The bound in effect: calibrated on the bank's volumes when threshold.bank_false_flag_rate asks.
        volume_threshold=outcome.policy.finding_mass, voxel_threshold=outcome.policy.voxel_z, flagged=outcome.flagged[:n],
        policy=LESION_POLICY_NAME, params={**outcome.params, "n_bank_volumes": len(scores.token_scores) - n},
        mask_values=outcome.mask_values[:n], z_values=outcome.z[:n], findings=outcome.findings[:n], units="z",
        rim_threshold=outcome.policy.rim_bound if outcome.policy.rim_bound > outcome.policy.finding_mass else None,
    )


def score_configured(
    layer_sets: Sequence[Sequence[np.ndarray]],
    groups: Sequence[Hashable],
    coords: Sequence[np.ndarray],
    grid_shape: tuple[int, int, int],
    settings: ScoringSettings,
    on_layer_done: Callable[[int, int], None] | None = None,
    known_scores: Sequence[Sequence[np.ndarray]] | None = None,
) -> BatchScores:
    """:func:`codegraph3d.scoring.batch.score_batch` with the ``scoring`` section's settings (the app's call).

    ``known_scores`` (``[layer][volume]``): the trailing cohort-bank volumes' scores kept from an
    earlier batch (:mod:`codegraph3d.store.bank_scores`); only the leading volumes are scored then.
    """
    return score_batch(
        layer_sets,
        k_fraction=settings.k_fraction,
        groups=groups,
        device=None if settings.device == "auto" else settings.device,
        chunk_size=settings.chunk_size,
        window_radius=None if settings.window_radius < 0 else settings.window_radius,
        coords=coords,
        grid_shape=grid_shape,
        method=settings.method.value,
        codegraph=settings.codegraph if settings.method == "codegraph" else None,
        memory_budget_mb=float(settings.memory_budget_mb) or None,
        precision=settings.precision.value,
        on_layer_done=on_layer_done,
        known_scores=known_scores,
        layer_weights=settings.layer_weights,
    )


def token_volume_ml(series: TokenisedSeries) -> float:
    """Volume (ml) of one token's cube on the series' working grid (template space when registered)."""
    edge_mm = series.prepared.grid_spacing * series.prepared.size / series.tokens.grid_shape[0]
    return float(edge_mm) ** 3 / 1000.0


def decided_against_bank(n_references: int, config: RunConfig) -> bool:
    """Whether a batch with ``n_references`` cohort-bank volumes is decided on the bank's statistics.

    The lesion policy with ``threshold.reference: auto`` and at least ``min_reference_volumes``
    bank volumes (fewer join the batch's own statistics): then ``threshold.with_bank``'s bounds
    hold and the bank's calibrated rate is shared (:func:`series_sharing_the_bank`).
    """
    threshold = config.threshold
    return (threshold.policy == "lesion" and threshold.reference == "auto"
            and n_references >= LesionPolicy.min_reference_volumes)


def series_sharing_the_bank(chunk_sizes: Iterable[tuple[int, int]], config: RunConfig) -> int:
    """Series a run decides against the cohort bank: they share ``threshold.bank_false_flag_rate``.

    ``chunk_sizes`` holds each chunk's (members, bank references), every contrast's, so that a
    study's T1w and T2w series share the rate as the run's other studies do: a normal study is
    then flagged with probability at most the rate, not up to once per series. A chunk that
    fails to score still counts (its share only makes the others' bounds stricter).
    """
    return sum(members for members, references in chunk_sizes if decided_against_bank(references, config))


def decide_batch(
    scores: BatchScores, coords: Sequence[np.ndarray], n: int, grid_shape: tuple[int, int, int],
    config: RunConfig, token_ml: float = 1.0, contrast: str | None = None,
    groups: Sequence[Hashable] | None = None, shared_by: int | None = None,
) -> ThresholdDecision:
    """Flags and mask bounds for a scored batch's first ``n`` volumes, by ``threshold.policy``.

    ``scores`` and ``coords`` cover the batch's own volumes first and any cohort-bank references
    after them. ``contrast`` names the batch's contrast (its ``threshold.*_by_contrast``
    entries apply). ``lesion``: :func:`_lesion_decision`. ``bank``: the first version's two-level rule
    with bounds from the bank volumes. ``robust_z``: that rule on the whole batch, bank volumes
    included (the sample an outlier rule needs). ``token_ml`` is one token's volume (ml), the
    unit of the lesion policy's evidence (:func:`token_volume_ml`). ``groups`` gives each volume's
    patient (the scoring's groups), so that the bank calibration leaves patients out whole.
    ``shared_by`` counts the run's series decided against the bank, every contrast's: they share
    ``threshold.bank_false_flag_rate`` (``None``: this batch's ``n``).
    """
    threshold = config.threshold
    if threshold.policy == "lesion":
        return _lesion_decision(scores, list(coords), n, grid_shape, config, token_ml, contrast, groups, shared_by)
    if threshold.policy == "bank":
        return decide_thresholds_from_reference(
            scores.token_scores[:n], scores.volume_scores[:n], scores.token_scores[n:], scores.volume_scores[n:],
            z_volume=threshold.volume_z, z_token=threshold.robust_token_z,
        )
    full = decide_thresholds(
        scores.token_scores, scores.volume_scores, z_volume=threshold.volume_z, z_token=threshold.robust_token_z,
    )
    n_bank = len(scores.token_scores) - n
    return ThresholdDecision(
        full.volume_threshold, full.voxel_threshold, full.flagged[:n], full.policy,
        {**full.params, "n_bank_volumes": n_bank} if n_bank else full.params,
    )


@dataclass
class _Chunk:
    """One chunk of a contrast batch on its way to a :class:`ScoredBatch`: members, then bank volumes."""

    contrast: str
    label: str
    index: int
    n_chunks: int
    members: list[TokenisedSeries]
    own_groups: list[Hashable]
    references: list[Any] = field(default_factory=list)
    # The bank volumes' scores against each other, kept from an earlier batch ([layer][volume]).
    known_scores: list[list[np.ndarray]] | None = None

    @property
    def bank_patients(self) -> list[str]:
        """Each bank volume's patient (its study where the PatientID is empty): its scoring group."""
        return [r.entry.patient_id or r.entry.study_instance_uid for r in self.references]

    @property
    def groups(self) -> list[Hashable]:
        return self.own_groups + bank_groups(self.bank_patients)

    @property
    def work(self) -> int:
        """Volume pairs to match per layer (:func:`scoring_work`)."""
        return scoring_work(len(self.members), len(self.references), self.known_scores is not None)

    @property
    def layer_sets(self) -> list[list[np.ndarray]]:
        """Per layer, the token arrays of the members then the bank volumes (the scorer's input)."""
        token_sets = [m.tokens.tokens for m in self.members] + [r.tokens for r in self.references]
        return [[tokens[layer] for tokens in token_sets] for layer in range(len(token_sets[0]))]

    @property
    def coords(self) -> list[np.ndarray]:
        return [m.tokens.coords for m in self.members] + [r.coords for r in self.references]

    @property
    def uids(self) -> list[str]:
        return [m.decision.series_instance_uid for m in self.members] + [
            f"bank:{r.entry.series_instance_uid}" for r in self.references
        ]


def bank_groups(patients: Sequence[Hashable]) -> list[Hashable]:
    """Scoring group keys of a batch's cohort-bank volumes, given each one's patient.

    Bank volumes are scored against the other bank volumes only (:class:`BankGroup`), so their
    scores, and the per-position statistics and evidence bound the lesion policy takes from them,
    are the same whatever the batch holds. That needs two bank patients at least (each bank
    volume needs a reference); with fewer, the bank volume is scored against the batch too.
    """
    if len(set(patients)) >= 2:
        return [BankGroup(patient) for patient in patients]
    return [("bank", patient) for patient in patients]


def _draw_references(chunk: _Chunk, bank: Any, config: RunConfig) -> None:
    """Bank volumes join a chunk with too few patients, or every chunk under ``threshold.policy: bank``."""
    if bank is None:
        return
    if config.threshold.policy != "bank" and len(set(chunk.own_groups)) >= config.bank.min_patients:
        return
    chunk.references = bank.references(
        chunk.contrast,
        exclude_patients=[m.decision.patient_id for m in chunk.members],
        exclude_studies=[m.decision.study_instance_uid for m in chunk.members],
        layer_names=chunk.members[0].tokens.layer_names,
        max_count=config.bank.max_references,
        seed=config.bank.seed,
    )


def _bank_scoring(config: RunConfig) -> dict[str, Any]:
    """The scoring settings a bank volume's score depends on (part of its kept scores' key)."""
    settings = config.scoring
    return {"method": settings.method.value, "k_fraction": float(settings.k_fraction),
            "window_radius": int(settings.window_radius), "precision": settings.precision.value}


def scoring_work(n_members: int, n_references: int, bank_scores_known: bool) -> int:
    """Volume pairs a chunk's scoring matches per layer, for the progress clock.

    Every ordered pair of its volumes, or, with the bank volumes' scores known, each member's
    pairs with every volume (one-sided).
    """
    n_total = n_members + n_references
    return n_members * n_total if bank_scores_known else n_total**2


def bank_scores_reusable(config: RunConfig, bank: Any, groups: Sequence[Hashable], n_members: int) -> bool:
    """Whether a batch's bank volumes' scores may be kept and reused (``bank.reuse_scores``).

    Only with a bank, MuSc (CoDeGraph's communities span the whole batch) and bank volumes that
    reference each other only (``groups`` after the ``n_members`` members are all
    :class:`BankGroup`: two bank patients at least, :func:`bank_groups`).
    """
    return (bank is not None and config.bank.reuse_scores and config.scoring.method.value == "musc"
            and len(groups) > n_members and all(isinstance(group, BankGroup) for group in groups[n_members:]))


def _reuses_bank_scores(chunk: _Chunk, bank: Any, config: RunConfig) -> bool:
    """:func:`bank_scores_reusable` for a chunk, where scoring its members alone also pays.

    Scoring the members alone can cost more than the whole chunk (many members, windowed
    matching: :func:`~codegraph3d.scoring.batch.known_scores_pay`); such a chunk neither reads
    nor keeps the bank's scores.
    """
    radius = None if config.scoring.window_radius < 0 else config.scoring.window_radius
    n_total = len(chunk.members) + len(chunk.references)
    return (bank_scores_reusable(config, bank, chunk.groups, len(chunk.members))
            and known_scores_pay(len(chunk.members), n_total, radius))


def _recall_bank_scores(chunk: _Chunk, bank: Any, config: RunConfig) -> None:
    """Fill ``chunk.known_scores`` from the bank's kept scores of the drawn volumes, when it has them."""
    if _reuses_bank_scores(chunk, bank, config):
        n_layers = len(chunk.members[0].tokens.tokens)
        chunk.known_scores = load_bank_scores(bank, chunk.references, chunk.bank_patients, _bank_scoring(config),
                                              n_layers)
        if chunk.known_scores is not None:
            logger.info("batch %s: the %d cohort-bank volumes' scores against each other reused",
                        chunk.label, len(chunk.references))


def _keep_scores(chunk: _Chunk, scores: BatchScores, bank: Any, config: RunConfig) -> None:
    """Keep freshly computed bank volumes' scores in the bank for the next batch that draws them."""
    if chunk.known_scores is None and _reuses_bank_scores(chunk, bank, config):
        n = len(chunk.members)
        keep_bank_scores(bank, chunk.references, chunk.bank_patients, _bank_scoring(config),
                         [layer[n:] for layer in scores.per_layer])


def _one_patient_id_note(chunk: _Chunk, config: RunConfig) -> str:
    """Why several studies count as one patient, when one PatientID spans them all (anonymised exports)."""
    studies = {m.decision.study_instance_uid for m in chunk.members}
    patient_ids = {m.decision.patient_id for m in chunk.members}
    if config.scoring.exclude_same != "patient_id" or len(studies) < 2 or len(patient_ids) != 1 or "" in patient_ids:
        return ""
    return (f": its {len(studies)} studies all carry PatientID {next(iter(patient_ids))!r}. Anonymised exports often "
            "give every study the same PatientID; if these studies are of different people, set "
            "scoring.exclude_same: study (the series of one study still never reference each other)")


def _check_chunk(chunk: _Chunk, config: RunConfig) -> None:
    """A ``ValueError`` saying why a chunk cannot be scored (one patient, no bank volumes, another grid)."""
    if len(set(chunk.groups)) < 2:
        raise ValueError(
            f"the {chunk.label} batch holds {len(chunk.members)} series from {len(set(chunk.own_groups))} patient(s)"
            f"{_one_patient_id_note(chunk, config)}; batch scoring needs series of at least two different patients "
            "of the same contrast. Add studies of other patients to the input"
            + ("." if config.bank.folder else ", or configure a cohort bank (bank.folder) of prior studies.")
        )
    if config.threshold.policy == "bank" and not chunk.references:
        raise ValueError(
            f"threshold.policy is bank, but the cohort bank holds no {chunk.contrast} series of other "
            "patients; add prior studies with `python -m codegraph3d bank add`, or use policy robust_z"
        )
    if any(r.grid_shape != chunk.members[0].tokens.grid_shape for r in chunk.references):
        raise ValueError("cohort bank tokens lie on another token grid than this run's")


def _score_chunk(chunk: _Chunk, config: RunConfig, clock: StageClock) -> BatchScores:
    """Score one chunk (members and bank volumes), logging progress in volume pairs; may raise ValueError."""
    def on_layer_done(layers_done: int, n_layers: int) -> None:
        elapsed, remaining = clock.advance(chunk.work / n_layers)
        logger.info(
            "scoring %s: layer %d/%d done, %.0f%% of the scoring work, %.0f s elapsed, ETA %.0f s",
            chunk.label, layers_done, n_layers, 100 * clock.fraction, elapsed, remaining,
        )

    _check_chunk(chunk, config)
    return score_configured(
        chunk.layer_sets, chunk.groups, chunk.coords, chunk.members[0].tokens.grid_shape, config.scoring, on_layer_done,
        chunk.known_scores,
    )


def _score_task(layer_sets: Sequence[Sequence[np.ndarray]], groups: Sequence[Hashable], coords: Sequence[np.ndarray],
                grid_shape: tuple[int, int, int], settings: ScoringSettings, threads: int,
                known_scores: Sequence[Sequence[np.ndarray]] | None = None) -> BatchScores:
    """A Ray task: score one chunk with the threads it was given (Ray would leave OMP_NUM_THREADS)."""
    import torch

    torch.set_num_threads(max(1, threads))
    return score_configured(layer_sets, groups, coords, grid_shape, settings, known_scores=known_scores)


@dataclass
class _RemoteChunks:
    """Chunks submitted to Ray as scoring tasks: a reference per chunk, or why it was not submitted."""

    ray: Any
    refs: list[Any]
    labels: list[str]
    sizes: list[int]  # each chunk's work in volume pairs (_Chunk.work)


def _scoring_node(ray: Any) -> tuple[int, int]:
    """CPUs and GPUs (0 or 1) a scoring task asks for: those of one real node, a GPU node first.

    CPUs and a GPU taken from different nodes could add up to a request no node can meet.
    """
    nodes = alive_nodes(ray)
    gpu_nodes = [node for node in nodes if node.get("GPU", 0) >= 1]
    best = max(gpu_nodes or nodes, key=lambda node: node.get("CPU", 0), default={})
    return max(1, int(best.get("CPU", 1))), 1 if gpu_nodes else 0


def _score_chunks_on_ray(chunks: Sequence[_Chunk], config: RunConfig) -> _RemoteChunks:
    """Submit every chunk as a Ray task at once, so chunks run in parallel on the cluster's nodes.

    Each task asks for the CPUs of one node (the scorer uses them all; a GPU node's when the
    cluster has GPUs, with its GPU), and ``scoring.memory_budget_mb`` plus twice its tokens and
    256 MB, capped at the largest node's memory; a task lost with its node runs again. A chunk
    that cannot be scored is not submitted: its ValueError takes the reference's place.
    """
    ray = ray_runtime(config.execution.ray_address, available_cpus)
    cpus, gpus = _scoring_node(ray)
    task = ray.remote(_score_task)
    remote = _RemoteChunks(ray, [], [chunk.label for chunk in chunks], [])
    for chunk in chunks:
        remote.sizes.append(chunk.work)
        try:
            _check_chunk(chunk, config)
        except ValueError as error:
            remote.refs.append(error)
            continue
        layer_sets = chunk.layer_sets
        token_bytes = sum(array.nbytes for layer in layer_sets for array in layer)
        memory = capped_memory(ray, int(config.scoring.memory_budget_mb) * 1024**2 + 2 * token_bytes + 256 * 1024**2)
        options = task.options(num_cpus=cpus, num_gpus=gpus, memory=memory, max_retries=RETRIES, retry_exceptions=False)
        remote.refs.append(options.remote(layer_sets, chunk.groups, chunk.coords, chunk.members[0].tokens.grid_shape,
                                          config.scoring, cpus, chunk.known_scores))
    logger.info("scoring: %d chunk task(s) submitted to Ray (%d CPU(s)%s each)", len(chunks), cpus,
                " and a GPU" if gpus else "")
    return remote


def _collect_chunk(remote: _RemoteChunks, index: int, clock: StageClock) -> BatchScores:
    """Chunk ``index``'s scores from its Ray task (a ValueError when it could not be scored)."""
    ref, remote.refs[index] = remote.refs[index], None  # released once read: nothing stays pinned
    if isinstance(ref, ValueError):
        raise ref
    try:
        scores = copy.deepcopy(remote.ray.get(ref))  # out of the object store's read-only buffers
    except remote.ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ValueError):  # the scorer refused the chunk, as it would locally
            raise error.cause from error
        raise ClusterError(f"scoring {remote.labels[index]} on Ray failed: {error}") from error
    except remote.ray.exceptions.RayError as error:
        raise ClusterError(f"scoring {remote.labels[index]} on Ray failed: {error}") from error
    elapsed, remaining = clock.advance(remote.sizes[index])
    logger.info("scoring %s: done on Ray, %.0f%% of the scoring work, %.0f s elapsed, ETA %.0f s",
                remote.labels[index], 100 * clock.fraction, elapsed, remaining)
    return scores


def _scored_batch(
    chunk: _Chunk, scores: BatchScores, config: RunConfig, scoring: Scoring, banked_series: int,
) -> ScoredBatch:
    """Decide a scored chunk and record it (CoDeGraph's groups and the bank volumes in the log).

    ``banked_series``: the run's series decided against the bank, every contrast's and chunk's
    (they share the bank's false-flag rate, so that it holds per study).
    """
    members, n, uids = chunk.members, len(chunk.members), chunk.uids
    decision = decide_batch(
        scores, chunk.coords, n, members[0].tokens.grid_shape, config, token_volume_ml(members[0]),
        chunk.contrast, chunk.groups,
        shared_by=banked_series if decided_against_bank(len(chunk.references), config) else None,
    )
    if scores.codegraph is not None:
        found = scores.codegraph.communities
        logger.info(
            "batch %s: CoDeGraph found %d group(s) of volumes sharing an anomaly %s; %d token(s) "
            "excluded from their references", chunk.label, len(found),
            [[uids[v] for v in group] for group in found], int(scores.codegraph.implicated_totals.sum()),
        )
    if chunk.references:
        scoring.bank["references"][chunk.label] = [r.entry.series_instance_uid for r in chunk.references]
        logger.info("batch %s: %d cohort-bank volume(s) joined as references", chunk.label, len(chunk.references))
    logger.info(
        "batch %s: %d series scored, %d flagged (volume threshold %.4g, voxel threshold %.4g)",
        chunk.label, n, int(decision.flagged.sum()), decision.volume_threshold, decision.voxel_threshold,
    )
    return ScoredBatch(
        chunk.contrast, members, _slice_scores(scores, n), decision, 0.0, 1.0,
        chunk=chunk.index, n_chunks=chunk.n_chunks,
        bank_references=[r.entry.series_instance_uid for r in chunk.references], volume_uids=uids,
        mask_interpolation=config.output.mask_interpolation,
        score_interpolation=config.output.score_interpolation,
        min_finding_ml=float(config.threshold.min_finding_ml),
    )


def _contrast_chunks(tokenisation: Tokenisation, config: RunConfig) -> list[_Chunk]:
    """Each contrast's series in ``scoring.batch_size`` chunks (:func:`batch_chunks`), contrasts in input order."""
    by_contrast: dict[str, list[TokenisedSeries]] = defaultdict(list)
    for record in tokenisation.series:
        by_contrast[record.decision.contrast].append(record)
    chunks = []
    for contrast, all_members in by_contrast.items():
        indices = batch_chunks(len(all_members), config.scoring.batch_size, config.scoring.batch_seed)
        for index, chunk in enumerate(indices):
            members = [all_members[i] for i in chunk]
            chunks.append(_Chunk(
                contrast, contrast if len(indices) == 1 else f"{contrast} chunk {index + 1}/{len(indices)}",
                index, len(indices), members,
                reference_groups([m.decision for m in members], config.scoring.exclude_same.value),
            ))
    return chunks


def score_batches(tokenisation: Tokenisation, config: RunConfig) -> Scoring:
    """Score each contrast batch (in chunks when configured), fuse layers, apply the threshold policy.

    A contrast's series are split into ``scoring.batch_size`` chunks (:func:`batch_chunks`). A
    chunk with fewer than ``bank.min_patients`` patients (or any chunk under
    ``threshold.policy: bank``) draws up to ``bank.max_references`` references of its contrast
    from the cohort bank, never of its own patients or studies. A chunk that still has fewer than
    two patients cannot be scored: its series are skipped with the reason; other chunks still run.

    Raises
    ------
    CohortError
        When no batch could be scored, or the configured bank cannot be used.
    """
    scoring = Scoring(batches=[], skipped=dict(tokenisation.skipped), tokenisation=tokenisation)
    bank = None
    if config.bank.folder:
        # A bank that add_scored will fill may not exist yet; one that is only read must.
        bank = open_bank(config, tokenisation, create=config.bank.add_scored != "none")
        scoring.bank = {"folder": str(bank.folder), "settings_id": bank.settings_id, "references": {}}
    chunks = _contrast_chunks(tokenisation, config)
    for chunk in chunks:
        _draw_references(chunk, bank, config)
        _recall_bank_scores(chunk, bank, config)
    banked_series = series_sharing_the_bank(((len(c.members), len(c.references)) for c in chunks), config)
    # Work is counted in volume pairs per layer: each layer's nearest-neighbour pass compares every
    # volume with every other, so a batch's cost grows with the square of its size, bank
    # references included (only the members' own pairs where the bank's scores were kept).
    clock = StageClock(sum(chunk.work for chunk in chunks))
    try:
        remote = _score_chunks_on_ray(chunks, config) if config.execution.backend == "ray" else None
    except (ValueError, ImportError) as error:  # Ray could not be started or reached
        raise CohortError(f"scoring cannot start: {error}") from error
    by_contrast: dict[str, list[ScoredBatch]] = defaultdict(list)
    for index, chunk in enumerate(chunks):
        if remote is None and chunk.known_scores is None:
            # An earlier chunk of this run may have just kept the scores of the same draw.
            work = chunk.work
            _recall_bank_scores(chunk, bank, config)
            clock.total -= work - chunk.work
        try:
            scores = _score_chunk(chunk, config, clock) if remote is None else _collect_chunk(remote, index, clock)
        except ClusterError as error:
            raise CohortError(str(error)) from error
        except ValueError as error:
            clock.total -= chunk.work  # this batch's work will not be done
            reason = f"{chunk.label} batch not scored: {error}"
            logger.error(reason)
            scoring.errors[chunk.label] = str(error)
            for member in chunk.members:
                scoring.skipped[member.decision.series_instance_uid] = reason
            continue
        _keep_scores(chunk, scores, bank, config)
        by_contrast[chunk.contrast].append(_scored_batch(chunk, scores, config, scoring, banked_series))
    for contrast_batches in by_contrast.values():
        # One unit mapping per contrast, so FRACTIONAL maps of all its chunks share a scale.
        low, high = score_to_unit_mapping([s for b in contrast_batches for s in b.scores.token_scores])
        for batch in contrast_batches:
            batch.unit_low, batch.unit_high = low, high
        scoring.batches += contrast_batches
    if not scoring.batches:
        raise CohortError(
            "no contrast batch could be scored: " + "; ".join(f"{c}: {e}" for c, e in scoring.errors.items())
        )
    return scoring


def update_bank(scoring: Scoring, config: RunConfig, source: str = "") -> list[str]:
    """Add the run's scored series to the cohort bank as ``bank.add_scored`` says; return their UIDs.

    ``unflagged`` adds only series the threshold policy did not flag (the bank should describe
    normal-looking anatomy); ``all`` adds every scored series; ``none`` adds nothing.
    """
    from codegraph3d.store.bank import series_record

    policy = config.bank.add_scored
    if policy == "none" or not config.bank.folder:
        return []
    bank = open_bank(config, scoring.tokenisation, create=True)
    records = [
        series_record(member)
        for batch in scoring.batches
        for index, member in enumerate(batch.members)
        if policy == "all" or not batch.decision.flagged[index]
    ]
    return bank.add(records, source=source)


# ---------------------------------------------------------------------------------------------
# maps


@dataclass
class SeriesMaps:
    """The maps of one scored series on its source grid."""

    score: np.ndarray  # float32 (z, y, x), raw scores, 0 outside the brain
    binary: np.ndarray  # bool (z, y, x)
    unit: np.ndarray  # float32 in [0, 1]
    anomalous_volume_ml: float
    findings: list[dict[str, Any]] = field(default_factory=list)  # :func:`mask_findings`, largest first


def drop_small_components(binary: np.ndarray, prepared: PreprocessedVolume, min_ml: float) -> np.ndarray:
    """The mask without its connected components (26-connectivity) smaller than ``min_ml`` ml.

    Carrying a mask from the working grid back onto a source grid leaves specks of a few voxels
    where a finding's edge grazes the grid; they are not findings a reader should be shown.
    """
    if min_ml <= 0 or not binary.any():
        return binary
    labels, count = ndimage.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_ml = float(np.prod(prepared.source_spacing)) / 1000.0
    sizes = ndimage.sum_labels(binary, labels, index=np.arange(1, count + 1)) * voxel_ml
    keep = np.concatenate([[False], sizes >= min_ml])
    return keep[labels]


def mask_findings(binary: np.ndarray, score: np.ndarray, prepared: PreprocessedVolume) -> list[dict[str, Any]]:
    """Connected components (26-connectivity) of a source-grid mask, largest first.

    Each finding: ``volume_ml``, ``centroid_lps_mm`` (the component's centre of mass, LPS mm),
    ``peak_score`` (the largest raw score inside it) and ``key_slice`` (:func:`key_slice`).
    """
    if not binary.any():
        return []
    labels, count = ndimage.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    boxes = ndimage.find_objects(labels)
    voxel_ml = float(np.prod(prepared.source_spacing)) / 1000.0
    sizes = ndimage.sum_labels(binary, labels, index=np.arange(1, count + 1))
    centres = ndimage.center_of_mass(binary, labels, index=np.arange(1, count + 1))
    peaks = ndimage.maximum(score, labels, index=np.arange(1, count + 1))
    to_lps = index_to_physical_matrix(prepared.source_origin, prepared.source_spacing, prepared.source_direction)
    found = []
    for label, (size, centre_zyx, peak) in enumerate(zip(sizes, centres, peaks), start=1):
        # Arrays are (z, y, x); the geometry maps an (x, y, z) index.
        lps = to_lps[:3, :3] @ np.asarray(centre_zyx[::-1], float) + to_lps[:3, 3]
        found.append({
            "volume_ml": round(float(size) * voxel_ml, 3),
            "centroid_lps_mm": [round(float(v), 2) for v in lps],
            "peak_score": float(peak),
            "key_slice": key_slice(labels[boxes[label - 1]] == label, boxes[label - 1]),
        })
    return sorted(found, key=lambda finding: -finding["volume_ml"])


def key_slice(component: np.ndarray, box: tuple[slice, slice, slice]) -> dict[str, Any]:
    """The slice holding most of a component's voxels, and the component's pixel extent there.

    ``component`` is the component's mask inside its bounding ``box`` (z, y, x slices of the
    series). Returns ``index`` (position of the slice in the series' z order, 0-based),
    ``rows`` and ``columns`` (first and last, inclusive, 0-based): where a viewer is sent.
    """
    z = int(component.sum(axis=(1, 2)).argmax())
    plane = component[z]
    rows, columns = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return {
        "index": box[0].start + z,
        "rows": [box[1].start + int(rows[0]), box[1].start + int(rows[-1])],
        "columns": [box[2].start + int(columns[0]), box[2].start + int(columns[-1])],
    }


def series_outputs(batch: ScoredBatch, index: int) -> SeriesMaps:
    """Upsample one member's token scores and carry them back onto its source grid.

    The binary mask thresholds the decision's per-token mask values when the policy gives them
    (the lesion policy's standardised scores), else the token scores themselves.
    """
    member = batch.members[index]
    tokens, prepared = member.tokens, member.prepared

    def on_source(values: np.ndarray, interpolation: str) -> np.ndarray:
        grid_map = token_voxel_map(values, tokens.coords, tokens.grid_shape, prepared.size,
                                   prepared.brain_mask, interpolation)
        return resample_to_source(grid_map, prepared)

    score = on_source(batch.scores.token_scores[index], batch.score_interpolation)
    flagged = bool(batch.decision.flagged[index])
    binary = np.zeros(score.shape, bool)
    if flagged:
        mask_values = batch.decision.mask_values
        if mask_values is not None:
            decided = on_source(mask_values[index], batch.mask_interpolation)
        elif batch.mask_interpolation == batch.score_interpolation:
            decided = score  # the same map: not computed twice
        else:
            decided = on_source(batch.scores.token_scores[index], batch.mask_interpolation)
        binary = drop_small_components(decided > batch.decision.voxel_threshold, prepared, batch.min_finding_ml)
    voxel_ml = float(np.prod(prepared.source_spacing)) / 1000.0
    return SeriesMaps(
        score=score,
        binary=binary,
        unit=to_unit(score, batch.unit_low, batch.unit_high),
        anomalous_volume_ml=float(binary.sum()) * voxel_ml,
        findings=mask_findings(binary, score, prepared),
    )


def run_pipeline(
    input_path: str | Path,
    config: RunConfig,
    model_path: str | Path | None = None,
    encoder: SliceEncoder | None = None,
) -> tuple[Selection, Scoring, StageTimer]:
    """Run load -> select -> tokenise -> score without the SDK (evaluation, benchmarks, tests).

    The app runs the same stages through its operators; writing is left to
    :func:`codegraph3d.run.report.write_results`.
    """
    timer = StageTimer()
    with timer("load_headers"):
        scan = scan_input(input_path)
    with timer("select"):
        selection = select_input(scan, config)
    if encoder is None:
        with timer("load_encoder"):
            encoder = build_encoder(config, model_path)
    tokenisation = tokenise_selected(selection, config, encoder, timer, model_path=model_path)
    with timer("score"):
        scoring = score_batches(tokenisation, config)
    return selection, scoring, timer
