"""The throttle inside gw_pump_run (issue 12) on a real AF_XDP port: a guest
re-arming its TX ring with 1024-descriptor chains of nothing makes each pump
pass walk up to the burst cap; the pass returns `throttled` and the worker
pauses GW_THROTTLE_MS. A stop (the guest's GET_VRING_BASE) still completes
while the guest keeps re-arming. Counts, not timings (timeouts are generous).
"""

from __future__ import annotations

import os
import threading

from gateway.datapath.xdp_port import XdpPort, XdpQueue
from gateway.registry import Registry
from gateway.testing import attacker
from gateway.testing.frontend import Frontend
from gateway.testing.netns import topology
from gateway.testing.wait import until
from gateway.vhost.transport import VhostService
from gateway.virtio.ring import lib
from gateway.xdp.nic import Nic

MAC = "52:54:00:00:12:31"
RING = 1024
DEADLINE = 30


class Rearm(threading.Thread):
    """The attacking guest: the whole TX ring back on offer and a kick, every ms."""

    def __init__(self, fe: Frontend) -> None:
        super().__init__(name="attacker", daemon=True)
        self.fe = fe
        self.halt = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        while not self.halt.is_set():
            attacker.split_rearm(self.fe.rings[1])
            os.eventfd_write(self.fe.kicks[1], 1)
            self.rounds += 1
            self.halt.wait(0.001)


def wait_for(cond, what: str) -> None:
    until(cond, what, DEADLINE)


def test_pump_throttles_the_attacker_and_its_stop_completes(tmp_path):
    with topology() as topo:
        nic = Nic(topo.nic)
        port = XdpPort(nic, "bad", MAC)
        service = VhostService().start()
        try:
            dev = Registry().create("bad", port)
            path = str(tmp_path / "bad.sock")
            service.listen(dev, path)
            with Frontend(path, queue_size=RING, timeout=DEADLINE) as fe:
                fe.connect().setup()
                tx = fe.rings[1]
                attacker.split_chain(tx, RING, write=False)
                attacker.split_fill(tx)
                rearm = Rearm(fe)
                rearm.start()
                try:
                    wait_for(lambda: 0 in dev.workers, "the worker")
                    w, _ = dev.workers[0]
                    assert isinstance(w.port, XdpQueue)  # the pump's throttle, not the worker's
                    wait_for(lambda: w.throttled >= 10 and rearm.rounds >= 2,
                             "throttled passes while the guest re-arms")
                    throttled = w.throttled
                    # A pass is throttled only past GW_THROTTLE_WALK reads with nothing
                    # moved: with chains of 1024, two chains or more per throttled pass.
                    assert w.txq.stats["drop_short"] >= 2 * throttled
                    assert w.txq.walked_max <= lib.GW_BURST_WALK
                    assert w.txq.stats["packets"] == 0
                    # The stop completes while the attacker keeps going; the ring's
                    # base is every chain the device took, each dropped tx_short.
                    base = fe.get_vring_base(1)
                    assert rearm.is_alive()
                    assert 0 not in dev.workers
                finally:
                    rearm.halt.set()
                    rearm.join(DEADLINE)
                assert not rearm.is_alive()
                stats = dev.stats()
                assert stats["drops"]["tx_short"] >= 2 * throttled
                assert base == stats["drops"]["tx_short"] & 0xFFFF
                assert dev.broken_total == 0
        finally:
            service.stop()
            port.close()
            nic.close()
