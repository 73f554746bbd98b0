"""Configuration: documented defaults, validated overrides from a file, the environment or the model folder."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from codegraph3d.decision.settings import ThresholdPolicy
from codegraph3d.run.config import (
    CONFIG_ENV_VAR, AddScored, ConfigError, ExcludeSame, RunConfig, ScoringMethod, config_hash, default_config, load_config,
)


def test_defaults_are_the_papers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    config = load_config()
    assert config.encoder.name == "dinov2"
    assert config.encoder.layers == (6, 12, 18, 24)
    assert config.tokens.grid_size == 16 and config.tokens.projection_dim == 128
    assert config.scoring.k_fraction == 0.3
    assert config.scoring.window_radius == -1
    assert config.sources == () and config.as_dict()["config_sources"] == []


def test_model_folder_file_applies_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    (tmp_path / "codegraph3d.yaml").write_text("encoder:\n  name: intensity\n", encoding="utf-8")
    assert load_config(tmp_path).encoder.name == "intensity"
    other = tmp_path / "other.yaml"
    other.write_text("encoder:\n  name: untrained-vit-s14\n", encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(other))
    config = load_config(tmp_path)
    assert config.encoder.name == "untrained-vit-s14"
    assert config.sources == (str(other),)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"encoder": {"nmae": "intensity"}}, "unknown configuration field 'encoder.nmae'"),
        ({"scoring": {"k_fraction": "0.3"}}, "must be of type float"),
        ({"scoring": {"k_fraction": 1.5}}, "k_fraction"),
        ({"selection": {"scored_contrasts": ["T3w"]}}, "scored_contrasts"),
        ({"scoring": {"window_radius": -2}}, "window_radius"),
    ],
)
def test_bad_overrides_are_refused_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(override=override)


def test_missing_environment_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config()


def test_hash_changes_with_settings_not_with_sources(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    a = load_config()
    b = load_config(override={"scoring": {"k_fraction": 0.2}})
    assert config_hash(a) != config_hash(b)
    c = load_config(override={})
    assert c.sources == ("<override>",) and config_hash(c) == config_hash(a)


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "twice.yaml"
    path.write_text("threshold:\n  policy: lesion\n  token_z: 4.5\n  policy: robust_z\n", encoding="utf-8")
    monkeypatch.setenv("CODEGRAPH3D_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"twice.yaml: line 4: key 'policy' is given twice .*first on line 2"):
        load_config()
    # The same key in two sections is fine.
    path.write_text("threshold:\n  policy: lesion\nbank:\n  seed: 3\nscoring:\n  batch_seed: 3\n", encoding="utf-8")
    assert load_config().bank.seed == 3


def test_the_shipped_defaults_give_no_key_twice():
    assert default_config()["threshold"]["policy"] == "lesion"


def test_the_configuration_is_typed_frozen_and_validated_once(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    config = load_config(override={"encoder": {"name": "intensity", "patch_size": 4}, "tokens": {"grid_size": 8}})
    assert isinstance(config, RunConfig)
    assert config.scoring.method is ScoringMethod.MUSC and config.scoring.exclude_same is ExcludeSame.PATIENT_ID
    assert config.threshold.policy is ThresholdPolicy.LESION and config.bank.add_scored is AddScored.NONE
    # The chain's settings are the ones a run uses, on its working grid (tokens x patch size).
    assert config.preprocess.chain.size == config.working_grid_size == 8 * 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scoring.k_fraction = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.values["scoring"]["k_fraction"] = 0.5  # type: ignore[index]
    copy = config.as_dict()  # report.json's copy: changing it changes nothing the run uses
    copy["scoring"]["k_fraction"] = 0.5
    assert config.scoring.k_fraction == 0.3 and config.as_dict()["scoring"]["k_fraction"] == 0.3


def test_a_variant_is_merged_and_validated_again_and_the_original_is_kept(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    config = load_config()
    variant = config.with_overrides({"scoring": {"method": "codegraph", "k_fraction": 0.2}}, "sweep")
    assert variant.scoring.method is ScoringMethod.CODEGRAPH and variant.scoring.k_fraction == 0.2
    assert variant.sources == ("sweep",) and config.scoring.method is ScoringMethod.MUSC
    assert variant.as_dict()["scoring"]["k_fraction"] == 0.2 and config_hash(variant) != config_hash(config)
    with pytest.raises(ConfigError, match=r"scoring.k_fraction must lie in \(0, 1\]"):
        config.with_overrides({"scoring": {"k_fraction": 2.0}})
    with pytest.raises(ConfigError, match="unknown configuration field 'scoring.k'"):
        config.with_overrides({"scoring": {"k": 2.0}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"scoring": {"method": "knn"}}, "scoring.method must be musc or codegraph; got 'knn'"),
        ({"scoring": {"exclude_same": "site"}}, "scoring.exclude_same must be patient_id, study or none"),
        ({"bank": {"add_scored": "some"}}, "bank.add_scored must be none, unflagged or all"),
        ({"threshold": {"reference": "bank"}}, "threshold.reference must be auto or batch"),
        ({"threshold": {"finding_mass_by_contrast": {"FLAIR": 10.0}}}, "'FLAIR' is not a scored contrast"),
        ({"threshold": {"policy": "bank"}}, "threshold.policy bank needs a cohort bank: set bank.folder"),
        ({"preprocess": {"workers": -1}}, "preprocess.workers must be an integer >= 0"),
        ({"encoder": {"layers": [0, 12]}}, "encoder.layers must be 1-based block indices"),
        ({"output": {"mask_interpolation": "cubic"}}, "output.mask_interpolation must be one of"),
    ],
)
def test_each_section_names_the_field_it_refuses(override, message, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(override=override)


def test_a_section_replaced_by_hand_is_refused(monkeypatch: pytest.MonkeyPatch):
    # report.json records ``values``: a record whose sections say otherwise would misreport the run.
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    config = load_config()
    with pytest.raises(ValueError, match="sections differ from its values; make variants with with_overrides"):
        dataclasses.replace(config, scoring=dataclasses.replace(config.scoring, k_fraction=0.5))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tokens": {"grid_size": 0}}, "tokens.grid_size must be an integer >= 1; got 0"),
        ({"preprocess": {"clip_percentiles": ["a", 1]}}, "preprocess.clip_percentiles must be a list of numbers"),
        ({"loading": {"studies_per_chunk": 0}}, "loading.studies_per_chunk must be an integer >= 1"),
        ({"encoder": {"batch_size": 0}}, "encoder.batch_size must be an integer >= 1"),
        ({"execution": {"backend": "spark"}}, "execution.backend must be local or ray; got 'spark'"),
        ({"scoring": {"layer_weights": [1, -2]}}, "scoring.layer_weights must be a list of numbers >= 0"),
        ({"scoring": {"layer_weights": "1 2"}}, "scoring.layer_weights must be a list of numbers >= 0"),
        ({"scoring": {"layer_weights": 2}}, "scoring.layer_weights must be a list of numbers >= 0"),
        ({"scoring": {"layer_weights": {"a": 1}}}, "scoring.layer_weights must be a list of numbers >= 0"),
        ({"scoring": {"layer_weights": [10**400, 1]}}, "scoring.layer_weights must be a list of numbers >= 0"),
    ],
)
def test_counts_and_lists_are_refused_with_their_field(override, message, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(override=override)


def test_layer_weights_enter_the_decision_settings_only_when_set(monkeypatch: pytest.MonkeyPatch):
    # A rate measured with the plain mean must not be reported for a weighted fusion, and the
    # points measured before the field existed must still match the plain mean.
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    plain = load_config()
    assert plain.scoring.layer_weights is None
    assert "layer_weights" not in plain.decision_settings().record("T2w")["scoring"]
    weighted = plain.with_overrides({"scoring": {"layer_weights": [1, 1, 1, 2, 1]}})
    assert weighted.scoring.layer_weights == (1.0, 1.0, 1.0, 2.0, 1.0)
    assert weighted.decision_settings().record("T2w")["scoring"]["layer_weights"] == [1.0, 1.0, 1.0, 2.0, 1.0]
    assert weighted.with_overrides({"scoring": {"layer_weights": None}}).scoring.layer_weights is None
    # Equal weights are the plain mean, and match its operating point.
    equal = plain.with_overrides({"scoring": {"layer_weights": [2, 2, 2, 2, 2]}})
    assert equal.scoring.layer_weights is None
    assert equal.decision_settings().record("T2w") == plain.decision_settings().record("T2w")
