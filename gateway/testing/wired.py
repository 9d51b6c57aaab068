"""One device on a test NIC with the Python test guest connected: the set-up
that tests of what a guest sends to the wire (offloads, the MTU) share.

The device runs in this process (Nic, XdpPort, registry, VhostService), so a
test can read the port's and device's counters directly; the far host's end is
the topology's namespace."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing.frontend import Frontend
from gateway.testing.netns import Topology, topology
from gateway.vhost.device import VhostDevice
from gateway.vhost.transport import VhostService
from gateway.xdp.nic import Nic

TIMEOUT = 20


@contextlib.contextmanager
def wired_guest(sock_dir: str, mac: str, *, name: str = "vm0",
                on_topology: Callable[[Topology], None] = lambda topo: None, **port_args
                ) -> Iterator[tuple[Topology, XdpPort, VhostDevice, Frontend]]:
    """Yields (topology, port, device, front-end) once the guest's queues run;
    everything is torn down on exit. `port_args` go to XdpPort (mtu, vlan...);
    `on_topology` runs before anything is attached (e.g. a sysctl on the far
    host that must hold from the first frame)."""
    with topology() as topo:
        on_topology(topo)
        nic = Nic(topo.nic)
        service = VhostService().start()
        started = threading.Event()
        registry = Registry()
        registry.register_callbacks(on_new_device=lambda d: started.set())
        port = XdpPort(nic, name, mac, **port_args)
        try:
            dev = registry.create(name, port, max_mtu=port.max_mtu)
            path = os.path.join(sock_dir, f"{name}.sock")
            service.listen(dev, path)
            with Frontend(path, queue_size=256, mem_size=32 << 20) as fe:
                fe.connect().setup()
                if not started.wait(TIMEOUT):
                    raise TimeoutError("the test guest's queues never started")
                yield topo, port, dev, fe
        finally:
            service.stop()
            port.close()
            nic.close()
