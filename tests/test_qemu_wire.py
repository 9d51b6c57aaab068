"""A real Linux guest (QEMU 7.2, TCG) on the wire through the gateway."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing import qemu
from gateway.testing.guest import ensure_guest, make_initrd, net_up
from gateway.testing.netns import topology
from gateway.vhost.transport import VhostService
from gateway.xdp.nic import Nic

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-system-x86_64 not installed"),
]

GUEST_MAC = "52:54:00:12:34:56"
BLOB_SIZE = 10 << 20

SCENARIO = """
ping -c 3 -W 2 {far} >/dev/null && echo "GW-GUEST: ping ok"
echo "GW-GUEST: md5 $(wget -q -O - http://{far}:8000/blob | md5sum | cut -d' ' -f1)"
"""


@contextlib.contextmanager
def guest_on(topo, tmp_path: Path, scenario: str, mac: str = GUEST_MAC, device_opts: str = ""
             ) -> Iterator[tuple[object, VhostService, object]]:
    """A gateway device on the topology's NIC and a Linux guest booting on it
    with `scenario` after its network is up: (device, service, running QEMU).
    device_opts: extra virtio-net-pci properties, e.g. "packed=on"."""
    nic = Nic(topo.nic)
    service = VhostService().start()
    port = XdpPort(nic, "vm0", mac)
    try:
        dev = Registry().create("vm0", port, max_mtu=port.max_mtu)
        path = str(tmp_path / "vm0.sock")
        service.listen(dev, path)
        image = ensure_guest()
        ip = f"10.{topo.peer_ip.split('.')[1]}.0.2"
        initrd = make_initrd(image, net_up(ip) + scenario, tmp_path / "initrd")
        nic_opts = qemu.VhostUserNic(socket=path, mac=mac, device_opts=device_opts)
        with qemu.QemuGuest(image.kernel, initrd, nics=[nic_opts],
                            log_path=tmp_path / "console.log") as vm:
            yield dev, service, vm
    finally:
        service.stop()
        port.close()
        nic.close()


@contextlib.contextmanager
def blob_server(topo, tmp_path: Path) -> Iterator[bytes]:
    """BLOB_SIZE random bytes served as http://FAR:8000/blob by the far host."""
    blob = os.urandom(BLOB_SIZE)
    (tmp_path / "blob").write_bytes(blob)
    server = topo.popen(sys.executable, "-m", "http.server", "8000", "--bind", topo.peer_ip,
                        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield blob
    finally:
        server.kill()
        server.wait()


def test_linux_guest_pings_and_downloads_over_tcp(tmp_path):
    with topology() as topo, blob_server(topo, tmp_path) as blob:
        with guest_on(topo, tmp_path, SCENARIO.format(far=topo.peer_ip)) as (dev, _, vm):
            vm.wait_for(r"GW-GUEST: ping ok", 120)
            m = vm.wait_for(r"GW-GUEST: md5 (\w+)", 120)
            vm.wait_for(r"GW-GUEST: scenario exit 0", 30)
        assert m.group(1) == hashlib.md5(blob).hexdigest()
        assert dev.stats()["rx_bytes"] > BLOB_SIZE


RESET_SCENARIO = """
ping -c 2 -W 2 {far} >/dev/null && echo "GW-GUEST: ping ok"
rmmod virtio_net && insmod /lib/modules/virtio_net.ko && echo "GW-GUEST: driver reloaded"
{net_up}
ping -c 3 -W 2 {far} >/dev/null && echo "GW-GUEST: ping ok again"
"""


def test_guest_driver_reload_resets_the_device_and_traffic_resumes(tmp_path):
    """Reloading virtio_net resets the device: QEMU stops every ring
    (GET_VRING_BASE) and sets them up anew on the same connection. The
    gateway must follow: the same session carries the guest's pings again."""
    with topology() as topo:
        ip = f"10.{topo.peer_ip.split('.')[1]}.0.2"
        script = RESET_SCENARIO.format(far=topo.peer_ip, net_up=net_up(ip))
        with guest_on(topo, tmp_path, script) as (dev, service, vm):
            vm.wait_for(r"GW-GUEST: ping ok", 120)
            vm.wait_for(r"GW-GUEST: driver reloaded", 60)
            vm.wait_for(r"GW-GUEST: ping ok again", 60)
            vm.wait_for(r"GW-GUEST: scenario exit 0", 30)
            assert service.endpoints["vm0"].connections == 1  # one session throughout
        assert dev.broken_reason is None
