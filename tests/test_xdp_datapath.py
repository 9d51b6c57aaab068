"""A vhost device on the wire: the Python test guest ↔ AF_XDP ↔ veth ↔ far host."""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
import sys
import threading

import pytest

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing.frontend import Frontend
from gateway.testing.netns import topology
from gateway.vhost.transport import VhostService
from gateway.xdp import link
from gateway.xdp.nic import Nic

GUEST_MAC = "52:54:00:aa:00:01"
GUEST_IP = "10.{}.0.2"
N = 10_000
BATCH = 500
TIMEOUT = 20


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, payload: bytes,
              sport: int = 4000, dport: int = 5000) -> bytes:
    s, d = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, 17, len(udp))
    udp = udp[:6] + struct.pack("!H", csum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, s, d)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) \
        + b"\x08\x00" + ip + udp


def payload(i: int) -> bytes:
    return struct.pack("!I", i) + hashlib.sha256(struct.pack("!I", i)).digest() * (1 + i % 8)


RECEIVER = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: root may pass rmem_max
s.bind(("0.0.0.0", 5000))
print("ready", flush=True)
s.settimeout(float(sys.argv[1]))
n, h = 0, hashlib.sha256()
try:
    while n < int(sys.argv[2]):
        h.update(s.recv(4096)); n += 1
except socket.timeout:
    pass
print(n, h.hexdigest(), flush=True)
"""

SENDER = """
import socket, sys, struct, hashlib
dst, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    if i % batch == 0:
        sys.stdin.readline()  # the test says when the guest has room again
    p = struct.pack("!I", i) + hashlib.sha256(struct.pack("!I", i)).digest() * (1 + i % 8)
    s.sendto(p, (dst, 5000))
print("done", flush=True)
"""


@pytest.fixture
def wire(tmp_path):
    with topology() as topo:
        nic = Nic(topo.nic)
        service = VhostService().start()
        registry = Registry()
        started = threading.Event()
        registry.register_callbacks(on_new_device=lambda d: started.set())
        ports = []

        def attach(name="vm0", mac=GUEST_MAC):
            port = XdpPort(nic, name, mac)
            ports.append(port)
            dev = registry.create(name, port, max_mtu=port.max_mtu)
            path = str(tmp_path / f"{name}.sock")
            service.listen(dev, path)
            return dev, port, path

        try:
            yield topo, nic, attach, started
        finally:
            service.stop()
            for p in ports:
                p.close()
            nic.close()


def test_guest_to_far_host_udp_intact(wire):
    topo, nic, attach, started = wire
    dev, port, path = attach()
    guest_ip = GUEST_IP.format(topo.peer_ip.split(".")[1])
    rx = topo.popen(sys.executable, "-c", RECEIVER, "5", str(N), stdout=subprocess.PIPE,
                    text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        with Frontend(path, queue_size=1024, mem_size=32 << 20) as fe:
            fe.connect().setup()
            assert started.wait(TIMEOUT)
            for i in range(0, N, BATCH):
                frames = [udp_frame(GUEST_MAC, topo.peer_mac, guest_ip, topo.peer_ip,
                                    payload(j)) for j in range(i, i + BATCH)]
                fe.transmit(frames)
                fe.wait_tx_done(BATCH)
            count, digest = rx.stdout.readline().split()
    finally:
        rx.kill()
        rx.wait()
    want = hashlib.sha256(b"".join(payload(i) for i in range(N))).hexdigest()
    assert int(count) == N
    assert digest == want
    assert dev.stats()["tx_packets"] == N


def test_far_host_to_guest_udp_intact(wire):
    topo, nic, attach, started = wire
    dev, port, path = attach()
    guest_ip = GUEST_IP.format(topo.peer_ip.split(".")[1])
    # No ARP for guests yet (broadcasts go to the kernel only): a static entry.
    topo.run("ip", "neigh", "replace", guest_ip, "lladdr", GUEST_MAC, "dev", topo.peer,
             "nud", "permanent")
    with Frontend(path, queue_size=1024, mem_size=32 << 20) as fe:
        fe.connect().setup()
        assert started.wait(TIMEOUT)
        tx = topo.popen(sys.executable, "-c", SENDER, guest_ip, str(N), str(BATCH),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        got: list[bytes] = []
        try:
            for _ in range(0, N, BATCH):
                fe.post_rx(BATCH)
                tx.stdin.write("go\n")
                tx.stdin.flush()
                got += fe.receive(BATCH)
            assert tx.stdout.readline().strip() == "done"
        finally:
            tx.kill()
            tx.wait()
    assert [f[42:] for f in got] == [payload(i) for i in range(N)]
    assert all(f[:6] == bytes.fromhex(GUEST_MAC.replace(":", "")) for f in got)
    assert port.stats()["rx_packets"] == N  # the XDP program's count
    assert dev.stats()["rx_packets"] == N  # what reached the guest


def test_attach_refuses_bad_input_before_touching_the_nic(wire):
    topo, nic, attach, started = wire
    with pytest.raises(link.LinkError, match="not a unicast"):
        XdpPort(nic, "x", "ff:ff:ff:ff:ff:ff")
    with pytest.raises(link.LinkError, match="queue pairs"):
        XdpPort(nic, "x", GUEST_MAC, queue_pairs=4)
    with pytest.raises(link.LinkError, match="MTU"):
        XdpPort(nic, "x", GUEST_MAC, mtu=9000)
    assert not nic.slots and not link.fdb_entries(topo.nic)


def test_detach_leaves_nothing_behind(tmp_path):
    with topology() as topo:
        nic = Nic(topo.nic)
        port = XdpPort(nic, "vm0", GUEST_MAC)
        assert link.xdp_state(topo.nic)[0] is not None
        assert GUEST_MAC in link.fdb_entries(topo.nic)
        port.close()
        nic.close()
        assert link.xdp_state(topo.nic)[0] is None
        assert link.fdb_entries(topo.nic) == []
        assert not nic.queues
        # and again on the same queue: the UMEM and sockets really were freed
        nic = Nic(topo.nic)
        port = XdpPort(nic, "vm0", GUEST_MAC)
        port.close()
        nic.close()
