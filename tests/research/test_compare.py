"""Paired bootstrap comparison of evaluated runs (codegraph3d_research.compare)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from codegraph3d_research.compare import ComparisonError, load_seed_run, main, paired_bootstrap
from codegraph3d_research.evaluate import SERIES_HISTOGRAMS, BatchAccumulator, write_series_histograms
from codegraph3d_research.metrics import StreamingBinaryMetrics, patient_auroc


def _write_run(folder: Path, rng: np.random.Generator, lesion_boost: float, n: int = 10, n_lesion: int = 4) -> None:
    """An evaluation folder: n patients, the first n_lesion with a lesion of 200 voxels."""
    folder.mkdir(parents=True)
    acc = BatchAccumulator("T2w", 0.0, 1.0, 100)
    rows = []
    for i in range(n):
        uid, has_lesion = f"1.2.{i}", i < n_lesion
        brain = rng.uniform(0.0, 0.6, 3000)
        lesion = np.zeros(3000, bool)
        if has_lesion:
            lesion[:200] = True
            brain[:200] = np.clip(rng.uniform(0.3, 0.9, 200) + lesion_boost, 0, 1)
        acc.add_volume(uid, float(brain.max()), has_lesion)
        acc.add_voxels(brain, lesion, uid=uid)
        rows.append({"series_instance_uid": uid, "patient_id": f"P{i}", "contrast": "T2w", "status": "scored",
                     "has_lesion": has_lesion, "score": float(brain.max())})
    write_series_histograms(folder / SERIES_HISTOGRAMS, {"T2w": acc})
    (folder / "metrics.json").write_text(json.dumps({"series": rows, "batches": {"T2w": acc.summary()}}))


def test_histograms_round_trip_and_reproduce_the_batch_metrics(tmp_path: Path):
    _write_run(tmp_path / "a", np.random.default_rng(0), 0.0)
    run = load_seed_run(tmp_path / "a", "T2w")
    summary = json.loads((tmp_path / "a" / "metrics.json").read_text())["batches"]["T2w"]
    pooled = StreamingBinaryMetrics(0.0, 1.0, 100)
    pooled.pos, pooled.neg = run.lesion.sum(axis=0), run.other.sum(axis=0)
    assert pooled.dice_max()[0] == pytest.approx(summary["dice_max"])
    assert patient_auroc(run.scores, run.has_lesion) == pytest.approx(summary["patient_auroc"])
    assert run.patients == [f"P{i}" for i in range(10)] and run.has_lesion.sum() == 4


def test_identical_conditions_differ_by_exactly_zero(tmp_path: Path):
    for seed in range(2):
        _write_run(tmp_path / f"a{seed}", np.random.default_rng(seed), 0.0)
    pairs = [(load_seed_run(tmp_path / f"a{s}", "T2w"), load_seed_run(tmp_path / f"a{s}", "T2w")) for s in range(2)]
    result = paired_bootstrap(pairs, n_resamples=200)
    for metric in ("patient_auroc", "dice_max"):
        assert result[metric]["difference"] == 0.0
        assert result[metric]["low"] == 0.0 and result[metric]["high"] == 0.0
        assert result[metric]["n_seeds"] == 2


def test_a_real_improvement_has_an_interval_above_zero(tmp_path: Path):
    for seed in range(3):
        _write_run(tmp_path / f"a{seed}", np.random.default_rng(seed), 0.0)
        _write_run(tmp_path / f"b{seed}", np.random.default_rng(seed), 0.3)
    pairs = [(load_seed_run(tmp_path / f"a{s}", "T2w"), load_seed_run(tmp_path / f"b{s}", "T2w")) for s in range(3)]
    result = paired_bootstrap(pairs, n_resamples=300, seed=1)["dice_max"]
    assert result["b"] > result["a"] and result["difference"] == pytest.approx(result["b"] - result["a"])
    assert 0.0 < result["low"] <= result["difference"] <= result["high"]


def test_cli_prints_the_table_and_rejects_unequal_seed_counts(tmp_path: Path, capsys: pytest.CaptureFixture):
    _write_run(tmp_path / "a", np.random.default_rng(0), 0.0)
    _write_run(tmp_path / "b", np.random.default_rng(0), 0.2)
    out_json = tmp_path / "c.json"
    assert main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--contrasts", "T2w",
                 "--resamples", "200", "--json", str(out_json)]) == 0
    assert "| T2w | Dice-max |" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["T2w"]["dice_max"]["n_seeds"] == 1
    assert main(["--a", str(tmp_path / "a"), str(tmp_path / "a"), "--b", str(tmp_path / "b")]) == 2


def test_bad_inputs_name_the_file_and_the_fix(tmp_path: Path):
    _write_run(tmp_path / "a", np.random.default_rng(0), 0.0)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text((tmp_path / "a" / "metrics.json").read_text())
    with pytest.raises(ComparisonError, match=r"series_histograms.npz does not exist: evaluate the run again"):
        load_seed_run(tmp_path / "old", "T2w")
    with pytest.raises(ComparisonError, match="no scored T1w series"):
        load_seed_run(tmp_path / "a", "T1w")
    other = load_seed_run(tmp_path / "a", "T2w")
    other.patients = [p + "x" for p in other.patients]
    with pytest.raises(ComparisonError, match="different patients"):
        paired_bootstrap([(load_seed_run(tmp_path / "a", "T2w"), other)], n_resamples=100)
