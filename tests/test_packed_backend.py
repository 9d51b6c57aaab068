"""Packed rings end to end over real unix sockets: the Python front-end with
packed rings (frontend.py over packed_driver.py) against the back-end and a
MemoryPort -- both directions, GET_VRING_BASE's wrap counter, and a lying
packed ring that breaks only its own device until the guest's reset."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from gateway.datapath.port import MemoryPort
from gateway.registry import Registry
from gateway.testing.frontend import Frontend
from gateway.testing.packed_driver import F_NEXT
from gateway.vhost.transport import VhostService
from gateway.virtio import features as vf
from gateway.virtio.features import Net

TIMEOUT = 10


class Gw:
    """Devices on one service, with their new/destroy callbacks awaitable."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.registry, self.service, self.ports = Registry(), VhostService().start(), []
        self.log: list[tuple[str, str]] = []
        self.cond = threading.Condition()
        self.registry.register_callbacks(lambda d: self._add("new", d.name),
                                         lambda d: self._add("destroy", d.name))

    def _add(self, kind: str, name: str) -> None:
        with self.cond:
            self.log.append((kind, name))
            self.cond.notify_all()

    def wait(self, kind: str, name: str, count: int = 1) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.log.count((kind, name)) >= count, TIMEOUT)
        assert ok, f"no {kind} for {name} (log: {self.log})"

    def device(self, name):
        port = MemoryPort()
        self.ports.append(port)
        dev = self.registry.create(name, port)
        path = str(self.tmp_path / f"{name}.sock")
        self.service.listen(dev, path)
        return dev, port, path


@pytest.fixture
def gw(tmp_path):
    g = Gw(tmp_path)
    yield g
    g.service.stop()
    for port in g.ports:
        port.close()


def frames_of(n: int, size: int = 60, seed: int = 0) -> list[bytes]:
    return [struct.pack("!I", seed + i) + bytes((seed + i + k) & 0xFF for k in range(size - 4))
            for i in range(n)]




@pytest.mark.parametrize("event_idx", [True, False])
def test_packed_frontend_both_ways_and_vring_base(gw, event_idx):
    want = None if event_idx else vf.SUPPORTED_FEATURES & ~(1 << Net.RING_EVENT_IDX)
    dev, port, path = gw.device("pk0")
    with Frontend(path, packed=True, want=want) as fe:
        fe.connect().setup()
        gw.wait("new", "pk0")
        assert fe.features >> Net.RING_PACKED & 1
        sent = frames_of(300, 100)
        for i in range(0, len(sent), 60):      # 2 descriptors each: wraps the 256 ring twice
            fe.transmit(sent[i : i + 60])
            fe.wait_tx_done(60)
        assert port.queue(0).wait_received(300, TIMEOUT) == sent
        frames = frames_of(50, 1514) + frames_of(5, 3000, seed=100)   # MRG_RXBUF: 2 buffers
        for k in range(5):                      # 60 buffers a round: RX wraps too
            fe.post_rx(60)
            port.queue(0).inject(frames)
            assert fe.receive(len(frames)) == frames, k
        # 600 descriptors: position 600 % 256 = 88, two wraps: counter back to 1
        assert fe.get_vring_base(1) == (88 | 1 << 15) * 0x10001
    stats = dev.stats()
    assert stats["tx_packets"] == 300 and stats["rx_packets"] == 5 * len(frames)


def test_lying_packed_ring_breaks_only_its_device_until_reset(gw):
    _, port_a, path_a = gw.device("good")
    bad_dev, port_b, path_b = gw.device("bad")
    with Frontend(path_a, packed=True) as good, Frontend(path_b, packed=True) as bad:
        good.connect().setup()
        bad.connect().setup()
        gw.wait("new", "bad")
        tx = bad.rings[1]
        # a chain whose last descriptor names buffer id 999 in a 256 ring
        tx.post([(tx.slot_gpa(0), 64, 0, F_NEXT), (tx.slot_gpa(1), 64, 999, 0)])
        before = bytes(bad.mem[tx.desc_gpa : tx.desc_gpa + 16 * 256])
        os.eventfd_write(bad.kicks[1], 1)
        assert bad.wait_error(1), "the ring's error eventfd must be signalled"
        gw.wait("destroy", "bad")
        assert bad_dev.state == "broken"
        assert "GW_E_BUF_ID" in bad_dev.broken_reason and "999" in bad_dev.broken_reason
        assert bytes(bad.mem[tx.desc_gpa : tx.desc_gpa + 16 * 256]) == before  # nothing used
        assert bad_dev.stats()["broken_total"] == 1
        good.transmit(frames_of(5))
        assert port_a.queue(0).wait_received(5, TIMEOUT) == frames_of(5)
        bad.reset()                              # the guest's device reset brings it back
        gw.wait("new", "bad", 2)
        assert bad_dev.state == "running" and bad_dev.broken_reason is None
        bad.transmit(frames_of(3, seed=50))
        assert port_b.queue(0).wait_received(3, TIMEOUT) == frames_of(3, seed=50)
