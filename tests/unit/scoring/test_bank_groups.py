"""Cohort-bank volumes in a batch are scored against the bank only (``BankGroup`` keys)."""

from __future__ import annotations

import numpy as np
import pytest

from codegraph3d.run.pipeline import bank_groups
from codegraph3d.scoring.batch import score_batch
from codegraph3d.scoring.musc import BankGroup, musc_scores, musc_scores_windowed, reference_sets

OWN = ["p1", "p2", "p1"]
BANK = [BankGroup("b1"), BankGroup("b2"), BankGroup("b3"), BankGroup("b2")]


def _sets(rng: np.random.Generator, sizes: list[int], dim: int = 6) -> list[np.ndarray]:
    return [rng.normal(scale=0.5, size=(n, dim)).astype(np.float32) for n in sizes]


def _grid_sets(rng: np.random.Generator, n_volumes: int, grid: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    coords = [np.argwhere(rng.random((grid, grid, grid)) < 0.7) for _ in range(n_volumes)]
    return [rng.standard_normal((len(c), 5)).astype(np.float32) for c in coords], coords


def test_bank_volumes_reference_only_the_bank_and_serve_the_batch():
    refs = reference_sets(7, OWN + BANK)
    assert refs[0] == [1, 3, 4, 5, 6]  # its own patient (2) left out, every bank volume in
    assert refs[1] == [0, 2, 3, 4, 5, 6]
    assert refs[3] == [4, 5, 6]  # other bank patients only: never the batch
    assert refs[4] == [3, 5]  # b2's two volumes do not reference each other
    assert refs[6] == [3, 5]


def test_bank_volumes_must_follow_the_batchs_own():
    with pytest.raises(ValueError, match="must come after"):
        reference_sets(3, [BankGroup("b1"), "p1", BankGroup("b2")])


@pytest.mark.parametrize("chunk_size", [4096, 4])
def test_global_scores_split_into_the_joint_batch_and_the_bank_alone(chunk_size):
    """The batch's volumes score as in the joint batch; the bank's as if the batch were absent."""
    rng = np.random.default_rng(3)
    sets = _sets(rng, [9, 5, 7, 8, 6, 11, 4])
    got = musc_scores(sets, 0.5, groups=OWN + BANK, device="cpu", chunk_size=chunk_size)
    joint = musc_scores(sets, 0.5, groups=OWN + [g.key for g in BANK], device="cpu", chunk_size=chunk_size)
    alone = musc_scores(sets[3:], 0.5, groups=[g.key for g in BANK], device="cpu", chunk_size=chunk_size)
    for own, want in zip(got[:3], joint[:3]):
        np.testing.assert_allclose(own, want, atol=1e-6, rtol=0)
    for bank, want in zip(got[3:], alone):
        np.testing.assert_allclose(bank, want, atol=1e-6, rtol=0)
    # Different from the joint batch's bank scores: the batch's volumes no longer count there.
    assert max(np.abs(g - j).max() for g, j in zip(got[3:], joint[3:])) > 1e-3


def test_windowed_scores_split_into_the_joint_batch_and_the_bank_alone():
    rng = np.random.default_rng(4)
    sets, coords = _grid_sets(rng, 7)
    got = musc_scores_windowed(sets, coords, (4, 4, 4), 1, 0.5, groups=OWN + BANK, device="cpu")
    joint = musc_scores_windowed(sets, coords, (4, 4, 4), 1, 0.5, groups=OWN + [g.key for g in BANK], device="cpu")
    alone = musc_scores_windowed(sets[3:], coords[3:], (4, 4, 4), 1, 0.5, groups=[g.key for g in BANK], device="cpu")
    for own, want in zip(got[:3], joint[:3]):
        np.testing.assert_allclose(own, want, atol=1e-6, rtol=0)
    for bank, want in zip(got[3:], alone):
        np.testing.assert_allclose(bank, want, atol=1e-6, rtol=0)


def test_score_batch_counts_the_bank_volumes_references():
    rng = np.random.default_rng(5)
    layers = [_sets(rng, [5, 6, 4, 7, 5, 6, 5], dim=4) for _ in range(2)]
    scores = score_batch(layers, k_fraction=0.5, groups=OWN + BANK, device="cpu")
    assert scores.n_references.tolist() == [5, 6, 5, 3, 2, 3, 2]
    assert scores.k.tolist() == [2, 3, 2, 1, 1, 1, 1]


def test_bank_groups_need_two_bank_patients():
    assert bank_groups(["b1", "b2", "b1"]) == [BankGroup("b1"), BankGroup("b2"), BankGroup("b1")]
    # One patient: its volume would have no reference of its own; it is scored with the batch.
    assert bank_groups(["b1"]) == [("bank", "b1")]
    assert bank_groups([]) == []
