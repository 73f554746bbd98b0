"""Token cache: hits equal fresh tokenisation; bad entries are detected and rebuilt; what the key covers."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures import STRIPPED_PREPROCESS

from codegraph3d.store.cache import (
    CachedSeries,
    TokenCache,
    cache_key,
    key_material,
    read_entry,
    settings_id,
)
from codegraph3d.run.config import ConfigError, load_config
from codegraph3d.features.encoders import IntensityEncoder
from codegraph3d.run.pipeline import CohortError, Selection, open_cache, scan_input, select_input, tokenise_selected
from codegraph3d.preprocess.chain import PreprocessedVolume
from codegraph3d.features.tokens import encode_volume, project, tokenise

P, G = 4, 8
S = P * G
UID_A, UID_B = "1.2.3.4.100", "1.2.3.4.200"
SMALL = {"encoder": {"name": "intensity", "patch_size": P}, "tokens": {"grid_size": G}, "preprocess": STRIPPED_PREPROCESS}


@pytest.fixture(scope="module")
def encoder() -> IntensityEncoder:
    return IntensityEncoder(patch_size=P)


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config(override=SMALL)


def _volume_and_mask() -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).random((S, S, S), dtype=np.float32)
    z, y, x = np.mgrid[:S, :S, :S] - (S - 1) / 2
    return image, z**2 + y**2 + x**2 <= 13.0**2


def _entry(encoder: IntensityEncoder) -> CachedSeries:
    image, mask = _volume_and_mask()
    prepared = PreprocessedVolume(
        image=np.zeros((0, 0, 0), np.float32), brain_mask=mask, grid_origin=np.array([-10.0, 5.0, 2.5]),
        grid_spacing=0.75, grid_to_source=np.diag([0.5, 0.5, 0.25, 1.0]), source_shape_zyx=(4, 20, 18),
        source_origin=np.array([1.0, 2.0, 3.0]), source_spacing=np.array([1.5, 1.5, 3.0]),
        source_direction=np.eye(3)[:, [1, 0, 2]], brain_volume_ml=123.4,
    )
    encoded = encode_volume(image, mask, encoder, grid_size=G)
    return CachedSeries(
        encoded=encoded, prepared=prepared, sop_instance_uids=[f"1.2.3.{i}" for i in range(4)],
        files=[f"/data/IM{i}.dcm" for i in range(4)], skipped_files=[("/data/bad.dcm", "truncated")],
        series={"patient_id": "P1", "contrast": "T2w"},
    )


@pytest.fixture()
def stored(tmp_path: Path, encoder, config) -> tuple[TokenCache, dict, CachedSeries]:
    cache = TokenCache(tmp_path / "cache")
    material = key_material(UID_A, ["1.2.3.3", "1.2.3.1", "1.2.3.0", "1.2.3.2"], config.token_recipe(), encoder)
    entry = _entry(encoder)
    cache.store(material, entry)
    return cache, material, entry


def test_a_hit_gives_the_tokens_of_a_fresh_tokenisation(stored, encoder):
    cache, material, entry = stored
    lookup = cache.load(material)
    assert lookup.status == "hit"
    got = lookup.entry
    image, mask = _volume_and_mask()
    fresh = tokenise(image, mask, encoder, grid_size=G, projection_dim=8, projection_seed=2)
    tokens = project(got.encoded, projection_dim=8, projection_seed=2)
    np.testing.assert_array_equal(tokens.tokens[0], fresh.tokens[0])
    np.testing.assert_array_equal(tokens.coords, fresh.coords)
    np.testing.assert_array_equal(tokens.brain_fraction, fresh.brain_fraction)
    np.testing.assert_array_equal(got.prepared.brain_mask, mask)
    for name in ("grid_origin", "grid_to_source", "source_origin", "source_spacing", "source_direction"):
        np.testing.assert_array_equal(getattr(got.prepared, name), getattr(entry.prepared, name))
    assert got.prepared.grid_spacing == 0.75 and got.prepared.brain_volume_ml == 123.4
    assert got.prepared.source_shape_zyx == (4, 20, 18)
    assert got.sop_instance_uids == entry.sop_instance_uids and got.files == entry.files
    assert got.skipped_files == [("/data/bad.dcm", "truncated")]
    assert got.series == {"patient_id": "P1", "contrast": "T2w"}
    npz, sidecar = cache.paths(material)
    assert npz.parent.name == settings_id(material) and npz.name == f"{UID_A}.npz" and sidecar.is_file()
    assert not list(npz.parent.glob(".*partial"))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", "SHA-256 of the file does not match"),
        ("truncate", "truncated"),
        ("other_key", "not the requested"),
        ("no_sidecar", "sidecar is missing"),
        ("garbage_sidecar", "unreadable sidecar"),
    ],
)
def test_bad_entries_are_detected_logged_and_rebuilt(stored, encoder, config, damage, reason, caplog):
    cache, material, entry = stored
    npz, sidecar = cache.paths(material)
    if damage == "flip":
        data = bytearray(npz.read_bytes())
        data[len(data) // 2] ^= 0xFF
        npz.write_bytes(bytes(data))
    elif damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:-100])
    elif damage == "other_key":  # another series' entry under this name
        other = key_material(UID_B, ["1.2.3.0"], config.token_recipe(), encoder)
        cache.store(other, entry)
        other_npz, other_sidecar = cache.paths(other)
        shutil.copy(other_npz, npz)
        shutil.copy(other_sidecar, sidecar)
    elif damage == "no_sidecar":
        sidecar.unlink()
    else:
        sidecar.write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="codegraph3d.store.cache"):
        lookup = cache.load(material)
    assert lookup.status == "invalid" and lookup.entry is None and reason in lookup.reason
    assert any(str(npz.parent) in record.getMessage() and reason in record.getMessage() for record in caplog.records)
    cache.store(material, entry)  # what the pipeline does next
    assert cache.load(material).status == "hit"


def test_an_edited_sidecar_is_not_trusted(stored):
    cache, material, _ = stored
    _, sidecar = cache.paths(material)
    text = sidecar.read_text(encoding="utf-8").replace('"grid_size": 8', '"grid_size": 9')
    sidecar.write_text(text, encoding="utf-8")
    lookup = cache.load(material)
    assert lookup.status == "invalid" and "does not match its key material" in lookup.reason


def test_projection_and_scoring_settings_keep_the_key_encoder_and_preprocess_change_it(encoder, config):
    sops = ["1.2.3.0", "1.2.3.1"]
    base = cache_key(key_material(UID_A, sops, config.token_recipe(), encoder))
    same = load_config(override={**SMALL, "tokens": {"grid_size": G, "projection_dim": 7, "projection_seed": 5},
                                 "scoring": {"k_fraction": 0.5, "window_radius": 1},
                                 "encoder": {"name": "intensity", "patch_size": P, "batch_size": 3, "device": "cpu"}})
    assert cache_key(key_material(UID_A, list(reversed(sops)), same.token_recipe(), encoder)) == base
    changed = {
        "preprocess": load_config(override={**SMALL, "preprocess": {**STRIPPED_PREPROCESS, "crop_margin": 0.1}}),
        "min_brain_fraction": load_config(override={**SMALL, "tokens": {"grid_size": G, "min_brain_fraction": 0.5}}),
        "grid": load_config(override={**SMALL, "tokens": {"grid_size": 4}}),
    }
    for label, other in changed.items():
        assert cache_key(key_material(UID_A, sops, other.token_recipe(), encoder)) != base, label
    identity = encoder.identity()
    for field, value in (("weights_sha256", "ab" * 32), ("layers", ["other"]), ("patch_size", 7), ("name", "dinov2")):
        assert cache_key(key_material(UID_A, sops, config.token_recipe(), {**identity, field: value})) != base, field
    assert cache_key(key_material(UID_A, sops + ["1.2.3.9"], config.token_recipe(), encoder)) != base  # a file more
    assert cache_key(key_material(UID_B, sops, config.token_recipe(), encoder)) != base
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        key_material("../../etc", sops, config.token_recipe(), encoder)


def test_the_landmarks_values_key_the_cache_not_their_source_text(encoder, config):
    # The source names files as they were written (a relative or an absolute model path) and the
    # command that makes them: neither changes what is cached, so neither may change the key.
    reference = {"percentiles": [1.0, 50.0, 99.0], "values": [0.0, 0.4, 1.0], "contrast": "T2w"}
    here = {"T2w": {**reference, "source": "uniform reference; learn one with python -m codegraph3d landmarks learn"}}
    there = {"T2w": {**reference, "source": "/elsewhere/models/landmarks/reference_landmarks.json"}}
    key = cache_key(key_material(UID_A, ["1.2.3.0"], config.token_recipe(), encoder, here))
    assert cache_key(key_material(UID_A, ["1.2.3.0"], config.token_recipe(), encoder, there)) == key
    moved = {"T2w": {**reference, "values": [0.0, 0.5, 1.0], "source": here["T2w"]["source"]}}
    assert cache_key(key_material(UID_A, ["1.2.3.0"], config.token_recipe(), encoder, moved)) != key


def test_cache_folder_is_configured_and_validated(tmp_path: Path):
    assert load_config().cache.folder == ""
    assert open_cache(load_config()) is None
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="cache.folder .* is a file"):
        load_config(override={"cache": {"folder": str(a_file)}})
    config = load_config(override={"cache": {"folder": str(tmp_path / "new" / "cache")}})
    assert open_cache(config).folder == tmp_path / "new" / "cache"
    # A file appears where the folder was, after the configuration was read.
    (tmp_path / "new" / "cache").rmdir()
    a_file.rename(tmp_path / "new" / "cache")
    with pytest.raises(CohortError, match="is a file"):
        open_cache(config)


def test_pipeline_hits_skip_pixels_and_keep_headers(tiny_cohort: Path, tmp_path: Path, encoder, monkeypatch):
    cache_dir = tmp_path / "cache"
    config = load_config(override={**SMALL, "cache": {"folder": str(cache_dir)}})
    scan = scan_input(tiny_cohort / "dicom")
    full = select_input(scan, config)
    taken = [d for d in full.decisions if d.taken and d.contrast == "T2w"][:2]
    selection = Selection(scan=scan, decisions=taken)
    first = tokenise_selected(selection, config, encoder)
    assert [r.qa["token_cache"] for r in first.series] == ["miss", "miss"]

    # Pixels are read where studies are preprocessed (in process here: preprocess.workers is 1).
    import codegraph3d.preprocess.workers as parallel

    def no_pixels(*args, **kwargs):
        raise AssertionError("a cache hit must not load pixels")

    monkeypatch.setattr(parallel, "load_series_volume", no_pixels)
    second = tokenise_selected(selection, config, encoder)
    assert [r.qa["token_cache"] for r in second.series] == ["hit", "hit"]
    for a, b in zip(first.series, second.series):
        np.testing.assert_array_equal(a.tokens.tokens[0], b.tokens.tokens[0])
        np.testing.assert_array_equal(a.prepared.brain_mask, b.prepared.brain_mask)
        np.testing.assert_array_equal(a.prepared.grid_to_source, b.prepared.grid_to_source)
        assert [d.SOPInstanceUID for d in a.datasets] == [d.SOPInstanceUID for d in b.datasets]
        assert "PixelData" not in b.datasets[0] and b.datasets[0].Rows == a.datasets[0].Rows
        assert a.qa["geometry"] == b.qa["geometry"]
    monkeypatch.undo()

    # A corrupt entry is rebuilt from the DICOM, and then hit again.
    npz = next(cache_dir.rglob(f"{taken[0].series_instance_uid}.npz"))
    npz.write_bytes(npz.read_bytes()[:1000])
    third = tokenise_selected(selection, config, encoder)
    assert [r.qa["token_cache"] for r in third.series] == ["rebuilt", "hit"]
    np.testing.assert_array_equal(third.series[0].tokens.tokens[0], first.series[0].tokens.tokens[0])
    read_entry(npz)  # valid again
