"""Preprocessing of a cohort's studies as Ray tasks: :mod:`workers`' job, on one machine or many.

:class:`RayStudyPreprocessor` is :class:`~codegraph3d.preprocess.workers.StudyPreprocessor` with
its process pool replaced by one Ray task per study (a study stays in one task, so its T1w mask
can be carried to its other series). Results come back in input order, never in order of
completion, so a run assembles the same batches as a local run.

* **Models once per worker process.** A Ray worker process runs many tasks of one function; it
  loads the models (template, skull stripper, Nyul references) for the first and keeps them for
  the next ones with the same settings, as a pool worker does.
* **Memory.** Each task asks Ray for the memory its study needs by the measured rule (0.5 GB +
  30 bytes per voxel of its largest series, plus 4 bytes per voxel of the study's other series,
  held loaded meanwhile: :func:`study_memory_bytes`), so large series are not co-scheduled into an
  out-of-memory kill.
* **Faults.** A task lost with its worker or node is run again elsewhere (Ray's ``max_retries``,
  system failures only); a study that fails for its own reasons comes back with its reason in
  its outcomes, as locally, and is never retried.
* **Threads.** Ray sets ``OMP_NUM_THREADS`` to a task's CPUs; the tasks set torch's and
  SimpleITK's thread counts themselves (``PreprocessSetup.threads``), so a result does not depend
  on where it ran.
* **Where.** The process's Ray instance (:func:`codegraph3d.core.ray_runtime.ray_runtime`): an
  embedded one, or a running cluster, which must see the input and model folders at the same
  paths (shared storage). It outlives this stage: encoding and scoring use it too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from codegraph3d.core.ray_runtime import RETRIES, ClusterError, alive_nodes, capped_memory, ray_runtime
from codegraph3d.preprocess.workers import (
    PreprocessModels,
    PreprocessSetup,
    SeriesJob,
    SeriesOutcome,
    StudyPreprocessor,
    available_cpus,
)

__all__ = ["RayStudyPreprocessor", "study_memory_bytes"]

logger = logging.getLogger(__name__)

BASE_BYTES = 500 * 1024**2
BYTES_PER_VOXEL = 30  # measured peak of a preprocessing worker (docs/RESULTS.md, "Very large series")
LOADED_BYTES_PER_VOXEL = 4  # a loaded float32 series waiting its turn in the same task

_MODELS: dict[PreprocessSetup, PreprocessModels] = {}


def _run_study(setup: PreprocessSetup, jobs: Sequence[SeriesJob]) -> tuple[str, list[SeriesOutcome]]:
    """A Ray task: preprocess one study with this worker process's models (loaded on first use).

    Returns the node it ran on as well (a separate, small return value): the next stage is sent
    to that node, where the outcomes, working images included, already are.
    """
    import ray  # in a Ray worker, where Ray is installed

    if setup not in _MODELS:
        _MODELS.clear()  # one settings' models at a time per process
        _MODELS[setup] = PreprocessModels(setup)
    return ray.get_runtime_context().get_node_id(), _MODELS[setup].run(jobs)


@dataclass
class _Study:
    """A study in flight: its jobs, its preprocessing task's two results, and what is waited for."""

    jobs: list[SeriesJob]
    node: Any  # reference to the node id the task ran on
    outcomes: Any  # reference to the preprocessing outcomes
    final: Any = None  # reference handed back: the outcomes, or the chained stage's result


def _series_voxels(job: SeriesJob) -> int:
    """Voxels of a series from its headers (0 when the headers lack the matrix size)."""
    return sum((s.rows or 0) * (s.columns or 0) * max(1, s.number_of_frames) for s in job.series.slices)


def study_memory_bytes(jobs: Sequence[SeriesJob]) -> int:
    """Memory one task needs for a study: 0.5 GB + 30 B/voxel of its largest series + 4 B/voxel of the rest.

    Parameters
    ----------
    jobs : sequence of SeriesJob
        The study's series, with their headers (matrix size and frames; no pixels are read).

    Returns
    -------
    int
        Bytes to request from Ray for the study's task.
    """
    voxels = sorted((_series_voxels(job) for job in jobs), reverse=True) or [0]
    return BASE_BYTES + BYTES_PER_VOXEL * voxels[0] + LOADED_BYTES_PER_VOXEL * sum(voxels[1:])


class RayStudyPreprocessor(StudyPreprocessor):
    """Load and preprocess studies as Ray tasks; results come back in input order.

    Parameters
    ----------
    setup : PreprocessSetup
        Settings and model folder (the same paths must exist on every node).
    workers : int
        Studies in flight at least (more on a cluster with more CPUs); each task asks for
        ``setup.threads`` CPUs (at least one) and its memory, and Ray places it on a node that has
        them.
    address : str
        ``""``: an embedded Ray instance for this run; ``"auto"`` or ``"host:port"``: a cluster.

    Raises
    ------
    codegraph3d.core.optional.OptionalDependencyError
        On entering, when Ray is not installed.
    ValueError
        On entering, when Ray cannot be started or the cluster cannot be reached (the address is
        in the message).
    """

    def __init__(self, setup: PreprocessSetup, workers: int = 1, address: str = "") -> None:
        super().__init__(setup, workers)
        self.address = address
        self._ray: Any = None
        self._task: Any = None
        self._follow: Callable[[str, Any], Any] | None = None
        self._stop_follow: Callable[[], None] | None = None

    @property
    def ray(self) -> Any:
        """The ``ray`` module, initialised (inside the ``with`` block)."""
        return self._ray

    def follow_with(self, follow: Callable[[str, Any], Any], stop: Callable[[], None]) -> None:
        """Chain a stage after each study's preprocessing, on the cluster (for example encoding).

        Parameters
        ----------
        follow : callable
            ``follow(node_id, ref)`` gets the node a study was preprocessed on and the reference
            to its outcomes (held on that node) and returns the reference :meth:`map` waits for
            instead; it is called as soon as the preprocessing finishes.
        stop : callable
            Called on leaving the ``with`` block (the Ray instance itself stays for later stages).
        """
        self._follow, self._stop_follow = follow, stop

    def __enter__(self) -> RayStudyPreprocessor:
        # Built here too: a missing template or landmark file fails in the caller with its message.
        self._local = PreprocessModels(self.setup)
        try:
            self._ray = ray_runtime(self.address, available_cpus)
        except BaseException:
            self._local = None
            raise
        self._task = self._ray.remote(_run_study)
        return self

    def __exit__(self, *exc: object) -> None:
        # The Ray instance stays for the run's later stages (it ends with the process).
        self._task = None
        stop, self._follow, self._stop_follow = self._stop_follow, None, None
        if stop is not None:
            with contextlib.suppress(Exception):  # a lost node must not keep the run from going on
                stop()
        self._local = None

    def map(self, studies: Iterable[Sequence[SeriesJob]]) -> Iterator[tuple[Sequence[SeriesJob], list[SeriesOutcome]]]:
        """Preprocess each study's jobs as a task; yield ``(jobs, outcomes)`` in input order.

        At most ``workers`` studies, or as many as the cluster's CPUs run at once, are in flight
        (submitted but not yet handed back), which bounds what waits in the object store. A
        chained stage (:meth:`follow_with`) is started for each study as soon as its
        preprocessing finishes, in whatever order they finish.
        """
        studies = [list(jobs) for jobs in studies if jobs]
        if self._task is None:
            raise RuntimeError("RayStudyPreprocessor.map() outside its 'with' block")
        setup_ref = self._ray.put(self.setup)
        cpus = self._task_cpus()
        in_flight = max(self.workers, int(self._ray.cluster_resources().get("CPU", 0)) // cpus)
        pending: deque[_Study] = deque()
        queue = iter(studies)
        try:
            while True:
                while len(pending) < in_flight and (jobs := next(queue, None)) is not None:
                    memory = capped_memory(self._ray, study_memory_bytes(jobs))
                    task = self._task.options(num_cpus=cpus, memory=memory, max_retries=RETRIES, retry_exceptions=False,
                                              num_returns=2)
                    node, outcomes = task.remote(setup_ref, jobs)
                    pending.append(_Study(jobs, node, outcomes, outcomes if self._follow is None else None))
                if not pending:
                    return
                study = self._next_in_order(pending)
                outcomes = self._get(study.final)
                self._progress(len(study.jobs))
                yield study.jobs, outcomes
        finally:
            for study in pending:
                # Cancelling the preprocessing task also fails the chained stage waiting on it.
                with contextlib.suppress(Exception):  # already finished, or its node already gone
                    self._ray.cancel(study.outcomes, force=True)

    def _next_in_order(self, pending: deque[_Study]) -> _Study:
        """Wait until the first pending study is done, starting chained stages as studies finish."""
        ray = self._ray
        while True:
            for study in pending:
                if study.final is None and ray.wait([study.node], timeout=0)[0]:
                    try:
                        study.final = self._follow(ray.get(study.node), study.outcomes)
                    except ray.exceptions.RayError:
                        study.final = study.outcomes  # the task failed: its error surfaces in _get
            head = pending[0]
            if head.final is not None and ray.wait([head.final], timeout=0)[0]:
                return pending.popleft()
            waiting = [study.node for study in pending if study.final is None]
            ray.wait(waiting + ([head.final] if head.final is not None else []), num_returns=1)

    def _task_cpus(self) -> int:
        """CPUs per study task: the setup's threads, at most the largest node's CPUs (else it never runs)."""
        largest = max((node.get("CPU", 0.0) for node in alive_nodes(self._ray)), default=0.0)
        return max(1, min(max(1, self.setup.threads), int(largest) or 1))

    def _get(self, ref: Any) -> list[SeriesOutcome]:
        """A study's outcomes, copied out of the object store; a failure outside its series as ClusterError."""
        try:
            # Ray hands numpy arrays back as read-only views of its object store: a kept brain
            # mask would pin its whole result there, image included. Copies let each result go.
            return copy.deepcopy(self._ray.get(ref))
        except self._ray.exceptions.RayError as error:
            # Series' own errors come back inside the outcomes; this is the node or the set-up.
            raise ClusterError(f"a study's Ray work failed ({error}); check that every node sees the model "
                               "folder and the input at the same paths") from error
