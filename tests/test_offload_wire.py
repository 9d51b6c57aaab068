"""Offloads through the AF_XDP datapath, with the Python test guest: what it
hands over with NEEDS_CSUM or as a GSO frame reaches the far host complete and
segmented (captured there and checked against the reference in
test_offload.py); lying headers are dropped and counted; received checksums
are vouched for (DATA_VALID) only when they are right."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from test_offload import (
    ACK,
    CWR,
    FIN,
    PSH,
    check_segments,
    ipv4,
    ipv6,
    l4_ok,
    ones_sum,
    pseudo,
    tcp,
)

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing.frontend import Frontend
from gateway.testing.guestnet import ipv4 as ip4_packet
from gateway.testing.guestnet import mac_bytes, udp
from gateway.testing.netns import topology
from gateway.testing.wired import wired_guest
from gateway.vhost.transport import VhostService
from gateway.virtio.features import Net
from gateway.xdp.nic import Nic

GUEST_MAC = "52:54:00:aa:00:07"
TIMEOUT = 20

# Captures frames of one EtherType on the far host's interface, each as a hex
# line, until it has `count` or a quiet second passes.
CAPTURE = """
import select, socket, sys
ifname, ethertype, count = sys.argv[1], int(sys.argv[2], 16), int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
s.bind((ifname, 0))
print("ready", flush=True)
got = 0
while got < count and select.select([s], [], [], 5)[0]:
    data, addr = s.recvfrom(65536)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    print(data.hex(), flush=True)
    got += 1
print("end", flush=True)
"""


@pytest.fixture
def wire(tmp_path):
    with wired_guest(str(tmp_path), GUEST_MAC) as (topo, _port, dev, fe):
        yield topo, dev, fe


def capture(topo, ethertype: int, count: int) -> subprocess.Popen:
    p = topo.popen(sys.executable, "-c", CAPTURE, topo.peer, f"{ethertype:x}", str(count),
                   stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def captured(p: subprocess.Popen) -> list[bytes]:
    out = []
    for line in p.stdout:
        if line.strip() == "end":
            break
        out.append(bytes.fromhex(line.strip()))
    p.wait(TIMEOUT)
    return out


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, start=0, off=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, start, off, 0)


def eth(topo, ethertype: int) -> bytes:
    return mac_bytes(topo.peer_mac) + mac_bytes(GUEST_MAC) + struct.pack("!H", ethertype)


def test_offloads_negotiated(wire):
    _, dev, fe = wire
    for bit in (Net.CSUM, Net.GUEST_CSUM, Net.HOST_TSO4, Net.HOST_TSO6, Net.GUEST_TSO4,
                Net.GUEST_TSO6):
        assert fe.features >> bit & 1 and dev.negotiated_features >> bit & 1


@pytest.mark.parametrize("v6", [False, True])
def test_gso_frame_reaches_the_wire_segmented(wire, v6):
    topo, dev, fe = wire
    payload = os.urandom(60000)
    flags = ACK | PSH | FIN | CWR
    if v6:
        frame = eth(topo, 0x86DD) + ipv6(tcp(payload, flags=flags))
        h = vnet(1, 4, 74, 1400, 54, 16)
    else:
        frame = eth(topo, 0x0800) + ipv4(tcp(payload, flags=flags))
        h = vnet(1, 1, 54, 1448, 34, 16)
    mss = 1400 if v6 else 1448
    nsegs = -(-len(payload) // mss)
    cap = capture(topo, 0x86DD if v6 else 0x0800, nsegs)
    try:
        fe.transmit([frame], vnet_hdr=h)
        fe.wait_tx_done(1)
        segs = captured(cap)
    finally:
        cap.kill()
    check_segments(frame, segs, mss, v6)
    assert all(len(s) <= 14 + 1500 for s in segs)
    off = dev.stats()["offload"]
    assert off["tx_gso"] == 1 and off["tx_gso_segs"] == nsegs


def test_partial_checksums_completed_for_the_far_stack(wire):
    """UDP datagrams with only the pseudo-header sum filled in: the far
    kernel drops any whose checksum is wrong, so each that arrives proves one."""
    topo, dev, fe = wire
    guest_ip = "10.{}.0.2".format(topo.peer_ip.split(".")[1])
    rx = topo.popen(sys.executable, "-c", """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5000)); s.settimeout(5)
print("ready", flush=True)
for _ in range(int(sys.argv[1])):
    print(s.recv(4096).hex(), flush=True)
""", "20", stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        sent = []
        for i in range(20):
            data = os.urandom(1 + 71 * i)
            u = bytearray(udp(guest_ip, topo.peer_ip, 4000, 5000, data))
            struct.pack_into("!H", u, 6, ones_sum(pseudo(bytes(map(int, guest_ip.split("."))),
                                                         bytes(map(int,
                                                                   topo.peer_ip.split("."))),
                                                         17, len(u))))
            frame = eth(topo, 0x0800) + ip4_packet(guest_ip, topo.peer_ip, 17, bytes(u))
            fe.transmit([frame], vnet_hdr=vnet(1, 0, 0, 0, 34, 6))
            sent.append(data)
        fe.wait_tx_done(20)
        got = [bytes.fromhex(rx.stdout.readline().strip()) for _ in range(20)]
    finally:
        rx.kill()
        rx.wait()
    assert got == sent
    assert dev.stats()["offload"]["tx_csum"] == 20


def test_lying_offload_headers_dropped_and_counted(wire):
    topo, dev, fe = wire
    frame = eth(topo, 0x0800) + ipv4(tcp(os.urandom(20000)))
    small = eth(topo, 0x0800) + ipv4(tcp(os.urandom(1000)))
    before = topo.peer_stats()["rx_packets"]
    bad = [(small, vnet(1, 0, 0, 0, len(small) - 1, 0)),   # checksum field past the end
           (small, vnet(1, 0, 0, 0, 0xFFFF, 0xFFFF)),
           (frame, vnet(1, 1, 54, 0, 34, 16)),             # gso_size 0
           (frame, vnet(1, 1, 54, 10, 34, 16)),            # 2000 segments
           (frame, vnet(1, 3, 54, 1448, 34, 16)),          # UDP fragmentation offload
           (frame, vnet(1, 4, 54, 1448, 34, 16)),          # TCPV6 on an IPv4 frame
           (frame, vnet(1, 1, 60000, 1448, 34, 16))]       # hdr_len past the frame
    for f, h in bad:
        fe.transmit([f], vnet_hdr=h)
    fe.wait_tx_done(len(bad))
    # a good frame after them still goes out, and alone
    cap = capture(topo, 0x0800, 1)
    try:
        ok = eth(topo, 0x0800) + ipv4(tcp(b"ok"))
        fe.transmit([ok])
        fe.wait_tx_done(1)
        assert captured(cap) == [ok]
    finally:
        cap.kill()
    s = dev.stats()
    assert s["drops"]["tx_bad_csum"] == 2 and s["drops"]["tx_bad_gso"] == 5
    assert topo.peer_stats()["rx_packets"] - before == 1
    assert s["broken_total"] == 0


@pytest.mark.parametrize("far_tx_csum", ["off", "on"])
def test_received_checksums_vouched_for_only_when_right(wire, far_tx_csum):
    """With the far veth's TX checksum offload on, its frames reach XDP with
    partial checksums: the guest must check those itself (no DATA_VALID)."""
    topo, dev, fe = wire
    topo.run("ethtool", "-K", topo.peer, "tx", far_tx_csum)
    guest_ip = "10.{}.0.2".format(topo.peer_ip.split(".")[1])
    topo.run("ip", "neigh", "replace", guest_ip, "lladdr", GUEST_MAC, "dev", topo.peer)
    fe.post_rx(64)
    topo.run(sys.executable, "-c", """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(10):
    s.sendto(bytes([i]) * (100 + i), (sys.argv[1], 6000))
""", guest_ip)
    got = []
    while len(got) < 10:  # the far host's own IPv6 chatter may come first
        got += [(h, f) for h, f in fe.receive(1, headers=True)
                if f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x17\x70"]
    valid = far_tx_csum == "off"
    for i, (h, f) in enumerate(got):
        assert f[14 + 28:] == bytes([i]) * (100 + i)
        assert h[0] == (2 if valid else 0)
        if valid:
            assert l4_ok(f[26:30], f[30:34], 17, f[34:])
    assert dev.stats()["offload"]["rx_csum_valid"] == (10 if valid else 0)


def test_local_guest_gets_segments_and_complete_checksums(tmp_path):
    """Guest to guest on one NIC never touches the wire: what the receiver
    gets must already be segmented and checksummed, whatever it negotiated."""
    mac_b = "52:54:00:aa:00:08"
    with topology() as topo:
        nic = Nic(topo.nic)
        service = VhostService().start()
        registry = Registry()
        ports = [XdpPort(nic, "vma", GUEST_MAC), XdpPort(nic, "vmb", mac_b)]
        try:
            for p in ports:
                service.listen(registry.create(p.name, p, max_mtu=p.max_mtu),
                               str(tmp_path / f"{p.name}.sock"))
            with Frontend(str(tmp_path / "vma.sock"), mem_size=32 << 20) as fa, \
                    Frontend(str(tmp_path / "vmb.sock"), mem_size=32 << 20,
                             want=~(1 << Net.GUEST_CSUM | 1 << Net.GUEST_TSO4
                                    | 1 << Net.GUEST_TSO6)) as fb:
                fa.connect().setup()
                fb.connect().setup()
                fb.post_rx(128)
                to_b = mac_bytes(mac_b) + mac_bytes(GUEST_MAC) + b"\x08\x00"
                gso = to_b + ipv4(tcp(os.urandom(30000), flags=ACK | PSH))
                t = bytearray(tcp(os.urandom(999)))
                struct.pack_into("!H", t, 16, ones_sum(pseudo(bytes([10, 0, 0, 1]),
                                                              bytes([10, 0, 0, 2]), 6, len(t))))
                partial = to_b + ipv4(bytes(t))
                fa.transmit([gso], vnet_hdr=vnet(1, 1, 54, 1448, 34, 16))
                fa.transmit([partial], vnet_hdr=vnet(1, 0, 0, 0, 34, 16))
                fa.wait_tx_done(2)
                nsegs = -(-30000 // 1448)
                got = []
                while len(got) < nsegs + 1:
                    got += [f for f in fb.receive(1) if f[12:14] == b"\x08\x00"]
        finally:
            service.stop()
            for p in ports:
                p.close()
            nic.close()
    check_segments(gso, got[:nsegs], 1448, False)
    last = got[nsegs]
    assert last[:34 + 16] == partial[:34 + 16] and last[34 + 18:] == partial[34 + 18:]
    assert l4_ok(last[26:30], last[30:34], 6, last[34:])


def test_ports_that_pass_frames_verbatim_offer_no_offloads():
    from gateway.datapath.port import MemoryPort
    from gateway.virtio import features as vf

    dev = Registry().create("mem0", MemoryPort())
    assert dev.features & vf.OFFLOADS == 0
    assert dev.features & vf.mask(Net.MRG_RXBUF, Net.VERSION_1) == vf.mask(Net.MRG_RXBUF,
                                                                          Net.VERSION_1)
    with pytest.raises(ValueError, match="unsupported"):
        dev.feature_enable(1 << Net.CSUM)
