"""Preprocessing of a cohort's studies over worker processes, with progress and an ETA.

Preprocessing (N4, skull stripping, registration, resampling) is CPU-bound and independent per
study, while the encoder wants the GPU (or all cores) in the parent. :class:`StudyPreprocessor`
therefore loads and preprocesses whole studies in ``workers`` processes (a study stays in one
worker so that its T1w brain mask can be carried to its other series) and hands the results
back in input order, so the parent encodes study *n* while the workers prepare *n + 1...*.

Processes come from the ``forkserver`` start method: the server starts once from a clean,
single-threaded state, and workers fork from it, so neither the parent's threads (the SDK's
scheduler, torch's thread pool) nor a full re-import per worker are inherited. With one worker
everything runs in the calling process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codegraph3d.io.dicom import SeriesHeader, load_series_volume
from codegraph3d.preprocess.chain import PreprocessConfig, PreprocessedVolume, preprocess_study
from codegraph3d.core.progress import StageClock

__all__ = ["PreprocessModels", "PreprocessSetup", "SeriesJob", "SeriesOutcome", "StudyPreprocessor", "resolve_workers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessSetup:
    """Everything a worker needs to preprocess studies (picklable; models are loaded per worker).

    Attributes
    ----------
    config : PreprocessConfig
        The preprocessing settings.
    model_path : str or None
        Model folder (registration template, landmarks, HD-BET weights).
    device : str
        ``cpu``, ``cuda`` or ``auto`` for the skull stripper.
    threads : int
        Threads per worker for torch and SimpleITK (0 = leave the libraries' defaults).
    contrasts : tuple of str
        Contrasts whose Nyul references are loaded.
    """

    config: PreprocessConfig
    model_path: str | None
    device: str = "auto"
    threads: int = 0
    contrasts: tuple[str, ...] = ("T2w", "T1w")


@dataclass
class SeriesJob:
    """One series to load and preprocess: its headers and its contrast."""

    series: SeriesHeader
    contrast: str
    series_instance_uid: str


@dataclass
class SeriesOutcome:
    """What a worker returns for one series: headers of the loaded files and the result or error."""

    series_instance_uid: str
    prepared: PreprocessedVolume | None = None
    error: str | None = None
    datasets: list = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    qa: dict[str, Any] = field(default_factory=dict)  # of a series that failed quality control
    # Features computed inside the backend, when it encodes before handing results back (the
    # Ray backend's encoder actors); None: the caller encodes ``prepared``.
    encoded: Any = None
    seconds_encode: float = 0.0


def _cgroup_cpu_limit(cgroup_root: Path) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max``, else v1 CFS), or None."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a container's CPU quota.

    ``os.cpu_count()`` counts the host's CPUs; a MAP given ``cpu: 2`` on a 64-core node would
    otherwise start 4 workers of 16 threads each and thrash under its quota.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        count = min(count, max(1, int(limit)))
    return max(1, count)


def resolve_workers(requested: int, n_studies: int) -> int:
    """Worker count: ``requested`` when positive, else min(available CPUs, 4), never more than the studies."""
    if requested < 0:
        raise ValueError(f"preprocess.workers must be >= 0 (0 = automatic); got {requested}")
    count = requested if requested > 0 else min(available_cpus(), 4)
    return max(1, min(count, max(n_studies, 1)))


class PreprocessModels:
    """The models a process holds: loaded once, used for every study it is given."""

    def __init__(self, setup: PreprocessSetup) -> None:
        from codegraph3d.preprocess.intensity import load_reference_landmarks
        from codegraph3d.preprocess.registration import load_template
        from codegraph3d.preprocess.skullstrip import make_stripper

        if setup.threads > 0:
            import SimpleITK as sitk
            import torch

            torch.set_num_threads(setup.threads)
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(setup.threads)
        config = setup.config
        self.config = config
        self.template = load_template(setup.model_path) if config.registration == "affine" else None
        needs_template = config.skull_strip == "template"
        if needs_template and self.template is None:
            self.template = load_template(setup.model_path)
        self.stripper = None
        if config.skull_strip != "none":
            device = setup.device
            if device == "auto":
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.stripper = make_stripper(
                config.skull_strip, model_path=setup.model_path, template=self.template, device=device
            )
        self.references = {}
        if config.intensity_scaling == "landmarks":
            for contrast in setup.contrasts:
                self.references[contrast] = load_reference_landmarks(
                    contrast, setup.model_path, config.landmark_percentiles
                )

    def run(self, jobs: Sequence[SeriesJob]) -> list[SeriesOutcome]:
        outcomes: list[SeriesOutcome] = []
        loaded_jobs = []
        for job in jobs:
            outcome = SeriesOutcome(series_instance_uid=job.series_instance_uid)
            start = time.perf_counter()
            try:
                loaded = load_series_volume(job.series)
            except (ValueError, OSError) as error:
                outcome.error = f"could not be loaded: {error}"
                outcome.seconds = time.perf_counter() - start
                outcomes.append(outcome)
                continue
            volume = loaded.volume
            volume.series_instance_uid = job.series_instance_uid
            outcome.datasets = loaded.datasets
            outcome.files = [str(path) for path in loaded.files]
            outcome.skipped_files = [(str(path), reason) for path, reason in loaded.skipped_files]
            outcome.sop_instance_uids = list(volume.sop_instance_uids)
            outcome.seconds = time.perf_counter() - start
            outcomes.append(outcome)
            loaded_jobs.append((outcome, volume, job.contrast))
        if loaded_jobs:
            start = time.perf_counter()
            results = preprocess_study(
                [(volume, contrast) for _, volume, contrast in loaded_jobs],
                self.config, self.template, stripper=self.stripper, references=self.references,
            )
            share = (time.perf_counter() - start) / len(loaded_jobs)
            for (outcome, _, _), result in zip(loaded_jobs, results):
                outcome.seconds += share
                if isinstance(result, Exception):
                    outcome.error = f"could not be preprocessed: {result}"
                    outcome.qa = dict(getattr(result, "qa", {}) or {})
                else:
                    outcome.prepared = result
        return outcomes


_STATE: PreprocessModels | None = None


def _initialise(setup: PreprocessSetup) -> None:
    global _STATE
    _STATE = PreprocessModels(setup)


def _run_study(jobs: Sequence[SeriesJob]) -> list[SeriesOutcome]:
    if _STATE is None:  # pragma: no cover - the pool always runs the initializer first
        raise RuntimeError("worker used before its initialisation")
    return _STATE.run(jobs)


class StudyPreprocessor:
    """Load and preprocess studies in worker processes; results come back in input order.

    Parameters
    ----------
    setup : PreprocessSetup
        Settings and model folder for the workers.
    workers : int
        Number of processes; 1 runs in the calling process.

    Examples
    --------
    >>> with StudyPreprocessor(setup, workers=2) as pool:          # doctest: +SKIP
    ...     for jobs, outcomes in pool.map(studies):
    ...         ...
    """

    def __init__(self, setup: PreprocessSetup, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        self.setup = setup
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._local: PreprocessModels | None = None
        self.clock = StageClock(0)

    def __enter__(self) -> StudyPreprocessor:
        # Built here even with worker processes: a missing template, landmark file or skull
        # stripper then fails in the caller with its own message, not as a broken pool.
        self._local = PreprocessModels(self.setup)
        if self.workers > 1:
            context = multiprocessing.get_context("forkserver")
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context, initializer=_initialise, initargs=(self.setup,)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._local = None

    def expect(self, n_series: int) -> None:
        """Announce how many series the whole run will preprocess (for the progress line)."""
        self.clock = StageClock(n_series)

    def _progress(self, n: int) -> None:
        elapsed, remaining = self.clock.advance(n)
        logger.info(
            "preprocessed %d/%d series (%d worker%s), %.0f s elapsed, about %.0f s left",
            self.clock.done, self.clock.total, self.workers, "" if self.workers == 1 else "s", elapsed, remaining,
        )

    def map(self, studies: Iterable[Sequence[SeriesJob]]) -> Iterator[tuple[Sequence[SeriesJob], list[SeriesOutcome]]]:
        """Preprocess each study's jobs; yield ``(jobs, outcomes)`` in input order."""
        studies = [list(jobs) for jobs in studies if jobs]
        if self._local is None:
            raise RuntimeError("StudyPreprocessor.map() outside its 'with' block")
        if self._executor is None:
            for jobs in studies:
                outcomes = self._local.run(jobs)
                self._progress(len(jobs))
                yield jobs, outcomes
            return
        futures: list[Future] = [self._executor.submit(_run_study, jobs) for jobs in studies]
        try:
            for jobs, future in zip(studies, futures):
                outcomes = future.result()
                self._progress(len(jobs))
                yield jobs, outcomes
        finally:
            for future in futures:
                future.cancel()


def model_path_text(model_path: str | Path | None) -> str | None:
    """The model folder as the plain string a worker receives."""
    return None if model_path is None else str(model_path)
