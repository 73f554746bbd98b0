"""The lesion decision policy (codegraph3d.decision.lesion_policy) on small synthetic token batches."""

from __future__ import annotations

import numpy as np
import pytest

from codegraph3d.run.config import ConfigError, load_config
from codegraph3d.decision.lesion_policy import (
    LesionPolicy, bank_calibration, calibration_rank, decide_lesions, fitted_levels, position_statistics, relative_z,
    rim_positions, shortfall_tokens, standardise, tail_spread, token_findings, volume_level,
)
from codegraph3d.decision.operating_point import bank_operating_point

GRID = (8, 8, 8)


def _batch(n_volumes: int, seed: int, hot_spot: float = 0.0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All-normal volumes: every position's scores vary a little around a position-dependent mean.

    ``hot_spot`` raises one corner of the grid in every volume alike (an anatomical hot spot).
    """
    rng = np.random.default_rng(seed)
    coords = np.argwhere(np.ones(GRID, bool))
    base = 1.0 + 0.2 * rng.random(len(coords))
    base[(coords < 2).all(axis=1)] += hot_spot
    scores = [base + 0.02 * rng.standard_normal(len(coords)) for _ in range(n_volumes)]
    return scores, [coords.copy() for _ in range(n_volumes)]


def _cube(coords: np.ndarray, centre: tuple[int, int, int], size: int) -> np.ndarray:
    """Tokens within ``size - 1`` grid steps of ``centre`` along every axis."""
    return (np.abs(coords - np.asarray(centre)) < size).all(axis=1)


def test_a_lesion_is_flagged_and_the_mask_values_cover_it():
    scores, coords = _batch(12, seed=0)
    lesion = _cube(coords[3], (4, 4, 4), 2)
    scores[3] = scores[3] + np.where(lesion, 0.5, 0.0)
    policy = LesionPolicy(token_z=4.5, finding_mass=5.0, voxel_z=10.0)
    decision = decide_lesions(scores, coords, GRID, policy)
    assert decision.flagged.tolist() == [i == 3 for i in range(12)]
    (finding,) = [f for f in decision.findings[3] if f.passed]
    assert set(finding.tokens.tolist()) == set(np.flatnonzero(lesion).tolist())
    # Inside the finding the values exceed the mask bound; elsewhere they never do.
    assert (decision.mask_values[3][lesion] > policy.voxel_z).all()
    assert (decision.mask_values[3][~lesion] <= policy.voxel_z).all()
    assert all((values <= policy.voxel_z).all() for i, values in enumerate(decision.mask_values) if i != 3)


def test_a_hot_spot_every_volume_shares_is_not_a_finding():
    # Raw scores: the hot spot is the highest region of every volume. Per position it is normal.
    scores, coords = _batch(12, seed=1, hot_spot=0.8)
    decision = decide_lesions(scores, coords, GRID, LesionPolicy(finding_mass=5.0))
    assert not decision.flagged.any()
    assert max(float(z.max()) for z in decision.z) < 6.0


def test_flags_do_not_move_with_prevalence():
    # The same lesion volume in a batch with 1 and with 6 lesioned volumes of 12 (at other places).
    policy = LesionPolicy(finding_mass=5.0)
    results = []
    for n_lesioned in (1, 6):
        scores, coords = _batch(12, seed=2)
        for v, centre in zip(range(n_lesioned), [(4, 4, 4), (1, 6, 2), (6, 1, 5), (2, 2, 6), (6, 6, 1), (3, 6, 6)]):
            scores[v] = scores[v] + np.where(_cube(coords[v], centre, 1), 0.5, 0.0)
        decision = decide_lesions(scores, coords, GRID, policy)
        results.append(decision.flagged[:n_lesioned].all() and not decision.flagged[n_lesioned:].any())
    assert results == [True, True]


def test_bank_references_give_the_statistics():
    bank_scores, bank_coords = _batch(10, seed=3)
    query_scores, query_coords = _batch(1, seed=4)
    lesion = _cube(query_coords[0], (4, 4, 4), 1)
    query_scores[0] = query_scores[0] + np.where(lesion, 0.5, 0.0)
    decision = decide_lesions(query_scores, query_coords, GRID, LesionPolicy(finding_mass=5.0),
                              reference_scores=bank_scores, reference_coords=bank_coords)
    assert decision.reference == "bank" and decision.flagged.tolist() == [True]
    assert decision.params["n_reference_volumes"] == 10


def test_evidence_is_in_z_times_ml():
    z = np.array([6.5, 5.5, 0.0])
    coords = np.array([[0, 0, 0], [0, 0, 1], [5, 5, 5]])
    policy = LesionPolicy(token_z=4.5, finding_mass=10.0)
    (finding,) = token_findings(z, z, coords, GRID, policy, token_ml=2.0)
    assert finding.mass == pytest.approx((2.0 + 1.0) * 2.0) and not finding.passed
    (finding,) = token_findings(z, z, coords, GRID, policy, token_ml=4.0)
    assert finding.mass == pytest.approx(12.0) and finding.passed


def test_a_broad_mild_group_is_not_a_finding_when_findings_must_be_focal():
    # Same evidence (6 z x ml): twelve tokens 0.5 above token_z, or two tokens 3 above it.
    coords = np.array([[x, y, 0] for x in range(4) for y in range(3)] + [[6, 6, 6], [6, 6, 7]])
    z = np.r_[np.full(12, 5.0), 7.5, 7.5]
    loose = token_findings(z, z, coords, GRID, LesionPolicy(token_z=4.5, finding_mass=5.0))
    assert [round(f.mass, 6) for f in loose] == [6.0, 6.0] and all(f.passed for f in loose)
    focal = LesionPolicy(token_z=4.5, finding_mass=5.0, finding_excess=2.0)
    found = token_findings(z, z, coords, GRID, focal)
    assert {f.n_tokens: f.passed for f in found} == {12: False, 2: True}
    assert {f.n_tokens: round(f.excess, 6) for f in found} == {12: 0.5, 2: 3.0}
    # The bank calibration's evidence counts only focal groups.
    assert focal.evidence(found) == pytest.approx(6.0)
    assert focal.evidence([f for f in found if f.n_tokens == 12]) == 0.0


def _raised_everywhere(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A batch of 12 whose volume 5 is mildly raised at every position (a series acquired unlike the others)."""
    scores, coords = _batch(12, seed=seed)
    scores[5] = scores[5] + 0.06
    return scores, coords


def test_a_volume_raised_everywhere_is_measured_from_its_own_level():
    scores, coords = _raised_everywhere(seed=7)
    plain = LesionPolicy(token_z=3.0, finding_mass=5.0)
    before = decide_lesions(scores, coords, GRID, plain)
    # Position statistics alone: its many small excesses form a broad finding.
    assert before.flagged.tolist() == [i == 5 for i in range(12)]
    assert np.median(before.z[5]) > 2.0
    levelled = LesionPolicy(token_z=3.0, finding_mass=5.0, subtract_volume_level=True)
    after = decide_lesions(scores, coords, GRID, levelled)
    assert not after.flagged.any()
    assert after.z[5] == pytest.approx(before.z[5] - np.median(before.z[5]), abs=1e-5)
    # A lesion in that volume is a local excess over its level: still found, and only there.
    lesion = _cube(coords[5], (4, 4, 4), 2)
    scores[5] = scores[5] + np.where(lesion, 0.5, 0.0)
    found = decide_lesions(scores, coords, GRID, levelled)
    assert found.flagged.tolist() == [i == 5 for i in range(12)]
    (finding,) = [f for f in found.findings[5] if f.passed]
    assert set(np.flatnonzero(lesion).tolist()) <= set(finding.tokens.tolist())
    assert finding.n_tokens <= lesion.sum() + 2  # a neighbour or two of the raised background at most


def test_the_volume_level_never_raises_a_z():
    z = np.array([-3.0, -1.0, -0.5, 0.5, 6.0], np.float32)
    assert volume_level(z) == 0.0
    assert relative_z(z, LesionPolicy(subtract_volume_level=True)) == pytest.approx(z)
    raised = z + 2.0
    assert volume_level(raised) == pytest.approx(1.5)
    assert relative_z(raised, LesionPolicy(subtract_volume_level=True)) == pytest.approx(raised - 1.5)
    assert relative_z(raised, LesionPolicy()) is raised


def test_the_volume_level_is_not_subtracted_with_bank_references():
    # The bank's calibrated bound already carries its volumes' whole-series offsets.
    rng = np.random.default_rng(11)
    bank, bank_coords = _noisy_batch(19, rng)
    queries, coords = _noisy_batch(2, rng)
    queries[1] = queries[1] + 0.1  # raised everywhere
    kwargs = dict(token_ml=0.5, reference_scores=bank, reference_coords=bank_coords)
    plain = decide_lesions(queries, coords, (6, 6, 6), LesionPolicy(token_z=2.0, finding_mass=1.0), **kwargs)
    levelled = decide_lesions(queries, coords, (6, 6, 6), LesionPolicy(
        token_z=2.0, finding_mass=1.0, subtract_volume_level=True), **kwargs)
    assert levelled.reference == "bank" and levelled.params["subtract_volume_level"] is False
    assert all(np.array_equal(a, b) for a, b in zip(plain.z, levelled.z))
    assert np.median(levelled.z[1]) > 1.0


def test_bank_references_weigh_the_batch_wide_spread_with_their_own_weight():
    # Small batches lean on the batch-wide spread (prior_volumes); a bank keeps bank_prior_volumes.
    rng = np.random.default_rng(12)
    bank, bank_coords = _noisy_batch(19, rng)
    queries, coords = _noisy_batch(3, rng)
    kwargs = dict(token_ml=0.5, reference_scores=bank, reference_coords=bank_coords)

    def decide(policy: LesionPolicy, **extra):
        return decide_lesions(queries, coords, (6, 6, 6), policy, **{**kwargs, **extra})

    heavy, light = LesionPolicy(prior_volumes=64.0, bank_false_flag_rate=0.1), LesionPolicy(bank_false_flag_rate=0.1)
    both = LesionPolicy(prior_volumes=64.0, bank_prior_volumes=4.0, bank_false_flag_rate=0.1)
    with_bank = decide(both)
    assert with_bank.params["prior_volumes"] == 4.0
    assert np.array_equal(with_bank.statistics.sigma, decide(light).statistics.sigma)
    assert with_bank.params["bank_calibration"] == decide(light).params["bank_calibration"]
    assert not np.array_equal(with_bank.statistics.sigma, decide(heavy).statistics.sigma)
    alone = decide_lesions(queries, coords, (6, 6, 6), both, token_ml=0.5)
    assert alone.params["prior_volumes"] == 64.0
    assert np.array_equal(alone.statistics.sigma, decide_lesions(queries, coords, (6, 6, 6), heavy,
                                                                 token_ml=0.5).statistics.sigma)


def test_the_bank_weight_is_read_from_the_configuration_and_not_part_of_the_measured_setting():
    config = load_config(override={"threshold": {"prior_volumes": 64.0, "bank_prior_volumes": 4.0}})
    assert config.threshold.lesion_policy("T2w").bank_prior_volumes == 4.0
    record = config.decision_settings().record("T2w")["threshold"]
    assert record["prior_volumes"] == 64.0 and "bank_prior_volumes" not in record
    assert load_config().threshold.bank_prior_volumes is None
    with pytest.raises(ConfigError, match="bank_prior_volumes"):
        load_config(override={"threshold": {"bank_prior_volumes": "many"}})


def test_a_later_layer_may_set_the_bank_weight_back_to_null(tmp_path, monkeypatch):
    layer = tmp_path / "site.yaml"
    layer.write_text("threshold:\n  prior_volumes: 64.0\n  bank_prior_volumes: 4.0\n", encoding="utf-8")
    monkeypatch.setenv("CODEGRAPH3D_CONFIG", str(layer))
    assert load_config().threshold.bank_prior_volumes == 4.0
    reset = load_config(override={"threshold": {"bank_prior_volumes": None}})
    assert reset.threshold.bank_prior_volumes is None
    assert reset.threshold.lesion_policy("T2w").bank_prior_volumes is None
    assert LesionPolicy(bank_prior_volumes=np.float32(4.0)).bank_prior_volumes == 4.0


def test_the_volume_level_setting_is_read_and_recorded_only_when_on():
    config = load_config(override={"threshold": {"subtract_volume_level": True}})
    assert config.threshold.lesion_policy("T2w").subtract_volume_level is True
    assert config.decision_settings().record("T2w")["threshold"]["subtract_volume_level"] is True
    assert "subtract_volume_level" not in load_config().decision_settings().record("T2w")["threshold"]
    with pytest.raises(ConfigError, match="threshold.subtract_volume_level' must be of type bool"):
        load_config(override={"threshold": {"subtract_volume_level": "sometimes"}})


def _levelled_batch(seed: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Twelve normal volumes whose levels differ (by several times their token noise) at every position."""
    scores, coords = _batch(12, seed=seed)
    levels = np.random.default_rng(seed + 100).normal(0.0, 0.06, 12)
    return [s + level for s, level in zip(scores, levels)], coords, levels


def test_fitted_levels_recover_each_volumes_offset():
    scores, coords, levels = _levelled_batch(seed=21)
    fitted = fitted_levels(scores, coords, GRID)
    # Levels are known up to one constant (the position medians carry the batch's own level).
    assert fitted - np.median(fitted) == pytest.approx(levels - np.median(levels), abs=0.01)
    unaligned = fitted_levels(scores, coords, GRID, by_position=False)
    assert unaligned - np.median(unaligned) == pytest.approx(levels - np.median(levels), abs=0.03)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        fitted_levels(scores, coords, GRID, rounds=0)


def test_fitted_levels_with_volumes_covering_different_positions():
    scores, coords, levels = _levelled_batch(seed=23)
    keep = coords[0][:, 0] > 0  # volume 0 lacks one face of the grid
    scores[0], coords[0] = scores[0][keep], coords[0][keep]
    fitted = fitted_levels(scores, coords, GRID)
    assert fitted - np.median(fitted) == pytest.approx(levels - np.median(levels), abs=0.01)
    # A volume without tokens has level 0 and does not move the others'.
    empty = fitted_levels([np.zeros(0), *scores[1:]], [np.zeros((0, 3), int), *coords[1:]], GRID)
    assert empty[0] == 0.0
    assert empty[1:] - np.median(empty[1:]) == pytest.approx(levels[1:] - np.median(levels[1:]), abs=0.01)


def test_fitted_levels_leave_the_spreads_and_a_lesion_stands_out_in_a_low_volume():
    scores, coords, levels = _levelled_batch(seed=22)
    low = int(np.argmin(levels))
    lesion = _cube(coords[low], (4, 4, 4), 2)
    scores[low] = scores[low] + np.where(lesion, 0.25, 0.0)
    policy = LesionPolicy(token_z=4.5, finding_mass=5.0, subtract_volume_level=True)
    before = decide_lesions(scores, coords, GRID, policy)
    after = decide_lesions(scores, coords, GRID, LesionPolicy(
        token_z=4.5, finding_mass=5.0, subtract_volume_level=True, fit_volume_levels=True))
    # The levels' differences widened the batch-wide spread several-fold and hid the lesion of the
    # lowest volume; fitted, the spread is the tokens' own and only that lesion is a finding.
    assert before.statistics.global_sigma > 2 * after.statistics.global_sigma
    assert not before.flagged[low]
    assert after.flagged.tolist() == [i == low for i in range(12)]
    (finding,) = [f for f in after.findings[low] if f.passed]
    assert set(finding.tokens.tolist()) == set(np.flatnonzero(lesion).tolist())
    # Without differing levels the fit changes little: the same volumes are flagged.
    plain, coords = _batch(12, seed=22)
    plain[3] = plain[3] + np.where(_cube(coords[3], (4, 4, 4), 2), 0.5, 0.0)
    flags = [decide_lesions(plain, coords, GRID, LesionPolicy(finding_mass=5.0, fit_volume_levels=fit)).flagged
             for fit in (False, True)]
    assert flags[0].tolist() == flags[1].tolist() == [i == 3 for i in range(12)]


def test_fitted_levels_are_not_used_with_bank_references():
    rng = np.random.default_rng(12)
    bank, bank_coords = _noisy_batch(19, rng)
    queries, coords = _noisy_batch(2, rng)
    queries[1] = queries[1] + 0.1
    kwargs = dict(token_ml=0.5, reference_scores=bank, reference_coords=bank_coords)
    plain = decide_lesions(queries, coords, (6, 6, 6), LesionPolicy(token_z=2.0, finding_mass=1.0), **kwargs)
    fitted = decide_lesions(queries, coords, (6, 6, 6), LesionPolicy(
        token_z=2.0, finding_mass=1.0, fit_volume_levels=True), **kwargs)
    assert fitted.reference == "bank" and fitted.params["fit_volume_levels"] is False
    assert all(np.array_equal(a, b) for a, b in zip(plain.z, fitted.z))


def test_the_fitted_levels_setting_is_read_and_recorded_only_when_on():
    config = load_config(override={"threshold": {"fit_volume_levels": True}})
    assert config.threshold.lesion_policy("T1w").fit_volume_levels is True
    assert config.decision_settings().record("T1w")["threshold"]["fit_volume_levels"] is True
    assert "fit_volume_levels" not in load_config().decision_settings().record("T1w")["threshold"]
    with pytest.raises(ConfigError, match="threshold.fit_volume_levels' must be of type bool"):
        load_config(override={"threshold": {"fit_volume_levels": "yes"}})


def _one_odd_region(n_volumes: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """An all-normal batch whose volume 2 has a small region a little unlike every other's."""
    scores, coords = _batch(n_volumes, seed=seed)
    odd = _cube(coords[2], (4, 4, 4), 1) | _cube(coords[2], (4, 4, 5), 1)
    scores[2] = scores[2] + np.where(odd, 0.14, 0.0)
    return scores, coords, odd


def test_a_small_batch_is_held_to_its_own_bound():
    scores, coords, odd = _one_odd_region(12, seed=13)
    policy = LesionPolicy(token_z=4.5, finding_mass=1.0, small_batch_volumes=16, small_batch_finding_mass=20.0)
    plain = decide_lesions(scores, coords, GRID, LesionPolicy(token_z=4.5, finding_mass=1.0))
    (finding,) = [f for f in plain.findings[2] if f.passed]
    assert 1.0 < finding.mass < 20.0  # the odd region passes the general bound, not the small batch's
    small = decide_lesions(scores, coords, GRID, policy)
    assert not small.flagged.any()
    assert small.policy.finding_mass == 20.0 and small.params["finding_mass"] == 20.0
    # A lesion's evidence passes both; the same odd region in a batch of 17 keeps the general bound.
    lesion = _cube(coords[7], (2, 2, 2), 2)
    scores[7] = scores[7] + np.where(lesion, 0.5, 0.0)
    assert decide_lesions(scores, coords, GRID, policy).flagged.tolist() == [i == 7 for i in range(12)]
    larger, larger_coords, _ = _one_odd_region(17, seed=13)
    decision = decide_lesions(larger, larger_coords, GRID, policy)
    assert decision.policy.finding_mass == 1.0 and decision.flagged[2]


def test_the_small_batch_bound_is_not_used_with_bank_references():
    rng = np.random.default_rng(12)
    bank, bank_coords = _noisy_batch(19, rng)
    queries, coords = _noisy_batch(2, rng)
    kwargs = dict(token_ml=0.5, reference_scores=bank, reference_coords=bank_coords)
    policy = LesionPolicy(token_z=2.0, finding_mass=1.0, small_batch_volumes=16, small_batch_finding_mass=50.0)
    decision = decide_lesions(queries, coords, (6, 6, 6), policy, **kwargs)
    assert decision.reference == "bank" and decision.policy.finding_mass == 1.0
    assert decision.params["small_batch_volumes"] == 0
    # With the bank's own bound calibrated above a (low) small-batch bound: the bank's bound, no error.
    bank, bank_coords = _noisy_batch(30, rng)
    calibrated = LesionPolicy(token_z=2.0, finding_mass=0.0, small_batch_volumes=16, small_batch_finding_mass=1e-6,
                              bank_false_flag_rate=0.1, bank_confidence=0.9)
    decision = decide_lesions(queries, coords, (6, 6, 6), calibrated, token_ml=0.5,
                              reference_scores=bank, reference_coords=bank_coords)
    bound = decision.params["bank_calibration"]["finding_mass"]
    assert bound > 1e-6 and decision.policy.finding_mass == bound


def test_a_small_batch_bound_left_over_with_the_setting_off_changes_nothing():
    # small_batch_volumes 0 turns it off: a section-wide leftover bound neither applies nor refuses.
    policy = LesionPolicy(finding_mass=10.0, small_batch_finding_mass=5.0)
    assert policy.for_batch(12) is policy


def test_the_small_batch_bound_is_read_per_contrast_and_recorded_only_when_set():
    override = {"threshold": {"finding_mass_by_contrast": {"T2w": 1.9}, "small_batch_volumes": 16,
                              "small_batch_finding_mass_by_contrast": {"T2w": 5.1}}}
    config = load_config(override=override)
    assert config.threshold.lesion_policy("T2w").for_batch(12).finding_mass == 5.1
    assert config.threshold.lesion_policy("T2w").for_batch(17).finding_mass == 1.9
    assert config.threshold.lesion_policy("T1w").for_batch(12).finding_mass == 30.0  # no bound of its own
    record = config.decision_settings().record("T2w")["threshold"]
    assert record["small_batch_volumes"] == 16 and record["small_batch_finding_mass"] == 5.1
    assert "small_batch_volumes" not in config.decision_settings().record("T1w")["threshold"]
    assert "small_batch_volumes" not in load_config().decision_settings().record("T2w")["threshold"]
    looser = {"threshold": {**override["threshold"], "small_batch_finding_mass_by_contrast": {"T2w": 1.0}}}
    with pytest.raises(ConfigError, match=r"small_batch_finding_mass \(1\) must be at least finding_mass \(1.9\).*T2w"):
        load_config(override=looser)
    with pytest.raises(ConfigError, match="small_batch_finding_mass_by_contrast: 'FLAIR' is not a scored contrast"):
        load_config(override={"threshold": {"small_batch_finding_mass_by_contrast": {"FLAIR": 90.0}}})


def test_finding_excess_per_contrast_comes_from_the_configuration():
    config = load_config(override={"threshold": {"finding_excess_by_contrast": {"T1w": 2.0}}})
    assert config.threshold.lesion_policy("T1w").finding_excess == 2.0
    assert config.threshold.lesion_policy("T2w").finding_excess == 0.0
    with pytest.raises(ConfigError, match="finding_excess_by_contrast.T1w must be a number >= 0"):
        load_config(override={"threshold": {"finding_excess_by_contrast": {"T1w": -1.0}}})


def test_a_bright_finding_is_masked_at_a_fraction_of_its_peak():
    plain = LesionPolicy(token_z=4.5, finding_mass=1.0, voxel_z=3.0)
    cut = LesionPolicy(token_z=4.5, finding_mass=1.0, voxel_z=3.0, mask_peak_fraction=0.4)
    assert plain.mask_bound(20.0) == 3.0
    assert cut.mask_bound(20.0) == pytest.approx(8.0)  # 0.4 x 20, below the quarter-way point 8.375
    assert cut.mask_bound(30.0) == pytest.approx(10.875)  # never above the quarter-way point
    assert cut.mask_bound(5.0) == 3.0  # a faint finding keeps voxel_z
    # A bright two-token finding with a mildly raised neighbour beside it.
    scores, coords = _batch(12, seed=9)
    core, rim = _cube(coords[0], (4, 4, 4), 1) | _cube(coords[0], (4, 4, 5), 1), _cube(coords[0], (4, 4, 3), 1)
    scores[0] = scores[0] + np.where(core, 0.6, 0.0) + np.where(rim, 0.11, 0.0)
    for policy in (plain, cut):
        decision = decide_lesions(scores, coords, GRID, policy)
        z, values = decision.z[0], decision.mask_values[0]
        (finding,) = [f for f in decision.findings[0] if f.passed]
        assert set(finding.tokens.tolist()) == set(np.flatnonzero(core).tolist())
        bound = policy.mask_bound(finding.peak_z)
        assert np.allclose(values[core], z[core] * 3.0 / bound, rtol=1e-5)
        # voxel_z alone: the neighbour keeps its z (clamped at the bound); with the peak fraction it
        # is scaled as the finding is, so the mask stops short of it.
        scale = 3.0 / bound if bound > 3.0 else 1.0
        assert 3.0 < z[rim][0] < policy.token_z
        assert values[rim][0] == pytest.approx(min(z[rim][0] * scale, 3.0), rel=1e-5)
    assert values[rim][0] < 3.0 and (values[~(core | rim)] <= 3.0).all()


def test_unaligned_grids_use_batch_wide_statistics():
    scores, coords = _batch(6, seed=5, hot_spot=0.8)
    statistics = position_statistics(scores, coords, GRID, by_position=False)
    assert np.ptp(statistics.median) == 0 and np.ptp(statistics.sigma) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_z": float("nan")}, "token_z must be a finite number"),
        ({"finding_mass": -1.0}, "finding_mass must be >= 0"),
        ({"voxel_z": 0.0}, "voxel_z must be > 0"),
        ({"prior_volumes": -2.0}, "prior_volumes must be >= 0"),
        ({"prior_volumes": float("inf")}, "prior_volumes must be a finite number"),
        ({"bank_prior_volumes": -1.0}, "bank_prior_volumes must be null"),
        ({"bank_prior_volumes": True}, "bank_prior_volumes must be null"),
        ({"token_z": -1.0}, "token_z must be > 0"),
        ({"min_reference_volumes": 2}, "min_reference_volumes must be an integer >= 3"),
        ({"tail_quantile": 1.0}, "tail_quantile must lie in"),
        ({"tail_quantile": -0.1}, "tail_quantile must lie in"),
        ({"finding_excess": -0.5}, "finding_excess must be a number >= 0"),
        ({"finding_excess": float("nan")}, "finding_excess must be a number >= 0"),
        ({"mask_peak_fraction": 1.0}, "mask_peak_fraction must lie in"),
        ({"mask_peak_fraction": True}, "mask_peak_fraction must lie in"),
        ({"subtract_volume_level": "yes"}, "subtract_volume_level must be true or false"),
        ({"fit_volume_levels": 1}, "fit_volume_levels must be true or false"),
        ({"small_batch_volumes": -1}, "small_batch_volumes must be an integer >= 0"),
        ({"small_batch_volumes": 12.5}, "small_batch_volumes must be an integer >= 0"),
        ({"small_batch_finding_mass": float("nan")}, "small_batch_finding_mass must be a number >= 0"),
        ({"finding_mass": 10.0, "small_batch_volumes": 16, "small_batch_finding_mass": 5.0},
         "small_batch_finding_mass .5. must be at least"),
        ({"shortfall_margin": -1}, "shortfall_margin must be an integer >= 0"),
        ({"shortfall_margin": 1.5}, "shortfall_margin must be an integer >= 0"),
        ({"shortfall_margin": True}, "shortfall_margin must be an integer >= 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LesionPolicy(**kwargs)


def test_bad_calls_are_refused():
    scores, coords = _batch(3, seed=6)
    with pytest.raises(ValueError, match="token_ml must be > 0"):
        decide_lesions(scores, coords, GRID, LesionPolicy(), token_ml=0.0)
    with pytest.raises(ValueError, match="coordinate arrays"):
        decide_lesions(scores, coords[:2], GRID, LesionPolicy())
    with pytest.raises(ValueError, match="reference_coords"):
        decide_lesions(scores, coords, GRID, LesionPolicy(), reference_scores=scores)


def test_too_few_references_flag_nothing_and_a_lone_bank_volume_joins_the_batch():
    scores, coords = _batch(2, seed=7)
    scores[0] = scores[0] + np.where(_cube(coords[0], (4, 4, 4), 2), 5.0, 0.0)
    decision = decide_lesions(scores, coords, GRID, LesionPolicy(finding_mass=5.0))
    assert not decision.flagged.any() and "at least 3" in decision.params["not_decided"]
    # One bank volume: too few for statistics of its own; with the two queries it makes three.
    bank_scores, bank_coords = _batch(1, seed=8)
    decision = decide_lesions(scores, coords, GRID, LesionPolicy(finding_mass=5.0),
                              reference_scores=bank_scores, reference_coords=bank_coords)
    assert decision.reference == "batch" and decision.flagged[:2].tolist() == [True, False]


def test_tail_spread_is_numpys_quantile_of_the_rest_over_the_gaussian_quantile():
    from scipy.stats import norm

    rng = np.random.default_rng(3)
    residual = np.abs(rng.standard_normal((9, 40)))
    residual[rng.random(residual.shape) < 0.3] = np.nan  # volumes without a token there
    residual[:, 0] = [1.0, 1.0, 1.0, 2.0, 2.0, np.nan, np.nan, np.nan, np.nan]  # ties at the maximum
    got = tail_spread(residual, 0.8)
    for column in range(residual.shape[1]):
        values = np.sort(residual[~np.isnan(residual[:, column]), column])[:-1]
        expected = np.quantile(values, 0.8) / norm.ppf(0.9) if values.size >= 2 else 0.0
        assert got[column] == pytest.approx(expected, abs=1e-12), column
    with pytest.raises(ValueError, match="quantile must lie in"):
        tail_spread(residual, 0.0)


def test_tail_spread_matches_the_gaussian_sd_and_leaves_the_largest_out():
    rng = np.random.default_rng(7)
    gaussian = np.abs(rng.standard_normal((4000, 2)))
    assert np.allclose(tail_spread(gaussian, 0.9), 1.0, atol=0.06)
    # One huge residual per column (an abnormal volume) does not move the spread: it is left out.
    residual = np.abs(rng.standard_normal((12, 3)))
    spread = tail_spread(residual, 0.9)
    residual[5] = 1e6
    residual[0, 2] = np.nan  # a volume without a token there
    moved = tail_spread(residual, 0.9)
    assert np.allclose(moved[:2], spread[:2], rtol=0.35) and np.all(moved < 10)
    # Too few residuals once the largest is out: no tail bound.
    assert tail_spread(np.ones((2, 1)), 0.9).tolist() == [0.0]


def test_a_heavy_tailed_position_stops_flagging_normal_volumes():
    # 48 normal volumes; at one block of positions a sixth of them deviate by graded amounts
    # (normal anatomy that registration leaves misaligned in some brains: a heavy tail). The MAD
    # alone calls the furthest lesions; the tail bound widens those positions' spread, and a true
    # lesion elsewhere is still found.
    scores, coords = _batch(48, seed=11)
    block = _cube(coords[0], (2, 2, 2), 2)
    deviating = [4, 9, 17, 30, 41, 2, 13, 36]
    for volume, step in zip(deviating, np.linspace(0.06, 0.16, len(deviating))):
        scores[volume] = scores[volume] + np.where(block, step, 0.0)
    lesion = _cube(coords[0], (5, 5, 5), 2)
    scores[22] = scores[22] + np.where(lesion, 0.5, 0.0)
    mad_only = decide_lesions(scores, coords, GRID, LesionPolicy(finding_mass=5.0, tail_quantile=0.0))
    tailed = decide_lesions(scores, coords, GRID, LesionPolicy(finding_mass=5.0, tail_quantile=0.9))
    assert mad_only.flagged[deviating].any()
    assert np.flatnonzero(tailed.flagged).tolist() == [22]


def test_finding_mass_per_contrast_comes_from_the_configuration():
    config = load_config(override={"threshold": {"finding_mass": 30.0, "finding_mass_by_contrast": {"T1w": 45.0}}})
    assert config.threshold.lesion_policy("T1w").finding_mass == 45.0
    assert config.threshold.lesion_policy("T2w").finding_mass == 30.0
    assert config.threshold.lesion_policy().finding_mass == 30.0
    with pytest.raises(ConfigError, match="finding_mass_by_contrast.T2w must be a number >= 0"):
        load_config(override={"threshold": {"finding_mass_by_contrast": {"T2w": -1.0}}})
    with pytest.raises(ConfigError, match="'t1w' is not a scored contrast"):
        load_config(override={"threshold": {"finding_mass_by_contrast": {"t1w": 45.0}}})


def test_token_and_voxel_bounds_per_contrast_come_from_the_configuration():
    # An encoder's standardised scores differ in scale between contrasts: all three bounds may.
    config = load_config(override={"threshold": {
        "token_z": 4.5, "voxel_z": 10.0, "token_z_by_contrast": {"T2w": 3.0}, "voxel_z_by_contrast": {"T2w": 4.0},
    }})
    t1w, t2w = config.threshold.lesion_policy("T1w"), config.threshold.lesion_policy("T2w")
    assert (t1w.token_z, t1w.voxel_z) == (4.5, 10.0)
    assert (t2w.token_z, t2w.voxel_z) == (3.0, 4.0)
    assert config.decision_settings().record("T2w")["threshold"]["token_z"] == 3.0
    # voxel_z shapes only the mask, so the operating point's record leaves it out.
    assert "voxel_z" not in config.decision_settings().record("T1w")["threshold"]
    with pytest.raises(ConfigError, match="token_z_by_contrast.T2w must be a number > 0"):
        load_config(override={"threshold": {"token_z_by_contrast": {"T2w": "high"}}})
    with pytest.raises(ConfigError, match=r"threshold.voxel_z_by_contrast.T1w must be a number > 0 \(robust SDs\); got 0.0"):
        load_config(override={"threshold": {"voxel_z_by_contrast": {"T1w": 0.0}}})
    assert load_config(override={"threshold": {"finding_mass_by_contrast": {"T1w": 0.0}}}).threshold.bound("finding_mass", "T1w") == 0.0
    with pytest.raises(ConfigError, match="voxel_z_by_contrast: 'PD' is not a scored contrast"):
        load_config(override={"threshold": {"voxel_z_by_contrast": {"PD": 5.0}}})


def test_a_later_layer_replaces_the_per_contrast_bounds_whole(tmp_path, monkeypatch):
    # The keys are contrast names, not fields: a later layer may list others, or none.
    layer = tmp_path / "site.yaml"
    layer.write_text("threshold:\n  finding_mass_by_contrast: {T1w: 45.0, T2w: 25.0}\n")
    monkeypatch.setenv("CODEGRAPH3D_CONFIG", str(layer))
    config = load_config(override={"threshold": {"finding_mass_by_contrast": {"T2w": 12.0}}})
    assert config.threshold.finding_mass_by_contrast == {"T2w": 12.0}
    assert load_config(override={"threshold": {"finding_mass_by_contrast": {}}}).threshold.finding_mass_by_contrast == {}


def test_the_batch_decision_takes_its_contrasts_bound():
    # The same scores, decided as a T1w and as a T2w batch with different bounds per contrast.
    from codegraph3d.run.pipeline import decide_batch
    from codegraph3d.scoring.batch import BatchScores

    scores, coords = _batch(12, seed=4)
    lesion = _cube(coords[2], (4, 4, 4), 2)
    scores[2] = scores[2] + np.where(lesion, 0.5, 0.0)
    batch = BatchScores(token_scores=scores, volume_scores=np.array([s.max() for s in scores]), per_layer=[scores])
    config = load_config(override={"threshold": {"finding_mass_by_contrast": {"T1w": 1e6, "T2w": 5.0}}})
    as_t1w = decide_batch(batch, coords, 12, GRID, config, 1.0, "T1w")
    as_t2w = decide_batch(batch, coords, 12, GRID, config, 1.0, "T2w")
    assert (as_t1w.volume_threshold, as_t2w.volume_threshold) == (1e6, 5.0)
    assert not as_t1w.flagged.any() and np.flatnonzero(as_t2w.flagged).tolist() == [2]


def test_bounds_with_a_bank_replace_the_sections_where_the_bank_gives_the_statistics():
    from codegraph3d.run.pipeline import decide_batch
    from codegraph3d.scoring.batch import BatchScores

    scores, coords = _batch(12, seed=5)
    scores[1] = scores[1] + np.where(_cube(coords[1], (4, 4, 4), 2), 0.5, 0.0)
    batch = BatchScores(token_scores=scores, volume_scores=np.array([s.max() for s in scores]), per_layer=[scores])
    config = load_config(override={"threshold": {
        "voxel_z_by_contrast": {"T2w": 8.0}, "finding_mass": 5.0,
        "with_bank": {"voxel_z_by_contrast": {"T2w": 3.0}, "finding_mass": 1e6}}})
    # Two queries against ten bank volumes (too few for the bank's rate: finding_mass holds).
    banked = decide_batch(batch, coords, 2, GRID, config, 1.0, "T2w")
    alone = decide_batch(batch, coords, 12, GRID, config, 1.0, "T2w")
    assert (banked.voxel_threshold, banked.volume_threshold) == (3.0, 1e6) and not banked.flagged.any()
    assert (alone.voxel_threshold, alone.volume_threshold) == (8.0, 5.0) and alone.flagged.tolist()[1]
    # Two bank volumes are too few for statistics of their own: they join the batch, as do its bounds.
    assert decide_batch(batch, coords, 10, GRID, config, 1.0, "T2w").voxel_threshold == 8.0


def test_bounds_with_a_bank_are_checked_when_the_configuration_is_read():
    config = load_config(override={"threshold": {"token_z": 6.0, "with_bank": {"token_z": 4.5}}})
    assert (config.threshold.lesion_policy().token_z, config.threshold.lesion_policy(with_bank=True).token_z) == (6.0, 4.5)
    assert config.threshold.for_bank().with_bank == {}
    # A later layer replaces the mapping whole.
    later = config.with_overrides({"threshold": {"with_bank": {"voxel_z": 3.0}}})
    assert later.threshold.lesion_policy(with_bank=True).token_z == 6.0
    for bad, match in (({"prior_volumes": 4.0}, r"\['prior_volumes'\] cannot be set .* the fields it may set are"),
                       ({"token_z": 0.0}, "threshold.with_bank: threshold.token_z must be > 0"),
                       ({"voxel_z_by_contrast": {"PD": 3.0}}, "threshold.with_bank.voxel_z_by_contrast: 'PD' is not a scored"),
                       ({"voxel_z_by_contrast": None}, "threshold.with_bank.voxel_z_by_contrast must be a mapping"),
                       ({"token_z": "4.5"}, "threshold.with_bank.token_z must be a number"),
                       ({"voxel_z": True}, "threshold.with_bank.voxel_z must be a number")):
        with pytest.raises(ConfigError, match=match):
            load_config(override={"threshold": {"with_bank": bad}})
    # An error of the section itself is named as such, not blamed on with_bank.
    with pytest.raises(ConfigError, match=r"^threshold.reference must be"):
        load_config(override={"threshold": {"reference": "batc", "with_bank": {"token_z": 4.5}}})
    # The small-batch bound is never used with a bank: it cannot refuse a bank bound.
    small = load_config(override={"threshold": {"small_batch_volumes": 16, "small_batch_finding_mass": 40.0,
                                                "with_bank": {"finding_mass": 50.0}}})
    assert small.threshold.lesion_policy(with_bank=True).finding_mass == 50.0
    # Frozen to the last level: the bounds a decision was made with cannot change under it.
    nested = load_config(override={"threshold": {"with_bank": {"voxel_z_by_contrast": {"T2w": 3.0}}}})
    with pytest.raises(TypeError):
        nested.threshold.with_bank["voxel_z_by_contrast"]["T2w"] = 9.0  # type: ignore[index]


def _noisy_batch(n_volumes: int, rng: np.random.Generator, grid=(6, 6, 6)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Normal volumes whose scores carry spatially smooth noise, so that some form small false groups."""
    from scipy import ndimage

    coords = np.argwhere(np.ones(grid, bool))
    base = 1.0 + 0.2 * rng.random(len(coords))
    scores = []
    for _ in range(n_volumes):
        field = ndimage.gaussian_filter(rng.standard_normal(grid), 0.8).ravel()
        scores.append(base + 0.05 * field / field.std())
    return scores, [coords.copy() for _ in range(n_volumes)]


def test_the_bank_calibration_is_the_kth_largest_leave_one_out_evidence():
    rng = np.random.default_rng(5)
    bank, coords = _noisy_batch(19, rng)
    policy = LesionPolicy(token_z=2.0, finding_mass=1e6, bank_false_flag_rate=0.1)
    calibration = bank_calibration(bank, coords, (6, 6, 6), policy, token_ml=0.5)
    assert calibration is not None and calibration.rank == 2 and calibration.n_reference == 19
    assert calibration.false_flag_bound == pytest.approx(2 / 20)
    expected = []
    for left_out in range(19):
        others = [i for i in range(19) if i != left_out]
        statistics = position_statistics([bank[i] for i in others], [coords[i] for i in others], (6, 6, 6))
        z = standardise(bank[left_out], coords[left_out], statistics)
        found = token_findings(z, bank[left_out], coords[left_out], (6, 6, 6), policy, 0.5)
        expected.append(max((f.mass for f in found), default=0.0))
    assert calibration.finding_mass == pytest.approx(sorted(expected)[-2], abs=1e-4)
    # Too few volumes for the rate: no calibration (the configured bound stays).
    assert bank_calibration(bank[:8], coords[:8], (6, 6, 6), policy, 0.5) is None


def test_a_calibrated_bank_flags_normal_studies_at_about_the_stated_rate():
    # Over many banks and normal queries drawn alike, the share flagged stays near rank / (n + 1).
    rng = np.random.default_rng(11)
    policy = LesionPolicy(token_z=2.0, finding_mass=1e6, bank_false_flag_rate=0.1)
    flags = []
    for _ in range(12):
        volumes, coords = _noisy_batch(29, rng)
        bank, queries = volumes[:19], volumes[19:]
        for query, where in zip(queries, coords[19:]):  # single studies: each keeps the whole rate
            decision = decide_lesions([query], [where], (6, 6, 6), policy, token_ml=0.5,
                                      reference_scores=bank, reference_coords=coords[:19])
            assert decision.params["bank_calibration"]["false_flag_bound"] == pytest.approx(0.1)
            flags.extend(decision.flagged.tolist())
    assert 0.02 <= np.mean(flags) <= 0.16, np.mean(flags)


def test_studies_decided_together_against_a_bank_share_its_rate():
    rng = np.random.default_rng(12)
    volumes, coords = _noisy_batch(31, rng)
    bank, queries = volumes[:19], volumes[19:]
    policy = LesionPolicy(token_z=2.0, finding_mass=1e6, bank_false_flag_rate=0.1)
    alone = bank_calibration(bank, coords[:19], (6, 6, 6), policy, 0.5)
    pair = bank_calibration(bank, coords[:19], (6, 6, 6), policy, 0.5, n_queries=2)
    assert (alone.rank, pair.rank) == (2, 1)  # floor(0.1 x 20) and floor(0.05 x 20)
    assert pair.record()["expected_false_flags_per_batch"] == pytest.approx(2 / 20)
    assert pair.finding_mass == alone.evidence[0] >= alone.finding_mass
    # A batch of 12 asks for more than 19 volumes can give: the largest evidence, said so.
    decision = decide_lesions(queries, coords[19:], (6, 6, 6), policy, token_ml=0.5,
                              reference_scores=bank, reference_coords=coords[:19])
    record = decision.params["bank_calibration"]
    assert (record["rank"], record["n_queries"]) == (1, 12)
    assert record["false_flag_bound"] == pytest.approx(1 / 20) and record["confidence"] == 0.0
    assert record["expected_false_flags_per_batch"] == pytest.approx(12 / 20)
    with pytest.raises(ValueError, match="n_queries"):
        bank_calibration(bank, coords[:19], (6, 6, 6), policy, 0.5, n_queries=0)


def test_a_studys_series_of_other_contrasts_share_the_bank_rate():
    # One query series of a study whose other series (another contrast) is decided in the same run.
    rng = np.random.default_rng(13)
    volumes, coords = _noisy_batch(20, rng)
    bank, query = volumes[:19], volumes[19:]
    policy = LesionPolicy(token_z=2.0, finding_mass=1e6, bank_false_flag_rate=0.1)
    kwargs = {"token_ml": 0.5, "reference_scores": bank, "reference_coords": coords[:19]}
    alone = decide_lesions(query, coords[19:], (6, 6, 6), policy, **kwargs).params["bank_calibration"]
    study = decide_lesions(query, coords[19:], (6, 6, 6), policy, shared_by=2, **kwargs).params["bank_calibration"]
    assert (alone["rank"], alone["n_queries"]) == (2, 1)
    assert (study["rank"], study["n_queries"]) == (1, 2)  # floor(0.05 x 20): the bank's largest evidence
    assert study["finding_mass"] == pytest.approx(study["largest_evidence"][0], abs=1e-3)
    assert study["finding_mass"] >= alone["finding_mass"]
    assert "the run's 2 series decided against the bank share the rate" in bank_operating_point(
        {"bank_calibration": study})["measured_on"]
    with pytest.raises(ValueError, match="shared_by counts the run's series"):
        decide_lesions(volumes[18:], coords[18:], (6, 6, 6), policy, shared_by=1, **{
            **kwargs, "reference_scores": bank[:18], "reference_coords": coords[:18]})


def test_the_calibrated_bound_replaces_finding_mass_and_is_reported():
    rng = np.random.default_rng(2)
    bank, coords = _noisy_batch(24, rng)
    query = bank[0].copy() + np.where(_cube(coords[0], (3, 3, 3), 2), 0.4, 0.0)
    fixed = LesionPolicy(token_z=2.0, finding_mass=1e6)
    calibrated = LesionPolicy(token_z=2.0, finding_mass=1e6, bank_false_flag_rate=0.05)
    kwargs = {"token_ml": 0.5, "reference_scores": bank[1:], "reference_coords": coords[1:]}
    assert not decide_lesions([query], coords[:1], (6, 6, 6), fixed, **kwargs).flagged[0]
    decision = decide_lesions([query], coords[:1], (6, 6, 6), calibrated, **kwargs)
    assert decision.flagged[0] and decision.policy.finding_mass < 1e6
    record = decision.params["bank_calibration"]
    assert record["rank"] == 1 and record["n_reference_volumes"] == 23
    assert record["finding_mass"] == decision.policy.finding_mass
    point = bank_operating_point(decision.params)
    assert point["false_flag_rate_per_normal_series"] == pytest.approx(1 / 24) and point["normal_series"] == 23
    assert point["bound_rank"] == 1
    # Without a bank the configured bound applies and no calibration is reported.
    batch = decide_lesions([query, *bank[1:]], coords, (6, 6, 6), calibrated, token_ml=0.5)
    assert "bank_calibration" not in batch.params and bank_operating_point(batch.params) is None


def test_the_bank_rate_is_validated_and_read_from_the_configuration():
    with pytest.raises(ValueError, match="bank_false_flag_rate must lie in"):
        LesionPolicy(bank_false_flag_rate=0.5)
    with pytest.raises(ConfigError, match="bank_false_flag_rate must lie in"):
        load_config(override={"threshold": {"bank_false_flag_rate": -0.1}})
    config = load_config(override={"threshold": {"bank_false_flag_rate": 0.05}})
    assert config.threshold.lesion_policy().bank_false_flag_rate == 0.05


def test_the_bank_calibration_leaves_a_patients_volumes_out_together():
    # Two series of one patient share its odd anatomy: left out alone, each hides behind its twin.
    rng = np.random.default_rng(4)
    bank, coords = _noisy_batch(20, rng)
    odd = np.where(_cube(coords[0], (3, 3, 3), 2), 0.3, 0.0)
    bank[0], bank[1] = bank[0] + odd, bank[0] + odd + 0.001
    policy = LesionPolicy(token_z=2.0, finding_mass=1e6, bank_false_flag_rate=0.05)
    alone = bank_calibration(bank, coords, (6, 6, 6), policy, 0.5)
    groups = ["twin", "twin", *range(18)]
    together = bank_calibration(bank, coords, (6, 6, 6), policy, 0.5, groups)
    assert together.evidence[0] > alone.evidence[0] and together.finding_mass >= alone.finding_mass
    with pytest.raises(ValueError, match="3 groups for 20 bank volumes"):
        bank_calibration(bank, coords, (6, 6, 6), policy, 0.5, ["a", "b", "c"])


def test_the_rank_keeps_the_rate_for_this_bank_with_the_confidence():
    from scipy import stats

    for n in (22, 40, 48, 100, 500):
        rank = calibration_rank(n, 0.1, 0.9)
        # The rank-th largest keeps the rate with the confidence; the next would not.
        assert stats.beta.cdf(0.1, rank, n + 1 - rank) >= 0.9 > stats.beta.cdf(0.1, rank + 1, n - rank)
        assert rank <= calibration_rank(n, 0.1, 0.0) == int(0.1 * (n + 1))
    assert calibration_rank(21, 0.1, 0.9) == 0 and calibration_rank(22, 0.1, 0.9) == 1
    assert (calibration_rank(40, 0.1, 0.9), calibration_rank(40, 0.1, 0.0)) == (2, 4)


def test_a_confident_calibration_reports_the_rate_it_keeps():
    rng = np.random.default_rng(8)
    bank, coords = _noisy_batch(30, rng)
    policy = LesionPolicy(token_z=2.0, finding_mass=1e6, bank_false_flag_rate=0.1, bank_confidence=0.9)
    decision = decide_lesions(bank[:1], coords[:1], (6, 6, 6), policy, token_ml=0.5,
                              reference_scores=bank[1:], reference_coords=coords[1:])
    record = decision.params["bank_calibration"]
    assert record["rank"] == calibration_rank(29, 0.1, 0.9) == 1
    assert record["false_flag_bound"] == 0.1 and record["confidence"] == 0.9
    assert record["expected_false_flag_rate"] == pytest.approx(1 / 30)
    point = bank_operating_point(decision.params)
    assert point["false_flag_rate_per_normal_series"] == 0.1 and point["confidence"] == 0.9
    assert "with confidence 0.9 for this bank" in point["measured_on"]
    with pytest.raises(ValueError, match="bank_confidence must lie in"):
        LesionPolicy(bank_confidence=1.0)
    assert load_config().threshold.lesion_policy().bank_confidence == 0.9


def test_a_faint_findings_edge_is_cut_at_its_own_bound():
    # A faint finding's bound (a quarter of the way from token_z to its peak) lies below voxel_z:
    # its neighbours are scaled up as its tokens are, so the upsampled map crosses voxel_z where
    # the z map crosses the finding's own bound, not closer to its centre.
    policy = LesionPolicy(token_z=4.5, finding_mass=1.0, voxel_z=10.0)
    scores, coords = _batch(12, seed=9)
    core, rim = _cube(coords[0], (4, 4, 4), 1) | _cube(coords[0], (4, 4, 5), 1), _cube(coords[0], (4, 4, 3), 1)
    scores[0] = scores[0] + np.where(core, 0.15, 0.0) + np.where(rim, 0.06, 0.0)
    decision = decide_lesions(scores, coords, GRID, policy)
    z, values = decision.z[0], decision.mask_values[0]
    (finding,) = [f for f in decision.findings[0] if f.passed]
    assert set(finding.tokens.tolist()) == set(np.flatnonzero(core).tolist())
    bound = policy.mask_bound(finding.peak_z)
    assert policy.token_z < bound < policy.voxel_z and 0 < z[rim][0] < policy.token_z
    scale = policy.voxel_z / bound
    assert np.allclose(values[core], z[core] * scale, rtol=1e-5)
    assert values[rim][0] == pytest.approx(z[rim][0] * scale, rel=1e-5)
    assert (values[~core] <= policy.voxel_z).all()


def test_the_rim_is_the_outer_layer_of_the_positions_most_references_cover():
    count = np.zeros(GRID, int)
    count[1:7, 1:7, 1:7] = 10  # every reference covers a 6^3 block
    count[0, 3, 3] = 4  # a position few references cover
    rim = rim_positions(count, 10)
    assert rim[1, 3, 3] and rim[6, 6, 6] and rim[0, 3, 3]  # the block's outer layer, and the sparse position
    assert not rim[2:6, 2:6, 2:6].any()  # inside it
    assert rim_positions(np.full(GRID, 10), 10)[0].all() and not rim_positions(np.full(GRID, 10), 10)[1:7, 1:7, 1:7].any()


def _odd_region_at(centre: tuple[int, int, int], seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """An all-normal batch of 12 whose volume 2 has a small region a little unlike every other's."""
    scores, coords = _batch(12, seed=seed)
    odd = _cube(coords[2], centre, 1) | _cube(coords[2], (centre[0], centre[1], centre[2] + 1), 1)
    scores[2] = scores[2] + np.where(odd, 0.14, 0.0)
    return scores, coords


def test_a_group_at_the_rim_is_held_to_the_rim_bound():
    policy = LesionPolicy(token_z=4.5, finding_mass=1.0, rim_finding_mass=20.0)
    inside = decide_lesions(*_odd_region_at((4, 4, 4), seed=13), GRID, policy)
    assert inside.flagged.tolist() == [i == 2 for i in range(12)]
    (finding,) = [f for f in inside.findings[2] if f.passed]
    assert not finding.at_rim
    edge = decide_lesions(*_odd_region_at((0, 4, 4), seed=13), GRID, policy)
    (group,) = edge.findings[2]
    assert group.at_rim and 1.0 < group.mass < 20.0 and not group.passed and not edge.flagged.any()
    # Without a rim bound (or one below finding_mass) the same group is a finding.
    for plain in (LesionPolicy(token_z=4.5, finding_mass=1.0), LesionPolicy(token_z=4.5, finding_mass=1.0, rim_finding_mass=0.5)):
        assert decide_lesions(*_odd_region_at((0, 4, 4), seed=13), GRID, plain).flagged[2]
    assert edge.params["rim_finding_mass"] == 20.0


def test_the_rim_bound_is_not_used_with_bank_references_and_never_lowers_the_bound():
    rng = np.random.default_rng(21)
    bank, bank_coords = _noisy_batch(19, rng)
    queries, coords = _noisy_batch(2, rng)
    policy = LesionPolicy(token_z=2.0, finding_mass=1.0, rim_finding_mass=50.0)
    decision = decide_lesions(queries, coords, (6, 6, 6), policy, reference_scores=bank, reference_coords=bank_coords)
    assert decision.reference == "bank" and decision.policy.rim_finding_mass == 0.0
    assert decision.policy.finding_mass == 50.0  # uncalibrated: the stricter bound everywhere
    assert LesionPolicy(finding_mass=10.0, rim_finding_mass=5.0).rim_bound == 10.0
    small = LesionPolicy(finding_mass=1.0, rim_finding_mass=5.0, small_batch_volumes=16, small_batch_finding_mass=8.0)
    assert small.for_batch(12).rim_bound == 8.0  # a small batch's higher bound holds at the rim too
    with pytest.raises(ValueError, match="rim_finding_mass must be a number >= 0"):
        LesionPolicy(rim_finding_mass=-1.0)


def test_the_rim_bound_is_read_per_contrast_and_recorded_only_above_finding_mass():
    override = {"threshold": {"finding_mass_by_contrast": {"T2w": 1.9}, "rim_finding_mass_by_contrast": {"T2w": 4.1}}}
    config = load_config(override=override)
    assert config.threshold.lesion_policy("T2w").rim_bound == 4.1
    assert config.threshold.lesion_policy("T1w").rim_bound == 30.0  # finding_mass: no bound of its own
    assert config.decision_settings().record("T2w")["threshold"]["rim_finding_mass"] == 4.1
    assert "rim_finding_mass" not in config.decision_settings().record("T1w")["threshold"]
    assert "rim_finding_mass" not in load_config().decision_settings().record("T2w")["threshold"]
    with pytest.raises(ConfigError, match="rim_finding_mass_by_contrast.T2w must be a number >= 0"):
        load_config(override={"threshold": {"rim_finding_mass_by_contrast": {"T2w": -2.0}}})


def test_a_group_is_at_the_rim_when_its_peak_is_and_coverage_of_exactly_nine_in_ten_is_inside():
    coords = np.argwhere(np.ones(GRID, bool))
    rim = rim_positions(np.full(GRID, 10), 10)
    # One group reaching from the rim layer (x = 0) inward; only where its peak lies decides.
    row = [int(np.flatnonzero((coords == (x, 4, 4)).all(axis=1))[0]) for x in (0, 1, 2)]
    policy = LesionPolicy(token_z=4.5, finding_mass=1.0, rim_finding_mass=50.0)
    for peak, at_rim in ((0, True), (2, False)):
        z = np.zeros(len(coords))
        z[row] = 5.0
        z[row[peak]] = 9.0
        (group,) = token_findings(z, z, coords, GRID, policy, rim=rim)
        assert group.at_rim is at_rim and group.passed is (not at_rim)
    count = np.full(GRID, 10)
    count[0] = 9  # nine of ten references cover the x = 0 face: still inside
    assert not rim_positions(count, 10)[1:7, 1:7, 1:7].any() and rim_positions(count, 10)[0].all()
    assert not rim_positions(count, 10, depth=0)[0, 2:6, 2:6].any()


def test_shortfall_tokens_are_those_near_where_the_volume_stops_short_of_the_common_brain():
    count = np.full(GRID, 10)
    count[7] = 3  # the last layer: few references reach it, so it is not part of the common brain
    coords = np.argwhere(np.ones(GRID, bool))
    short = coords[:, 0] < 6  # the volume stops at x = 5, one layer short of the common brain's x = 6
    marked = shortfall_tokens(coords[short], count, 10, margin=1)
    assert set(np.unique(coords[short][marked][:, 0])) == {5}  # the layer next to the missing one
    assert set(np.unique(coords[short][shortfall_tokens(coords[short], count, 10, margin=2)][:, 0])) == {4, 5}
    # A volume that covers the common brain, or a margin of 0, marks nothing.
    assert not shortfall_tokens(coords, count, 10, margin=2).any()
    assert not shortfall_tokens(coords[short], count, 10, margin=0).any()
    count[6] = 9  # nine of ten references is still the common brain (as for the rim)
    assert shortfall_tokens(coords[short], count, 10, margin=1).any()


def _short_at_the_edge(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A batch of 12 whose volume 2 stops one layer short at x = 7 and is raised in the layer under it."""
    scores, coords = _batch(12, seed=seed)
    keep = coords[2][:, 0] < 7
    scores[2], coords[2] = scores[2][keep], coords[2][keep]
    under = _cube(coords[2], (6, 4, 4), 2)  # tokens at x = 6 (the layer next to the missing one) ... x = 5
    scores[2] = scores[2] + np.where(under & (coords[2][:, 0] == 6), 0.5, 0.0)
    return scores, coords


def test_a_group_where_the_brain_stops_short_of_the_others_is_not_a_finding():
    policy = LesionPolicy(token_z=4.5, finding_mass=1.0)
    plain = decide_lesions(*_short_at_the_edge(seed=31), GRID, policy)
    assert plain.flagged.tolist() == [i == 2 for i in range(12)]
    margin = decide_lesions(*_short_at_the_edge(seed=31), GRID, LesionPolicy(token_z=4.5, finding_mass=1.0, shortfall_margin=1))
    assert not margin.flagged.any() and not margin.findings[2]
    assert margin.params["shortfall_margin"] == 1
    # The same raised tokens in a volume that reaches the common brain's edge stay a finding.
    scores, coords = _batch(12, seed=31)
    scores[2] = scores[2] + np.where(_cube(coords[2], (6, 4, 4), 2) & (coords[2][:, 0] == 6), 0.5, 0.0)
    whole = decide_lesions(scores, coords, GRID, LesionPolicy(token_z=4.5, finding_mass=1.0, shortfall_margin=1))
    assert whole.flagged.tolist() == [i == 2 for i in range(12)]


def test_the_bank_calibration_leaves_shortfall_tokens_out_of_each_left_out_volumes_evidence():
    rng = np.random.default_rng(33)
    bank, bank_coords = _noisy_batch(19, rng)
    # One bank volume stops a layer short at x = 5 and is raised under it: with the margin, its
    # evidence there is no longer a normal volume's evidence that sets the bound.
    keep = bank_coords[0][:, 0] < 5
    bank[0], bank_coords[0] = bank[0][keep] + np.where(bank_coords[0][keep][:, 0] == 4, 3.0, 0.0), bank_coords[0][keep]
    policy = LesionPolicy(token_z=2.0, finding_mass=1.0, bank_false_flag_rate=0.1)
    plain = bank_calibration(bank, bank_coords, (6, 6, 6), policy)
    margin = bank_calibration(bank, bank_coords, (6, 6, 6), LesionPolicy(token_z=2.0, finding_mass=1.0,
                                                                          bank_false_flag_rate=0.1, shortfall_margin=1))
    assert plain is not None and margin is not None
    # Volume 0's raised layer is the bank's largest evidence by far without the margin; with it,
    # the largest is a normal volume's noise, and the calibrated bound falls with it.
    assert plain.evidence[0] > 10 * margin.evidence[0]
    assert margin.finding_mass <= plain.finding_mass


def test_a_query_that_stops_short_of_the_banks_common_brain_is_counted_against_the_bank():
    rng = np.random.default_rng(34)
    bank, bank_coords = _noisy_batch(19, rng)
    queries, coords = _noisy_batch(2, rng)
    keep = coords[0][:, 0] < 5  # query 0 stops a layer short of every bank volume
    queries[0], coords[0] = queries[0][keep] + np.where(coords[0][keep][:, 0] == 4, 3.0, 0.0), coords[0][keep]
    # A fixed bound well above the noise groups' evidence (no calibration): only the raised layer can pass.
    kwargs = {"token_z": 4.5, "finding_mass": 5.0, "bank_false_flag_rate": 0.0}
    plain = decide_lesions(queries, coords, (6, 6, 6), LesionPolicy(**kwargs), reference_scores=bank, reference_coords=bank_coords)
    margin = decide_lesions(queries, coords, (6, 6, 6), LesionPolicy(**kwargs, shortfall_margin=1),
                            reference_scores=bank, reference_coords=bank_coords)
    assert plain.reference == margin.reference == "bank"
    assert plain.flagged[0] and not margin.flagged[0]
    assert all(not (coords[0][f.tokens][:, 0] == 4).any() for f in margin.findings[0])


def test_in_a_batch_of_under_ten_volumes_no_position_is_a_shortfall():
    # The volume is one of its batch's references: with 9, 8 others are under 90 % of 9.
    scores, coords = _short_at_the_edge(seed=35)
    small = decide_lesions(scores[:9], coords[:9], GRID, LesionPolicy(token_z=4.5, finding_mass=1.0, shortfall_margin=1))
    assert small.flagged[2]
    ten = decide_lesions(scores[:10], coords[:10], GRID, LesionPolicy(token_z=4.5, finding_mass=1.0, shortfall_margin=1))
    assert not ten.flagged.any()


def test_the_shortfall_margin_is_read_and_recorded_only_when_on():
    assert load_config().threshold.lesion_policy("T2w").shortfall_margin == 0
    assert "shortfall_margin" not in load_config().decision_settings().record("T2w")["threshold"]
    config = load_config(override={"threshold": {"shortfall_margin": 1}})
    assert config.threshold.lesion_policy("T1w").shortfall_margin == 1
    assert config.threshold.lesion_policy("T1w", with_bank=True).shortfall_margin == 1
    assert config.decision_settings().record("T1w")["threshold"]["shortfall_margin"] == 1
    with pytest.raises(ConfigError, match="shortfall_margin must be an integer >= 0"):
        load_config(override={"threshold": {"shortfall_margin": -1}})


def test_the_shortfall_margin_may_differ_with_a_bank_and_must_be_whole_grid_steps():
    config = load_config(override={"threshold": {"shortfall_margin": 1, "with_bank": {"shortfall_margin": 0}}})
    assert config.threshold.lesion_policy("T2w").shortfall_margin == 1
    assert config.threshold.lesion_policy("T2w", with_bank=True).shortfall_margin == 0
    with pytest.raises(ConfigError, match="with_bank.shortfall_margin must be an integer"):
        load_config(override={"threshold": {"with_bank": {"shortfall_margin": 1.5}}})
