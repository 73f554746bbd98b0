"""The process's Ray instance for ``execution.backend: ray``: started or joined once, used by every stage.

Preprocessing, encoding and scoring each submit work to Ray; they share one connection, made by
the first stage that needs it and closed when the process ends (Ray's own exit hook), so a run
starts an embedded instance once, not once per stage.

* ``address`` empty: an embedded instance for this process (``address="local"`` always starts a
  new one, even where ``RAY_ADDRESS`` names a cluster), sized to this machine or its container
  quota, its node address 127.0.0.1, with no dashboard. Ray's servers still listen on every
  interface (measured with ray 2.60, docs/SCALE.md): on a host with an untrusted network, run
  it in a network namespace or a container without network, or keep the local backend.
* ``auto`` or ``host:port``: join a running cluster. A ``host:port`` that nothing answers is an
  error at once (Ray itself would keep retrying for minutes).

Usage statistics are off in both (``RAY_USAGE_STATS_ENABLED=0``): nothing about a hospital's
runs leaves its network. Ray's token authentication is left as Ray sets it (on by default for a
new instance; a cluster's token comes from ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from codegraph3d.core.optional import optional_import

__all__ = ["RAY_INSTALL", "RETRIES", "ClusterError", "alive_nodes", "capped_memory", "check_reachable", "ray_runtime"]

logger = logging.getLogger(__name__)

RAY_INSTALL = "pip install ray==2.60.0"
RETRIES = 3  # runs of a task, or restarts of an actor, lost with its worker or node


class ClusterError(RuntimeError):
    """Ray work failed for a reason outside any one series (a node without the model folder, a lost cluster).

    The run layer reports it as an input/configuration failure (exit code 2) naming the cause.
    """


def alive_nodes(ray: Any) -> list[dict[str, float]]:
    """The resources (``CPU``, ``GPU``, ``memory`` in bytes, ...) of every live node of the cluster."""
    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def capped_memory(ray: Any, wanted: int) -> int:
    """``wanted`` bytes, at most the largest node's schedulable memory.

    A request no node can meet would leave its task pending for ever; capped, the task runs on
    the largest node, as the local backend would run it on the one machine it has.
    """
    largest = max((node.get("memory", 0.0) for node in alive_nodes(ray)), default=0.0)
    return int(min(wanted, largest)) if largest > 0 else int(wanted)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise ConnectionError unless the cluster's ``host:port`` accepts a connection.

    Parameters
    ----------
    address : str
        The head node's ``host:port`` (its GCS port).
    timeout_s : float
        Seconds to wait for the connection.

    Raises
    ------
    ConnectionError
        When ``address`` is not ``host:port`` or nothing accepts the connection (both named).
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"{address!r} is not 'auto' or host:port (the head node's GCS port, 6379 by default)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {address} ({error})") from error


def ray_runtime(address: str, cpus: Callable[[], int]) -> Any:
    """The ``ray`` module, initialised for this process: an embedded instance or a cluster.

    Parameters
    ----------
    address : str
        ``""`` (embedded), ``"auto"`` or ``"host:port"`` (``execution.ray_address``).
    cpus : callable
        The CPUs an embedded instance may use (called only when one is started).

    Raises
    ------
    codegraph3d.core.optional.OptionalDependencyError
        When Ray is not installed.
    ValueError
        When Ray cannot be started or the cluster cannot be reached (the address is named).
    """
    ray = optional_import("ray", "execution.backend 'ray'", RAY_INSTALL, "set execution.backend: local")
    if ray.is_initialized():
        return ray
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read by Ray when it starts a node
    embedded = not address
    try:
        if address not in ("", "auto"):
            check_reachable(address)
        # An embedded instance serves this process only: its node is addressed on loopback.
        where = {"address": "local", "num_cpus": cpus(), "_node_ip_address": "127.0.0.1"} if embedded else {
            "address": address}
        ray.init(**where, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as error:
        if ray.is_initialized():  # nothing started may outlive a failed start
            ray.shutdown()
        where = f"the Ray cluster at {address!r}" if address else "an embedded Ray instance"
        raise ValueError(f"execution.backend ray: {where} could not be used ({error}); check "
                         "execution.ray_address, or set execution.backend: local") from error
    logger.info("ray: %s (%s)", "embedded instance started" if embedded else f"joined {address}",
                ray.get_runtime_context().gcs_address)
    return ray
