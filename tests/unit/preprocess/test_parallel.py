"""Study preprocessing over worker processes, and the T1w mask shared within a study."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from codegraph3d.run.config import load_config
from codegraph3d.io.dicom import load_series_volume
from codegraph3d.preprocess.workers import PreprocessSetup, SeriesJob, StudyPreprocessor, resolve_workers
from codegraph3d.run.pipeline import scan_input, select_input
from codegraph3d.preprocess.chain import PreprocessConfig, preprocess_study
from codegraph3d.preprocess.skullstrip import intensity_brain_mask
from fixtures import STRIPPED_PREPROCESS

SMALL = {"encoder": {"name": "intensity", "patch_size": 4}, "tokens": {"grid_size": 8}, "preprocess": STRIPPED_PREPROCESS}


@pytest.fixture(scope="module")
def studies(tiny_cohort: Path) -> list[list[SeriesJob]]:
    config = load_config(override=SMALL)
    selection = select_input(scan_input(tiny_cohort / "dicom"), config)
    by_study: dict[str, list[SeriesJob]] = defaultdict(list)
    for decision in selection.taken:
        by_study[decision.study_instance_uid].append(
            SeriesJob(decision.series, decision.contrast, decision.series_instance_uid)
        )
    return list(by_study.values())[:3]


def _setup() -> PreprocessSetup:
    config = load_config(override=SMALL)
    return PreprocessSetup(config=config.preprocess.chain, model_path=None, device="cpu", threads=1)


def test_workers_give_the_same_volumes_as_one_process(studies, caplog):
    with StudyPreprocessor(_setup(), workers=1) as pool:
        serial = [outcomes for _, outcomes in pool.map(studies)]
    caplog.set_level(logging.INFO, logger="codegraph3d.preprocess.workers")
    with StudyPreprocessor(_setup(), workers=2) as pool:
        pool.expect(sum(len(jobs) for jobs in studies))
        parallel = [(jobs, outcomes) for jobs, outcomes in pool.map(studies)]
    assert [jobs for jobs, _ in parallel] == studies  # input order, whatever finishes first
    for one, (_, two) in zip(serial, parallel):
        for a, b in zip(one, two):
            assert a.error is None and b.error is None
            assert a.series_instance_uid == b.series_instance_uid
            np.testing.assert_array_equal(a.prepared.image, b.prepared.image)
            np.testing.assert_array_equal(a.prepared.brain_mask, b.prepared.brain_mask)
            np.testing.assert_allclose(a.prepared.grid_to_source, b.prepared.grid_to_source)
            assert len(b.datasets) == len(b.sop_instance_uids) > 0
    total = sum(len(jobs) for jobs in studies)
    assert f"preprocessed {total}/{total} series (2 workers)" in caplog.text


def test_a_series_that_cannot_load_is_an_outcome_not_a_crash(studies):
    broken = [SeriesJob(studies[0][0].series, "T2w", "1.2.3.broken")]
    original = broken[0].series.slices
    try:
        broken[0].series.slices = original[:1]  # one slice: not a volume
        with StudyPreprocessor(_setup(), workers=1) as pool:
            ((_, (outcome,)),) = list(pool.map([broken]))
    finally:
        broken[0].series.slices = original
    assert outcome.prepared is None and "could not be loaded" in outcome.error


def test_resolve_workers():
    assert resolve_workers(3, 10) == 3
    assert resolve_workers(3, 2) == 2
    assert 1 <= resolve_workers(0, 10) <= 4
    with pytest.raises(ValueError, match="preprocess.workers must be >= 0"):
        resolve_workers(-1, 3)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        StudyPreprocessor(_setup(), workers=0)


def test_map_outside_with_block_is_an_error():
    with pytest.raises(RuntimeError, match="outside its 'with' block"):
        list(StudyPreprocessor(_setup(), workers=1).map([[]]))


def test_study_strips_the_t1w_series_once_and_carries_its_mask(studies):
    study = next(jobs for jobs in studies if {job.contrast for job in jobs} == {"T1w", "T2w"})
    volumes = []
    for job in study:
        volume = load_series_volume(job.series).volume
        volume.series_instance_uid = job.series_instance_uid
        volumes.append((volume, job.contrast))
    calls: list[str] = []

    def stripper(volume):
        calls.append(volume.series_instance_uid)
        return intensity_brain_mask(volume)

    config = PreprocessConfig(size=32, skull_strip="deepbet")
    results = preprocess_study(volumes, config, stripper=stripper)
    t1w_uid = next(v.series_instance_uid for v, contrast in volumes if contrast == "T1w")
    assert calls == [t1w_uid]
    for (volume, contrast), prepared in zip(volumes, results):
        assert not isinstance(prepared, Exception), prepared
        method = prepared.qa["skull_strip"]["method"]
        if contrast == "T1w":
            assert "carried" not in method
        else:
            assert f"carried from T1w series {t1w_uid}" in method
            assert prepared.qa["skull_strip"]["carry"]["doubtful"] is False
            # The carried mask covers the series' own brain: both are the same head.
            own = intensity_brain_mask(volume).mask
            assert own.sum() > 0 and prepared.brain_volume_ml == pytest.approx(
                own.sum() * np.prod(volume.spacing) / 1000.0, rel=0.15)
        assert set(prepared.qa["step_seconds"]) >= {"registration", "resample", "standardise", "quality_control"}


def test_without_a_t1w_series_each_series_is_stripped(studies):
    job = next(job for jobs in studies for job in jobs if job.contrast == "T2w")
    volume = load_series_volume(job.series).volume
    calls: list[int] = []

    def stripper(v):
        calls.append(1)
        return intensity_brain_mask(v)

    (prepared,) = preprocess_study([(volume, "T2w")], PreprocessConfig(size=32, skull_strip="deepbet"), stripper=stripper)
    assert calls == [1] and not isinstance(prepared, Exception)


def test_available_cpus_honours_a_containers_cpu_quota(tmp_path: Path):
    from codegraph3d.preprocess.workers import available_cpus

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "no-cgroup") == affinity
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cpus(v2) == affinity
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: one worker's worth
    assert available_cpus(v2) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1) == affinity
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert available_cpus(v1) == 1
