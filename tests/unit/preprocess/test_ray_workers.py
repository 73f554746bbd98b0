"""The Ray preprocessor's pure parts: a study's memory request, and the address check before Ray starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from codegraph3d.io.dicom import SeriesHeader, SliceHeader
from codegraph3d.core.ray_runtime import alive_nodes, capped_memory, check_reachable
from codegraph3d.preprocess.ray_workers import study_memory_bytes
from codegraph3d.preprocess.workers import SeriesJob


def _job(rows: int, columns: int, slices: int, frames: int = 1) -> SeriesJob:
    headers = [SliceHeader(Path(f"{i}.dcm"), f"1.2.{i}", "1.2.840.10008.5.1.4.1.1.4", i, None, None, None, rows, columns,
                           frames) for i in range(slices)]
    series = SeriesHeader("1.2.3", f"1.2.3.{rows}", rows=rows, columns=columns, slices=headers)
    return SeriesJob(series=series, contrast="T1w", series_instance_uid=series.series_instance_uid)


def test_a_study_asks_for_the_measured_rule_of_its_largest_series_plus_the_others_held_loaded():
    large, small = _job(512, 512, 384), _job(256, 256, 10, frames=4)
    expected = 500 * 1024**2 + 30 * 512 * 512 * 384 + 4 * 256 * 256 * 40
    assert study_memory_bytes([small, large]) == expected
    assert study_memory_bytes([large]) == 500 * 1024**2 + 30 * 512 * 512 * 384
    # A series of 100 M voxels (the selection's limit) asks for about 3.5 GB.
    assert 3.4e9 < study_memory_bytes([large]) < 3.6e9


def test_headers_without_a_matrix_size_ask_for_the_base_only():
    assert study_memory_bytes([_job(0, 0, 3)]) == 500 * 1024**2


@pytest.mark.parametrize("address", ["127.0.0.1", "head-node", "127.0.0.1:port"])
def test_an_address_that_is_not_host_port_is_named(address: str):
    with pytest.raises(ConnectionError, match="is not 'auto' or host:port"):
        check_reachable(address)


def test_a_closed_port_is_reported_with_its_address():
    with socket.socket() as probe:  # a port that was free a moment ago, nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"nothing answers at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)


def test_a_listening_port_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=2.0)


class _FakeRay:
    """The one call of Ray's API that the resource helpers read: the cluster's nodes."""

    def __init__(self, nodes: list[dict]) -> None:
        self._nodes = nodes

    def nodes(self) -> list[dict]:
        return self._nodes


def test_memory_requests_are_capped_at_the_largest_live_node():
    ray = _FakeRay([{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8e9}},
                    {"Alive": True, "Resources": {"CPU": 8.0, "memory": 12e9}},
                    {"Alive": False, "Resources": {"CPU": 64.0, "memory": 512e9}}])  # a dead node offers nothing
    assert [node["CPU"] for node in alive_nodes(ray)] == [2.0, 8.0]
    assert capped_memory(ray, 4 * 10**9) == 4 * 10**9
    assert capped_memory(ray, 20 * 10**9) == 12 * 10**9  # else the task would wait for ever
    assert capped_memory(_FakeRay([]), 5) == 5  # nothing known: the request as asked
