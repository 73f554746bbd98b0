"""Cohort-bank volumes in a batch are scored against the bank only (``BankGroup`` keys)."""

from __future__ import annotations

import numpy as np
import pytest

from codegraph3d.run.pipeline import bank_groups
from codegraph3d.scoring.batch import known_scores_pay, score_batch
from codegraph3d.scoring.musc import BankGroup, musc_scores, musc_scores_first, musc_scores_windowed, reference_sets

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


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("chunk_size", [4096, 4])
def test_known_bank_scores_give_the_batch_its_scores_with_the_bank_unscored(windowed, chunk_size):
    """The bank's scores kept from one batch stand for them in the next: the batch's own score as if scored anew."""
    rng = np.random.default_rng(6)
    sets, coords = _grid_sets(rng, 10)
    layers = [sets, [s[:, :3] * 2 for s in sets]]
    # One study against nine bank volumes (two of one patient): scoring the study alone pays.
    groups = ["p1"] + [BankGroup(f"b{i}") for i in range(8)] + [BankGroup("b0")]
    options = dict(k_fraction=0.5, groups=groups, device="cpu", chunk_size=chunk_size,
                   window_radius=1 if windowed else None, coords=coords, grid_shape=(4, 4, 4))
    full = score_batch(layers, **options)
    known = [layer[1:] for layer in full.per_layer]
    reused = score_batch(layers, known_scores=known, **options)
    for got, want in zip(reused.token_scores, full.token_scores):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert reused.n_references.tolist() == full.n_references.tolist() and reused.k.tolist() == full.k.tolist()
    # The known scores are taken as given, not recomputed.
    shifted = score_batch(layers, known_scores=[[s + 1 for s in layer] for layer in known], **options)
    np.testing.assert_allclose(shifted.token_scores[3], full.token_scores[3] + 1, atol=1e-6)
    np.testing.assert_allclose(shifted.token_scores[0], full.token_scores[0], atol=1e-6)


@pytest.mark.parametrize("windowed", [False, True])
def test_known_scores_that_would_not_pay_are_scored_again(windowed):
    """Three studies of seven volumes: scoring them alone would cost more than the whole batch."""
    rng = np.random.default_rng(9)
    sets, coords = _grid_sets(rng, 7)
    options = dict(k_fraction=0.5, groups=OWN + BANK, device="cpu", window_radius=1 if windowed else None,
                   coords=coords, grid_shape=(4, 4, 4))
    full = score_batch([sets], **options)
    shifted = score_batch([sets], known_scores=[[s + 1 for s in full.per_layer[0][3:]]], **options)
    for got, want in zip(shifted.token_scores, full.token_scores):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_known_scores_pay_where_the_studies_pairs_cost_less_than_the_batch():
    assert known_scores_pay(1, 41, None) and known_scores_pay(1, 41, 1)
    assert known_scores_pay(12, 52, None) and not known_scores_pay(12, 52, 1)
    assert known_scores_pay(5, 45, 1) and not known_scores_pay(6, 46, 1)


def test_musc_scores_first_scores_the_leading_volumes_only():
    rng = np.random.default_rng(7)
    sets = _sets(rng, [9, 5, 7, 8, 6, 11, 4])
    full = musc_scores(sets, 0.5, groups=OWN + BANK, device="cpu")
    first = musc_scores_first(sets, 2, 0.5, groups=OWN + BANK, device="cpu")
    assert len(first) == 2
    for got, want in zip(first, full):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    for bad in (0, 8, True, 1.5):
        with pytest.raises(ValueError, match="n_scored"):
            musc_scores_first(sets, bad, 0.5, groups=OWN + BANK, device="cpu")


@pytest.mark.parametrize(
    "groups, known, options, match",
    [
        # Bank volumes that reference the batch's own cannot have scores known beforehand.
        (OWN + [g.key for g in BANK], lambda k: [layer[3:] for layer in k], {}, "cannot stand for theirs"),
        (OWN + BANK, lambda k: [layer[2:] for layer in k], {}, "cannot stand for theirs"),
        (OWN + BANK, lambda k: [layer[3:] for layer in k], {"method": "codegraph"}, "method 'musc' only"),
        (OWN + BANK, lambda k: [k[0][3:]], {}, "one list per layer"),
        (OWN + BANK, lambda k: [[s[:-1] for s in layer[3:]] for layer in k], {}, "shape"),
        (OWN + BANK, lambda k: [[] for _ in k], {}, "known scores for 0 of 7 volumes"),
        (OWN + BANK, lambda k: k, {}, "known scores for 7 of 7 volumes"),
    ],
)
def test_known_scores_that_cannot_stand_are_refused(groups, known, options, match):
    rng = np.random.default_rng(8)
    layers = [_sets(rng, [5, 6, 4, 7, 5, 6, 5], dim=4) for _ in range(2)]
    full = score_batch(layers, k_fraction=0.5, groups=OWN + BANK, device="cpu")
    with pytest.raises(ValueError, match=match):
        score_batch(layers, k_fraction=0.5, groups=groups, device="cpu", known_scores=known(full.per_layer), **options)
