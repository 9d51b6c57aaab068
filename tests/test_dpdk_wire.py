"""DPDK virtio-user as the guest, on the wire through the gateway."""

from __future__ import annotations

import time

import pytest

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing import testpmd as tp
from gateway.testing.netns import topology
from gateway.vhost.transport import VhostService
from gateway.xdp.nic import Nic

pytestmark = [
    pytest.mark.dpdk,
    pytest.mark.skipif(not tp.testpmd_available(), reason="dpdk-testpmd not installed"),
]


def test_testpmd_txonly_frames_are_counted_on_the_far_host(tmp_path):
    with topology() as topo:
        nic = Nic(topo.nic)
        service = VhostService().start()
        port = XdpPort(nic, "pmd0", "52:54:00:00:00:42")
        try:
            dev = Registry().create("pmd0", port)
            path = str(tmp_path / "pmd0.sock")
            service.listen(dev, path)
            before = topo.peer_stats()
            with tp.Testpmd(path, mac=port.mac, args=["--forward-mode=txonly", "--txpkts=64",
                                        f"--eth-peer=0,{topo.peer_mac}"]) as pmd:
                pmd.wait_ready()
                pmd.wait_link_up(30)
                pmd.start()
                time.sleep(1)  # a second of traffic at full speed
                sent = pmd.stop()["TX-packets"]
                # frames testpmd queued before it stopped are still ours to send:
                # quitting stops the ring, so let the worker drain it first (its
                # counters are C memory with no event to wait on)
                deadline = time.monotonic() + 10
                while dev.stats()["tx_packets"] < sent and time.monotonic() < deadline:
                    time.sleep(0.01)
                pmd.quit()
            after = topo.peer_stats()
        finally:
            service.stop()
            port.close()
            nic.close()
    assert sent > 10_000
    assert dev.stats()["tx_packets"] == sent
    assert after["rx_packets"] - before["rx_packets"] == sent
