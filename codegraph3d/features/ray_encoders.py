"""Encoding on Ray actors: the encoder loaded once per GPU (or once per node without one).

With ``execution.backend: ray`` a series is encoded next to where it was preprocessed, so its
pixels (the 224^3 working volume) stay in the cluster and only tokens, the brain mask and the
headers travel back to the app. :class:`RayEncoders` starts one actor per GPU of the cluster
(each asks for a whole GPU), or, on a cluster without GPUs, one per node (spread over the nodes;
they ask for no CPU of their own, since their work alternates with the preprocessing tasks').
Each actor builds the encoder once from the run's factory and checks that its identity (name,
layers, weights' SHA-256) is the app's: a node that reads other weights at the model path would
otherwise mix features of two encoders in one batch.

Studies go to the actors in turn (study ``i`` to actor ``i mod n``); an actor takes them in that
order as their preprocessing finishes. An actor lost with its node is restarted elsewhere and
its pending studies run again (``max_restarts``, ``max_task_retries``). Threads are set in each
actor, as in the preprocessing tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from codegraph3d.features.encoders import SliceEncoder
from codegraph3d.features.tokens import encode_volume
from codegraph3d.preprocess.workers import SeriesOutcome

__all__ = ["ACTOR_RESTARTS", "RayEncoders"]

ACTOR_RESTARTS = 3  # restarts of an encoder actor lost with its node, and retries of its calls


class _EncoderActor:
    """What a Ray encoder actor holds: one encoder, built once, and the token settings."""

    def __init__(self, factory: Callable[[], SliceEncoder], threads: int, grid_size: int,
                 min_brain_fraction: float, batch_size: int) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.encoder = factory()
        self.settings = {"grid_size": grid_size, "min_brain_fraction": min_brain_fraction, "batch_size": batch_size}

    def identity(self) -> dict[str, Any]:
        return self.encoder.identity()

    def encode(self, outcomes: Sequence[SeriesOutcome]) -> list[SeriesOutcome]:
        """Encode every preprocessed series of a study; the working image is dropped after."""
        done = []
        for outcome in outcomes:
            if outcome.error is None and outcome.prepared is not None:
                start = time.perf_counter()
                prepared = outcome.prepared
                outcome.encoded = encode_volume(prepared.image, prepared.brain_mask, self.encoder, **self.settings)
                prepared.image = np.zeros((0, 0, 0), np.float32)  # only the mask and geometry travel on
                outcome.seconds_encode = time.perf_counter() - start
            done.append(outcome)
        return done


class RayEncoders:
    """Encoder actors on a running Ray instance; :meth:`follow` chains a study's encoding to its preprocessing.

    Parameters
    ----------
    ray : module
        The initialised ``ray`` module.
    factory : callable
        Builds the run's encoder (picklable: it is sent to every actor).
    identity : dict
        The app's encoder identity (:meth:`SliceEncoder.identity`); every actor must match it.
    grid_size, min_brain_fraction, batch_size : int, float, int
        The token settings of :func:`~codegraph3d.features.tokens.encode_volume`.
    threads : int
        Torch threads per actor (0: the library's default).

    Raises
    ------
    ValueError
        When an actor's encoder differs from the app's.
    """

    def __init__(self, ray: Any, factory: Callable[[], SliceEncoder], identity: dict[str, Any], *, grid_size: int,
                 min_brain_fraction: float, batch_size: int, threads: int) -> None:
        self._ray = ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        nodes = sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0)
        options: dict[str, Any] = {"max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_RESTARTS}
        if gpus:
            options.update(num_gpus=1, num_cpus=1)
        else:
            options.update(num_cpus=0, scheduling_strategy="SPREAD")
        remote = ray.remote(_EncoderActor).options(**options)
        self.actors = [remote.remote(factory, threads, grid_size, min_brain_fraction, batch_size)
                       for _ in range(max(1, gpus or nodes))]
        self.where = f"{len(self.actors)} encoder actor(s) on " + (f"{gpus} GPU(s)" if gpus else f"{nodes} node(s), CPU")
        try:
            for found in ray.get([actor.identity.remote() for actor in self.actors]):
                if found != identity:
                    raise ValueError(f"an encoder actor loaded {found.get('description')!r} (weights sha256 "
                                     f"{found.get('weights_sha256')}), not the app's {identity.get('description')!r} "
                                     f"(sha256 {identity.get('weights_sha256')}); every node must see the same model folder")
        except BaseException:
            self.stop()
            raise

    def follow(self, index: int, ref: Any) -> Any:
        """Encode study ``index``'s outcomes (``ref``) on actor ``index mod n``; the reference to the result."""
        return self.actors[index % len(self.actors)].encode.remote(ref)

    def stop(self) -> None:
        """Stop every actor."""
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        self.actors = []
