"""Fixtures shared by several test files: a daemon on a fresh topology, and a
back-end for DPDK's virtio-user (split and packed ring tests alike)."""

import pytest

from gateway.datapath.port import MemoryPort
from gateway.registry import Registry
from gateway.testing.daemon import Daemon
from gateway.testing.netns import topology
from gateway.vhost.transport import VhostService


@pytest.fixture
def env(tmp_path):
    with topology() as topo:
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
        try:
            yield topo, d
        finally:
            if d.proc.poll() is None:
                d.stop()


@pytest.fixture
def backend(tmp_path):
    """make(queues) -> (device, MemoryPort, socket path): a device a DPDK
    virtio-user front-end can connect to, frames kept in memory."""
    registry = Registry()
    service = VhostService().start()
    ports = []

    def make(queues: int):
        port = MemoryPort()
        ports.append(port)
        dev = registry.create("pmd0", port, queue_pairs=queues)
        path = str(tmp_path / "pmd0.sock")
        service.listen(dev, path)
        return dev, port, path

    yield make
    service.stop()
    for port in ports:
        port.close()
