"""The cohort bank: persistence, refusal of other settings, crash safety, and seeded chunking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from codegraph3d.store import bank as bank_module
from codegraph3d.store.bank import BankError, CohortBank, bank_settings
from codegraph3d.cli import main as codegraph3d_command
from codegraph3d.run.config import ConfigError, load_config
from codegraph3d.run.pipeline import batch_chunks
from codegraph3d.features.tokens import TokenSet

ENCODER = {
    "name": "intensity", "pretrained": False, "weights_sha256": None, "description": "intensity test",
    "layers": ["intensity"], "patch_size": 4, "dim": 16, "normalisation": "none",
}


def _settings(**token_overrides) -> dict:
    config = load_config(override={"tokens": token_overrides} if token_overrides else None)
    return bank_settings(config.token_recipe(), ENCODER)


def _series(index: int, contrast: str = "T2w", n_tokens: int = 20, patient: str | None = None) -> dict:
    rng = np.random.default_rng(index)
    coords = np.stack(np.unravel_index(np.arange(n_tokens), (8, 8, 8)), axis=1).astype(np.int64)
    tokens = TokenSet(
        tokens=[rng.standard_normal((n_tokens, 48)).astype(np.float32)],
        coords=coords,
        grid_shape=(8, 8, 8),
        layer_names=["intensity"],
        brain_fraction=np.ones((8, 8, 8)),
    )
    return {
        "series_instance_uid": f"1.2.3.{index}.1",
        "study_instance_uid": f"1.2.3.{index}",
        "patient_id": patient or f"P{index}",
        "contrast": contrast,
        "series_description": f"series {index}",
        "tokens": tokens,
    }


def test_add_list_load_remove_round_trip(tmp_path: Path):
    bank = CohortBank(tmp_path / "bank", _settings(), create=True)
    added = bank.add([_series(i) for i in range(3)] + [_series(9, contrast="T1w")], source="test")
    assert added == ["1.2.3.0.1", "1.2.3.1.1", "1.2.3.2.1", "1.2.3.9.1"]
    reopened = CohortBank(tmp_path / "bank", _settings())
    entries = reopened.entries()
    assert [e.contrast for e in entries] == ["T2w", "T2w", "T2w", "T1w"]
    volume = reopened.load(entries[1])
    np.testing.assert_array_equal(volume.tokens[0], _series(1)["tokens"].tokens[0])
    np.testing.assert_array_equal(volume.coords, _series(1)["tokens"].coords)
    assert volume.grid_shape == (8, 8, 8)
    # Adding a series again replaces it instead of duplicating it.
    reopened.add([_series(1)])
    assert len(reopened.entries()) == 4
    removed = reopened.remove(["1.2.3.1"])
    assert [e.series_instance_uid for e in removed] == ["1.2.3.1.1"]
    assert not (tmp_path / "bank" / "tokens" / "1.2.3.1.1.npz").exists()
    assert reopened.check() == []


def test_references_exclude_own_patients_and_studies_and_are_seeded(tmp_path: Path):
    bank = CohortBank(tmp_path / "bank", _settings(), create=True)
    bank.add([_series(i) for i in range(12)] + [_series(20, patient="P3"), _series(30, contrast="T1w")])
    refs = bank.references("T2w", exclude_patients=["P3"], exclude_studies=["1.2.3.5"], max_count=50)
    uids = {r.entry.series_instance_uid for r in refs}
    assert len(uids) == 10 and "1.2.3.3.1" not in uids and "1.2.3.20.1" not in uids and "1.2.3.5.1" not in uids
    assert all(r.entry.contrast == "T2w" for r in refs)
    first = [r.entry.series_instance_uid for r in bank.references("T2w", max_count=4, seed=7)]
    again = [r.entry.series_instance_uid for r in bank.references("T2w", max_count=4, seed=7)]
    assert first == again and len(first) == 4
    assert bank.references("T2w", layer_names=["other"]) == []


def test_bank_of_other_settings_is_refused_with_the_fields(tmp_path: Path):
    CohortBank(tmp_path / "bank", _settings(), create=True).add([_series(0)])
    with pytest.raises(BankError, match=r"another configuration or encoder \(differs in: projection.projection_dim\)"):
        CohortBank(tmp_path / "bank", _settings(projection_dim=64))
    other_encoder = dict(ENCODER, weights_sha256="ab" * 32)
    config = load_config()
    with pytest.raises(BankError, match="encoder.weights_sha256"):
        CohortBank(tmp_path / "bank", bank_settings(config.token_recipe(), other_encoder))


def test_missing_bank_and_bad_manifest_are_named(tmp_path: Path):
    with pytest.raises(BankError, match="no cohort bank at .*codegraph3d bank add"):
        CohortBank(tmp_path / "nothing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bank.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BankError, match="bank.json cannot be read"):
        CohortBank(tmp_path / "broken")


def test_writer_killed_before_the_manifest_leaves_the_bank_intact(tmp_path: Path, monkeypatch):
    bank = CohortBank(tmp_path / "bank", _settings(), create=True)
    bank.add([_series(0)])
    before = (tmp_path / "bank" / "bank.json").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the manifest")

    monkeypatch.setattr(bank_module, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        bank.add([_series(1), _series(2)])
    monkeypatch.undo()
    assert (tmp_path / "bank" / "bank.json").read_bytes() == before
    assert not list((tmp_path / "bank").rglob("*.partial"))
    reopened = CohortBank(tmp_path / "bank", _settings())
    assert [e.series_instance_uid for e in reopened.entries()] == ["1.2.3.0.1"]
    assert len(reopened.references("T2w")) == 1
    problems = reopened.check()
    assert len(problems) == 2 and all("orphan file" in p for p in problems)
    assert reopened.check(repair=True)
    assert reopened.check() == []
    assert sorted(p.name for p in (tmp_path / "bank" / "tokens").iterdir()) == ["1.2.3.0.1.npz"]


def test_corrupt_entry_is_skipped_reported_and_repaired(tmp_path: Path, caplog):
    bank = CohortBank(tmp_path / "bank", _settings(), create=True)
    bank.add([_series(0), _series(1)])
    victim = tmp_path / "bank" / "tokens" / "1.2.3.1.1.npz"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(BankError, match="does not match its recorded SHA-256"):
        bank.load(bank.entries()[1])
    refs = bank.references("T2w")
    assert [r.entry.series_instance_uid for r in refs] == ["1.2.3.0.1"]
    assert "1.2.3.1.1.npz" in caplog.text
    assert len(bank.check()) == 1
    bank.check(repair=True)
    assert [e.series_instance_uid for e in bank.entries()] == ["1.2.3.0.1"] and bank.check() == []


def test_remove_of_an_unknown_study_removes_nothing(tmp_path: Path):
    bank = CohortBank(tmp_path / "bank", _settings(), create=True)
    bank.add([_series(0), _series(1)])
    with pytest.raises(BankError, match="holds no study 9.9"):
        bank.remove(["1.2.3.0", "9.9"])
    assert len(bank.entries()) == 2


def test_command_line_list_check_remove(tmp_path: Path, capsys):
    bank = CohortBank(tmp_path / "bank", _settings(), create=True)
    bank.add([_series(0), _series(1)])
    assert codegraph3d_command(["bank", "list", str(tmp_path / "bank")]) == 0
    out = capsys.readouterr().out
    assert "2 series" in out and "1.2.3.1.1" in out
    assert codegraph3d_command(["bank", "check", str(tmp_path / "bank")]) == 0
    (tmp_path / "bank" / "tokens" / "stray.npz").write_bytes(b"x")
    assert codegraph3d_command(["bank", "check", str(tmp_path / "bank")]) == 1
    assert "orphan file" in capsys.readouterr().out
    assert codegraph3d_command(["bank", "check", str(tmp_path / "bank"), "--repair"]) == 0
    assert codegraph3d_command(["bank", "remove", str(tmp_path / "bank"), "--study", "1.2.3.0"]) == 0
    assert codegraph3d_command(["bank", "remove", str(tmp_path / "bank"), "--study", "1.2.3.0"]) == 2
    assert "holds no study" in capsys.readouterr().err
    assert codegraph3d_command(["bank", "list", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("n, size", [(10, 4), (7, 3), (40, 30), (5, 5), (5, 0), (181, 60)])
def test_batch_chunks_cover_every_volume_once_with_near_equal_sizes(n: int, size: int):
    chunks = batch_chunks(n, size, seed=3)
    joined = np.concatenate(chunks)
    assert sorted(joined.tolist()) == list(range(n))
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1
    if size and n > size:
        assert len(chunks) == -(-n // size) and max(sizes) <= size
    else:
        assert len(chunks) == 1
    again = batch_chunks(n, size, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(chunks, again))


def test_batch_chunks_depend_on_the_seed():
    assert not all(np.array_equal(a, b) for a, b in zip(batch_chunks(40, 10, 0), batch_chunks(40, 10, 1)))


@pytest.mark.parametrize(
    "override, match",
    [
        ({"scoring": {"batch_size": 1}}, "batch_size"),
        ({"threshold": {"policy": "bank"}}, "needs a cohort bank"),
        ({"threshold": {"policy": "fixed"}}, "lesion, robust_z or bank"),
        ({"bank": {"add_scored": "yes"}}, "add_scored"),
        ({"bank": {"min_patients": 1}}, "min_patients"),
        ({"scoring": {"memory_budget_mb": -1}}, "memory_budget_mb"),
    ],
)
def test_bank_and_chunk_settings_are_validated(override: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        load_config(override=override)


def test_manifest_is_plain_json_with_settings_and_hashes(tmp_path: Path):
    bank = CohortBank(tmp_path / "bank", _settings(), create=True)
    bank.add([_series(0)])
    manifest = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert manifest["format"] == "codegraph3d.cohort-bank/1"
    assert manifest["settings"]["encoder"]["name"] == "intensity"
    assert len(manifest["entries"][0]["sha256"]) == 64


def test_landmark_source_paths_do_not_split_banks(tmp_path: Path):
    config = load_config()
    landmarks = {"T2w": {"contrast": "T2w", "percentiles": [1.0, 99.0], "values": [0.0, 1.0], "source": "/models/a"}}
    moved = {"T2w": dict(landmarks["T2w"], source="/opt/holoscan/models/a")}
    CohortBank(tmp_path / "bank", bank_settings(config.token_recipe(), ENCODER, landmarks), create=True)
    CohortBank(tmp_path / "bank", bank_settings(config.token_recipe(), ENCODER, moved))
    changed = {"T2w": dict(landmarks["T2w"], values=[0.0, 0.9])}
    with pytest.raises(BankError, match="landmarks.T2w.values"):
        CohortBank(tmp_path / "bank", bank_settings(config.token_recipe(), ENCODER, changed))
