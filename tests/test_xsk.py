"""gateway.xdp.xsk against a real veth "NIC": TX to and RX from a far-host namespace,
copy-mode fallback, shared sockets on one queue, EBUSY for a second UMEM, re-binding
a freed queue, and no fd leaks. Needs root (netns, AF_XDP); RX needs bcc."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time

import pytest

from gateway.testing.netns import Topology, topology
from gateway.xdp.xsk import STATS_KEYS, Umem, XskError, XskSocket

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, AF_XDP)")

ETHERTYPE = b"\x88\xb5"  # IEEE local experimental: nothing else on the link uses it

# Runs on the far host: AF_PACKET capture of our ethertype, prints "ready" once
# bound, then the hex of each frame until `count` arrived or `timeout` passed.
CAPTURE = r"""
import socket, sys, time
ifname, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: hold a whole burst
s.bind((ifname, 0x88B5))
s.settimeout(0.2)
print("ready", flush=True)
got, end = [], time.monotonic() + timeout
while len(got) < count and time.monotonic() < end:
    try:
        got.append(s.recv(65536).hex())
    except TimeoutError:
        pass
print("\n".join(got), flush=True)
"""

# Runs on the far host: sends the hex frames read from stdin out of ifname,
# pausing now and then so veth's 256-entry XDP ring towards the NIC never overflows.
SEND = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((sys.argv[1], 0))
for i, line in enumerate(sys.stdin.read().split()):
    s.send(bytes.fromhex(line))
    if i % 16 == 15:
        time.sleep(0.001)
"""

XDP_PROG = r"""
BPF_XSKMAP(xsks, 4);

int xsk_redirect(struct xdp_md *ctx)
{
    return xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);
}
"""


def mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def frames(dst: str, src: str, n: int, tag: bytes) -> list[bytes]:
    """n distinct frames of 64..~300 bytes: index, tag, then a varying filler."""
    out = []
    for i in range(n):
        body = tag + i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range(40 + i % 240))
        out.append(mac(dst) + mac(src) + ETHERTYPE + body)
    return out


def quiet_nic(topo: Topology) -> None:
    """No IPv6 on the gateway side: its own ND/MLD frames would disturb the peer's counters."""
    with open(f"/proc/sys/net/ipv6/conf/{topo.nic}/disable_ipv6", "w") as f:
        f.write("1")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_tx_to_far_host():
    with topology() as topo, Umem() as umem:
        quiet_nic(topo)
        sock = XskSocket(topo.nic, 0, umem, first=True)
        assert sock.mode == "copy"  # veth has no zero-copy: the fallback ran
        sent = frames(topo.peer_mac, topo.nic_mac, 1000, b"tx")
        cap = topo.popen(sys.executable, "-c", CAPTURE, topo.peer, "1000", "10",
                         stdout=subprocess.PIPE, text=True)
        try:
            assert cap.stdout.readline().strip() == "ready"
            before = topo.peer_stats()["rx_packets"]
            assert sock.send(sent) == 1000
            out, _ = cap.communicate(timeout=15)
        finally:
            cap.kill()
            cap.wait()
        time.sleep(0.05)
        assert topo.peer_stats()["rx_packets"] - before == 1000
        got = [bytes.fromhex(line) for line in out.split()]
        assert len(got) == 1000
        assert got == sent  # one queue, one socket: order kept too
        assert sock.stats()["tx_invalid_descs"] == 0
        # every TX frame comes back through the completion ring
        deadline = time.monotonic() + 2
        while umem.nfree + umem.fill_size < umem.nframes and time.monotonic() < deadline:
            umem.reap_completions()
            time.sleep(0.01)
        assert umem.nfree == umem.nframes - umem.fill_size


def attach_redirect(nic: str, fd: int, native: bool = True):
    """bcc XDP program redirecting queue 0 to XSKMAP slot 0; native mode, else generic."""
    bcc = pytest.importorskip("bcc")
    cflags = os.environ.get("GATEWAY_BPF_CFLAGS", "").split()
    b = bcc.BPF(text=XDP_PROG.encode(), cflags=cflags)
    fn = b.load_func(b"xsk_redirect", bcc.BPF.XDP)
    modes = [bcc.BPF.XDP_FLAGS_DRV_MODE] if native else []
    for flags in [*modes, bcc.BPF.XDP_FLAGS_SKB_MODE]:
        try:
            bcc.BPF.attach_xdp(nic.encode(), fn, flags)
            break
        except Exception:
            if flags == bcc.BPF.XDP_FLAGS_SKB_MODE:
                b.cleanup()
                raise
    b[b"xsks"][ctypes.c_int(0)] = ctypes.c_int(fd)
    return b, flags


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
def test_rx_from_far_host(native):
    if "GATEWAY_BPF_CFLAGS" not in os.environ:
        pytest.skip("kernel header flags for bcc missing: run through ./run.sh test")
    with topology() as topo, Umem() as umem:
        # native XDP on veth wants NIC rx queues >= peer tx queues (one per CPU by default)
        topo.run("ethtool", "-L", topo.peer, "tx", "1", check=False)
        sock = XskSocket(topo.nic, 0, umem, first=True)
        b, flags = attach_redirect(topo.nic, sock.fd, native)
        try:
            sent = frames(topo.nic_mac, topo.peer_mac, 300, b"rx")
            topo.run(sys.executable, "-c", SEND, topo.peer, input="\n".join(f.hex() for f in sent))
            got: list[bytes] = []
            deadline = time.monotonic() + 5
            while len(got) < len(sent) and time.monotonic() < deadline:
                # the far host's own IPv6 chatter is redirected too: keep only ours
                got += [f for f in sock.recv(64, timeout=0.2) if f[12:14] == ETHERTYPE]
            assert got == sent
            st = sock.stats()
            assert st["rx_ring_full"] == st["rx_fill_ring_empty_descs"] == 0
            assert umem.nfree == umem.nframes - umem.fill_size  # frames went back to fill
        finally:
            type(b).remove_xdp(topo.nic.encode(), flags)
            b.cleanup()


def test_shared_sockets_busy_queue_rebind_and_no_leaks():
    fds = open_fds()
    with topology() as topo:
        quiet_nic(topo)
        umem = Umem(nframes=1024, fill_size=256, comp_size=256)
        first = XskSocket(topo.nic, 0, umem, first=True, rx_size=256, tx_size=256)
        second = XskSocket(topo.nic, 0, umem, first=False, rx_size=256, tx_size=256)
        assert first.mode == second.mode == "copy"
        assert first.fd == umem.fd != second.fd  # the first socket IS the umem's fd
        assert set(second.stats()) == set(STATS_KEYS)
        assert all(v == 0 for v in first.stats().values())
        # libxdp left the shared rings alone: still the ones the umem created
        assert umem.fill_ring.producer[0] == 256
        # both sockets transmit through the one completion ring
        before = topo.peer_stats()["rx_packets"]
        assert first.send(frames(topo.peer_mac, topo.nic_mac, 5, b"s1")) == 5
        assert second.send(frames(topo.peer_mac, topo.nic_mac, 7, b"s2")) == 7
        deadline = time.monotonic() + 2
        while topo.peer_stats()["rx_packets"] - before < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert topo.peer_stats()["rx_packets"] - before == 12

        with pytest.raises(ValueError):
            XskSocket(topo.nic, 1, umem, first=False)  # another queue needs its own rings

        other = Umem(nframes=64)
        with pytest.raises(XskError) as ei:
            XskSocket(topo.nic, 0, other, first=True)
        assert ei.value.errno == errno.EBUSY and "EBUSY" in str(ei.value)
        assert "queue already has a UMEM" in str(ei.value)

        second.close()
        umem.close()  # closes `first` too, then the umem: the queue is freed
        assert umem.spent and first.fd == -1
        with pytest.raises(ValueError):
            XskSocket(topo.nic, 0, umem, first=True)

        # `other` survived its failed bind (recreated): it binds once the kernel let go
        t0 = time.monotonic()
        again = XskSocket(topo.nic, 0, other, first=True, busy_wait=3.0)
        waited = time.monotonic() - t0
        assert again.mode == "copy" and waited < 3.0
        other.close()

        with Umem(nframes=64) as lone, pytest.raises(XskError) as ei:
            XskSocket("gwtnosuchdev", 0, lone, first=True)
        assert ei.value.errno == errno.ENODEV and "no such interface" in str(ei.value)
    assert open_fds() == fds
