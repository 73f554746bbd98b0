"""MuSc scoring against a float64 brute force, the K rule, group exclusion, chunking, errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from codegraph3d.scoring.batch import BatchScores, score_batch
from codegraph3d.scoring.musc import (
    check_layer_weights,
    fuse_layers,
    k_for_references,
    musc_scores,
    volume_scores,
)


def brute_force(token_sets, k_fraction=0.3, groups=None):
    """Straightforward float64 MuSc: loops, no tricks."""
    sets = [np.asarray(t, dtype=np.float64) for t in token_sets]
    out = []
    for i, query in enumerate(sets):
        refs = [
            j for j in range(len(sets)) if j != i and (groups is None or groups[j] != groups[i])
        ]
        k = max(1, math.floor(k_fraction * len(refs) + 1e-9))
        scores = np.empty(len(query))
        for t, q in enumerate(query):
            nearest = [np.sqrt(((sets[j] - q) ** 2).sum(axis=1)).min() for j in refs]
            scores[t] = np.mean(sorted(nearest)[:k])
        out.append(scores)
    return out


def random_sets(rng, sizes, dim=12):
    return [rng.normal(scale=0.5, size=(n, dim)) for n in sizes]


@pytest.mark.parametrize("sizes", [(7, 13), (5, 9, 4), (6, 11, 3, 8, 10)])
def test_matches_brute_force_unequal_sizes(sizes):
    rng = np.random.default_rng(len(sizes))
    sets = random_sets(rng, sizes)
    got = musc_scores(sets, device="cpu")
    want = brute_force(sets)
    assert [g.shape for g in got] == [(n,) for n in sizes]
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_size", [4096, 200])
def test_long_volumes_cross_blocks_and_lanes_as_a_float64_brute_force(chunk_size):
    """Volumes longer than a CPU reference block (1,536 tokens), segments not whole lanes of 64."""
    from codegraph3d.scoring.musc import nearest_distances

    rng = np.random.default_rng(5)
    sets = random_sets(rng, (1700, 130, 257, 64, 300), dim=13)
    got = nearest_distances([s.astype(np.float32) for s in sets], chunk_size=chunk_size)
    stacked = np.concatenate(sets)
    centred = [s - stacked.mean(axis=0) for s in sets]
    starts = np.cumsum([0] + [len(s) for s in sets])
    for j, ref in enumerate(centred):
        for i, query in enumerate(centred):
            if i != j:
                exact = np.sqrt(((query[:, None, :] - ref[None, :, :]) ** 2).sum(axis=2).min(axis=1))
                np.testing.assert_allclose(got[j, starts[i]:starts[i + 1]], exact, rtol=1e-5, atol=1e-6)


def test_selecting_matmuls_stay_ieee_float32_whatever_the_global_precision():
    """A global "medium" precision would let oneDNN choose neighbours in bf16 on some CPUs."""
    import torch

    from codegraph3d.scoring.musc import selection_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        outside = torch.backends.mkldnn.matmul.fp32_precision
        for precision in ("float32", "tf32"):
            with selection_precision(precision):
                assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
            assert torch.backends.mkldnn.matmul.fp32_precision == outside
    finally:
        torch.set_float32_matmul_precision(before)


def test_k_rule_and_k_fraction():
    assert [k_for_references(b - 1, 0.3) for b in (2, 3, 4, 5, 11, 45)] == [1, 1, 1, 1, 3, 13]
    assert k_for_references(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in binary
    assert k_for_references(9, 1.0) == 9
    rng = np.random.default_rng(3)
    sets = random_sets(rng, [4] * 11, dim=5)  # B - 1 = 10 -> K = 3
    for kf in (0.3, 1.0, 0.05):
        got = musc_scores(sets, kf, device="cpu")
        for g, w in zip(got, brute_force(sets, kf)):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
    # K = 3 really differs from K = 1 and from the mean of all, so the rule is exercised.
    k3 = brute_force(sets, 0.3)[0]
    assert not np.allclose(k3, brute_force(sets, 0.05)[0])
    assert not np.allclose(k3, brute_force(sets, 1.0)[0])


def test_groups_exclude_same_patient():
    rng = np.random.default_rng(4)
    sets = random_sets(rng, [10, 8, 9, 7], dim=6)
    sets.append(sets[0].copy())  # volume 4 duplicates volume 0
    plain = musc_scores(sets, device="cpu")
    assert np.abs(plain[4]).max() < 1e-6 and np.abs(plain[0]).max() < 1e-6
    groups = ["p0", "p1", "p2", "p3", "p0"]
    grouped = musc_scores(sets, groups=groups, device="cpu")
    assert grouped[4].min() > 0.1 and grouped[0].min() > 0.1
    for g, w in zip(grouped, brute_force(sets, groups=groups)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_chunking_is_invisible():
    rng = np.random.default_rng(5)
    sets = random_sets(rng, [11, 5, 9, 7])
    full = musc_scores(sets, chunk_size=4096, device="cpu")
    for chunk in (7, 3):
        small = musc_scores(sets, chunk_size=chunk, device="cpu")
        for a, b in zip(full, small):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_offset_data_stays_accurate():
    # Large common offset: the |q|^2 + |k|^2 - 2 q.k expansion would lose float32 precision.
    rng = np.random.default_rng(6)
    sets = [s + 100.0 for s in random_sets(rng, [6, 8, 5])]
    for g, w in zip(musc_scores(sets, device="cpu"), brute_force(sets)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_errors():
    ok = np.zeros((3, 4))
    with pytest.raises(ValueError, match="at least 2 volumes"):
        musc_scores([ok])
    with pytest.raises(ValueError, match="token set 1 is empty"):
        musc_scores([ok, np.zeros((0, 4))])
    with pytest.raises(ValueError, match="token set 1 must be 2-D"):
        musc_scores([ok, np.zeros(4)])
    with pytest.raises(ValueError, match="feature dimension 5"):
        musc_scores([ok, np.zeros((3, 5))])
    bad = ok.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="token set 1 contains 1 non-finite"):
        musc_scores([ok, bad])
    for kf in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="k_fraction"):
            musc_scores([ok, ok], kf)
    with pytest.raises(ValueError, match="chunk_size"):
        musc_scores([ok, ok], chunk_size=0)
    with pytest.raises(ValueError, match="groups has 3 entries"):
        musc_scores([ok, ok], groups=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"volume 0 \(group 'p'\) has no eligible reference"):
        musc_scores([ok, ok, ok], groups=["p", "p", "p"])
    with pytest.raises(ValueError, match="sequence"):
        musc_scores(np.zeros((2, 3, 4)))


def test_fusion_volume_scores_and_score_batch():
    rng = np.random.default_rng(7)
    layer_a = random_sets(rng, [5, 6, 7], dim=4)
    layer_b = random_sets(rng, [5, 6, 7], dim=9)  # D may differ across layers
    batch = score_batch([layer_a, layer_b], k_fraction=0.3, groups=None, device="cpu")
    assert isinstance(batch, BatchScores)
    a = musc_scores(layer_a, device="cpu")
    b = musc_scores(layer_b, device="cpu")
    for fused, x, y in zip(batch.token_scores, a, b):
        np.testing.assert_allclose(fused, (x + y) / 2, atol=1e-6)
    np.testing.assert_allclose(batch.volume_scores, [f.max() for f in batch.token_scores])
    assert batch.n_references.tolist() == [2, 2, 2] and batch.k.tolist() == [1, 1, 1]
    np.testing.assert_allclose(volume_scores([np.array([1.0, 3.0]), np.array([2.0])]), [3, 2])
    with pytest.raises(ValueError, match="layer 1 volume 0 has shape"):
        fuse_layers([[np.zeros(3)], [np.zeros(4)]])
    with pytest.raises(ValueError, match="layer 1 volume 2 has 8 tokens"):
        score_batch([layer_a, layer_a[:2] + [np.zeros((8, 4))]], device="cpu")


def test_layer_weights_give_the_weighted_mean_and_null_the_plain_one():
    rng = np.random.default_rng(11)
    layer_a = random_sets(rng, [5, 6, 7], dim=4)
    layer_b = random_sets(rng, [5, 6, 7], dim=9)
    plain = score_batch([layer_a, layer_b], device="cpu")
    weighted = score_batch([layer_a, layer_b], device="cpu", layer_weights=[1, 3])
    for fused, x, y in zip(weighted.token_scores, *weighted.per_layer):
        np.testing.assert_allclose(fused, 0.25 * x + 0.75 * y, atol=1e-6)
    # Weights are relative, and equal weights are the plain mean.
    for fused, again in zip(fuse_layers(plain.per_layer, [2.0, 2.0]), plain.token_scores):
        np.testing.assert_allclose(fused, again, atol=1e-7)
    for fused, a in zip(fuse_layers(plain.per_layer, [1, 0]), plain.per_layer[0]):
        np.testing.assert_allclose(fused, a, atol=1e-7)
    np.testing.assert_allclose(weighted.volume_scores, [f.max() for f in weighted.token_scores])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "has 1 weights but the encoder gives 2 layers"),
        ([1.0, -1.0], "numbers >= 0"),
        ([0.0, 0.0], "at least one of them > 0"),
        ([1.0, float("nan")], "numbers >= 0"),
        ([True, 1.0], "numbers >= 0"),
        ([], "numbers >= 0"),
    ],
)
def test_bad_layer_weights_are_refused_before_scoring(weights, message):
    rng = np.random.default_rng(12)
    layers = [random_sets(rng, [4, 5, 6], dim=3) for _ in range(2)]
    with pytest.raises(ValueError, match=re.escape(message)):
        score_batch(layers, device="cpu", layer_weights=weights)
    assert check_layer_weights(None, 3) is None
    assert check_layer_weights([1, 2]) == (1.0, 2.0)


def _random_grid_tokens(rng, n_volumes, grid=4, dim=5):
    sets, coords = [], []
    for _ in range(n_volumes):
        keep = rng.random(grid**3) < 0.7
        c = np.argwhere(keep.reshape(grid, grid, grid))
        coords.append(c)
        sets.append(rng.standard_normal((len(c), dim)).astype(np.float32))
    return sets, coords


def test_windowed_scores_equal_global_when_the_window_covers_the_grid():
    from codegraph3d.scoring.musc import musc_scores_windowed

    rng = np.random.default_rng(5)
    sets, coords = _random_grid_tokens(rng, 4)
    windowed = musc_scores_windowed(sets, coords, (4, 4, 4), radius=3, k_fraction=0.5)
    exact = musc_scores(sets, 0.5)
    for a, b in zip(windowed, exact):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_windowed_scores_only_see_the_window():
    from codegraph3d.scoring.musc import musc_scores_windowed

    # Volume 0's token at (0,0,0) equals volume 1's token at (3,3,3): far apart, so unmatched.
    a = np.array([[1.0, 0.0]], np.float32)
    b = np.array([[1.0, 0.0], [5.0, 5.0]], np.float32)
    coords = [np.array([[0, 0, 0]]), np.array([[3, 3, 3], [0, 0, 1]])]
    (s0, s1) = musc_scores_windowed([a, b], coords, (4, 4, 4), radius=1)
    assert s0[0] == pytest.approx(np.hypot(4.0, 5.0), rel=1e-6)  # matched to (0,0,1) only
    assert s1[0] == 0.0  # (3,3,3) has no neighbour within the window in volume 0
    assert musc_scores([a, b])[0][0] == pytest.approx(0.0)  # global matching finds the twin
    with pytest.raises(ValueError, match="radius"):
        musc_scores_windowed([a, b], coords, (4, 4, 4), radius=-1)


@pytest.mark.parametrize("chunk_size", [4, 4096])
def test_windowed_nearest_distances_match_a_float64_brute_force(chunk_size):
    from codegraph3d.scoring.musc import nearest_distances

    rng = np.random.default_rng(11)
    grid = (5, 4, 6)
    coords, sets = [], []
    for _ in range(5):
        c = np.argwhere(rng.random(grid) < 0.6)
        coords.append(c)
        sets.append((rng.standard_normal((len(c), 7)) + 3.0).astype(np.float32))  # off-centre
    groups = ["a", "b", "a", "c", "d"]
    got = nearest_distances(sets, groups=groups, device="cpu", chunk_size=chunk_size, window_radius=1,
                            coords=coords, grid_shape=grid)
    starts = np.cumsum([0] + [len(s) for s in sets])
    for i in range(5):
        for j in range(5):
            block = got[j, starts[i] : starts[i + 1]]
            if i == j or groups[i] == groups[j]:
                assert np.isinf(block).all()
                continue
            for t, (c, q) in enumerate(zip(coords[i], sets[i].astype(np.float64))):
                near = np.abs(coords[j] - c).max(axis=1) <= 1
                want = np.sqrt(((sets[j][near].astype(np.float64) - q) ** 2).sum(axis=1)).min() if near.any() else np.inf
                assert block[t] == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_nearest_distances_reduce_to_musc_exactly():
    from codegraph3d.scoring.musc import (
        musc_from_distances,
        musc_scores_windowed,
        nearest_distances,
    )

    rng = np.random.default_rng(8)
    sets = random_sets(rng, [6, 9, 5, 7], dim=4)
    groups = ["a", "b", "a", "c"]
    dist = nearest_distances(sets, groups=groups, device="cpu", chunk_size=4)
    assert dist.shape == (4, 27) and dist.dtype == np.float32
    starts = np.cumsum([0, 6, 9, 5, 7])
    for i in range(4):
        for j in range(4):
            block = dist[j, starts[i] : starts[i + 1]]
            if i == j or groups[i] == groups[j]:
                assert np.isinf(block).all()
            else:
                want = np.sqrt(((sets[i][:, None, :] - sets[j][None]) ** 2).sum(-1)).min(axis=1)
                np.testing.assert_allclose(block, want, rtol=1e-6)
    reduced = musc_from_distances(dist, [6, 9, 5, 7], 0.5, groups=groups)
    direct = musc_scores(sets, 0.5, groups=groups, device="cpu", chunk_size=4)
    assert all(np.array_equal(a, b) for a, b in zip(reduced, direct))

    grid_sets, coords = _random_grid_tokens(rng, 4)
    windowed = nearest_distances(
        grid_sets, device="cpu", window_radius=1, coords=coords, grid_shape=(4, 4, 4)
    )
    reduced = musc_from_distances(windowed, [len(s) for s in grid_sets], 0.7)
    direct = musc_scores_windowed(grid_sets, coords, (4, 4, 4), radius=1, k_fraction=0.7)
    assert all(np.array_equal(a, b) for a, b in zip(reduced, direct))


def test_musc_from_distances_skips_inf_and_checks_input():
    from codegraph3d.scoring.musc import musc_from_distances

    inf = np.inf
    # 4 volumes of one token; column v is token v; K = floor(1.0 * 3) = 3.
    dist = np.array(
        [[inf, 1.0, inf, 2.0], [1.0, inf, inf, 4.0], [inf, 3.0, inf, 6.0], [3.0, 5.0, inf, inf]],
        dtype=np.float32,
    )
    scores = musc_from_distances(dist, [1, 1, 1, 1], 1.0)
    assert [float(s[0]) for s in scores] == [2.0, 3.0, 0.0, 4.0]
    with pytest.raises(ValueError, match=r"distances must have shape \(4, 5\)"):
        musc_from_distances(dist, [1, 1, 1, 2], 1.0)
    bad = dist.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        musc_from_distances(bad, [1, 1, 1, 1], 1.0)


def test_score_batch_method_argument():
    rng = np.random.default_rng(9)
    layer = random_sets(rng, [5, 6, 7], dim=4)
    default = score_batch([layer], device="cpu")
    explicit = score_batch([layer], device="cpu", method="musc")
    assert default.codegraph is None
    assert all(np.array_equal(a, b) for a, b in zip(default.token_scores, explicit.token_scores))
    with pytest.raises(ValueError, match="method must be one of"):
        score_batch([layer], method="MuSc")


def test_memory_budget_lowers_the_chunk_size_without_changing_scores():
    from codegraph3d.scoring.musc import ALLOCATOR_FACTOR, fit_chunk_size, scoring_memory

    rng = np.random.default_rng(5)
    sets = [[rng.standard_normal((n, 24)).astype(np.float32) for n in (700, 650, 720, 690)]]
    sizes = [a.shape[0] for a in sets[0]]
    estimate = scoring_memory(sizes, 24, chunk_size=4096)
    assert estimate.per_chunk == 8 * 4096**2
    budget_mb = ALLOCATOR_FACTOR * (estimate.fixed + 16 * 300 * 300) / 2**20
    fitted = fit_chunk_size(sizes, 24, budget_mb, chunk_size=4096)
    assert 256 <= fitted <= 300
    assert ALLOCATOR_FACTOR * scoring_memory(sizes, 24, chunk_size=fitted).total <= budget_mb * 2**20
    assert fit_chunk_size(sizes, 24, 10_000, chunk_size=4096) == 4096
    bounded = score_batch(sets, memory_budget_mb=budget_mb)
    unbounded = score_batch(sets)
    for a, b in zip(bounded.token_scores, unbounded.token_scores):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_batch_too_large_for_the_budget_is_refused_with_the_batch_size_that_fits():
    from codegraph3d.scoring.musc import ALLOCATOR_FACTOR, fit_chunk_size, scoring_memory

    sizes = [2000] * 180
    with pytest.raises(ValueError, match=r"180 volumes .* over the memory budget of 512 MB; split the cohort into chunks of at most (\d+) volumes") as error:
        fit_chunk_size(sizes, 384, 512)
    fit_b = int(re.search(r"at most (\d+) volumes", str(error.value)).group(1))
    assert 2 <= fit_b < 180
    assert ALLOCATOR_FACTOR * scoring_memory([2000] * fit_b, 384, chunk_size=256).total <= 512 * 2**20
    assert ALLOCATOR_FACTOR * scoring_memory([2000] * (fit_b + 1), 384, chunk_size=256).total > 512 * 2**20
    windowed = scoring_memory(sizes, 384, window_radius=1, grid_shape=(16, 16, 16))
    # The global scorer holds copies of the tokens that select: the queries with their norms and
    # the keys, 2 x 180 x 2000 rows of D + 2 floats padded to 392 (on a GPU the keys in slots,
    # 386 wide, unless a volume is too long for slots: the larger of the two is counted).
    global_cpu = scoring_memory(sizes, 384).fixed
    without_copies = global_cpu - 2 * 4 * 180 * 2000 * 392
    # Both hold running minima and indices with one dump column; the window adds its padded
    # grid of row indices (B x 18^3 x 8 bytes).
    assert windowed.fixed - without_copies == 8 * 180 * 18**3
    assert scoring_memory(sizes, 384, accelerator=True).fixed == global_cpu
    uneven = [4000] + [100] * 179  # slots of the longest volume outgrow the stacked rows
    slots = 4 * (sum(uneven) + 180 * 4000) * 386
    assert scoring_memory(uneven, 384, accelerator=True).fixed - scoring_memory(uneven, 384).fixed == (
        slots - 2 * 4 * sum(uneven) * 392)
    assert windowed.per_chunk == 12 * 4096**2


@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_selection_precision_keeps_distances_within_the_documented_bound(precision: str):
    """Exact float64 brute force against the scorer's chosen-neighbour distances."""
    from codegraph3d.scoring.musc import nearest_distances, selection_error_bound, selection_precision

    rng = np.random.default_rng(11)
    base = rng.standard_normal((1, 64))
    # Near-duplicate tokens make near ties, where the selection arithmetic matters.
    sets = [(base + 0.05 * rng.standard_normal((300, 64)) + rng.standard_normal((300, 1)) * 0.01).astype(np.float32)
            for _ in range(4)]
    with selection_precision(precision):
        got = nearest_distances(sets, chunk_size=128).astype(np.float64)
    stacked = np.concatenate(sets).astype(np.float64)
    mean = stacked.mean(axis=0)
    starts = np.cumsum([0] + [len(a) for a in sets])
    n_changed = 0
    for j, ref in enumerate(sets):
        ref64 = ref.astype(np.float64) - mean
        for i, query in enumerate(sets):
            if i == j:
                continue
            q64 = query.astype(np.float64) - mean
            d2 = ((q64[:, None, :] - ref64[None, :, :]) ** 2).sum(axis=2)
            exact = np.sqrt(d2.min(axis=1))
            reported = got[j, starts[i]:starts[i + 1]]
            bound = np.array([
                selection_error_bound(np.linalg.norm(q), np.linalg.norm(ref64, axis=1).max(), 64, precision)
                for q in q64
            ])
            assert np.all(reported >= exact * (1 - 1e-6))
            assert np.all(reported**2 <= exact**2 + bound + 1e-9)
            n_changed += int(np.sum(reported > exact * (1 + 1e-6)))
    if precision == "float32":
        assert n_changed == 0
    assert selection_error_bound(1.0, 1.0, 384, "tf32") > selection_error_bound(1.0, 1.0, 384, "float32")


def test_precision_is_validated_and_restored():
    import torch

    from codegraph3d.scoring.musc import selection_precision

    before = torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(ValueError, match="float32"):
        with selection_precision("bf16"):
            pass
    with selection_precision("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cuda.matmul.allow_tf32 == before
    sets = [[np.random.default_rng(v).standard_normal((50, 8)).astype(np.float32) for v in range(3)]]
    a = score_batch(sets, precision="tf32")
    b = score_batch(sets)
    for x, y in zip(a.token_scores, b.token_scores):
        np.testing.assert_allclose(x, y, rtol=1e-3)


def test_inputs_are_left_as_given_and_a_repeated_volume_matches_itself():
    """Centring works on copies: float64 inputs are not changed, one array given twice is at 0."""
    rng = np.random.default_rng(31)
    x, y = rng.normal(size=(9, 6)) + 5.0, rng.normal(size=(7, 6)) + 5.0
    before = x.copy()
    scores = musc_scores([x, x, y], device="cpu")
    np.testing.assert_array_equal(x, before)
    assert np.abs(scores[0]).max() < 1e-6 and np.abs(scores[1]).max() < 1e-6


@pytest.mark.parametrize("precision", ["float32", "tf32"])
@pytest.mark.parametrize("chunk_size", [4096, 11, 4])
def test_accelerator_layout_matches_a_float64_brute_force(chunk_size, precision):
    """The GPU path (slots of the largest volume's size, many volumes per matmul), run on CPU.

    Unequal sizes (padding slots), patient groups (gaps in the later volumes), and small chunks
    (queries split into several chunks: the column minima become running minima). The data are
    well separated, so TF32's rounding picks the same neighbours here.
    """
    import torch

    from codegraph3d.scoring import musc

    rng = np.random.default_rng(21)
    sets = random_sets(rng, [7, 12, 3, 9, 5, 10, 6])
    groups = ["a", "b", "c", "a", "d", "e", "b"]
    batch = musc._prepare_batch(sets, groups)
    tokens, sq_norms = musc._stack_centred(batch, torch.device("cpu"))
    with musc.selection_precision(precision):  # float32: augmented rows; tf32: norms added after
        chosen = musc._padded_nearest(batch, tokens, sq_norms, chunk_size)
    got = musc._exact_distances(batch, tokens, chosen, chunk_size).numpy()
    starts = batch.starts
    for j, ref in enumerate(sets):
        for i, query in enumerate(sets):
            block = got[j, starts[i]:starts[i + 1]]
            if i == j or groups[i] == groups[j]:
                assert np.all(np.isinf(block))
                continue
            want = np.sqrt(((query[:, None, :] - ref[None, :, :]) ** 2).sum(axis=2)).min(axis=1)
            np.testing.assert_allclose(block, want, atol=1e-5, rtol=0)
    # And the CPU path chooses the same neighbours.
    cpu = musc.nearest_distances(sets, groups=groups, chunk_size=chunk_size, device="cpu")
    np.testing.assert_allclose(got, cpu, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_cols", [5, 127, 128, 200, 1000, 1536])
@pytest.mark.parametrize("ties", [False, True])
def test_block_minima_by_lanes_and_groups_equal_plain_minima(n_cols, ties):
    import torch

    from codegraph3d.scoring.musc import column_argmin, row_argmin

    generator = torch.Generator().manual_seed(n_cols)
    block = torch.randn(333, n_cols + 37, generator=generator)
    if ties:  # few distinct values: many rows and columns hold their minimum more than once
        block = torch.randint(0, 4, block.shape, generator=generator).float()
    segment = block[:, 17 : 17 + n_cols]  # a strided column slice, as the scorer passes
    cases = ((row_argmin(segment), segment.min(dim=1), 1), (column_argmin(segment), segment.min(dim=0), 0))
    for got, expected, dim in cases:
        assert torch.equal(got[0], expected.values)
        # The index may differ on ties, but must hold the minimum.
        assert torch.equal(segment.gather(dim, got[1].unsqueeze(dim)).squeeze(dim), expected.values)
