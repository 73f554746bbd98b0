"""Cohort bank: the tokens of earlier studies, kept as references for studies that arrive alone.

Batch-based zero-shot scoring compares each volume with the other volumes of its batch. A MAP is
usually triggered per study, so a study often arrives with nothing to compare it with. The bank
keeps the projected tokens of scored (or explicitly added) series, so that such a study is scored
against up to ``bank.max_references`` prior volumes of its contrast; their scores in that batch
also give a threshold reference (``threshold.policy: bank``).

Layout::

    <folder>/bank.json                       manifest: format, settings, settings id, entries
    <folder>/tokens/<SeriesInstanceUID>.npz  one series' tokens (every layer), coords, grid shape
    <folder>/scores/<key>.npz                the drawn bank volumes scored against each other
                                             (:mod:`codegraph3d.store.bank_scores`), deleted by
                                             every add and remove
    <folder>/.lock                           advisory lock serialising writers

Tokens are only comparable when everything that made them agrees: preprocessing, the token grid,
the projection, the encoder (name, weights SHA-256, layers) and the Nyul references. Those form
the bank's *settings* (:func:`bank_settings`), fixed when the bank is created and compared on
every open; a run with other settings is refused with the fields that differ.

Crash safety: an entry's ``.npz`` is written under a temporary name and renamed, and only then is
the manifest (also renamed into place) updated; removal rewrites the manifest first and deletes
files after. A writer killed at any point leaves the previous manifest intact plus, at worst, an
``.npz`` no manifest entry names: readers use only manifest entries whose file hashes to the
recorded SHA-256, and ``check --repair`` deletes such orphans.

Command line (:mod:`codegraph3d.cli.bank`)::

    codegraph3d bank list BANK
    codegraph3d bank add BANK -i DICOM_FOLDER [-m MODEL_FOLDER]
    codegraph3d bank remove BANK --study STUDY_UID [STUDY_UID ...]
    codegraph3d bank check BANK [--repair]
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codegraph3d.core.files import atomic_path, write_json_atomic
from codegraph3d.store.cache import TokenRecipe, canonical_json, settings_id, settings_material
from codegraph3d.io.selection import is_valid_uid

__all__ = [
    "BANK_FORMAT",
    "BankEntry",
    "BankError",
    "BankVolume",
    "CohortBank",
    "SCORES_DIR",
    "bank_settings",
]

logger = logging.getLogger(__name__)

BANK_FORMAT_VERSION = 1
BANK_FORMAT = f"codegraph3d.cohort-bank/{BANK_FORMAT_VERSION}"
MANIFEST = "bank.json"
TOKENS_DIR = "tokens"
SCORES_DIR = "scores"


class BankError(ValueError):
    """A cohort bank that cannot be used as asked; the message names the folder and the fix."""


def bank_settings(
    recipe: TokenRecipe,
    encoder: Any,
    landmarks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that makes two series' tokens comparable (the bank's identity).

    The token cache's settings (preprocessing, token grid, brain-fraction rule, encoder identity,
    Nyul references) plus the projection (size and seed), which the bank stores after.

    Parameters
    ----------
    recipe : TokenRecipe
        The preprocessing, token and projection settings.
    encoder : SliceEncoder or mapping
        The encoder or its identity.
    landmarks : mapping, optional
        The Nyul reference landmarks in effect per contrast.
    """
    settings = settings_material(recipe, encoder, landmarks)
    if "landmarks" in settings:
        # The values decide the tokens; where they were read from (a path that differs between a
        # workstation and a container) does not.
        settings["landmarks"] = {
            contrast: {key: value for key, value in item.items() if key != "source"}
            for contrast, item in settings["landmarks"].items()
        }
    settings["format"] = BANK_FORMAT
    settings["projection"] = {
        "projection_dim": int(recipe.projection_dim),
        "projection_seed": int(recipe.projection_seed),
    }
    return settings


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two settings mappings differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        names: list[str] = []
        for key in sorted(set(a) | set(b)):
            names += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return names
    return [] if canonical_json(a) == canonical_json(b) else [prefix.rstrip(".")]


@dataclass
class BankEntry:
    """One banked series, as the manifest lists it."""

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    contrast: str
    series_description: str
    n_tokens: int
    layer_names: list[str]
    file: str  # relative to the bank folder
    sha256: str
    added: str  # ISO 8601 UTC
    source: str  # where it came from (a run's output folder or the input given to `add`)


@dataclass
class BankVolume:
    """A banked series loaded for scoring: its manifest entry and tokens."""

    entry: BankEntry
    tokens: list[np.ndarray]  # per layer (N, D) float32
    coords: np.ndarray  # (N, 3) int64
    grid_shape: tuple[int, int, int]


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class CohortBank:
    """A folder of banked series' tokens with one settings identity.

    Parameters
    ----------
    folder : path-like
        The bank folder.
    settings : mapping, optional
        The settings of the caller (:func:`bank_settings`). When given, a bank with other settings
        is refused (:class:`BankError` listing the fields that differ); when the folder holds no
        bank yet and ``create`` is true, a new bank with these settings is made.
    create : bool, default False
        Create the bank when the folder holds none (needs ``settings``).

    Raises
    ------
    BankError
        No bank and ``create`` false, an unreadable manifest, or other settings.
    """

    def __init__(self, folder: str | os.PathLike, settings: Mapping[str, Any] | None = None, create: bool = False) -> None:
        self.folder = Path(folder).expanduser()
        self.manifest_path = self.folder / MANIFEST
        if self.folder.exists() and not self.folder.is_dir():
            raise BankError(f"cohort bank {self.folder} is a file; point bank.folder at a folder")
        if not self.manifest_path.is_file():
            if not create or settings is None:
                raise BankError(
                    f"no cohort bank at {self.folder} ({MANIFEST} missing); create one with "
                    f"`python -m codegraph3d bank add {self.folder} -i DICOM_FOLDER`, or set bank.add_scored"
                )
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.locked():
                if not self.manifest_path.is_file():
                    write_json_atomic(self.manifest_path, self._new_manifest(settings))
        manifest = self._read_manifest()
        self.settings: dict[str, Any] = manifest["settings"]
        self.settings_id: str = manifest["settings_id"]
        if settings is not None and canonical_json(dict(settings)) != canonical_json(self.settings):
            differing = _differences(self.settings, dict(settings))
            raise BankError(
                f"cohort bank {self.folder} was built with another configuration or encoder "
                f"(differs in: {', '.join(differing[:8])}{' ...' if len(differing) > 8 else ''}); its tokens "
                "cannot be compared with this run's. Point bank.folder at a bank built with this "
                "configuration, or build a new bank in an empty folder with "
                "`python -m codegraph3d bank add NEW_FOLDER -i DICOM_FOLDER`."
            )

    # -- manifest ---------------------------------------------------------------------------

    @staticmethod
    def _new_manifest(settings: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT,
            "created": _utc_now(),
            "settings_id": settings_id({"settings": settings}),
            "settings": dict(settings),
            "entries": [],
        }

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise BankError(
                f"cohort bank manifest {self.manifest_path} cannot be read ({error}); restore it from a "
                "backup or build a new bank"
            ) from error
        if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
            raise BankError(
                f"{self.manifest_path} is not a {BANK_FORMAT} manifest (format "
                f"{manifest.get('format') if isinstance(manifest, dict) else None!r}); build a new bank"
            )
        for key in ("settings", "settings_id", "entries"):
            if key not in manifest:
                raise BankError(f"{self.manifest_path} lacks {key!r}; build a new bank")
        return manifest

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (several runs may share a mounted bank)."""
        with open(self.folder / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def entries(self) -> list[BankEntry]:
        """The manifest's entries (files are not opened)."""
        return [BankEntry(**item) for item in self._read_manifest()["entries"]]

    # -- writing ----------------------------------------------------------------------------

    def add(self, series: Sequence[Mapping[str, Any]], source: str = "") -> list[str]:
        """Add (or replace) series; return their Series Instance UIDs.

        Parameters
        ----------
        series : sequence of mapping
            Each with ``series_instance_uid``, ``study_instance_uid``, ``patient_id``,
            ``contrast``, ``series_description`` and ``tokens`` (a
            :class:`~codegraph3d.features.tokens.TokenSet` projected with the bank's settings).
        source : str
            Where they came from (recorded).
        """
        expected_layers: list[str] | None = None
        staged: list[tuple[BankEntry, dict[str, np.ndarray]]] = []
        width = self.settings["projection"]["projection_dim"]
        for item in series:
            uid = str(item["series_instance_uid"])
            if not is_valid_uid(uid):
                raise BankError(f"SeriesInstanceUID {uid!r} is not a valid DICOM UID; it cannot name a bank entry")
            token_set = item["tokens"]
            if expected_layers is None:
                expected_layers = list(token_set.layer_names)
            for layer in token_set.tokens:
                # Projected ViT tokens are 3 axes x projection_dim wide; narrower encoders keep theirs.
                if layer.shape[1] > 3 * width:
                    raise BankError(
                        f"series {uid}: tokens of width {layer.shape[1]} were not projected to the bank's "
                        f"{width} dimensions per axis"
                    )
            arrays = {
                "coords": np.asarray(token_set.coords, np.int64),
                "grid_shape": np.asarray(token_set.grid_shape, np.int64),
                "layer_names": np.asarray(token_set.layer_names),
                **{f"layer_{i}": np.asarray(t, np.float32) for i, t in enumerate(token_set.tokens)},
            }
            entry = BankEntry(
                series_instance_uid=uid,
                study_instance_uid=str(item["study_instance_uid"]),
                patient_id=str(item.get("patient_id", "")),
                contrast=str(item["contrast"]),
                series_description=str(item.get("series_description", "")),
                n_tokens=int(token_set.n_tokens),
                layer_names=list(token_set.layer_names),
                file=f"{TOKENS_DIR}/{uid}.npz",
                sha256="",
                added=_utc_now(),
                source=source,
            )
            staged.append((entry, arrays))
        if not staged:
            return []
        with self.locked():
            manifest = self._read_manifest()
            for entry, arrays in staged:
                buffer = io.BytesIO()
                np.savez(buffer, **arrays)
                data = buffer.getvalue()
                entry.sha256 = hashlib.sha256(data).hexdigest()
                with atomic_path(self.folder / entry.file) as temporary:
                    temporary.write_bytes(data)
            new = {entry.series_instance_uid for entry, _ in staged}
            manifest["entries"] = [e for e in manifest["entries"] if e["series_instance_uid"] not in new]
            manifest["entries"] += [asdict(entry) for entry, _ in staged]
            write_json_atomic(self.manifest_path, manifest)
            self._forget_scores()
        logger.info("cohort bank %s: added %d series", self.folder, len(staged))
        return [entry.series_instance_uid for entry, _ in staged]

    def remove(self, study_instance_uids: Sequence[str]) -> list[BankEntry]:
        """Remove every series of the given studies; return the removed entries.

        Raises
        ------
        BankError
            When a study UID is not in the bank (nothing is removed then).
        """
        wanted = set(study_instance_uids)
        with self.locked():
            manifest = self._read_manifest()
            present = {e["study_instance_uid"] for e in manifest["entries"]}
            missing = sorted(wanted - present)
            if missing:
                raise BankError(
                    f"cohort bank {self.folder} holds no study {', '.join(missing)}; "
                    f"`python -m codegraph3d bank list {self.folder}` shows what it holds"
                )
            removed = [BankEntry(**e) for e in manifest["entries"] if e["study_instance_uid"] in wanted]
            manifest["entries"] = [e for e in manifest["entries"] if e["study_instance_uid"] not in wanted]
            write_json_atomic(self.manifest_path, manifest)
            self._forget_scores()
            for entry in removed:
                (self.folder / entry.file).unlink(missing_ok=True)
        return removed

    def _forget_scores(self) -> None:
        """Delete the kept scores of drawn volumes (:mod:`~codegraph3d.store.bank_scores`; caller holds the lock).

        Their keys name the volumes, so none would be read again after a change; deleting them
        keeps the folder from filling with scores of draws that no longer happen.
        """
        folder = self.folder / SCORES_DIR
        # With the temporary files a killed writer left behind (atomic_path's ".*.partial").
        for path in sorted([*folder.glob("*.npz"), *folder.glob(".*.partial")]):
            path.unlink(missing_ok=True)

    # -- reading ----------------------------------------------------------------------------

    def load(self, entry: BankEntry) -> BankVolume:
        """Read and verify one entry's tokens.

        Raises
        ------
        BankError
            A missing file, a SHA-256 mismatch, or arrays that do not fit the entry.
        """
        path = self.folder / entry.file
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BankError(f"cohort bank file {path} cannot be read ({error}); run `check --repair`") from error
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BankError(f"cohort bank file {path} does not match its recorded SHA-256; run `check --repair`")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            coords = arrays["coords"]
            tokens = [arrays[f"layer_{i}"] for i in range(len(entry.layer_names))]
            grid_shape = tuple(int(v) for v in arrays["grid_shape"])
        if coords.shape != (entry.n_tokens, 3) or any(t.shape[0] != entry.n_tokens for t in tokens):
            raise BankError(f"cohort bank file {path} holds arrays that do not fit its entry; run `check --repair`")
        return BankVolume(entry=entry, tokens=tokens, coords=coords, grid_shape=grid_shape)  # type: ignore[arg-type]

    def references(
        self,
        contrast: str,
        *,
        exclude_patients: Sequence[str] = (),
        exclude_studies: Sequence[str] = (),
        layer_names: Sequence[str] | None = None,
        max_count: int = 40,
        seed: int = 0,
    ) -> list[BankVolume]:
        """Up to ``max_count`` banked volumes of ``contrast`` for a batch (a seeded draw).

        Volumes of the excluded patients and studies (the batch's own) are never returned, so a
        study is not compared with itself or the same patient's earlier scans. Entries that fail
        verification are skipped with a warning naming the file.
        """
        skip_patients = {p for p in exclude_patients if p}
        skip_studies = set(exclude_studies)
        candidates = [
            e for e in self.entries()
            if e.contrast == contrast
            and e.study_instance_uid not in skip_studies
            and not (e.patient_id and e.patient_id in skip_patients)
            and (layer_names is None or list(layer_names) == e.layer_names)
        ]
        candidates.sort(key=lambda e: e.series_instance_uid)
        order = np.random.default_rng(seed).permutation(len(candidates))
        chosen: list[BankVolume] = []
        for index in order:
            if len(chosen) >= max_count:
                break
            try:
                chosen.append(self.load(candidates[index]))
            except BankError as error:
                logger.warning("cohort bank entry skipped: %s", error)
        return chosen

    def check(self, repair: bool = False) -> list[str]:
        """Verify every entry and look for orphans; return the problems found.

        With ``repair``, entries that fail are dropped from the manifest and orphan files (left by
        a writer that was killed, or by hand) are deleted.
        """
        problems: list[str] = []
        bad: set[str] = set()
        with self.locked():
            entries = self.entries()
            for entry in entries:
                try:
                    self.load(entry)
                except BankError as error:
                    problems.append(str(error))
                    bad.add(entry.series_instance_uid)
            named = {(self.folder / e.file).resolve() for e in entries}
            tokens_dir = self.folder / TOKENS_DIR
            orphans = [
                p for p in (sorted(tokens_dir.iterdir()) if tokens_dir.is_dir() else [])
                if p.resolve() not in named
            ]
            problems += [f"orphan file {p} (no manifest entry names it)" for p in orphans]
            if repair and (bad or orphans):
                manifest = self._read_manifest()
                manifest["entries"] = [e for e in manifest["entries"] if e["series_instance_uid"] not in bad]
                write_json_atomic(self.manifest_path, manifest)
                for entry in entries:
                    if entry.series_instance_uid in bad:
                        (self.folder / entry.file).unlink(missing_ok=True)
                for path in orphans:
                    path.unlink(missing_ok=True)
        return problems
def series_record(record: Any) -> dict[str, Any]:
    """The fields :meth:`CohortBank.add` needs, from a :class:`~codegraph3d.run.pipeline.TokenisedSeries`."""
    decision = record.decision
    return {
        "series_instance_uid": decision.series_instance_uid,
        "study_instance_uid": decision.study_instance_uid,
        "patient_id": decision.patient_id,
        "contrast": decision.contrast,
        "series_description": decision.series_description,
        "tokens": record.tokens,
    }
