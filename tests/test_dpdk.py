"""DPDK's virtio-user, a vhost-user driver nobody here wrote, against our back-end."""

from __future__ import annotations

import struct
import time

import pytest

from gateway.testing import testpmd as tp
from gateway.testing.guestnet import csum

pytestmark = [
    pytest.mark.dpdk,
    pytest.mark.skipif(not tp.testpmd_available(), reason="dpdk-testpmd not installed"),
]

CASES = [(1, False), (1, True), (2, True)]
IDS = ["1q-mrg0", "1q-mrg1", "2q-mrg1"]


def assert_txonly_frame(f: bytes, size: int) -> None:
    """testpmd's txonly frame: Ether / IPv4 / UDP 9→9, `size` bytes in all."""
    assert len(f) == size
    assert f[12:14] == b"\x08\x00"
    ip = f[14:34]
    assert ip[0] == 0x45 and ip[9] == 17
    assert struct.unpack("!H", ip[2:4])[0] == size - 14
    assert csum(ip) == 0
    assert struct.unpack("!HH", f[34:38]) == (9, 9)


@pytest.mark.parametrize("queues, mrg", CASES, ids=IDS)
def test_testpmd_txonly_frames_arrive_intact(backend, queues, mrg):
    dev, port, path = backend(queues)
    with tp.Testpmd(path, queues=queues, mrg_rxbuf=mrg,
                 args=["--forward-mode=txonly", "--txpkts=64"]) as pmd:
        pmd.wait_ready()
        pmd.wait_link_up(30)
        pmd.start()
        first = port.wait_total(20000, 30)  # let it run for a while, under load
        sent = pmd.stop()["TX-packets"]
        rest = port.wait_total(sent - len(first), 30)
    assert sent >= 20000
    total = dev.stats()["tx_packets"]
    assert total == sent == len(first) + len(rest), f"testpmd sent {sent}, we got {total}"
    for f in first[:1000] + rest[-1000:]:
        assert_txonly_frame(f, 64)
    if queues == 2:
        assert all(port.queue(q).waiting() == 0 for q in (0, 1))


@pytest.mark.parametrize("queues, mrg", CASES, ids=IDS)
def test_testpmd_rxonly_counts_what_we_inject(backend, queues, mrg):
    dev, port, path = backend(queues)
    per_queue = 3000
    frames = [
        b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb5"
        + bytes([i & 0xFF]) * (46 + (i * 37) % 1454)
        for i in range(per_queue)
    ]
    with tp.Testpmd(path, queues=queues, mrg_rxbuf=mrg, args=["--forward-mode=rxonly"]) as pmd:
        pmd.wait_ready()
        pmd.wait_link_up(30)
        pmd.start()
        for q in range(queues):
            port.queue(q).inject(frames)
        want = per_queue * queues
        deadline = time.monotonic() + 30
        while (stats := pmd.port_stats())["RX-packets"] < want and time.monotonic() < deadline:
            time.sleep(0.2)  # testpmd is another process: its counters can only be polled
        pmd.stop()
    assert stats["RX-packets"] == want
    assert stats["RX-bytes"] == sum(map(len, frames)) * queues
    assert dev.stats()["rx_packets"] == want
