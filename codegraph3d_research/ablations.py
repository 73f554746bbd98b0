"""Ablations from the token cache: rescoring a cohort under other settings without re-encoding.

Two commands::

    python -m codegraph3d_research.ablations fill --input DICOM_DIR --cache CACHE_DIR [--models MODEL_DIR]
    python -m codegraph3d_research.ablations --cache CACHE_DIR --truth COHORT_DIR [--contrast T2w]
        [--seeds 0 1 2] [--json OUT.json] [--markdown OUT.md] [--settings ID] [--tables ...]

``fill`` tokenises every selected series of ``DICOM_DIR`` with the configured encoder (the
configuration is read as the app reads it: ``CODEGRAPH3D_CONFIG``, else ``codegraph3d.yaml`` in the
model folder) and stores the encoder output in the cache (:mod:`codegraph3d.store.cache`); entries that
are already there and valid are kept. The app fills the same cache when ``cache.folder`` is set.

The ablation run reads the entries of the series listed in ``COHORT_DIR/labels.json`` (the demo
cohort's format, :mod:`codegraph3d_research.synthetic`), rescoring them per contrast batch with
:func:`codegraph3d.scoring.batch.score_batch` and the configuration's scoring settings (``k_fraction``,
``window_radius``, ``exclude_same`` through :func:`codegraph3d.run.pipeline.reference_groups`), and
measures for every setting:

* patient level: AUROC and AP of the volume scores (maximum token score) against ``has_lesion``;
* voxel level, on the working grid: the token map upsampled trilinearly
  (:func:`codegraph3d.scoring.maps.upsample_token_map`) against the ``truth.lesion`` mask carried onto the
  working grid (:func:`codegraph3d.preprocess.chain.resample_from_source`, linear, >= 0.5), pooled over
  the brain voxels of every series in streaming histograms: AUROC, AP and Dice-max.

Tables (the paper's numbering):

* Table 4, views: A, C, S, A+C, A+S, C+S, A+C+S (A = axial, C = coronal, S = sagittal);
* Table 7, chunked batches: the batch split into 1, 2, 4, 6, 12 random non-overlapping chunks
  (seeded; a patient's series stay in one chunk), every volume scored within its chunk only,
  metrics pooled over the chunks, mean and sample standard deviation over the seeds;
* Table 3, projection size ``k`` in 1, 10, 50, 100, 128, 200 per axis, over projection seeds;
  sizes at or above the encoder's width are the identity (no projection) and are reported once,
  as such;
* layers: each single layer and all, when the encoder has more than one.

Paper figures: only the CoDeGraph3D paper's headline figures are known here (T2w, 180 volumes,
DINOv2 ViT-L/14: patient AUROC 96.9 %, voxel Dice-max 41.3 %, for its default setting; chunking
"B >= 45 loses < 1 point"); they are printed beside the matching rows, every other paper cell reads
"n/a". Memory: every entry's unprojected features are held (layers x 3 x tokens x width float32:
about 70 MB per series for DINOv2 ViT-L with 4 layers, well under 1 MB for the intensity encoder).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from codegraph3d.store.cache import CacheEntryError, read_entry, settings_id, settings_material
from codegraph3d.run.config import ConfigError, RunConfig, load_config
from .evaluate import EvaluationInputError, SeriesTruth, TruthCohort
from codegraph3d.io.selection import SeriesDecision
from codegraph3d.scoring.maps import token_grid_map, upsample_token_map
from .metrics import StreamingBinaryMetrics, patient_auroc, patient_average_precision
from codegraph3d.run.pipeline import (
    CohortError,
    StageTimer,
    TokenisedSeries,
    build_encoder,
    landmark_material,
    reference_groups,
    scan_input,
    select_input,
    tokenise_selected,
)
from codegraph3d.preprocess.chain import PreprocessedVolume, resample_from_source
from codegraph3d.scoring.batch import score_batch
from codegraph3d.features.tokens import AXES, EncodedVolume, TokenSet, parse_views, project
from codegraph3d.core.volume import LPS_TO_RAS, index_to_physical_matrix

__all__ = [
    "CHUNK_DIVISORS",
    "K_VALUES",
    "PAPER_HEADLINE",
    "VIEW_SETS",
    "AblationError",
    "AblationSeries",
    "Cohort",
    "Setting",
    "chunk_indices",
    "evaluate_setting",
    "fill_cache",
    "format_tables",
    "load_cohort",
    "main",
    "run_ablations",
]

logger = logging.getLogger(__name__)

VIEW_SETS: tuple[str, ...] = ("A", "C", "S", "A+C", "A+S", "C+S", "A+C+S")
CHUNK_DIVISORS: tuple[int, ...] = (1, 2, 4, 6, 12)
K_VALUES: tuple[int, ...] = (1, 10, 50, 100, 128, 200)
PAPER_K = 128
TABLES: tuple[str, ...] = ("views", "chunks", "projection", "layers")
METRICS: tuple[str, ...] = ("patient_auroc", "patient_ap", "voxel_auroc", "voxel_ap", "dice_max")
#: The only paper figures given to us: the CoDeGraph3D paper's headline (T2w, 180 volumes,
#: DINOv2 ViT-L/14, its default setting: A+C+S, full batch, k = 128, layers 6/12/18/24).
PAPER_HEADLINE: dict[str, Any] = {
    "contrast": "T2w",
    "patient_auroc_pct": 96.9,
    "dice_max_pct": 41.3,
    "seconds_per_volume": 4.0,
    "gpu_memory": "under 10 GB on an RTX 4070 Ti Super",
    "chunking": "B >= 45 loses < 1 point",
    "chunking_min_batch": 45,
    "setting": "DINOv2 ViT-L/14, T2w, 180 volumes, A+C+S, full batch, k = 128, layers 6/12/18/24",
}
# RAS <-> LPS flips x and y (NIfTI affines are RAS).
_FILL_HINT = (
    "fill the cache first: python -m codegraph3d_research.ablations fill --input {dicom} --cache {cache} "
    "(or run the app with cache.folder: {cache} in the CODEGRAPH3D_CONFIG file)"
)


class AblationError(ValueError):
    """The ablation inputs cannot be used; the message says which file or series and what to do."""


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass
class AblationSeries:
    """One cohort series: its cache entry, labels and the truth on its working grid.

    Attributes
    ----------
    record : TokenisedSeries
        Decision (identity, contrast) and preprocessing record from the cache; ``tokens`` holds
        the configured projection, ``datasets`` is empty (no DICOM is read).
    encoded : EncodedVolume
        The unprojected features every setting projects anew.
    has_lesion : bool
        Patient-level label from ``labels.json``.
    truth_in_brain : numpy.ndarray
        Bit-packed lesion labels of the working-grid brain voxels (C order), computed once.
    n_brain : int
        Number of brain voxels of the working grid.
    """

    record: TokenisedSeries
    encoded: EncodedVolume
    has_lesion: bool
    truth_in_brain: np.ndarray
    n_brain: int

    @property
    def uid(self) -> str:
        return self.record.decision.series_instance_uid

    def lesion_labels(self) -> np.ndarray:
        """Boolean lesion labels of the brain voxels, in the order of ``map[brain_mask]``."""
        return np.unpackbits(self.truth_in_brain, count=self.n_brain).astype(bool)


@dataclass
class Cohort:
    """The series of one cache settings folder that ``labels.json`` lists, by contrast."""

    cache_folder: Path
    truth_folder: Path
    settings: dict[str, Any]
    by_contrast: dict[str, list[AblationSeries]] = field(default_factory=dict)


def _labelled_series(truth: Path, contrast: str | None) -> list[SeriesTruth]:
    try:
        cohort = TruthCohort.load(truth)
    except EvaluationInputError as error:
        raise AblationError(str(error)) from error
    rows = list(cohort.series.values())
    available = sorted({row.contrast for row in rows})
    if contrast is not None:
        rows = [row for row in rows if row.contrast == contrast]
        if not rows:
            raise AblationError(f"{truth / 'labels.json'} lists no {contrast} series; its contrasts are {available}")
    if not rows:
        raise AblationError(f"{truth / 'labels.json'} lists no series with truth")
    return rows


def _lesion_on_source_grid(row: SeriesTruth, prepared: PreprocessedVolume) -> np.ndarray:
    """The series' lesion mask ``[z, y, x]``, checked against the cached source geometry."""
    path = row.lesion_path
    if not path.is_file():
        raise AblationError(f"series {row.series_instance_uid}: truth mask {path} not found (labels.json truth.lesion)")
    image = nib.load(str(path))
    # NIfTI voxel (i, j, k) is the series' (x, y, z) index.
    lesion = np.asarray(image.dataobj).transpose(2, 1, 0) > 0
    if lesion.shape != tuple(prepared.source_shape_zyx):
        raise AblationError(
            f"{path}: shape (z, y, x) {lesion.shape} differs from the cached series grid "
            f"{tuple(prepared.source_shape_zyx)}; the mask does not belong to series {row.series_instance_uid}"
        )
    expected = LPS_TO_RAS @ index_to_physical_matrix(
        prepared.source_origin, prepared.source_spacing, prepared.source_direction
    )
    affine = np.asarray(image.affine, dtype=float)
    # Tolerances as in codegraph3d_research.evaluate: far above float32 header rounding, far below a misfit.
    if not (np.allclose(affine[:3, :3], expected[:3, :3], atol=1e-3) and np.allclose(affine[:3, 3], expected[:3, 3], atol=1e-2)):
        raise AblationError(
            f"{path}: not on the grid of the cached series {row.series_instance_uid} (NIfTI affine "
            f"{np.round(affine, 3).tolist()}, series {np.round(expected, 3).tolist()})"
        )
    if bool(lesion.any()) != row.has_lesion:
        raise AblationError(
            f"{path}: labels.json says has_lesion={row.has_lesion} for series {row.series_instance_uid} "
            f"but the mask holds {int(lesion.sum())} voxels; fix labels.json or the mask"
        )
    return lesion


def _candidate_folders(cache: Path) -> list[Path]:
    """Settings folders under ``cache`` (or ``cache`` itself when it is one)."""
    if not cache.is_dir():
        raise AblationError(f"cache folder {cache} does not exist")
    if any(cache.glob("*.npz")):
        return [cache]
    return sorted(folder for folder in cache.iterdir() if folder.is_dir() and any(folder.glob("*.npz")))


def _encoder_of(folder: Path) -> str:
    for sidecar in sorted(folder.glob("*.json"))[:1]:
        try:
            material = json.loads(sidecar.read_text(encoding="utf-8"))["key_material"]["settings"]
            return f"{material['encoder']['name']} layers {material['encoder']['layers']}"
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return "unreadable sidecar"
    return "no sidecar"


def _choose_folder(cache: Path, uids: list[str], settings: str | None, hint: str) -> Path:
    candidates = _candidate_folders(cache)
    if settings is not None:
        chosen = [folder for folder in candidates if folder.name == settings]
        if not chosen:
            raise AblationError(
                f"cache {cache} has no settings folder {settings!r}; it has "
                f"{[folder.name for folder in candidates] or 'none'}"
            )
        candidates = chosen
    if not candidates:
        raise AblationError(f"cache {cache} holds no entries; {hint}")
    coverage = {folder: [uid for uid in uids if (folder / f"{uid}.npz").is_file()] for folder in candidates}
    complete = [folder for folder in candidates if len(coverage[folder]) == len(uids)]
    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        described = "; ".join(f"{folder.name} ({_encoder_of(folder)})" for folder in complete)
        raise AblationError(
            f"cache {cache} holds entries for every series under several settings: {described}; "
            "choose one with --settings ID"
        )
    best = max(candidates, key=lambda folder: len(coverage[folder]))
    missing = [uid for uid in uids if uid not in set(coverage[best])]
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise AblationError(
        f"token cache {best} has no entry for {len(missing)} of the {len(uids)} series: {shown}; {hint}"
    )


def load_cohort(
    cache: str | Path,
    truth: str | Path,
    config: RunConfig,
    *,
    contrast: str | None = None,
    settings: str | None = None,
) -> Cohort:
    """Read the cache entries of the cohort's series and their truth on the working grid.

    Parameters
    ----------
    cache : path-like
        The cache folder (``cache.folder``), or one settings folder inside it.
    truth : path-like
        Cohort folder with ``labels.json`` and the truth NIfTI files it names.
    config : RunConfig
        Configuration whose ``tokens.projection_dim``/``projection_seed`` give the default tokens.
    contrast : str, optional
        Only this contrast; default every contrast the labels list.
    settings : str, optional
        The settings folder to use when the cache holds several complete ones.

    Raises
    ------
    AblationError
        Missing labels, missing or unusable cache entries (naming the series and the command that
        fills the cache), truth masks that do not fit their series.
    """
    cache, truth = Path(cache), Path(truth)
    rows = _labelled_series(truth, contrast)
    dicom = truth / "dicom" if (truth / "dicom").is_dir() else Path("DICOM_DIR")
    hint = _FILL_HINT.format(dicom=dicom, cache=cache)
    folder = _choose_folder(cache, [row.series_instance_uid for row in rows], settings, hint)
    cohort = Cohort(cache_folder=folder, truth_folder=truth, settings={})
    for row in rows:
        uid = row.series_instance_uid
        try:
            sidecar, entry = read_entry(folder / f"{uid}.npz")
        except CacheEntryError as error:
            raise AblationError(f"{error}; {hint} (fill rebuilds bad entries)") from error
        entry_settings = sidecar["key_material"]["settings"]
        if not cohort.settings:
            cohort.settings = entry_settings
        elif entry_settings != cohort.settings:
            raise AblationError(
                f"{folder / (uid + '.json')}: built with other settings than the other entries of {folder}; "
                f"remove the folder and {hint}"
            )
        prepared = entry.prepared
        lesion = _lesion_on_source_grid(row, prepared)
        on_grid = resample_from_source(lesion.astype(np.float32), prepared, order=1) >= 0.5
        in_brain = on_grid[prepared.brain_mask]
        info = entry.series
        decision = SeriesDecision(
            study_instance_uid=info.get("study_instance_uid") or row.study_instance_uid,
            series_instance_uid=uid,
            patient_id=info.get("patient_id") or row.patient_id,
            series_description=info.get("series_description", ""),
            taken=True,
            contrast=row.contrast,
            reason="selected",
        )
        tokens = project(
            entry.encoded,
            projection_dim=config.tokens.projection_dim,
            projection_seed=config.tokens.projection_seed,
        )
        record = TokenisedSeries(decision=decision, datasets=[], prepared=prepared, tokens=tokens,
                                 qa={"token_cache": "hit"})
        cohort.by_contrast.setdefault(row.contrast, []).append(AblationSeries(
            record=record, encoded=entry.encoded, has_lesion=row.has_lesion,
            truth_in_brain=np.packbits(in_brain), n_brain=int(in_brain.size),
        ))
    return cohort


# ---------------------------------------------------------------------------------------------
# settings and scoring


def chunk_indices(groups: Sequence[Hashable], n_chunks: int, seed: int) -> list[np.ndarray]:
    """Split a batch into ``n_chunks`` random, non-overlapping chunks that keep each group whole.

    Parameters
    ----------
    groups : sequence of hashable
        Reference group per volume (:func:`codegraph3d.run.pipeline.reference_groups`): a patient's
        volumes stay in one chunk, so every chunk offers each volume references of other patients.
    n_chunks : int
        Number of chunks (1 = the full batch).
    seed : int
        Seed of the permutation of the groups.

    Returns
    -------
    list of numpy.ndarray
        Sorted volume indices per chunk; every volume is in exactly one chunk.

    Raises
    ------
    ValueError
        When there are fewer than ``2 * n_chunks`` groups (a chunk needs two patients).
    """
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, (int, np.integer)) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive integer; got {n_chunks!r}")
    labels = list(dict.fromkeys(groups))
    if len(labels) < 2 * n_chunks:
        raise ValueError(
            f"{n_chunks} chunks need at least {2 * n_chunks} patients (two per chunk); the batch has {len(labels)}"
        )
    index_of = {label: i for i, label in enumerate(labels)}
    group_ids = np.array([index_of[g] for g in groups])
    order = np.random.default_rng(int(seed)).permutation(len(labels))
    return [np.flatnonzero(np.isin(group_ids, part)) for part in np.array_split(order, n_chunks)]


@dataclass(frozen=True)
class Setting:
    """One rescoring: which views, layers and projection, and how the batch is chunked."""

    views: tuple[str, ...]
    layers: tuple[str, ...] | None
    k: int
    projection_seed: int
    n_chunks: int = 1
    chunk_seed: int = 0

    def memo_key(self, dim: int) -> tuple[Any, ...]:
        # k >= dim is the identity whatever the seed; one chunk ignores the chunk seed.
        projection = ("identity",) if self.k >= dim else (self.k, self.projection_seed)
        chunking = (1,) if self.n_chunks == 1 else (self.n_chunks, self.chunk_seed)
        return (self.views, self.layers, projection, chunking)


def _metrics_of(
    series: list[AblationSeries], token_sets: list[TokenSet], token_scores: list[np.ndarray],
    volume_scores: np.ndarray, n_bins: int,
) -> dict[str, float]:
    """Patient metrics, and voxel metrics unless ``n_bins`` is 0 (then NaN: not computed)."""
    labels = np.array([s.has_lesion for s in series])
    patient = {
        "patient_auroc": patient_auroc(volume_scores, labels),
        "patient_ap": patient_average_precision(volume_scores, labels),
    }
    if n_bins == 0:
        return {**patient, "voxel_auroc": math.nan, "voxel_ap": math.nan, "dice_max": math.nan}
    high = max(float(np.max(scores)) if scores.size else 0.0 for scores in token_scores)
    voxel = StreamingBinaryMetrics(0.0, high if high > 0 else 1.0, n_bins=n_bins)
    for item, tokens, scores in zip(series, token_sets, token_scores):
        prepared = item.record.prepared
        grid = token_grid_map(scores, tokens.coords, tokens.grid_shape)
        # Inside the brain the masked and unmasked upsampled maps agree; only brain voxels count.
        values = upsample_token_map(grid, prepared.size)[prepared.brain_mask]
        voxel.update(values, item.lesion_labels())
    dice, _, _ = voxel.dice_max()
    return {
        **patient,
        "voxel_auroc": voxel.auroc(),
        "voxel_ap": voxel.average_precision(),
        "dice_max": dice,
    }


def evaluate_setting(
    series: list[AblationSeries], setting: Setting, config: RunConfig, n_bins: int = 1000
) -> dict[str, float]:
    """Project, score (chunk by chunk) and measure one setting on one contrast batch.

    ``n_bins`` is the number of histogram bins of the voxel metrics; 0 skips them (patient level
    only: the upsampling of every map to the working grid is most of the cost).
    """
    scoring = config.scoring
    token_sets = [
        project(item.encoded, projection_dim=setting.k, projection_seed=setting.projection_seed,
                views=setting.views, layers=setting.layers)
        for item in series
    ]
    groups = reference_groups([item.record.decision for item in series], scoring.exclude_same.value)
    chunks = (
        [np.arange(len(series))] if setting.n_chunks == 1
        else chunk_indices(groups, setting.n_chunks, setting.chunk_seed)
    )
    token_scores: list[np.ndarray | None] = [None] * len(series)
    volume_scores = np.full(len(series), np.nan)
    for chunk in chunks:
        members = [token_sets[i] for i in chunk]
        chunk_groups = [groups[i] for i in chunk]
        if len(set(chunk_groups)) < 2:
            raise AblationError(
                f"a batch of {len(chunk)} series from one patient cannot be scored; batch scoring needs two patients"
            )
        result = score_batch(
            [[tokens.tokens[layer] for tokens in members] for layer in range(len(members[0].tokens))],
            k_fraction=scoring.k_fraction,
            groups=chunk_groups,
            device=None if scoring.device == "auto" else scoring.device,
            chunk_size=scoring.chunk_size,
            window_radius=None if scoring.window_radius < 0 else scoring.window_radius,
            coords=[tokens.coords for tokens in members],
            grid_shape=members[0].grid_shape,
            # The configured weights fit the encoder's full layer list only; a layer subset is averaged.
            layer_weights=scoring.layer_weights if setting.layers is None else None,
        )
        for position, index in enumerate(chunk):
            token_scores[index] = result.token_scores[position]
            volume_scores[index] = result.volume_scores[position]
    return _metrics_of(series, token_sets, token_scores, volume_scores, n_bins)  # type: ignore[arg-type]


class _Measure:
    """Evaluate each distinct setting of one batch once: the default setting recurs in every table."""

    def __init__(self, series: list[AblationSeries], config: RunConfig, n_bins: int) -> None:
        self.series, self.config, self.n_bins = series, config, n_bins
        self.dim = series[0].encoded.dim
        self.results: dict[tuple[Any, ...], dict[str, float]] = {}

    def __call__(self, setting: Setting) -> dict[str, float]:
        key = setting.memo_key(self.dim)
        if key not in self.results:
            self.results[key] = evaluate_setting(self.series, setting, self.config, self.n_bins)
        return self.results[key]


def _summary(values: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in METRICS:
        numbers = [run[name] for run in values]
        finite = [v for v in numbers if np.isfinite(v)]
        out[name] = {
            "mean": float(np.mean(finite)) if finite else float("nan"),
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
            "values": numbers,
        }
    return out


def _paper_cells(contrast: str, default_row: bool) -> dict[str, str]:
    if contrast == PAPER_HEADLINE["contrast"] and default_row:
        return {"patient_auroc": f"{PAPER_HEADLINE['patient_auroc_pct']:.1f} (headline)",
                "dice_max": f"{PAPER_HEADLINE['dice_max_pct']:.1f} (headline)"}
    return {"patient_auroc": "n/a", "dice_max": "n/a"}


@dataclass(frozen=True)
class _TableContext:
    """What every table of one contrast batch needs: the memoised measure and the default setting."""

    contrast: str
    measure: _Measure
    groups: list[Hashable]
    seeds: Sequence[int]
    k0: int
    seed0: int
    dim: int
    layer_names: Sequence[str]
    base: Setting
    paper_k: bool


_Rows = tuple[list[dict[str, Any]], list[str]]


def _views_table(ctx: _TableContext) -> _Rows:
    """Table 4: one row per view set, at the configured projection.

    Returns
    -------
    tuple of list
        The rows and the notes (none for this table).
    """
    rows: list[dict[str, Any]] = []
    for label in VIEW_SETS:
        setting = Setting(views=parse_views(label), layers=None, k=ctx.k0, projection_seed=ctx.seed0)
        rows.append({"setting": label, **_summary([ctx.measure(setting)]),
                     "paper": _paper_cells(ctx.contrast, ctx.paper_k and label == "A+C+S")})
    return rows, []


def _chunk_row(ctx: _TableContext, divisor: int, full: dict[str, float]) -> dict[str, Any]:
    """One row of Table 7: the batch split into ``divisor`` chunks, one run per seed.

    Returns
    -------
    dict
        The row; ``skipped`` with the reason when the batch has too few patients for the split.
    """
    label = "full" if divisor == 1 else f"B/{divisor}"
    try:
        # The first seed's split stands for all: only the chunk sizes are reported from it.
        sizes = [len(c) for c in chunk_indices(ctx.groups, divisor, int(ctx.seeds[0]))]
    except ValueError as error:
        return {"setting": label, "skipped": str(error)}
    runs = (
        [full] if divisor == 1
        else [ctx.measure(Setting(AXES, None, ctx.k0, ctx.seed0, divisor, int(s))) for s in ctx.seeds]
    )
    row = {"setting": label, "chunk_sizes": sizes, **_summary(runs)}
    row["delta_patient_auroc"] = row["patient_auroc"]["mean"] - full["patient_auroc"]
    paper = _paper_cells(ctx.contrast, ctx.paper_k and divisor == 1)
    if divisor > 1:
        # The paper states a bound only for chunks of at least its minimum batch size.
        paper["patient_auroc"] = (
            "< 1 pt loss (B >= 45)"
            if min(sizes) >= PAPER_HEADLINE["chunking_min_batch"] else "n/a"
        )
    row["paper"] = paper
    return row


def _chunks_table(ctx: _TableContext) -> _Rows:
    """Table 7: the full batch, then the batch split into each of ``CHUNK_DIVISORS`` chunks.

    Returns
    -------
    tuple of list
        The rows and the notes (none for this table).
    """
    full = ctx.measure(ctx.base)
    return [_chunk_row(ctx, divisor, full) for divisor in CHUNK_DIVISORS], []


def _projection_table(ctx: _TableContext) -> _Rows:
    """Table 3: one row per projection size below the encoder's width, then one identity row.

    Returns
    -------
    tuple of list
        The rows and the notes (why the table is not run, or which sizes are the identity).
    """
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    dim = ctx.dim
    if dim <= 1:
        notes.append(f"the encoder's width is {dim} per axis: a projection is meaningless, table not run")
        return rows, notes
    identity_ks = [k for k in K_VALUES if k >= dim]
    for k in K_VALUES:
        if k >= dim:
            continue
        runs = [ctx.measure(Setting(AXES, None, k, int(s))) for s in ctx.seeds]
        rows.append({"setting": f"k={k}", **_summary(runs),
                     "paper": _paper_cells(ctx.contrast, k == PAPER_K)})
    if identity_ks:
        # Sizes at or above the width all leave the tokens unprojected: one setting, measured once.
        notes.append(
            f"k = {', '.join(map(str, identity_ks))} >= the encoder's width {dim} per axis: no "
            "projection is applied (identity), so these sizes are one setting, measured once"
        )
        runs = [ctx.measure(Setting(AXES, None, identity_ks[0], ctx.seed0))]
        rows.append({"setting": f"k>={dim} (identity: {', '.join(map(str, identity_ks))})",
                     **_summary(runs), "paper": _paper_cells(ctx.contrast, PAPER_K in identity_ks)})
    return rows, notes


def _layers_table(ctx: _TableContext) -> _Rows:
    """Layer subsets: each single layer, then all of them.

    Returns
    -------
    tuple of list
        The rows and the notes (why there is nothing to compare for a one-layer encoder).
    """
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    layer_names = ctx.layer_names
    if len(layer_names) < 2:
        notes.append(f"the encoder has one layer ({layer_names[0]}): no layer subsets to compare")
        return rows, notes
    for name in layer_names:
        rows.append({"setting": name, **_summary([ctx.measure(Setting(AXES, (name,), ctx.k0, ctx.seed0))]),
                     "paper": _paper_cells(ctx.contrast, False)})
    rows.append({"setting": "all", **_summary([ctx.measure(ctx.base)]),
                 "paper": _paper_cells(ctx.contrast, ctx.paper_k)})
    return rows, notes


_TABLE_BUILDERS: dict[str, Callable[[_TableContext], _Rows]] = {
    "views": _views_table,
    "chunks": _chunks_table,
    "projection": _projection_table,
    "layers": _layers_table,
}


def _check_ablation_arguments(tables: Sequence[str], seeds: Sequence[int], n_bins: int) -> None:
    """Fail before any scoring on tables, seeds or bins that :func:`run_ablations` cannot use.

    Raises
    ------
    AblationError
        Naming the offending argument.
    """
    unknown = [table for table in tables if table not in TABLES]
    if unknown or not tables:
        raise AblationError(f"unknown tables {unknown}; choose from {list(TABLES)}")
    if not seeds:
        raise AblationError("at least one seed is needed")
    if n_bins < 0:
        raise AblationError(f"n_bins must be >= 0 (0: patient-level metrics only); got {n_bins}")


def _results_header(
    cohort: Cohort, config: RunConfig, seeds: Sequence[int], n_bins: int, k0: int, seed0: int
) -> dict[str, Any]:
    """The results' settings part, with empty ``contrasts`` and ``timings_s`` to be filled.

    Returns
    -------
    dict
        JSON-serialisable; its key order is the order of the written JSON.
    """
    return {
        "cache": str(cohort.cache_folder),
        "truth": str(cohort.truth_folder),
        "settings_id": settings_id({"settings": cohort.settings}),
        "encoder": cohort.settings["encoder"],
        "scoring": {key: config.as_dict()["scoring"][key]
                    for key in ("k_fraction", "exclude_same", "window_radius", "layer_weights")},
        "projection": {"projection_dim": k0, "projection_seed": seed0},
        "seeds": [int(s) for s in seeds],
        "voxel_metrics": n_bins > 0,
        "paper_headline": PAPER_HEADLINE,
        "contrasts": {},
        "timings_s": {},
    }


def _run_contrast(
    contrast: str,
    series: list[AblationSeries],
    config: RunConfig,
    *,
    seeds: Sequence[int],
    tables: Sequence[str],
    n_bins: int,
    k0: int,
    seed0: int,
    timings: dict[str, float],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Every requested table on one contrast batch; each table's seconds also go into ``timings``.

    Returns
    -------
    dict
        The batch's entry: counts, tables, and ``error`` instead of tables for a one-patient batch.
    """
    measure = _Measure(series, config, n_bins)
    groups = reference_groups([item.record.decision for item in series], config.scoring.exclude_same.value)
    entry: dict[str, Any] = {
        "n_series": len(series),
        "n_lesion": int(sum(item.has_lesion for item in series)),
        "n_patients": len(set(groups)),
        "tables": {},
    }
    if len(set(groups)) < 2:
        entry["error"] = f"the {contrast} batch holds {len(set(groups))} patient(s); batch scoring needs two"
        return entry
    dim = series[0].encoded.dim
    context = _TableContext(
        contrast=contrast, measure=measure, groups=groups, seeds=seeds, k0=k0, seed0=seed0, dim=dim,
        layer_names=series[0].encoded.layer_names, base=Setting(views=AXES, layers=None, k=k0, projection_seed=seed0),
        # Our rows at the configured k show the paper's headline only when that k is the paper's.
        paper_k=min(k0, dim) == min(PAPER_K, dim),
    )
    for table in tables:
        start = time.perf_counter()
        rows, notes = _TABLE_BUILDERS[table](context)
        seconds = time.perf_counter() - start
        entry["tables"][table] = {"rows": rows, "notes": notes, "seconds": round(seconds, 2)}
        timings[f"{contrast}.{table}"] = round(seconds, 2)
        say(f"{contrast}: table {table} done in {seconds:.1f} s ({len(rows)} rows)")
    entry["settings_scored"] = len(measure.results)
    return entry


def run_ablations(
    cohort: Cohort,
    config: RunConfig,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    tables: Sequence[str] = TABLES,
    n_bins: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the ablation tables on every contrast batch of ``cohort``; see the module docstring.

    Parameters
    ----------
    cohort : Cohort
        From :func:`load_cohort`.
    config : mapping
        Scoring settings (``scoring``) and the default projection (``tokens``).
    seeds : sequence of int
        Seeds of the chunk permutations (Table 7) and of the projections (Table 3).
    tables : sequence of str
        Any of ``views``, ``chunks``, ``projection``, ``layers``.
    n_bins : int
        Histogram bins of the voxel metrics; 0 computes patient-level metrics only.
    progress : callable, optional
        Receives a line per finished table (default: the log).

    Returns
    -------
    dict
        JSON-serialisable: settings, encoder, per contrast the tables (rows with ``mean``, ``std``
        and per-run ``values`` of each metric, the paper's cells, notes) and timings.
    """
    _check_ablation_arguments(tables, seeds, n_bins)
    say = progress or (lambda message: logger.info("%s", message))
    k0, seed0 = int(config.tokens.projection_dim), int(config.tokens.projection_seed)
    results = _results_header(cohort, config, seeds, n_bins, k0, seed0)
    for contrast, series in sorted(cohort.by_contrast.items()):
        results["contrasts"][contrast] = _run_contrast(
            contrast, series, config, seeds=seeds, tables=tables, n_bins=n_bins, k0=k0, seed0=seed0,
            timings=results["timings_s"], say=say,
        )
    return results


# ---------------------------------------------------------------------------------------------
# output

_TITLES = {
    "views": "Table 4: views (A axial, C coronal, S sagittal)",
    "chunks": "Table 7: chunked batches (each volume scored within its chunk; metrics pooled)",
    "projection": "Table 3: projection size k per axis",
    "layers": "Layer subsets",
}


def _pct(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{100 * value:.1f}"


def _cell(stats: Mapping[str, Any]) -> str:
    if len(stats["values"]) > 1 and math.isfinite(stats["mean"]):
        return f"{_pct(stats['mean'])} ± {_pct(stats['std'])}"
    return _pct(stats["mean"])


def format_tables(results: Mapping[str, Any]) -> str:
    """The results as Markdown tables (percent; mean ± sample std over seeds where seeded)."""
    encoder = results["encoder"]
    lines = [
        "# CoDeGraph3D ablations from the token cache",
        "",
        f"Cache: `{results['cache']}` (settings {results['settings_id']}); truth: `{results['truth']}`.",
        f"Encoder: {encoder['description']} (layers {', '.join(encoder['layers'])}, width {encoder['dim']} per axis).",
        (f"Scoring: k_fraction {results['scoring']['k_fraction']}, exclude_same {results['scoring']['exclude_same']}, "
         f"window_radius {results['scoring']['window_radius']}; projection k = {results['projection']['projection_dim']}, "
         f"seed {results['projection']['projection_seed']} unless the row says otherwise; seeds {results['seeds']}."),
        "",
        ("Paper columns: only the CoDeGraph3D paper's headline figures are known here "
         f"({PAPER_HEADLINE['setting']}: patient AUROC {PAPER_HEADLINE['patient_auroc_pct']} %, voxel Dice-max "
         f"{PAPER_HEADLINE['dice_max_pct']} %; chunking: {PAPER_HEADLINE['chunking']}). They are printed beside our "
         "row of the same setting; every other paper cell is n/a."),
    ]
    if not results["voxel_metrics"]:
        lines.append("Voxel metrics were not computed (--patient-only): those columns read nan.")
    if not encoder.get("pretrained"):
        lines.append(f"Our figures come from **{encoder['name']}**, not DINOv2: they are not comparable with the paper's.")
    for contrast, entry in results["contrasts"].items():
        title = f"## {contrast}: {entry['n_series']} series ({entry['n_lesion']} with lesion), {entry['n_patients']} patients"
        lines += ["", title, ""]
        if "error" in entry:
            lines.append(f"Not run: {entry['error']}.")
            continue
        for table, data in entry["tables"].items():
            lines += [f"### {_TITLES[table]}", ""]
            extra = " | chunk sizes | Δ patient AUROC (pts)" if table == "chunks" else ""
            header = ("| setting | runs | patient AUROC | patient AP | voxel AUROC | voxel AP | Dice-max"
                      f"{extra} | paper patient AUROC | paper Dice-max |")
            if data["rows"]:
                lines += [header, "|" + "---|" * (header.count("|") - 1)]
            for row in data["rows"]:
                if "skipped" in row:
                    lines.append(f"| {row['setting']} | 0 | not run: {row['skipped']} |")
                    continue
                cells = [row["setting"], str(len(row["patient_auroc"]["values"]))]
                cells += [_cell(row[name]) for name in METRICS]
                if table == "chunks":
                    sizes = sorted(set(row["chunk_sizes"]))
                    cells += ["/".join(map(str, sizes)), f"{100 * row['delta_patient_auroc']:+.1f}"
                              if math.isfinite(row["delta_patient_auroc"]) else "nan"]
                cells += [row["paper"]["patient_auroc"], row["paper"]["dice_max"]]
                lines.append("| " + " | ".join(cells) + " |")
            for note in data["notes"]:
                lines += ["", f"Note: {note}."]
            lines += ["", f"({data['seconds']} s)", ""]
    lines.append(f"Timings (s): {json.dumps(results['timings_s'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# fill


def fill_cache(
    input_dir: str | Path, cache_dir: str | Path, model_path: str | Path | None = None
) -> dict[str, Any]:
    """Tokenise every selected series of ``input_dir`` into the token cache ``cache_dir``.

    The configuration is the app's (``CODEGRAPH3D_CONFIG``, else ``codegraph3d.yaml`` in
    ``model_path``, else the defaults), with ``cache.folder`` set to ``cache_dir``.

    Returns
    -------
    dict
        Settings folder, counts of hits / built / rebuilt / skipped series and timings.
    """
    config = load_config(model_path).with_overrides({"cache": {"folder": str(cache_dir)}}, "<ablation cache>")
    timer = StageTimer()
    start = time.perf_counter()
    with timer("load_headers"):
        scan = scan_input(input_dir)
    selection = select_input(scan, config)
    with timer("load_encoder"):
        encoder = build_encoder(config, model_path)
    tokenisation = tokenise_selected(selection, config, encoder, timer, model_path=model_path)
    status = [record.qa["token_cache"] for record in tokenisation.series]
    built_seconds = [record.qa["seconds"] for record in tokenisation.series if record.qa["token_cache"] != "hit"]
    folder = Path(cache_dir).expanduser().absolute() / settings_id(
        {"settings": settings_material(config.token_recipe(), encoder, landmark_material(config, model_path))}
    )
    return {
        "cache": str(folder),
        "encoder": encoder.identity(),
        "series": len(status),
        "hits": status.count("hit"),
        "built": status.count("miss"),
        "rebuilt": status.count("rebuilt"),
        "skipped": dict(tokenisation.skipped),
        "seconds_total": round(time.perf_counter() - start, 2),
        "seconds_per_built_series": round(float(np.mean(built_seconds)), 2) if built_seconds else None,
        "timings_s": {stage: round(seconds, 2) for stage, seconds in timer.seconds.items()},
    }


# ---------------------------------------------------------------------------------------------
# command line


def _fill_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codegraph3d_research.ablations fill",
        description="Tokenise every selected series of a DICOM folder into the token cache "
        "(configuration as for the app: CODEGRAPH3D_CONFIG, else codegraph3d.yaml in the model folder).",
    )
    parser.add_argument("--input", required=True, help="DICOM folder (as the app's -i)")
    parser.add_argument("--cache", required=True, help="token cache folder (created when missing)")
    parser.add_argument("--models", "-m", help="model folder (DINOv2 weights, codegraph3d.yaml)")
    args = parser.parse_args(argv)
    try:
        summary = fill_cache(args.input, args.cache, args.models)
    except (CohortError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"token cache {summary['cache']}: {summary['series']} series ({summary['hits']} already cached, "
        f"{summary['built']} built, {summary['rebuilt']} rebuilt), {len(summary['skipped'])} skipped; "
        f"{summary['seconds_total']} s in all"
        + (f", {summary['seconds_per_built_series']} s per built series" if summary["seconds_per_built_series"] else "")
    )
    for uid, reason in summary["skipped"].items():
        print(f"  skipped {uid}: {reason}")
    return 0


def _jsonable(value: Any) -> Any:
    """Undefined metrics (NaN: a class absent) as JSON null, which strict parsers accept."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``fill`` or the ablation run; exit 2 on unusable input, with the reason."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if argv and argv[0] == "fill":
        return _fill_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m codegraph3d_research.ablations",
        description="Ablation tables (views, chunked batches, projection size, layers) rescored from the "
        "token cache. 'python -m codegraph3d_research.ablations fill --input DICOM_DIR --cache CACHE_DIR' fills it.",
    )
    parser.add_argument("--cache", required=True, help="token cache folder (or one settings folder in it)")
    parser.add_argument("--truth", required=True, help="cohort folder with labels.json and the truth masks")
    parser.add_argument("--contrast", help="only this contrast batch (default: every contrast)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of chunking and projection")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES, help="tables to run")
    parser.add_argument("--settings", help="settings folder to use when the cache holds several")
    parser.add_argument("--bins", type=int, default=1000, help="histogram bins of the voxel metrics")
    parser.add_argument("--patient-only", action="store_true",
                        help="skip the voxel metrics (most of the time on 224^3 grids)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--markdown", help="also write the tables as Markdown here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        config = load_config()
        cohort = load_cohort(args.cache, args.truth, config, contrast=args.contrast, settings=args.settings)
        loaded = time.perf_counter() - start
        if args.bins < 1:
            raise AblationError(f"--bins must be at least 1; got {args.bins} (use --patient-only to skip voxel metrics)")
        results = run_ablations(cohort, config, seeds=args.seeds, tables=args.tables,
                                n_bins=0 if args.patient_only else args.bins)
    except (AblationError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results["timings_s"]["load"] = round(loaded, 2)
    results["timings_s"]["total"] = round(time.perf_counter() - start, 2)
    text = format_tables(results)
    print(text, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(results), indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
