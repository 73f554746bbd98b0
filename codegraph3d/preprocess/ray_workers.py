"""Preprocessing of a cohort's studies as Ray actors: :mod:`workers`' job, on one machine or many.

:class:`RayStudyPreprocessor` is :class:`~codegraph3d.preprocess.workers.StudyPreprocessor` with
its process pool replaced by Ray actors. Each actor loads the models once (template, skull
stripper, Nyul references), like a pool worker, and preprocesses whole studies (a study stays on
one actor, so its T1w mask can be carried to its other series). Results come back in input
order, never in order of completion, so a run assembles the same batches as a local run.

Ray sets ``OMP_NUM_THREADS`` to an actor's CPUs; the actors set torch's and SimpleITK's thread
counts themselves (``PreprocessSetup.threads``), so a result does not depend on where it ran.
With ``address`` empty an embedded Ray instance is started for the run, sized to this machine
(or container quota), and stopped after it; ``auto`` or ``host:port`` joins a running cluster,
which must see the input and model folders at the same paths (shared storage).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from codegraph3d.core.optional import optional_import
from codegraph3d.preprocess.workers import (
    PreprocessModels,
    PreprocessSetup,
    SeriesJob,
    SeriesOutcome,
    StudyPreprocessor,
    available_cpus,
)

__all__ = ["RAY_INSTALL", "RayStudyPreprocessor"]

logger = logging.getLogger(__name__)

RAY_INSTALL = "pip install ray==2.60.0"


class _ModelsActor:
    """What a Ray actor holds: the preprocessing models, loaded once per actor."""

    def __init__(self, setup: PreprocessSetup) -> None:
        self.models = PreprocessModels(setup)

    def run(self, jobs: Sequence[SeriesJob]) -> list[SeriesOutcome]:
        return self.models.run(jobs)


class RayStudyPreprocessor(StudyPreprocessor):
    """Load and preprocess studies on Ray actors; results come back in input order.

    Parameters
    ----------
    setup : PreprocessSetup
        Settings and model folder (the same paths must exist on every node).
    workers : int
        Actors, each asking Ray for ``setup.threads`` CPUs (at least one).
    address : str
        ``""``: an embedded Ray instance for this run; ``"auto"`` or ``"host:port"``: a cluster.

    Raises
    ------
    codegraph3d.core.optional.OptionalDependencyError
        On entering, when Ray is not installed.
    """

    def __init__(self, setup: PreprocessSetup, workers: int = 1, address: str = "") -> None:
        super().__init__(setup, workers)
        self.address = address
        self._ray: Any = None
        self._actors: list[Any] = []
        self._started = False

    def __enter__(self) -> RayStudyPreprocessor:
        # Built here too: a missing template or landmark file fails in the caller with its message.
        self._local = PreprocessModels(self.setup)
        self._ray = optional_import("ray", "execution.backend 'ray'", RAY_INSTALL, "set execution.backend: local")
        try:
            self._start()
        except Exception as error:
            self.__exit__(None, None, None)  # nothing started may outlive a failed start
            where = f"the Ray cluster at {self.address!r}" if self.address else "an embedded Ray instance"
            raise ValueError(f"execution.backend ray: {where} could not be used ({error}); check "
                             "execution.ray_address, or set execution.backend: local") from error
        return self

    def _start(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            # "local" always starts a new instance, even where RAY_ADDRESS names a cluster.
            embedded = not self.address
            ray.init(address="local" if embedded else self.address, num_cpus=available_cpus() if embedded else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
            self._started = True
            logger.info("ray: %s (%s)", "embedded instance started" if embedded else f"joined {self.address}",
                        ray.get_runtime_context().gcs_address)
        remote = ray.remote(_ModelsActor).options(num_cpus=max(1, self.setup.threads))
        self._actors = [remote.remote(self.setup) for _ in range(self.workers)]

    def __exit__(self, *exc: object) -> None:
        try:
            for actor in self._actors:
                with contextlib.suppress(Exception):
                    self._ray.kill(actor)
        finally:
            self._actors = []
            if self._started:
                self._started = False
                self._ray.shutdown()
            self._local = None

    def map(self, studies: Iterable[Sequence[SeriesJob]]) -> Iterator[tuple[Sequence[SeriesJob], list[SeriesOutcome]]]:
        """Preprocess each study's jobs on the actors; yield ``(jobs, outcomes)`` in input order."""
        from ray.util import ActorPool

        studies = [list(jobs) for jobs in studies if jobs]
        if not self._actors:
            raise RuntimeError("RayStudyPreprocessor.map() outside its 'with' block")
        pool = ActorPool(self._actors)
        # ActorPool.map yields in submission order, whatever order the actors finish in.
        for jobs, outcomes in zip(studies, pool.map(lambda actor, jobs: actor.run.remote(jobs), studies)):
            self._progress(len(jobs))
            # Ray hands numpy arrays back as read-only views of its object store: a kept brain mask
            # would pin its whole result there, image included. Copies let each result go.
            yield jobs, copy.deepcopy(outcomes)
