"""DPDK virtio-user as the guest, on the wire through the gateway."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing import testpmd as tp
from gateway.testing.netns import topology
from gateway.vhost.transport import VhostService
from gateway.xdp.nic import Nic

TIMEOUT = 30

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


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _guest_mappings() -> int:
    """Mappings of front-end memory (memfds) in this process."""
    with open("/proc/self/maps") as f:
        return sum("memfd:" in line for line in f)


def test_frontend_killed_mid_burst_leaks_nothing_and_a_new_one_works(tmp_path):
    """SIGKILL of the guest's process while it sends at full speed: the device
    goes back to `waiting` with every fd and mapping of the session gone, its
    AF_XDP socket stays usable, and a new front-end on the same socket works."""
    with topology() as topo:
        nic = Nic(topo.nic)
        service = VhostService().start()
        port = XdpPort(nic, "pmd0", "52:54:00:00:00:43")
        registry = Registry()
        new, gone = threading.Event(), threading.Event()
        registry.register_callbacks(on_new_device=lambda d: new.set(),
                                    on_destroy_device=lambda d: gone.set())
        try:
            dev = registry.create("pmd0", port)
            path = str(tmp_path / "pmd0.sock")
            service.listen(dev, path)
            fds, maps = _fds(), _guest_mappings()
            args = ["--forward-mode=txonly", "--txpkts=64", f"--eth-peer=0,{topo.peer_mac}"]
            with tp.Testpmd(path, mac=port.mac, args=args) as pmd:
                pmd.wait_link_up(30)
                assert new.wait(TIMEOUT)
                pmd.start()
                base = dev.stats()["tx_packets"]
                deadline = time.monotonic() + TIMEOUT
                while dev.stats()["tx_packets"] < base + 10_000 and time.monotonic() < deadline:
                    time.sleep(0.01)  # C counters: nothing to wait on
                assert dev.stats()["tx_packets"] >= base + 10_000  # mid-burst
                os.killpg(pmd.proc.pid, signal.SIGKILL)
                assert gone.wait(TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while (_fds(), _guest_mappings()) != (fds, maps) and time.monotonic() < deadline:
                time.sleep(0.01)  # the service thread closes them after the callback
            assert (_fds(), _guest_mappings()) == (fds, maps)
            assert dev.state == "waiting"
            new.clear()
            before = topo.peer_stats()["rx_packets"]
            with tp.Testpmd(path, mac=port.mac, args=args) as pmd:
                pmd.wait_link_up(30)
                assert new.wait(TIMEOUT)
                pmd.start()
                deadline = time.monotonic() + TIMEOUT
                while topo.peer_stats()["rx_packets"] < before + 1000 and \
                        time.monotonic() < deadline:
                    time.sleep(0.01)
                assert topo.peer_stats()["rx_packets"] >= before + 1000
        finally:
            service.stop()
            port.close()
            nic.close()
