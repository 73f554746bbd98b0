"""A cohort bank's volumes scored against each other, kept so that the next batch skips that work.

A study that arrives alone is scored with up to ``bank.max_references`` bank volumes. The bank
volumes reference only each other (:class:`~codegraph3d.scoring.musc.BankGroup`), so their MuSc
scores do not depend on the study: with 40 bank volumes they are 780 of the batch's 820 volume
pairs, computed again for every study that draws the same volumes. This module keeps them in the
bank folder, keyed by everything they depend on, so that a batch drawing the same volumes scores
only its own (:func:`codegraph3d.scoring.batch.score_batch`, ``known_scores``).

Layout::

    <bank>/scores/<key>.npz   per layer, the drawn volumes' scores end to end, their token counts, the key

The key hashes the bank's settings id, the drawn volumes in order (Series Instance UID and the
SHA-256 of their token file), their scoring groups, the scoring settings the caller names and
the scorer's version (the product's and :data:`~codegraph3d.scoring.musc.SCORER_VERSION`), so
that a bank shared by two releases never mixes their scores. Adding to or removing from the bank
deletes every kept score (:class:`~codegraph3d.store.bank.CohortBank`), and at most
:data:`MAX_SCORE_FILES` are kept (the least recently used go; reading one counts as a use). A file that does not match its key or
its volumes is ignored with a warning and written again; a bank folder mounted read-only keeps
nothing and costs nothing but the work saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from codegraph3d import __version__
from codegraph3d.core.files import atomic_path
from codegraph3d.scoring.musc import SCORER_VERSION
from codegraph3d.store.bank import SCORES_DIR, BankVolume, CohortBank
from codegraph3d.store.cache import canonical_json

__all__ = ["MAX_SCORE_FILES", "SCORES_FORMAT", "keep_bank_scores", "load_bank_scores", "scores_key"]

logger = logging.getLogger(__name__)

SCORES_FORMAT = "codegraph3d.bank-scores/1"
#: Kept score files per bank: one per distinct draw (a draw differs when a study's own patient is
#: in the bank, or after the bank changed, which deletes them all anyway).
MAX_SCORE_FILES = 16


def scores_key(bank: CohortBank, volumes: Sequence[BankVolume], groups: Sequence[str],
               scoring: Mapping[str, Any]) -> str:
    """The 32 hex digits that name the scores of ``volumes`` scored against each other.

    Parameters
    ----------
    bank : CohortBank
    volumes : sequence of BankVolume
        The drawn bank volumes, in batch order.
    groups : sequence of str
        Each volume's scoring group (its patient): volumes of one group never reference each other.
    scoring : mapping
        JSON-able scoring settings the scores depend on (method, ``k_fraction``, window, precision).
    """
    if len(groups) != len(volumes):
        raise ValueError(f"{len(groups)} groups for {len(volumes)} bank volumes")
    material = {
        "format": SCORES_FORMAT, "settings_id": bank.settings_id, "scoring": dict(scoring),
        "scorer": {"product": __version__, "musc": SCORER_VERSION},
        "volumes": [[v.entry.series_instance_uid, v.entry.sha256, str(g)] for v, g in zip(volumes, groups)],
    }
    return hashlib.sha256(canonical_json(material)).hexdigest()[:32]


def load_bank_scores(bank: CohortBank, volumes: Sequence[BankVolume], groups: Sequence[str],
                     scoring: Mapping[str, Any], n_layers: int) -> list[list[np.ndarray]] | None:
    """The kept scores (``[layer][volume]`` float32) of these volumes, or None when none are kept.

    A file that cannot be read or does not fit the volumes is reported and treated as absent.
    """
    key = scores_key(bank, volumes, groups, scoring)
    path = bank.folder / SCORES_DIR / f"{key}.npz"
    if not path.is_file():
        return None
    sizes = [int(v.entry.n_tokens) for v in volumes]
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # deleted by a writer since (the bank changed): none kept
        return None
    except OSError as error:
        logger.warning("cohort bank scores %s cannot be read (%s); scoring the bank volumes again", path, error)
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            fits = str(arrays["key"]) == key and arrays["sizes"].tolist() == sizes
            layers = [np.asarray(arrays[f"layer_{i}"], np.float32) for i in range(n_layers)] if fits else []
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logger.warning("cohort bank scores %s cannot be read (%s); scoring the bank volumes again", path, error)
        return None
    if not fits or any(layer.shape != (sum(sizes),) or not np.isfinite(layer).all() for layer in layers):
        logger.warning("cohort bank scores %s do not fit the drawn volumes; scoring them again", path)
        return None
    with contextlib.suppress(OSError):  # a read-only bank cannot record the use; the scores still hold
        os.utime(path)  # a use: the least recently used files are the ones deleted
    bounds = np.cumsum([0, *sizes])
    return [[layer[bounds[i]:bounds[i + 1]] for i in range(len(sizes))] for layer in layers]


def keep_bank_scores(bank: CohortBank, volumes: Sequence[BankVolume], groups: Sequence[str],
                     scoring: Mapping[str, Any], per_layer: Sequence[Sequence[np.ndarray]]) -> bool:
    """Keep the bank volumes' scores (``per_layer[layer][volume]``) for later batches; False if not written.

    Written under the bank's lock and renamed into place, so a reader sees a whole file or none;
    the least recently used files beyond :data:`MAX_SCORE_FILES` are deleted, never this one. A
    folder that cannot be written (mounted read-only) is reported and changes nothing else.
    """
    sizes = [int(v.entry.n_tokens) for v in volumes]
    for layer in per_layer:
        if [int(np.shape(values)[0]) for values in layer] != sizes:
            raise ValueError(f"scores of {[np.shape(values) for values in layer]} for bank volumes of {sizes} tokens")
    key = scores_key(bank, volumes, groups, scoring)
    arrays = {"key": np.asarray(key), "sizes": np.asarray(sizes, np.int64),
              **{f"layer_{i}": np.concatenate([np.asarray(v, np.float32) for v in layer])
                 for i, layer in enumerate(per_layer)}}
    target = bank.folder / SCORES_DIR / f"{key}.npz"
    try:
        with bank.locked():
            with atomic_path(target) as temporary:
                with open(temporary, "wb") as handle:
                    np.savez(handle, **arrays)
            others = sorted((p for p in target.parent.glob("*.npz") if p != target),
                            key=lambda p: p.stat().st_mtime, reverse=True)
            for old in others[MAX_SCORE_FILES - 1:]:
                old.unlink(missing_ok=True)
    except OSError as error:
        logger.warning("cohort bank %s: its volumes' scores cannot be kept (%s); every batch scores them again",
                       bank.folder, error)
        return False
    return True

