"""Batch formation rules of the pipeline: patient grouping and batches too small to score."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from codegraph3d.run.config import load_config
from codegraph3d.io.selection import SeriesDecision
from codegraph3d.run.pipeline import (
    CohortError,
    Tokenisation,
    TokenisedSeries,
    build_encoder,
    decided_against_bank,
    reference_groups,
    score_batches,
    series_sharing_the_bank,
)
from codegraph3d.preprocess.chain import PreprocessedVolume
from codegraph3d.features.tokens import TokenSet


def _series(uid: str, patient: str, study: str, contrast: str, rng: np.random.Generator) -> TokenisedSeries:
    grid = (4, 4, 4)
    coords = np.argwhere(np.ones(grid, bool))
    tokens = TokenSet(
        tokens=[rng.standard_normal((len(coords), 6)).astype(np.float32)],
        coords=coords,
        grid_shape=grid,
        layer_names=["intensity"],
        brain_fraction=np.ones(grid),
    )
    prepared = PreprocessedVolume(
        image=np.zeros((0, 0, 0), np.float32), brain_mask=np.ones((16, 16, 16), bool), grid_origin=np.zeros(3),
        grid_spacing=1.0, grid_to_source=np.eye(4), source_shape_zyx=(16, 16, 16), source_origin=np.zeros(3),
        source_spacing=np.ones(3), source_direction=np.eye(3), brain_volume_ml=4.0,
    )
    decision = SeriesDecision(study, uid, patient, "desc", True, contrast, "selected")
    return TokenisedSeries(decision=decision, datasets=[], prepared=prepared, tokens=tokens)


def test_groups_join_same_patient_and_same_study():
    rng = np.random.default_rng(0)
    series = [
        _series("1", "P1", "S1", "T2w", rng),
        _series("2", "P1", "S2", "T2w", rng),  # repeat study of P1
        _series("3", "", "S3", "T2w", rng),  # no PatientID: its study groups it
        _series("4", "P2", "S3", "T2w", rng),  # same study as 3
        _series("5", "P3", "S5", "T2w", rng),
    ]
    decisions = [s.decision for s in series]
    groups = reference_groups(decisions, "patient_id")
    assert groups[0] == groups[1] and groups[2] == groups[3]
    assert len({groups[0], groups[2], groups[4]}) == 3
    by_study = reference_groups(decisions, "study")
    assert by_study[0] != by_study[1] and by_study[2] == by_study[3]
    assert len(set(reference_groups(decisions, "none"))) == 5


def test_a_batch_of_one_patient_is_skipped_while_others_score():
    rng = np.random.default_rng(1)
    series = [_series(str(i), f"P{i}", f"S{i}", "T2w", rng) for i in range(4)]
    series.append(_series("9", "P9", "S9", "T1w", rng))
    tokenisation = Tokenisation(series=series, skipped={}, encoder={"name": "intensity"})
    scoring = score_batches(tokenisation, load_config(override={"encoder": {"name": "intensity"}}))
    assert [batch.contrast for batch in scoring.batches] == ["T2w"]
    assert "T1w batch not scored" in scoring.skipped["9"] and "at least two different patients" in scoring.skipped["9"]
    assert len(scoring.batches[0].scores.volume_scores) == 4


def test_one_patient_id_over_many_studies_names_the_setting_for_anonymised_cohorts():
    rng = np.random.default_rng(4)
    series = [_series(str(i), "ANONYMOUS", f"S{i}", "T2w", rng) for i in range(5)]
    tokenisation = Tokenisation(series=series, skipped={}, encoder={"name": "intensity"})
    with pytest.raises(CohortError) as raised:
        score_batches(tokenisation, load_config(override={"encoder": {"name": "intensity"}}))
    message = str(raised.value)
    assert "5 studies all carry PatientID 'ANONYMOUS'" in message and "scoring.exclude_same: study" in message
    # The remedy works: studies of one PatientID are then different patients.
    scoring = score_batches(tokenisation, load_config(override={"encoder": {"name": "intensity"},
                                                                "scoring": {"exclude_same": "study"}}))
    assert len(scoring.batches[0].scores.volume_scores) == 5


def test_one_study_of_one_patient_gets_no_anonymisation_note():
    rng = np.random.default_rng(5)
    series = [_series("1", "P1", "S1", "T2w", rng), _series("2", "P1", "S1", "T2w", rng)]
    tokenisation = Tokenisation(series=series, skipped={}, encoder={"name": "intensity"})
    with pytest.raises(CohortError) as raised:
        score_batches(tokenisation, load_config(override={"encoder": {"name": "intensity"}}))
    assert "carry PatientID" not in str(raised.value)


def test_no_scorable_batch_is_a_cohort_error():
    rng = np.random.default_rng(2)
    series = [_series("1", "P1", "S1", "T2w", rng), _series("2", "P1", "S2", "T2w", rng)]
    tokenisation = Tokenisation(series=series, skipped={}, encoder={"name": "intensity"})
    with pytest.raises(CohortError, match="no contrast batch could be scored"):
        score_batches(tokenisation, load_config(override={"encoder": {"name": "intensity"}}))


def test_codegraph_method_finds_the_volumes_sharing_an_anomaly():
    rng = np.random.default_rng(3)
    series = [_series(str(i), f"P{i}", f"S{i}", "T2w", rng) for i in range(16)]
    shared = rng.standard_normal(6).astype(np.float32) * 6.0  # far from the normal tokens
    carriers = [1, 4, 7, 10, 13]
    for i in carriers:
        tokens = series[i].tokens.tokens[0]
        tokens[:6] = shared + 0.01 * rng.standard_normal((6, 6)).astype(np.float32)
    tokenisation = Tokenisation(series=series, skipped={}, encoder={"name": "intensity"})
    musc = score_batches(tokenisation, load_config(override={"encoder": {"name": "intensity"}})).batches[0]
    config = load_config(override={"encoder": {"name": "intensity"}, "scoring": {"method": "codegraph"}})
    batch = score_batches(tokenisation, config).batches[0]
    assert musc.scores.codegraph is None
    assert batch.scores.codegraph.communities == [carriers]
    for i in carriers:
        # MuSc: the shared anomaly explains itself away; CoDeGraph: it stands out again.
        assert batch.scores.token_scores[i][:6].min() > 2.0 * musc.scores.token_scores[i][:6].max()
    for i in sorted(set(range(16)) - set(carriers)):
        # Volumes outside the group keep their references, hence their MuSc scores.
        np.testing.assert_array_equal(batch.scores.token_scores[i], musc.scores.token_scores[i])


def test_codegraph_settings_are_validated():
    from codegraph3d.run.config import ConfigError

    with pytest.raises(ConfigError, match="scoring.method must be musc or codegraph"):
        load_config(override={"scoring": {"method": "graph"}})
    with pytest.raises(ConfigError, match="scoring.codegraph: .*false_alarm_rate"):
        load_config(override={"scoring": {"codegraph": {"false_alarm_rate": 2.0}}})


def test_bank_scores_are_reused_for_musc_with_two_bank_patients_only():
    from codegraph3d.run.pipeline import bank_groups, bank_scores_reusable, scoring_work

    musc, bank = load_config(), object()
    own = ["p1"]
    assert bank_scores_reusable(musc, bank, own + bank_groups(["b1", "b2", "b1"]), 1)
    # One bank patient: its volume is scored with the batch (not a BankGroup), so nothing is kept.
    assert not bank_scores_reusable(musc, bank, own + bank_groups(["b1", "b1"]), 1)
    assert not bank_scores_reusable(musc, bank, own, 1)
    assert not bank_scores_reusable(musc, None, own + bank_groups(["b1", "b2"]), 1)
    off = load_config(override={"bank": {"reuse_scores": False}})
    assert not bank_scores_reusable(off, bank, own + bank_groups(["b1", "b2"]), 1)
    codegraph = load_config(override={"scoring": {"method": "codegraph"}})
    assert not bank_scores_reusable(codegraph, bank, own + bank_groups(["b1", "b2"]), 1)
    # The progress clock's work: every ordered pair, or the members' own with the bank's scores kept.
    assert (scoring_work(1, 3, False), scoring_work(1, 3, True), scoring_work(2, 3, True)) == (16, 4, 10)


def test_layer_weights_that_do_not_match_the_encoder_stop_before_any_series_is_read(tmp_path):
    config = load_config(override={"encoder": {"name": "intensity"}, "scoring": {"layer_weights": [1, 2]}})
    with pytest.raises(CohortError, match=r"scoring.layer_weights has 2 weights but encoder 'intensity' gives 1 layers \(intensity\)"):
        build_encoder(config, tmp_path)
    assert build_encoder(config.with_overrides({"scoring": {"layer_weights": [3]}}), tmp_path).layer_names == ["intensity"]


def test_the_app_fuses_the_layers_with_the_configured_weights():
    rng = np.random.default_rng(3)
    series = []
    for i in range(4):
        one = _series(str(i), f"P{i}", f"S{i}", "T2w", rng)
        first = one.tokens.tokens[0]
        two = TokenSet(tokens=[first, rng.standard_normal(first.shape).astype(np.float32)], coords=one.tokens.coords,
                       grid_shape=one.tokens.grid_shape, layer_names=["a", "b"], brain_fraction=one.tokens.brain_fraction)
        series.append(dataclasses.replace(one, tokens=two))
    tokenisation = Tokenisation(series=series, skipped={}, encoder={"name": "intensity"})
    config = load_config(override={"encoder": {"name": "intensity"}})
    weighted = score_batches(tokenisation, config.with_overrides({"scoring": {"layer_weights": [1, 0]}})).batches[0].scores
    for fused, layer_a in zip(weighted.token_scores, weighted.per_layer[0]):
        np.testing.assert_allclose(fused, layer_a, atol=1e-7)
    plain = score_batches(tokenisation, config).batches[0].scores
    for fused, layer_a, layer_b in zip(plain.token_scores, *plain.per_layer):
        np.testing.assert_allclose(fused, (layer_a + layer_b) / 2, atol=1e-6)


def test_every_series_decided_against_the_bank_in_a_run_shares_its_rate():
    # (members, bank references) per chunk: a study's T1w and T2w series, and a chunk whose two
    # bank volumes are too few for statistics of their own (they join its batch; no rate to share).
    config = load_config()
    assert series_sharing_the_bank([(1, 40), (1, 40)], config) == 2
    assert series_sharing_the_bank([(1, 40), (1, 2), (12, 0)], config) == 1
    assert [decided_against_bank(n, config) for n in (0, 2, 3, 40)] == [False, False, True, True]
    for threshold in ({"reference": "batch"}, {"policy": "robust_z"}):
        assert series_sharing_the_bank([(1, 40), (1, 40)], config.with_overrides({"threshold": threshold})) == 0
