"""QEMU 7.2 with a real Linux guest (TCG): its virtio_net driver talks to us."""

from __future__ import annotations

import struct

import pytest

from gateway.datapath.port import MemoryPort
from gateway.registry import Registry
from gateway.testing import qemu
from gateway.testing.guest import ensure_guest, make_initrd, net_up
from gateway.testing.guestnet import csum, ipv4, udp
from gateway.vhost.transport import VhostService

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-system-x86_64 not installed"),
]

GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("020000000001")
GUEST_IP, PEER_IP = "10.99.0.2", "10.99.0.1"
INJECT = 20

SCENARIO = f"""
arp -s {PEER_IP} 02:00:00:00:00:01
echo "GW-GUEST: link $(cat /sys/class/net/eth0/operstate)"
ping -c 5 -i 0.2 -W 1 {PEER_IP} >/dev/null
echo "GW-GUEST: pinged"
i=0
while [ "$(cat /sys/class/net/eth0/statistics/rx_packets)" -lt {INJECT} ] && [ $i -lt 300 ]; do
    sleep 0.1; i=$((i+1))
done
echo "GW-GUEST: rx_packets $(cat /sys/class/net/eth0/statistics/rx_packets)"
"""


def udp_to_guest(i: int) -> bytes:
    data = f"gateway frame {i}".encode()
    return GUEST_MAC + PEER_MAC + b"\x08\x00" \
        + ipv4(PEER_IP, GUEST_IP, 17, udp(PEER_IP, GUEST_IP, 9999, 9, data), ident=i)


def is_echo_request(f: bytes) -> bool:
    if f[:6] != PEER_MAC or f[6:12] != GUEST_MAC or f[12:14] != b"\x08\x00":
        return False
    ip = f[14:34]
    return ip[9] == 1 and csum(ip) == 0 and f[34] == 8 and csum(f[34:14 + struct.unpack(
        "!H", ip[2:4])[0]]) == 0


@pytest.fixture(scope="module")
def image():
    return ensure_guest()


@pytest.mark.parametrize("mode", ["server", "client"])
def test_linux_guest_on_the_backend(tmp_path, image, mode):
    registry = Registry()
    service = VhostService().start()
    port = MemoryPort()
    path = str(tmp_path / "vm.sock")
    dev = registry.create("vm0", port)
    initrd = make_initrd(image, net_up(GUEST_IP) + SCENARIO, tmp_path / "initrd")
    nic = qemu.VhostUserNic(socket=path, mac=GUEST_MAC.hex(":"), server=(mode == "client"))
    try:
        if mode == "server":
            service.listen(dev, path)
        with qemu.QemuGuest(image.kernel, initrd, nics=[nic],
                            log_path=tmp_path / "console.log") as vm:
            if mode == "client":
                service.connect(dev, path)  # QEMU created the socket; we dial in
            vm.wait_for(r"GW-GUEST: link up", 120)
            vm.wait_for(r"GW-GUEST: pinged", 60)
            got = port.queue(0).take()
            echoes = [f for f in got if is_echo_request(f)]
            assert len(echoes) == 5, f"{len(got)} frames from the guest, {len(echoes)} pings"
            port.queue(0).inject([udp_to_guest(i) for i in range(INJECT)])
            m = vm.wait_for(r"GW-GUEST: rx_packets (\d+)", 60)
            assert int(m.group(1)) >= INJECT
            vm.wait_for(r"GW-GUEST: scenario exit 0", 30)
            vm.check()
            assert dev.stats()["rx_packets"] == INJECT
            assert dev.negotiated_features >> 32 & 1  # VERSION_1: a modern driver bound
    finally:
        service.stop()
        port.close()
