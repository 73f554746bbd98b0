"""The per-position z-score baseline: hand-computed z, settings, and a run on the tiny cohort."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures import STRIPPED_PREPROCESS

from codegraph3d_research.baseline import (
    BaselineSettings,
    baseline_markdown,
    main,
    run_baseline,
    smooth_map,
    volume_score,
    zscore_maps,
)
from codegraph3d.run.config import load_config
from codegraph3d_research.evaluate import (
    EvaluationInputError,
    TruthMismatchError,
    write_evaluation,
)

# A 32^3 working grid (8 x 4): the product's preprocessing, in a fraction of a second per series.
SMALL = {"encoder": {"name": "intensity", "patch_size": 4}, "tokens": {"grid_size": 8}, "preprocess": STRIPPED_PREPROCESS}


def _z(values, groups, brains=None, floor=0.01):
    images = [np.array([[[v]]], np.float32) for v in values]
    brains = [np.ones((1, 1, 1), bool) for _ in values] if brains is None else brains
    return [float(z[0, 0, 0]) for z in zscore_maps(images, brains, groups, floor)]


def test_zscore_by_hand():
    z = _z([0.2, 0.4, 0.6, 1.0], ["a", "b", "c", "d"])
    # Volume d against 0.2, 0.4, 0.6: mean 0.4, sample std 0.2 -> 0.6 / 0.2.
    assert z[3] == pytest.approx(3.0, rel=1e-6)
    # Volume a against 0.4, 0.6, 1.0: mean 2/3, sample variance (0.0711 + 0.0044 + 0.1111) / 2.
    assert z[0] == pytest.approx((2 / 3 - 0.2) / np.sqrt((0.8 / 3) ** 2 / 2 + (0.2 / 3) ** 2 / 2 + (1 / 3) ** 2 / 2), rel=1e-6)
    # Same patient never referenced: a's references are now 0.6 and 1.0 only (std 0.2 sqrt 2).
    z = _z([0.2, 0.4, 0.6, 1.0], ["a", "a", "c", "d"])
    assert z[0] == pytest.approx(0.6 / (0.2 * np.sqrt(2)), rel=1e-6)
    assert z[1] == pytest.approx(0.4 / (0.2 * np.sqrt(2)), rel=1e-6)
    # Identical references: the floor stands in for a zero std.
    assert _z([0.5, 0.5, 0.5, 0.6], ["a", "b", "c", "d"], floor=0.05)[3] == pytest.approx(2.0, rel=1e-6)


def test_zscore_needs_two_references_inside_their_brains():
    brains = [np.array([[[True]]]), np.array([[[True]]]), np.array([[[False]]]), np.array([[[True]]])]
    z = _z([0.2, 0.4, 0.9, 1.0], ["a", "b", "c", "d"], brains=brains)
    assert z[2] == 0.0  # outside its own brain
    # d's references inside their brains: 0.2, 0.4 (c is not brain there) -> mean 0.3, std 0.1414.
    assert z[3] == pytest.approx(0.7 / (0.1 * np.sqrt(2)), rel=1e-6)
    # With groups leaving a single reference the voxel has no z.
    assert _z([0.2, 0.4, 0.9], ["a", "b", "b"])[0] == pytest.approx(
        abs(0.2 - 0.65) / (0.5 / np.sqrt(2)), rel=1e-6)
    assert _z([0.2, 0.4, 0.9], ["a", "b", "b"])[1] == 0.0


def test_zscore_matches_brute_force():
    rng = np.random.default_rng(0)
    images = [rng.random((3, 4, 5)).astype(np.float32) for _ in range(6)]
    brains = [rng.random((3, 4, 5)) < 0.8 for _ in range(6)]
    groups = [0, 0, 1, 2, 3, 4]
    got = list(zscore_maps(images, brains, groups, 0.05))
    for i in range(6):
        for idx in np.ndindex(3, 4, 5):
            refs = [images[j][idx] for j in range(6) if groups[j] != groups[i] and brains[j][idx]]
            want = 0.0
            if brains[i][idx] and len(refs) >= 2:
                want = abs(images[i][idx] - np.mean(refs)) / max(np.std(refs, ddof=1), 0.05)
            assert got[i][idx] == pytest.approx(want, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="same positive number"):
        list(zscore_maps(images, brains[:2], groups, 0.05))


def test_smoothing_and_volume_score():
    z = np.zeros((9, 9, 9), np.float32)
    z[4, 4, 4] = 10.0
    brain = np.ones(z.shape, bool)
    brain[0] = False
    z[0, 0, 0] = 99.0
    plain = smooth_map(z, brain, 0.0)
    assert plain[0, 0, 0] == 0.0 and plain[4, 4, 4] == 10.0
    smooth = smooth_map(z, brain, 1.0)
    assert 0 < smooth[4, 4, 4] < 10.0 and smooth.sum() == pytest.approx(10.0, rel=0.02)
    assert volume_score(plain, brain, 100.0) == 10.0
    assert volume_score(plain, brain, 50.0) == 0.0
    assert volume_score(plain, np.zeros_like(brain), 100.0) == 0.0


def test_settings_and_grid_size(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CODEGRAPH3D_CONFIG", raising=False)
    assert load_config().working_grid_size == 224
    assert load_config(override=SMALL).working_grid_size == 32
    assert load_config(override={"encoder": {"name": "untrained-vit-s14"}}).working_grid_size == 224
    assert load_config(override={"encoder": {"name": "untrained-tiny"}, "tokens": {"grid_size": 8}}).working_grid_size == 8 * 14
    for bad, match in [({"std_floor": 0.0}, "std_floor"), ({"smoothing_sigma_mm": -1.0}, "smoothing"),
                       ({"volume_percentile": 0.0}, "volume_percentile"), ({"n_bins": 5}, "n_bins")]:
        with pytest.raises(ValueError, match=match):
            BaselineSettings(**bad)


@pytest.fixture(scope="module")
def baseline(tiny_cohort: Path):
    return run_baseline(tiny_cohort / "dicom", tiny_cohort, load_config(override=SMALL))


def test_baseline_on_tiny_cohort(baseline, tiny_cohort: Path, tmp_path: Path):
    metrics = baseline.metrics
    assert metrics["working_grid_size"] == 32 and metrics["schema"] == "codegraph3d.baseline/1"
    assert set(metrics["batches"]) == {"T2w", "T1w"}
    for item in metrics["batches"].values():
        assert (item["n_series"], item["n_lesion"], item["n_excluded"]) == (6, 2, 0)
        for key in ("patient_auroc", "patient_ap", "voxel_auroc", "voxel_ap", "dice_max"):
            assert 0.0 <= item[key] <= 1.0, key
        assert item["dice_at_product_threshold"] is None
        assert any("no binary threshold" in note for note in item["notes"])
    scored = [r for r in metrics["series"] if r["status"] == "scored"]
    assert len(scored) == 12 and {r["rank"] for r in scored if r["contrast"] == "T2w"} == set(range(1, 7))
    skipped = [r for r in metrics["series"] if r["status"] == "skipped"]
    assert skipped and all(r["in_truth"] == "distractor" for r in skipped)
    assert metrics["excluded"]["n_series"] == len(skipped) and metrics["excluded"]["n_with_truth"] == 0

    with pytest.raises(EvaluationInputError, match="inside"):
        write_evaluation(baseline, tiny_cohort / "baseline", forbidden=[tiny_cohort])
    written = write_evaluation(baseline, tmp_path / "out", forbidden=[tiny_cohort],
                               markdown=lambda m: baseline_markdown(m, {"run": "product", "batches": {
                                   "T2w": {"patient_auroc": 0.5}}}))
    assert {p.name for p in written} >= {"metrics.json", "metrics.md", "roc_pr_patient.png", "montage_T2w.png"}
    text = (tmp_path / "out" / "metrics.md").read_text()
    assert "| T2w | patient AUROC | 0.500 |" in text and "| T1w | patient AUROC | n/a |" in text
    json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_wrong_truth_fails_before_reading_pixels(tiny_cohort: Path, tmp_path: Path):
    labels = json.loads((tiny_cohort / "labels.json").read_text())
    removed = labels["studies"][0]["series"].pop(0)["series_instance_uid"]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(TruthMismatchError, match=removed):
        run_baseline(tiny_cohort / "dicom", tmp_path, load_config(override=SMALL))


def test_cli(tiny_cohort: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CODEGRAPH3D_CONFIG", raising=False)
    config = tmp_path / "small.yaml"
    config.write_text("encoder:\n  name: intensity\n  patch_size: 4\ntokens:\n  grid_size: 8\n")
    product = tmp_path / "product.json"
    product.write_text(json.dumps({"run": "x", "batches": {"T1w": {"patient_auroc": 0.25}}}))
    args = ["--input", str(tiny_cohort / "dicom"), "--truth", str(tiny_cohort), "--config", str(config),
            "--out", str(tmp_path / "b"), "--no-plots", "--compare", str(product), "--percentile", "99.9"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "working grid 32^3" in printed and "| T1w | patient AUROC | 0.250 |" in printed
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix != ".npz") == ["metrics.json", "metrics.md"]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["settings"]["volume_percentile"] == 99.9
    assert main(args[:-2] + ["--out", str(tiny_cohort / "x")]) == 2
    assert "inside" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--std-floor", "0"])
