"""DPDK virtio-user with checksum and TSO TX offloads: testpmd's csum engine
sends every frame the far host sends it back out with the TCP/UDP checksum
left to the "hardware" (NEEDS_CSUM) and TCP cut at 800 bytes by "TSO" (a GSO
frame); the far host must capture complete, segmented frames."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from test_offload import check_segments, l4_ok
from test_offload_wire import CAPTURE

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

MAC = "52:54:00:00:00:43"
MSS = 600
PAYLOAD = 1400
N = 20

# Raw frames from the far host's interface to the testpmd guest: N UDP
# datagrams and N TCP segments of PAYLOAD bytes (i + k, k = 0..), checksums complete.
SEND = """
import os, socket, struct, sys
ifname, dst, src = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
n = int(sys.argv[4])
def csum(b):
    b += b"\\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
def ip(proto, l4):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 7, 0x4000, 64, proto, 0,
                    bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2]))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:]
def l4sum(proto, l4):
    return csum(bytes([10, 9, 0, 1, 10, 9, 0, 2, 0, proto]) + struct.pack("!H", len(l4)) + l4)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
for i in range(n):
    data = os.urandom(100 + i)
    u = struct.pack("!HHHH", 4000, 5000, 8 + len(data), 0) + data
    u = u[:6] + struct.pack("!H", l4sum(17, u) or 0xffff) + u[8:]
    s.send(dst + src + b"\\x08\\x00" + ip(17, u) + u)
    t = struct.pack("!HHIIBBHHH", 4000, 5000, 1000 * i, 1, 5 << 4, 0x18, 512, 0, 0)
    t += bytes((i + k) & 0xff for k in range(int(sys.argv[5])))
    t = t[:16] + struct.pack("!H", l4sum(6, t)) + t[18:]
    s.send(dst + src + b"\\x08\\x00" + ip(6, t) + t)
"""


def test_testpmd_csum_and_tso_offloads_completed_on_the_wire(tmp_path):
    with topology() as topo:
        nic = Nic(topo.nic)
        service = VhostService().start()
        port = XdpPort(nic, "pmd0", MAC)
        try:
            dev = Registry().create("pmd0", port, max_mtu=port.max_mtu)
            path = str(tmp_path / "pmd0.sock")
            service.listen(dev, path)
            with tp.Testpmd(path, mac=MAC, args=[
                    "--forward-mode=csum", f"--eth-peer=0,{topo.peer_mac}"]) as pmd:
                pmd.wait_ready()
                pmd.cmd("port stop 0")
                for what in ("csum set ip sw 0", "csum set udp hw 0", "csum set tcp hw 0",
                             f"tso set {MSS} 0", "port start 0"):
                    out = pmd.cmd(what)
                    assert "rror" not in out and "not support" not in out, (what, out)
                pmd.wait_link_up(30)
                cap = topo.popen(sys.executable, "-c", CAPTURE, topo.peer, "800",
                                 str(N * (1 + 3)), stdout=subprocess.PIPE, text=True)
                try:
                    assert cap.stdout.readline().strip() == "ready"
                    pmd.start()
                    topo.run(sys.executable, "-c", SEND, topo.peer, MAC.replace(":", ""),
                             topo.peer_mac.replace(":", ""), str(N), str(PAYLOAD))
                    frames = []
                    for line in cap.stdout:
                        if line.strip() == "end":
                            break
                        frames.append(bytes.fromhex(line.strip()))
                finally:
                    cap.kill()
                    cap.wait()
                pmd.stop()
                features = dev.negotiated_features
        finally:
            service.stop()
            port.close()
            nic.close()
    for bit in (Net.CSUM, Net.HOST_TSO4):
        assert features >> bit & 1
    # frames testpmd sent out (source = its MAC): UDP checksums completed,
    # each TCP segment cut into 3 of at most MSS
    back = [f for f in frames if f[6:12] == bytes.fromhex(MAC.replace(":", ""))]
    udp = [f for f in back if f[23] == 17]
    tcp = [f for f in back if f[23] == 6]
    assert len(udp) == N and len(tcp) == 3 * N
    for f in udp:
        assert l4_ok(f[26:30], f[30:34], 17, f[34:])
    for i in range(N):
        segs = tcp[3 * i : 3 * i + 3]
        # what testpmd handed over: the first segment's headers, all the payload
        orig = bytearray(segs[0][:54] + bytes((i + k) & 0xFF for k in range(PAYLOAD)))
        struct.pack_into("!H", orig, 16, len(orig) - 14)
        orig[47] = 0x18  # ACK|PSH as sent; only the last segment keeps PSH
        assert struct.unpack_from("!I", orig, 38)[0] == 1000 * i
        check_segments(bytes(orig), segs, MSS, False)
    off = dev.stats()["offload"]
    assert off["tx_gso"] == N and off["tx_gso_segs"] == 3 * N
    assert off["tx_csum"] == N
