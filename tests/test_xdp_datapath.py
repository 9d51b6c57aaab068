"""A vhost device on the wire: the Python test guest ↔ AF_XDP ↔ veth ↔ far host."""

from __future__ import annotations

import contextlib
import hashlib
import struct
import subprocess
import sys
import threading
import time

import pytest

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing.frontend import Frontend, FrontendError
from gateway.testing.guestnet import GuestHost, ipv4, mac_bytes, parse_ipv4, udp
from gateway.testing.netns import topology
from gateway.vhost.transport import VhostService
from gateway.xdp import link
from gateway.xdp.nic import Nic

GUEST_MAC = "52:54:00:aa:00:01"
GUEST_IP = "10.{}.0.2"
N = 10_000
BATCH = 500
TIMEOUT = 20


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, data: bytes) -> bytes:
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" \
        + ipv4(src_ip, dst_ip, 17, udp(src_ip, dst_ip, 4000, 5000, data))


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
    # A static entry: this test is about volume; ARP has its own test.
    topo.run("ip", "neigh", "replace", guest_ip, "lladdr", GUEST_MAC, "dev", topo.peer,
             "nud", "permanent")
    with Frontend(path, queue_size=1024, mem_size=32 << 20) as fe:
        fe.connect().setup()
        assert started.wait(TIMEOUT)
        tx = topo.popen(sys.executable, "-c", SENDER, guest_ip, str(N), str(BATCH),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        got: list[bytes] = []
        every: list[bytes] = []  # what else the far host sends (ND, MLD, ...) included
        try:
            fe.post_rx(BATCH + 64)  # room for a batch plus the far host's own multicast
            for k in range(0, N, BATCH):
                tx.stdin.write("go\n")
                tx.stdin.flush()
                while len(got) < k + BATCH:
                    frames = fe.receive(1)
                    fe.post_rx(len(frames))
                    every += frames
                    got += [f for f in frames if f[12:14] == b"\x08\x00"]
            assert tx.stdout.readline().strip() == "done"
        finally:
            tx.kill()
            tx.wait()
    assert [f[42:] for f in got] == [payload(i) for i in range(N)]
    assert all(f[:6] == bytes.fromhex(GUEST_MAC.replace(":", "")) for f in got)
    unicast = [f for f in every if f[:6] == mac_bytes(GUEST_MAC)]
    assert port.stats()["rx_packets"] == len(unicast) >= N  # the XDP program's count
    assert dev.stats()["rx_packets"] == len(every)  # what reached the guest


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


FAR_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.sendto(sys.argv[2].encode(), (sys.argv[1], 5000))
"""

FAR_PING = """
import socket, struct, sys
def csum(d):
    t = sum(struct.unpack("!%dH" % (len(d) // 2), d))
    while t >> 16: t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(5)
m = struct.pack("!BBHHH", 8, 0, 0, 77, 1) + b"ping-from-far!"
s.sendto(m[:2] + struct.pack("!H", csum(m)) + m[4:], (sys.argv[1], 0))
while True:
    d, a = s.recvfrom(2048)
    if a[0] == sys.argv[1] and d[20] == 0 and d[28:] == b"ping-from-far!":
        print("pong"); break
"""


def guest_ip(topo, n: int = 2) -> str:
    return f"10.{topo.peer_ip.split('.')[1]}.0.{n}"


def is_udp_to(ip: str, data: bytes):
    def match(f: bytes) -> bool:
        p = parse_ipv4(f)
        return p is not None and p[1] == ip and p[2] == 17 and p[3][8:] == data
    return match


def test_arp_and_ping_both_ways(wire):
    topo, nic, attach, started = wire
    dev, port, path = attach()
    ip = guest_ip(topo)
    with Frontend(path) as fe:
        fe.connect().setup()
        assert started.wait(TIMEOUT)
        host = GuestHost(fe, GUEST_MAC, ip)
        try:
            # guest -> far: ARP out as a broadcast, the reply back as unicast
            assert host.resolve(topo.peer_ip) == mac_bytes(topo.peer_mac)
            for seq in range(3):
                host.ping(topo.peer_ip, seq)
            # far -> guest: the far host's ARP request is a broadcast the tap floods
            assert topo.run(sys.executable, "-c", FAR_PING, ip).stdout.strip() == "pong"
            assert GUEST_MAC in topo.run("ip", "neigh", "show", ip).stdout
            topo.run(sys.executable, "-c", FAR_UDP, ip, "hello guest")
            host.expect(is_udp_to(ip, b"hello guest"))
        finally:
            host.stop()
    counters = port.stats()
    assert counters["drop_no_socket"] == counters["drop_stopped"] == 0


def test_two_guests_on_one_nic(wire):
    topo, nic, attach, started = wire
    mac_a, mac_b = GUEST_MAC, "52:54:00:aa:00:02"
    _, _, path_a = attach("vma", mac_a)
    _, _, path_b = attach("vmb", mac_b)
    ip_a, ip_b = guest_ip(topo, 2), guest_ip(topo, 3)
    with Frontend(path_a) as fa, Frontend(path_b) as fb:
        fa.connect().setup()
        fb.connect().setup()
        a, b = GuestHost(fa, mac_a, ip_a), GuestHost(fb, mac_b, ip_b)
        try:
            # unicast from the far host reaches only its guest
            topo.run(sys.executable, "-c", FAR_UDP, ip_a, "only for a")
            a.expect(is_udp_to(ip_a, b"only for a"))
            # a broadcast reaches both
            bcast = f"10.{topo.peer_ip.split('.')[1]}.0.255"
            topo.run(sys.executable, "-c", FAR_UDP, bcast, "for everyone")
            a.expect(is_udp_to(bcast, b"for everyone"))
            b.expect(is_udp_to(bcast, b"for everyone"))
            # guest to guest through the hairpin: ARP flooded, reply and ping local
            assert a.resolve(ip_b) == mac_bytes(mac_b)
            for seq in range(3):
                a.ping(ip_b, seq)
            # b never saw what was a's alone
            seen_by_b = []
            while not b.frames.empty():
                seen_by_b.append(b.frames.get())
            assert not any(is_udp_to(ip_a, b"only for a")(f) for f in seen_by_b)
        finally:
            a.stop()
            b.stop()


SPREAD_SENDER = """
import socket, sys
dst, n = sys.argv[1], int(sys.argv[2])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
for i in range(n):
    socks[i % 32].sendto(b"flow %02d datagram %05d" % (i % 32, i), (dst, 5000))
"""


def ethtool_stats(ifname: str) -> dict[str, int]:
    out = subprocess.run(["ethtool", "-S", ifname], capture_output=True, text=True,
                         check=True).stdout
    return {k.strip(): int(v) for k, v in
            (line.split(":") for line in out.splitlines()[1:] if ":" in line)}


@pytest.mark.parametrize("queue_pairs", [1, 2])
def test_return_traffic_on_either_nic_queue_reaches_the_guest(tmp_path, queue_pairs):
    """Flows spread over both NIC queues all reach the guest, and none of them
    reaches a second, promiscuous guest on the same queues (the test front-end
    takes every frame it is given)."""
    n = 2000
    with topology(queues=2) as topo:
        nic = Nic(topo.nic)
        service = VhostService().start()
        port = XdpPort(nic, "vm0", GUEST_MAC, queue_pairs=queue_pairs)
        other = XdpPort(nic, "vm1", "52:54:00:aa:00:02", queue_pairs=2)
        try:
            dev = Registry().create("vm0", port, queue_pairs=queue_pairs)
            dev1 = Registry().create("vm1", other, queue_pairs=2)
            path, path1 = str(tmp_path / "vm0.sock"), str(tmp_path / "vm1.sock")
            service.listen(dev, path)
            service.listen(dev1, path1)
            ip = guest_ip(topo)
            topo.run("ip", "neigh", "replace", ip, "lladdr", GUEST_MAC, "dev", topo.peer,
                     "nud", "permanent")
            with Frontend(path, queue_pairs=queue_pairs, queue_size=1024,
                          mem_size=32 << 20) as fe, Frontend(path1, queue_pairs=2) as fe1:
                fe.connect().setup()
                fe1.connect().setup()
                fe.timeout = fe1.timeout = 0.5  # per wait on a queue pair that may have nothing
                for qp in range(2):
                    fe1.post_rx(256, qp=qp)
                deadline = time.monotonic() + 30
                for qp in range(queue_pairs):
                    fe.post_rx(1024, qp=qp)
                topo.run(sys.executable, "-c", SPREAD_SENDER, ip, str(n))
                got: list[bytes] = []
                per_qp = [0] * queue_pairs
                while len(got) < n and time.monotonic() < deadline:
                    for qp in range(queue_pairs):
                        try:
                            raw = fe.receive(1, qp=qp)
                        except FrontendError:
                            continue  # nothing on this queue pair for now
                        fe.post_rx(len(raw), qp=qp)
                        frames = [f for f in raw if f[12:14] == b"\x08\x00"]
                        per_qp[qp] += len(frames)
                        got += frames
                leaked = []
                for qp in range(2):
                    with contextlib.suppress(FrontendError):
                        while True:
                            leaked += [f for f in fe1.receive(1, qp=qp)
                                       if f[:6] == mac_bytes(GUEST_MAC)]
            stats = ethtool_stats(topo.nic)
            mode = nic.program.mode
        finally:
            service.stop()
            port.close()
            other.close()
            nic.close()
    assert mode == "native"  # the per-queue redirect counters below exist there only
    assert stats["rx_queue_0_xdp_redirect"] > 0 and stats["rx_queue_1_xdp_redirect"] > 0
    assert sorted(f[42:] for f in got) == sorted(
        b"flow %02d datagram %05d" % (i % 32, i) for i in range(n))
    assert all(per_qp)
    assert leaked == []


def test_an_idle_device_sleeps(wire):
    """With a guest connected and nothing to move, workers sleep in poll()."""
    topo, nic, attach, started = wire
    dev, port, path = attach()
    with Frontend(path) as fe:
        fe.connect().setup()
        assert started.wait(TIMEOUT)
        before = time.process_time()
        threading.Event().wait(1.0)  # one idle second is what is being measured
        busy = time.process_time() - before
    assert busy < 0.1, f"{busy:.2f} s of CPU in an idle second"


CRASHER = """
import os, sys
from gateway.datapath.xdp_port import XdpPort
from gateway.xdp.nic import Nic
nic = Nic(sys.argv[1])
XdpPort(nic, "vm0", sys.argv[2])
print("attached", flush=True)
os._exit(0)  # a crash: nothing undone
"""


def test_the_next_start_cleans_up_after_a_crash():
    with topology() as topo:
        out = subprocess.run([sys.executable, "-c", CRASHER, topo.nic, GUEST_MAC],
                             capture_output=True, text=True, timeout=60)
        assert "attached" in out.stdout, out.stderr
        stale, _ = link.xdp_state(topo.nic)
        assert stale is not None and GUEST_MAC in link.fdb_entries(topo.nic)
        nic = Nic(topo.nic)
        try:
            assert nic.program.replaced == stale
            assert link.fdb_entries(topo.nic) == []
            port = XdpPort(nic, "vm0", GUEST_MAC)  # the queue and MAC are free again
            port.close()
        finally:
            nic.close()
        assert link.xdp_state(topo.nic)[0] is None


def _wire_count(topo, want: int) -> int:
    """The far veth's rx_packets once it reaches `want` (or the deadline)."""
    deadline = time.monotonic() + TIMEOUT
    while (n := topo.peer_stats()["rx_packets"]) < want and time.monotonic() < deadline:
        time.sleep(0.01)  # a kernel counter: nothing to wait on
    return n


@pytest.mark.parametrize("allow", [False, True], ids=["default", "allow_spoofing"])
def test_source_mac_spoofing_is_dropped_and_counted(wire, allow):
    """A guest posing as another host (any source MAC but its own) is cut off
    unless the operator allowed it; runts never reach the wire either."""
    topo, nic, _, started = wire
    port = XdpPort(nic, "vm0", GUEST_MAC, allow_spoofing=allow)
    registry_dev = Registry().create("vm0", port, max_mtu=port.max_mtu)
    service = VhostService().start()
    try:
        path = f"/tmp/gwt-spoof-{allow}.sock"
        service.listen(registry_dev, path)
        guest_ip = GUEST_IP.format(topo.peer_ip.split(".")[1])
        base = topo.peer_stats()["rx_packets"]
        with Frontend(path) as fe:
            fe.connect().setup()
            forged = [udp_frame("52:54:00:aa:00:99", topo.peer_mac, guest_ip, topo.peer_ip,
                                b"forged %d" % i) for i in range(7)]
            runts = [b"\x01" * n for n in (1, 6, 13)]
            good = [udp_frame(GUEST_MAC, topo.peer_mac, guest_ip, topo.peer_ip,
                              b"good %d" % i) for i in range(5)]
            fe.transmit(forged + runts + good)
            fe.wait_tx_done(len(forged + runts + good))
            want = len(good) + (len(forged) if allow else 0)
            assert _wire_count(topo, base + want) - base == want
            s = port.stats()
            assert s["tx_spoofed"] == (0 if allow else len(forged))
            assert s["tx_runt"] == len(runts)
    finally:
        service.stop()
        port.close()
