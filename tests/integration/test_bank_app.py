"""End to end: one study scored against a cohort bank of ten prior studies, and chunked batches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import highdicom as hd
import pytest

from codegraph3d.store.bank import CohortBank
from codegraph3d_research.synthetic import make_cohort
from fixtures import ROOT, TINY_VIT_CONFIG, run_app


@pytest.fixture(scope="module")
def bank_setup(tmp_path_factory: pytest.TempPathFactory):
    """Eleven T2w subjects: ten prior studies in a bank (built with the CLI), one arriving alone."""
    tmp = tmp_path_factory.mktemp("bank_app")
    cohort = tmp / "cohort"
    make_cohort(cohort, n_subjects=11, lesion_fraction=0.3, contrasts=("T2w",), matrix_scale=0.3, seed=4,
                with_localizer_fraction=0.0)
    studies = sorted(p for p in (cohort / "dicom").iterdir() if p.is_dir())
    priors = tmp / "priors"
    for study in studies[:10]:
        shutil.copytree(study, priors / study.name)
    single = tmp / "single"
    shutil.copytree(studies[10], single / studies[10].name)
    models = tmp / "models"
    models.mkdir()
    config_file = tmp / "bank_build.yaml"
    config_file.write_text(TINY_VIT_CONFIG, encoding="utf-8")
    bank = tmp / "bank"
    completed = subprocess.run(
        [sys.executable, "-m", "codegraph3d", "bank", "add", str(bank), "-i", str(priors), "-m", str(models)],
        cwd=ROOT, env=dict(os.environ, CODEGRAPH3D_CONFIG=str(config_file)),
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "added 10 series" in completed.stdout
    return tmp, priors, single, models, bank


def test_single_study_is_scored_against_the_bank(bank_setup):
    tmp, _, single, models, bank = bank_setup
    config = TINY_VIT_CONFIG + f"bank:\n  folder: {bank}\n"
    run = run_app(single, tmp / "out_single", models, config, tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.report
    [row] = [r for r in report["series"] if r["status"] == "scored"]
    [batch] = report["batches"]
    assert batch["n_series"] == 1 and len(batch["bank_references"]) == 10
    assert row["references"] == 10 and row["score"] > 0
    assert report["bank"]["folder"] == str(bank)
    assert report["studies"][0]["score"] == row["score"]
    seg = hd.seg.segread(run.output / row["seg_binary"])
    assert seg.SeriesNumber == 9901
    fractional = hd.seg.segread(run.output / row["seg_score"])
    assert str(fractional.SegmentationType) == "FRACTIONAL"
    # Reading the bank never changes it.
    assert len(CohortBank(bank).entries()) == 10


def test_a_second_study_reuses_the_bank_volumes_scores(bank_setup):
    """The bank volumes' scores against each other are kept by the first run and reused by the next."""
    tmp, _, single, models, bank = bank_setup
    kept = tmp / "bank_kept"
    shutil.copytree(bank, kept, ignore=shutil.ignore_patterns("scores"))
    config = TINY_VIT_CONFIG + f"bank:\n  folder: {kept}\n"
    first = run_app(single, tmp / "out_kept_1", models, config, tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(list((kept / "scores").glob("*.npz"))) == 1
    assert "scores against each other reused" not in first.stderr
    second = run_app(single, tmp / "out_kept_2", models, config, tmp)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "the 10 cohort-bank volumes' scores against each other reused" in second.stderr
    rows = [[r for r in run.report["series"] if r["status"] == "scored"] for run in (first, second)]
    assert [r["score"] for r in rows[0]] == pytest.approx([r["score"] for r in rows[1]], rel=1e-5)
    assert [r["flagged"] for r in rows[0]] == [r["flagged"] for r in rows[1]]
    assert first.report["batches"][0]["threshold"] == pytest.approx(second.report["batches"][0]["threshold"],
                                                                    rel=1e-5)
    # Turned off, nothing is read or kept.
    shutil.rmtree(kept / "scores")
    off = run_app(single, tmp / "out_kept_off", models, config + "  reuse_scores: false\n", tmp)
    assert off.returncode == 0 and "reused" not in off.stderr
    assert not (kept / "scores").exists() or not list((kept / "scores").glob("*.npz"))


def test_bank_threshold_policy_and_adding_scored_series(bank_setup):
    tmp, _, single, models, bank = bank_setup
    grown = tmp / "bank_grown"
    shutil.copytree(bank, grown)
    config = TINY_VIT_CONFIG + f"bank:\n  folder: {grown}\n  add_scored: all\nthreshold:\n  policy: bank\n"
    run = run_app(single, tmp / "out_policy", models, config, tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    [batch] = run.report["batches"]
    assert batch["threshold_policy"].startswith("bank-")
    assert batch["threshold_params"]["n_reference_volumes"] == 10
    entries = CohortBank(grown).entries()
    assert len(entries) == 11
    assert run.report["bank"]["added"] == [r["series_instance_uid"] for r in run.report["series"] if r["status"] == "scored"]
    assert CohortBank(grown).check() == []


def test_bank_of_another_configuration_is_refused(bank_setup):
    tmp, _, single, models, bank = bank_setup
    # One tokens section (a key given twice is refused): the bank was built with the default projection.
    config = TINY_VIT_CONFIG.replace("tokens:\n  grid_size: 8\n", "tokens:\n  grid_size: 8\n  projection_dim: 8\n") \
        + f"bank:\n  folder: {bank}\n"
    run = run_app(single, tmp / "out_refused", models, config, tmp)
    assert run.returncode == 2
    assert "was built with another configuration or encoder" in run.last_line
    assert "projection.projection_dim" in run.last_line
    assert not (run.output / "SEG").exists() or not list((run.output / "SEG").iterdir())


def test_single_study_without_a_bank_names_the_fix(bank_setup):
    tmp, _, single, models, _ = bank_setup
    run = run_app(single, tmp / "out_nobank", models, TINY_VIT_CONFIG, tmp)
    assert run.returncode == 2
    assert "configure a cohort bank (bank.folder)" in run.last_line


def test_chunked_batches_score_every_series_once(bank_setup):
    tmp, priors, _, models, _ = bank_setup
    config = TINY_VIT_CONFIG + "scoring:\n  batch_size: 4\n  batch_seed: 5\n"
    run = run_app(priors, tmp / "out_chunks", models, config, tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.report
    batches = report["batches"]
    assert [b["n_chunks"] for b in batches] == [3, 3, 3]
    assert sorted(b["n_series"] for b in batches) == [3, 3, 4]
    assert len({(b["score_to_unit"]["low"], b["score_to_unit"]["high"]) for b in batches}) == 1
    scored = [r for r in report["series"] if r["status"] == "scored"]
    assert len(scored) == 10 and all(r["batch_size"] in (3, 4) for r in scored)
    assert all(r["references"] in (2, 3) for r in scored)


def test_every_chunk_decided_against_the_bank_shares_its_rate(bank_setup):
    """The run's series decided against the bank (every chunk's, every contrast's) share its rate."""
    tmp, priors, _, models, bank = bank_setup
    config = TINY_VIT_CONFIG + (f"bank:\n  folder: {bank}\nscoring:\n  batch_size: 4\n  batch_seed: 5\n"
                                "threshold:\n  bank_false_flag_rate: 0.2\n  bank_confidence: 0\n")
    run = run_app(priors, tmp / "out_shared", models, config, tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    batches = run.report["batches"]
    assert sorted(b["n_series"] for b in batches) == [3, 3, 4]
    for batch in batches:
        # Each chunk's priors are left out of its references: 10 - its own series join.
        calibration = batch["threshold_params"]["bank_calibration"]
        assert calibration["n_queries"] == 10 and calibration["rank"] == 1
        assert calibration["n_reference_volumes"] == 10 - batch["n_series"]
    # The report printer states the calibrated bound (a bound, not a count of flags).
    printed = subprocess.run([sys.executable, str(ROOT / "tools" / "print_report.py"), str(run.output / "report.json")],
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "of normal series on average over banks (bound: the largest evidence of" in printed.stdout


def test_a_batch_under_min_patients_draws_the_bank_and_one_at_it_keeps_its_own(bank_setup):
    """A batch of fewer than bank.min_patients patients is scored against the bank; one of that many alone."""
    tmp, priors, single, models, bank = bank_setup
    two = tmp / "two"
    prior = sorted(p for p in priors.iterdir() if p.is_dir())[0]
    shutil.copytree(prior, two / prior.name)
    shutil.copytree(next(single.iterdir()), two / next(single.iterdir()).name)
    banked = run_app(two, tmp / "out_two_banked", models, TINY_VIT_CONFIG + f"bank:\n  folder: {bank}\n", tmp)
    assert banked.returncode == 0, banked.stderr[-3000:]
    [batch] = banked.report["batches"]
    # The prior's own study is in the bank and never references itself: 9 of the 10 join.
    assert batch["n_series"] == 2 and len(batch["bank_references"]) == 9
    alone = run_app(two, tmp / "out_two_alone", models,
                    TINY_VIT_CONFIG + f"bank:\n  folder: {bank}\n  min_patients: 2\n", tmp)
    assert alone.returncode == 0, alone.stderr[-3000:]
    [batch] = alone.report["batches"]
    assert batch["n_series"] == 2 and batch["bank_references"] == []
    assert all(r["references"] == 1 for r in alone.report["series"] if r["status"] == "scored")
