"""DPDK virtio-user with packed virtqueues (packed_vq=1) against our back-end:
in memory (exact frame counts and bytes, 1 and 2 queue pairs, mrg_rxbuf 0/1)
and on the wire through AF_XDP (every frame counted on the far veth, and
frames from the far host counted by testpmd's rxonly)."""

from __future__ import annotations

import time

import pytest
from test_dpdk import CASES, IDS, assert_txonly_frame

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing import testpmd as tp
from gateway.testing.netns import topology
from gateway.vhost.transport import VhostService
from gateway.virtio.features import Net
from gateway.xdp.nic import Nic

pytestmark = [
    pytest.mark.dpdk,
    pytest.mark.skipif(not tp.testpmd_available(), reason="dpdk-testpmd not installed"),
]

def assert_packed(dev) -> None:
    assert dev.negotiated_features >> Net.RING_PACKED & 1, "testpmd did not negotiate packed"


@pytest.mark.parametrize("queues, mrg", CASES, ids=IDS)
def test_packed_txonly_frames_arrive_intact(backend, queues, mrg):
    dev, port, path = backend(queues)
    with tp.Testpmd(path, queues=queues, mrg_rxbuf=mrg, packed_vq=True,
                    args=["--forward-mode=txonly", "--txpkts=64"]) as pmd:
        pmd.wait_ready()
        pmd.wait_link_up(30)
        assert_packed(dev)
        pmd.start()
        first = port.wait_total(20000, 30)      # many wraps of the 256-entry ring
        sent = pmd.stop()["TX-packets"]
        rest = port.wait_total(sent - len(first), 30)
    assert sent >= 20000
    assert dev.stats()["tx_packets"] == sent == len(first) + len(rest)
    for f in first[:1000] + rest[-1000:]:
        assert_txonly_frame(f, 64)


@pytest.mark.parametrize("queues, mrg", CASES, ids=IDS)
def test_packed_rxonly_counts_what_we_inject(backend, queues, mrg):
    dev, port, path = backend(queues)
    per_queue = 3000
    frames = [
        b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb5"
        + bytes([i & 0xFF]) * (46 + (i * 37) % 1454)
        for i in range(per_queue)
    ]
    with tp.Testpmd(path, queues=queues, mrg_rxbuf=mrg, packed_vq=True,
                    args=["--forward-mode=rxonly"]) as pmd:
        pmd.wait_ready()
        pmd.wait_link_up(30)
        assert_packed(dev)
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


SENDER = """
import socket, sys, time
ifname, dst, n = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
src = s.getsockname()[4]
for i in range(n):
    s.send(dst + src + b"\\x88\\xb5" + bytes([i & 0xFF]) * (46 + (i * 37) % 1400))
    if i % 50 == 49:
        time.sleep(0.002)   # paced: a shared 2-CPU machine, and exact counts asserted
"""


def test_packed_on_the_wire_both_ways(tmp_path):
    mac = "52:54:00:00:00:5a"
    with topology() as topo:
        # No IPv6 on the far host: its router solicitations and MLD reports
        # are multicast, which every guest gets a copy of, and rxonly counts all
        topo.run("sysctl", "-qw", f"net.ipv6.conf.{topo.peer}.disable_ipv6=1")
        nic = Nic(topo.nic)
        service = VhostService().start()
        port = XdpPort(nic, "pmd0", mac)
        try:
            dev = Registry().create("pmd0", port)
            path = str(tmp_path / "pmd0.sock")
            service.listen(dev, path)
            # guest -> wire: txonly, every frame counted on the far veth
            before = topo.peer_stats()
            with tp.Testpmd(path, mac=mac, packed_vq=True,
                            args=["--forward-mode=txonly", "--txpkts=64",
                                  f"--eth-peer=0,{topo.peer_mac}"]) as pmd:
                pmd.wait_ready()
                pmd.wait_link_up(30)
                assert_packed(dev)
                pmd.start()
                time.sleep(1)  # a second of traffic at full speed
                sent = pmd.stop()["TX-packets"]
                deadline = time.monotonic() + 10
                while dev.stats()["tx_packets"] < sent and time.monotonic() < deadline:
                    time.sleep(0.01)   # C counters: no event to wait on
                pmd.quit()
            after = topo.peer_stats()
            assert sent > 10_000
            assert dev.stats()["tx_packets"] == sent
            assert after["rx_packets"] - before["rx_packets"] == sent
            # wire -> guest: the far host's frames, counted by rxonly
            n = 3000
            with tp.Testpmd(path, mac=mac, packed_vq=True,
                            args=["--forward-mode=rxonly"]) as pmd:
                pmd.wait_ready()
                pmd.wait_link_up(30)
                pmd.start()
                rx0 = dev.stats()["rx_packets"]
                topo.run("python3", "-c", SENDER, topo.peer, mac, str(n), timeout=60)
                deadline = time.monotonic() + 30
                while (stats := pmd.port_stats())["RX-packets"] < n \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
                pmd.stop()
            assert stats["RX-packets"] == n
            assert stats["RX-bytes"] == sum(60 + (i * 37) % 1400 for i in range(n))
            assert dev.stats()["rx_packets"] - rx0 == n
        finally:
            service.stop()
            port.close()
            nic.close()


# IN_ORDER: we take and return buffers strictly in the order the guest made
# them available (both layouts; a chain that is kept is not taken), which is
# all the feature asks of a device. DPDK's in-order paths then run against us.
ORDER = [(False, False), (False, True), (True, False), (True, True)]
ORDER_IDS = ["split-mrg0", "split-mrg1", "packed-mrg0", "packed-mrg1"]


@pytest.mark.parametrize("packed, mrg", ORDER, ids=ORDER_IDS)
def test_in_order_both_ways(backend, packed, mrg):
    dev, port, path = backend(1)
    frames = [
        b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb5"
        + bytes([i & 0xFF]) * (46 + (i * 37) % 1454)
        for i in range(3000)
    ]
    with tp.Testpmd(path, mrg_rxbuf=mrg, packed_vq=packed, in_order=True,
                    args=["--forward-mode=txonly", "--txpkts=64"]) as pmd:
        pmd.wait_ready()
        pmd.wait_link_up(30)
        assert dev.negotiated_features >> Net.IN_ORDER & 1
        assert bool(dev.negotiated_features >> Net.RING_PACKED & 1) == packed
        pmd.start()
        first = port.wait_total(10000, 30)
        sent = pmd.stop()["TX-packets"]
        rest = port.wait_total(sent - len(first), 30)
        assert dev.stats()["tx_packets"] == sent == len(first) + len(rest)
        for f in first[:500] + rest[-500:]:
            assert_txonly_frame(f, 64)
        pmd.cmd("set fwd rxonly")
        pmd.start()
        port.queue(0).inject(frames)
        deadline = time.monotonic() + 30
        while (stats := pmd.port_stats())["RX-packets"] < len(frames) \
                and time.monotonic() < deadline:
            time.sleep(0.2)  # testpmd is another process: its counters can only be polled
        pmd.stop()
    assert stats["RX-packets"] == len(frames)
    assert stats["RX-bytes"] == sum(map(len, frames))
