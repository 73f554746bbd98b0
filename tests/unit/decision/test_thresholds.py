"""Binary threshold policy and score-to-unit mapping."""

from __future__ import annotations

import numpy as np
import pytest

from codegraph3d.decision.thresholds import (
    binary_token_masks,
    decide_thresholds,
    robust_upper_bound,
    score_to_unit_mapping,
    simulate_all_normal_flag_rate,
    to_unit,
)


def test_all_normal_batch_flags_few():
    rate = simulate_all_normal_flag_rate(n_batches=2, n_volumes=12, n_tokens=40, dim=8, seed=0)
    assert rate < 0.2


def test_never_flags_half_even_with_heavy_tail():
    rng = np.random.default_rng(1)
    for _ in range(20):
        tokens = [rng.standard_cauchy(size=30) ** 2 for _ in range(9)]
        assert decide_thresholds(tokens).flagged.sum() < 9 / 2


def test_outlier_volume_flagged_with_nonempty_local_mask():
    rng = np.random.default_rng(2)
    tokens = [rng.normal(1.0, 0.05, size=200) for _ in range(12)]
    tokens[5][10:15] += 2.0  # a small lesion
    decision = decide_thresholds(tokens)
    assert decision.flagged.tolist() == [i == 5 for i in range(12)]
    assert decision.voxel_threshold <= decision.volume_threshold
    masks = binary_token_masks(tokens, decision)
    assert np.flatnonzero(masks[5]).tolist() == list(range(10, 15))
    assert not any(m.any() for i, m in enumerate(masks) if i != 5)
    assert decision.params["n_volumes"] == 12 and decision.policy


def test_small_batch_and_ties():
    assert not decide_thresholds([np.array([0.0, 5.0]), np.array([1.0])]).flagged.any()
    tied = [np.full(4, 2.0) for _ in range(6)]
    d = decide_thresholds(tied)
    assert not d.flagged.any() and d.volume_threshold > 2.0
    bound, median, mad = robust_upper_bound(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), 3.0)
    assert median == 3.0 and mad == 1.0 and bound == pytest.approx(3.0 + 3 * 1.4826)


def test_unit_mapping():
    tokens = [np.array([0.0, 1.0, 2.0]), np.array([1.0, 4.0])]
    low, high = score_to_unit_mapping(tokens)
    assert (low, high) == (1.0, 4.0)
    np.testing.assert_allclose(to_unit(np.array([-1.0, 1.0, 2.5, 4.0, 9.0]), low, high),
                               [0, 0, 0.5, 1, 1])
    low, high = score_to_unit_mapping([np.ones(3), np.ones(2)])
    assert high > low
    with pytest.raises(ValueError, match="low < high"):
        to_unit(1.0, 2.0, 2.0)


def test_errors():
    with pytest.raises(ValueError, match="volume 1 has no token scores"):
        decide_thresholds([np.ones(2), np.zeros(0)])
    with pytest.raises(ValueError, match="volume_scores has shape"):
        decide_thresholds([np.ones(2), np.ones(2)], np.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        decide_thresholds([np.ones(2), np.array([np.nan])])
