"""Ablations from the token cache: fill, every table end to end, chunking, missing entries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures import STRIPPED_PREPROCESS_YAML

from codegraph3d_research.ablations import (
    CHUNK_DIVISORS,
    K_VALUES,
    VIEW_SETS,
    AblationError,
    chunk_indices,
    fill_cache,
    load_cohort,
    main,
)
from codegraph3d.run.config import CONFIG_ENV_VAR, load_config
from codegraph3d_research.synthetic import make_cohort

# A 2-layer, 128-wide untrained ViT on an 8^3 grid: every table has rows (no signal is expected).
VIT = STRIPPED_PREPROCESS_YAML + "encoder:\n  name: untrained-tiny\n  patch_size: 4\n  layers: [1, 2]\n  batch_size: 32\ntokens:\n  grid_size: 8\n"
INTENSITY = STRIPPED_PREPROCESS_YAML + "encoder:\n  name: intensity\n  patch_size: 4\ntokens:\n  grid_size: 8\nscoring:\n  window_radius: 1\n"


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four T2w subjects (two with lesions), cached under a ViT and an intensity configuration."""
    root = tmp_path_factory.mktemp("ablations")
    cohort = root / "cohort"
    make_cohort(cohort, n_subjects=4, lesion_fraction=0.5, contrasts=("T2w",), matrix_scale=0.3, seed=2,
                with_localizer_fraction=0.0)
    configs, summaries = {}, {}
    with pytest.MonkeyPatch.context() as patch:
        for name, text in (("vit", VIT), ("intensity", INTENSITY)):
            configs[name] = root / f"{name}.yaml"
            configs[name].write_text(text, encoding="utf-8")
            patch.setenv(CONFIG_ENV_VAR, str(configs[name]))
            summaries[name] = fill_cache(cohort / "dicom", root / "cache")
    return {"root": root, "cohort": cohort, "cache": root / "cache", "configs": configs, "summaries": summaries}


def test_fill_builds_then_hits(filled, monkeypatch):
    summary = filled["summaries"]["vit"]
    assert (summary["series"], summary["built"], summary["hits"]) == (4, 4, 0)
    assert Path(summary["cache"]).parent == filled["cache"] and len(list(Path(summary["cache"]).glob("*.npz"))) == 4
    monkeypatch.setenv(CONFIG_ENV_VAR, str(filled["configs"]["vit"]))
    again = fill_cache(filled["cohort"] / "dicom", filled["cache"])
    assert (again["hits"], again["built"], again["rebuilt"]) == (4, 0, 0)


def test_every_table_end_to_end(filled, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv(CONFIG_ENV_VAR, str(filled["configs"]["vit"]))
    settings = Path(filled["summaries"]["vit"]["cache"]).name
    out_json, out_md = tmp_path / "ablations.json", tmp_path / "ablations.md"
    code = main(["--cache", str(filled["cache"]), "--settings", settings, "--truth", str(filled["cohort"]),
                 "--contrast", "T2w", "--seeds", "0", "1", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed == out_md.read_text(encoding="utf-8")
    for title in ("Table 4: views", "Table 7: chunked batches", "Table 3: projection size", "Layer subsets"):
        assert title in printed
    results = json.loads(out_json.read_text(encoding="utf-8"))
    tables = results["contrasts"]["T2w"]["tables"]
    assert [row["setting"] for row in tables["views"]["rows"]] == list(VIEW_SETS)
    assert [row["setting"] for row in tables["chunks"]["rows"]] == ["full"] + [f"B/{d}" for d in CHUNK_DIVISORS[1:]]
    halves = tables["chunks"]["rows"][1]
    assert halves["chunk_sizes"] == [2, 2] and len(halves["patient_auroc"]["values"]) == 2
    assert "need at least 8 patients" in tables["chunks"]["rows"][2]["skipped"]
    projection = [row["setting"] for row in tables["projection"]["rows"]]
    assert projection == [f"k={k}" for k in K_VALUES if k < 128] + ["k>=128 (identity: 128, 200)"]
    assert [row["setting"] for row in tables["layers"]["rows"]] == ["block1", "block2", "all"]
    for table in tables.values():
        for row in table["rows"]:
            if "skipped" not in row:
                assert set(row["paper"].values()) <= {"n/a", "96.9 (headline)", "41.3 (headline)"}
                for metric in ("patient_auroc", "voxel_auroc", "dice_max"):
                    assert row[metric]["mean"] is None or 0.0 <= row[metric]["mean"] <= 1.0
    views = {row["setting"]: row for row in tables["views"]["rows"]}
    assert views["A+C+S"]["paper"]["patient_auroc"] == "96.9 (headline)" and views["A"]["paper"]["patient_auroc"] == "n/a"
    # the default setting is scored once and shared by the tables that contain it
    assert views["A+C+S"]["voxel_auroc"] == tables["chunks"]["rows"][0]["voxel_auroc"]


def test_intensity_width_makes_large_k_the_identity(filled, monkeypatch, capsys):
    monkeypatch.setenv(CONFIG_ENV_VAR, str(filled["configs"]["intensity"]))
    settings = Path(filled["summaries"]["intensity"]["cache"]).name
    code = main(["--cache", str(filled["cache"]), "--settings", settings, "--truth", str(filled["cohort"]),
                 "--seeds", "0", "--tables", "projection", "layers"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "k = 50, 100, 128, 200 >= the encoder's width 16 per axis: no projection is applied (identity)" in printed
    assert "| k=1 |" in printed and "| k=10 |" in printed and "| k=50 |" not in printed
    assert "no layer subsets to compare" in printed


def test_several_settings_need_a_choice(filled):
    config = load_config(override={"encoder": {"name": "intensity"}})
    with pytest.raises(AblationError, match="several settings: .*--settings"):
        load_cohort(filled["cache"], filled["cohort"], config)


def test_missing_entry_names_the_series_and_the_fill_command(filled, tmp_path: Path, capsys):
    settings = Path(filled["summaries"]["vit"]["cache"])
    partial = tmp_path / "cache" / settings.name
    shutil.copytree(settings, partial)
    victim = sorted(partial.glob("*.npz"))[0]
    victim.unlink()
    uid = victim.name[: -len(".npz")]
    code = main(["--cache", str(tmp_path / "cache"), "--truth", str(filled["cohort"])])
    assert code == 2
    message = capsys.readouterr().err
    assert uid in message and "no entry for 1 of the 4 series" in message
    assert f"python -m codegraph3d_research.ablations fill --input {filled['cohort'] / 'dicom'} --cache {tmp_path / 'cache'}" in message
    # a corrupt entry is named too, and fill is the remedy
    shutil.copy(settings / victim.name, victim)
    victim.write_bytes(victim.read_bytes()[:-10])
    code = main(["--cache", str(tmp_path / "cache"), "--truth", str(filled["cohort"])])
    assert code == 2 and str(victim) in capsys.readouterr().err


def test_chunks_cover_every_volume_once_and_keep_patients_together():
    groups = ["p0", "p1", "p1", "p2", "p3", "p4", "p5", "p5", "p6", "p7", "p8", "p9"]
    for n_chunks in (1, 2, 3, 5):
        for seed in (0, 1):
            chunks = chunk_indices(groups, n_chunks, seed)
            assert len(chunks) == n_chunks
            together = np.sort(np.concatenate(chunks))
            np.testing.assert_array_equal(together, np.arange(len(groups)))  # each exactly once
            for chunk in chunks:
                members = {groups[i] for i in chunk}
                assert len(members) >= 2
                assert all(set(np.flatnonzero([g == m for g in groups])) <= set(chunk) for m in members)
    assert [c.tolist() for c in chunk_indices(groups, 2, 0)] == [c.tolist() for c in chunk_indices(groups, 2, 0)]
    assert any(
        [c.tolist() for c in chunk_indices(groups, 2, 0)] != [c.tolist() for c in chunk_indices(groups, 2, s)]
        for s in range(1, 5)
    )
    with pytest.raises(ValueError, match="6 chunks need at least 12 patients"):
        chunk_indices(groups, 6, 0)
