"""Encoding on Ray actors: the encoder loaded once per GPU (or once per node without one).

With ``execution.backend: ray`` a series is encoded inside the cluster: its pixels (the 224^3
working volume, about 57 MB) go from its preprocessing task to an encoder actor, on the same
node wherever that node has one, and only tokens, the brain mask and the headers (about 12 MB)
travel back to the app. :class:`RayEncoders` starts one actor per GPU of the cluster (each asks
for a GPU), or, on a cluster without GPUs, one per node (spread over the nodes, so nearly every
node holds one). The actors ask for no CPU of their own: a reservation held for the whole run
could leave a preprocessing task that wants a node's every CPU unplaceable for ever; on CPU-only
nodes their threads share the cores with the preprocessing tasks, as the app's own encoding
does in a local run.

Each actor builds the encoder once from the run's factory and refuses to start unless its
identity (name, layers, weights' SHA-256) is the app's, on its first start and on every restart:
a node that reads other weights at the model path would otherwise mix features of two encoders
in one batch. A study goes to an actor on the node where it was preprocessed when that node has
one, so its pixels stay there; otherwise to the actors in turn. An actor lost with its node is
restarted elsewhere and its pending studies run again (``max_restarts``, ``max_task_retries``).
Threads are set in each actor, as in the preprocessing tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from codegraph3d.core.ray_runtime import RETRIES, ClusterError, alive_nodes
from codegraph3d.features.encoders import SliceEncoder
from codegraph3d.features.tokens import encode_volume
from codegraph3d.preprocess.workers import SeriesOutcome

__all__ = ["RayEncoders"]


class _EncoderActor:
    """What a Ray encoder actor holds: one encoder, built once, and the token settings."""

    def __init__(self, factory: Callable[[], SliceEncoder], identity: dict[str, Any], threads: int, grid_size: int,
                 min_brain_fraction: float, batch_size: int) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.encoder = factory()
        found = self.encoder.identity()
        if found != identity:  # checked here, so a restart on another node is checked too
            raise ValueError(f"this node's encoder is {found.get('description')!r} (weights sha256 "
                             f"{found.get('weights_sha256')}), not the app's {identity.get('description')!r} "
                             f"(sha256 {identity.get('weights_sha256')}); every node must see the same model folder")
        self.settings = {"grid_size": grid_size, "min_brain_fraction": min_brain_fraction, "batch_size": batch_size}

    def node(self) -> str:
        """The id of the node this actor runs on (the caller waits on it to surface a failed start)."""
        import ray  # in a Ray actor, where Ray is installed

        return ray.get_runtime_context().get_node_id()

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
    codegraph3d.core.ray_runtime.ClusterError
        When an actor cannot start: its encoder differs from the app's, or it cannot be built on
        its node (missing weights), with Ray's message.
    """

    def __init__(self, ray: Any, factory: Callable[[], SliceEncoder], identity: dict[str, Any], *, grid_size: int,
                 min_brain_fraction: float, batch_size: int, threads: int) -> None:
        self._ray = ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        nodes = sum(1 for node in alive_nodes(ray) if node.get("CPU", 0) > 0)
        options: dict[str, Any] = {"max_restarts": RETRIES, "max_task_retries": RETRIES, "num_cpus": 0}
        options.update({"num_gpus": 1} if gpus else {"scheduling_strategy": "SPREAD"})
        remote = ray.remote(_EncoderActor).options(**options)
        self.actors = [remote.remote(factory, identity, threads, grid_size, min_brain_fraction, batch_size)
                       for _ in range(max(1, gpus or nodes))]
        self.where = f"{len(self.actors)} encoder actor(s) on " + (f"{gpus} GPU(s)" if gpus else f"{nodes} node(s), CPU")
        self._turn = 0
        try:
            self.nodes = ray.get([actor.node.remote() for actor in self.actors])
        except Exception as error:
            self.stop()
            raise ClusterError(f"the Ray encoder actors could not start: {error}") from error

    def follow(self, node_id: str, ref: Any) -> Any:
        """Encode a study's outcomes (``ref``, preprocessed on ``node_id``); the reference to the result.

        An actor on that node takes it when there is one (its pixels then stay on the node), in
        turn among that node's actors; otherwise the actors take studies in turn.
        """
        local = [actor for actor, node in zip(self.actors, self.nodes) if node == node_id] or self.actors
        self._turn += 1
        return local[self._turn % len(local)].encode.remote(ref)

    def stop(self) -> None:
        """Stop every actor."""
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        self.actors = []
