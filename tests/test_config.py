"""Configuration: documented defaults, validated overrides from a file, the environment or the model folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from codegraph3d.run.config import CONFIG_ENV_VAR, ConfigError, config_hash, default_config, load_config


def test_defaults_are_the_papers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    config = load_config()
    assert config["encoder"]["name"] == "dinov2"
    assert config["encoder"]["layers"] == [6, 12, 18, 24]
    assert config["tokens"]["grid_size"] == 16 and config["tokens"]["projection_dim"] == 128
    assert config["scoring"]["k_fraction"] == 0.3
    assert config["scoring"]["window_radius"] == -1
    assert config["config_sources"] == []


def test_model_folder_file_applies_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    (tmp_path / "codegraph3d.yaml").write_text("encoder:\n  name: intensity\n", encoding="utf-8")
    assert load_config(tmp_path)["encoder"]["name"] == "intensity"
    other = tmp_path / "other.yaml"
    other.write_text("encoder:\n  name: untrained-vit-s14\n", encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(other))
    config = load_config(tmp_path)
    assert config["encoder"]["name"] == "untrained-vit-s14"
    assert config["config_sources"] == [str(other)]


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
    c = default_config()
    c["config_sources"] = ["somewhere.yaml"]
    assert config_hash(c) == config_hash(a)


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "twice.yaml"
    path.write_text("threshold:\n  policy: lesion\n  token_z: 4.5\n  policy: robust_z\n", encoding="utf-8")
    monkeypatch.setenv("CODEGRAPH3D_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"twice.yaml: line 4: key 'policy' is given twice .*first on line 2"):
        load_config()
    # The same key in two sections is fine.
    path.write_text("threshold:\n  policy: lesion\nbank:\n  seed: 3\nscoring:\n  batch_seed: 3\n", encoding="utf-8")
    assert load_config()["bank"]["seed"] == 3


def test_the_shipped_defaults_give_no_key_twice():
    assert default_config()["threshold"]["policy"] == "lesion"
