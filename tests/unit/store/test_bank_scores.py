"""The bank volumes' scores against each other, kept in the bank folder for the next batch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from codegraph3d.store import bank_scores
from codegraph3d.store.bank import CohortBank
from codegraph3d.store.bank_scores import keep_bank_scores, load_bank_scores, scores_key
from test_bank import _series, _settings

SCORING = {"method": "musc", "k_fraction": 0.3, "window_radius": 1, "precision": "float32"}


def _bank(tmp_path: Path, n: int = 4) -> tuple[CohortBank, list, list[str]]:
    bank = CohortBank(tmp_path / "bank", _settings(), create=True)
    bank.add([_series(i, n_tokens=10 + i) for i in range(n)])
    volumes = bank.references("T2w", max_count=n)
    return bank, volumes, [v.entry.patient_id for v in volumes]


def _scores(volumes: list, n_layers: int = 2) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.random(v.entry.n_tokens).astype(np.float32) for v in volumes] for _ in range(n_layers)]


def test_kept_scores_come_back_for_the_same_draw_only(tmp_path: Path):
    bank, volumes, groups = _bank(tmp_path)
    assert load_bank_scores(bank, volumes, groups, SCORING, 2) is None
    scores = _scores(volumes)
    assert keep_bank_scores(bank, volumes, groups, SCORING, scores)
    loaded = load_bank_scores(bank, volumes, groups, SCORING, 2)
    assert loaded is not None
    for got_layer, want_layer in zip(loaded, scores):
        for got, want in zip(got_layer, want_layer):
            np.testing.assert_array_equal(got, want)
    # Another order, grouping, draw or scoring setting is another key: nothing comes back.
    assert load_bank_scores(bank, volumes[::-1], groups[::-1], SCORING, 2) is None
    assert load_bank_scores(bank, volumes, ["one"] * len(volumes), SCORING, 2) is None
    assert load_bank_scores(bank, volumes[:3], groups[:3], SCORING, 2) is None
    assert load_bank_scores(bank, volumes, groups, {**SCORING, "k_fraction": 0.5}, 2) is None
    assert len({scores_key(bank, volumes, groups, SCORING), scores_key(bank, volumes, groups, {**SCORING, "window_radius": 2})}) == 2


def test_adding_or_removing_series_forgets_every_kept_score(tmp_path: Path):
    bank, volumes, groups = _bank(tmp_path)
    keep_bank_scores(bank, volumes, groups, SCORING, _scores(volumes))
    bank.add([_series(9)])
    assert load_bank_scores(bank, volumes, groups, SCORING, 2) is None
    keep_bank_scores(bank, volumes, groups, SCORING, _scores(volumes))
    bank.remove(["1.2.3.9"])
    assert load_bank_scores(bank, volumes, groups, SCORING, 2) is None
    assert not list((bank.folder / "scores").glob("*.npz"))


def test_a_damaged_score_file_is_reported_and_ignored(tmp_path: Path, caplog):
    bank, volumes, groups = _bank(tmp_path)
    keep_bank_scores(bank, volumes, groups, SCORING, _scores(volumes))
    [path] = (bank.folder / "scores").glob("*.npz")
    path.write_bytes(path.read_bytes()[:40])
    with caplog.at_level(logging.WARNING):
        assert load_bank_scores(bank, volumes, groups, SCORING, 2) is None
    assert str(path) in caplog.text and "scoring the bank volumes again" in caplog.text
    # Written again, it comes back; a file of fewer layers than the run's does not fit.
    keep_bank_scores(bank, volumes, groups, SCORING, _scores(volumes))
    assert load_bank_scores(bank, volumes, groups, SCORING, 2) is not None
    assert load_bank_scores(bank, volumes, groups, SCORING, 3) is None


def test_scores_that_do_not_fit_the_volumes_are_refused(tmp_path: Path):
    bank, volumes, groups = _bank(tmp_path)
    scores = _scores(volumes)
    scores[1][2] = scores[1][2][:-1]
    with pytest.raises(ValueError, match="tokens"):
        keep_bank_scores(bank, volumes, groups, SCORING, scores)


def test_a_bank_that_cannot_be_written_keeps_nothing_and_says_so(tmp_path: Path, monkeypatch, caplog):
    bank, volumes, groups = _bank(tmp_path)

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(bank_scores, "atomic_path", read_only)
    with caplog.at_level(logging.WARNING):
        assert not keep_bank_scores(bank, volumes, groups, SCORING, _scores(volumes))
    assert "cannot be kept" in caplog.text
    assert load_bank_scores(bank, volumes, groups, SCORING, 2) is None


def test_the_least_recently_used_score_files_go_first(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(bank_scores, "MAX_SCORE_FILES", 2)
    bank, volumes, groups = _bank(tmp_path)
    folder = bank.folder / "scores"

    def kept(k: float) -> bool:
        return load_bank_scores(bank, volumes, groups, {**SCORING, "k_fraction": k}, 2) is not None

    keep_bank_scores(bank, volumes, groups, {**SCORING, "k_fraction": 0.1}, _scores(volumes))
    keep_bank_scores(bank, volumes, groups, {**SCORING, "k_fraction": 0.2}, _scores(volumes))
    # Times set by hand: a file system's coarse clock must not decide which file is older.
    for age, path in enumerate(sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)):
        os.utime(path, (1000 + age, 1000 + age))
    assert kept(0.1)  # read: now the most recently used
    keep_bank_scores(bank, volumes, groups, {**SCORING, "k_fraction": 0.3}, _scores(volumes))
    assert len(list(folder.glob("*.npz"))) == 2
    assert kept(0.1) and kept(0.3) and not kept(0.2)
    # The file just written is never the one deleted, whatever the clock says.
    for path in folder.glob("*.npz"):
        os.utime(path, (5000, 5000))
    keep_bank_scores(bank, volumes, groups, {**SCORING, "k_fraction": 0.4}, _scores(volumes))
    assert kept(0.4) and len(list(folder.glob("*.npz"))) == 2


def test_a_writers_leftovers_go_with_the_scores_when_the_bank_changes(tmp_path: Path):
    bank, volumes, groups = _bank(tmp_path)
    keep_bank_scores(bank, volumes, groups, SCORING, _scores(volumes))
    leftover = bank.folder / "scores" / ".abc.npz.x1.partial"
    leftover.write_bytes(b"half")
    bank.add([_series(9)])
    assert not leftover.exists() and not list((bank.folder / "scores").glob("*.npz"))


def test_scores_of_another_scorer_version_are_not_reused(tmp_path: Path, monkeypatch):
    bank, volumes, groups = _bank(tmp_path)
    keep_bank_scores(bank, volumes, groups, SCORING, _scores(volumes))
    monkeypatch.setattr(bank_scores, "SCORER_VERSION", bank_scores.SCORER_VERSION + 1)
    assert load_bank_scores(bank, volumes, groups, SCORING, 2) is None
