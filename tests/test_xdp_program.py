"""The XDP program (bpf/gateway_xdp.c), its loader (gateway/xdp/program.py) and link.py.

A veth pair plays the NIC (gateway.testing.netns.topology). The far host sends raw frames
through an AF_PACKET socket (a child `python3` in its namespace); an AF_PACKET socket on the
NIC counts what XDP handed to the kernel. One compiled program serves most tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from pyroute2 import IPRoute

from gateway.testing.netns import topology
from gateway.xdp import link
from gateway.xdp.link import LinkError
from gateway.xdp.program import (
    COUNTERS,
    XdpError,
    XdpProgram,
    import_bcc,
    mac_key,
    prog_info,
)

ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else on the wire uses it

# Far host: send COUNT frames of SIZE bytes (Ethernet header included) to DST from IFACE.
SENDER = textwrap.dedent("""
    import socket, sys
    iface, dst, count, size, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5].encode()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    src = s.getsockname()[4]
    hdr = bytes.fromhex(dst.replace(":", "")) + src + (0x88B5).to_bytes(2, "big")
    body = (tag + b"." * size)[: size - len(hdr)]
    for _ in range(count):
        s.send(hdr + body)
""")

# Far host: one ICMP echo to sys.argv[1] through the host stack; exit 0 on a reply.
PINGER = textwrap.dedent("""
    import socket, struct, sys, time
    def csum(b):
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        s = (s >> 16) + (s & 0xFFFF); s += s >> 16
        return ~s & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(0.5)
    for seq in range(1, 11):
        msg = struct.pack("!BBHHH", 8, 0, 0, 0x4777, seq) + b"gateway-ping"
        msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
        s.sendto(msg, (sys.argv[1], 0))
        try:
            while True:
                data, _ = s.recvfrom(2048)
                icmp = data[(data[0] & 15) * 4:]
                if icmp[0] == 0 and icmp[4:8] == struct.pack("!HH", 0x4777, seq):
                    sys.exit(0)
        except socket.timeout:
            continue
    sys.exit(1)
""")


def _skip_without_bcc():
    try:
        import_bcc()
    except XdpError as e:
        pytest.skip(str(e))


class Tap:
    """AF_PACKET socket on the NIC: the frames of our test ethertype the kernel received."""

    def __init__(self, ifname: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        self.sock.bind((ifname, ETHERTYPE))
        self.sock.setblocking(False)

    def drain(self, *tags: bytes, settle: float = 0.2) -> int | list[int]:
        """How many frames carrying each tag arrived (one int for one tag)."""
        n, deadline = [0] * len(tags), time.monotonic() + settle
        while time.monotonic() < deadline:
            try:
                frame = self.sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            for i, tag in enumerate(tags):
                n[i] += frame[14:14 + len(tag)] == tag
        return n[0] if len(tags) == 1 else n

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def env():
    _skip_without_bcc()
    with topology(queues=2) as topo:
        nic_ip = topo.peer_ip.rsplit(".", 1)[0] + ".2"
        with IPRoute() as ipr:
            ipr.addr("add", index=topo.nic_index, address=nic_ip, prefixlen=topo.prefix_len)
        t0 = time.monotonic()
        prog = XdpProgram(topo.nic, max_devices=8, max_queues=4)
        compile_s = time.monotonic() - t0
        try:
            prog.attach()
            yield topo, prog, nic_ip, compile_s
        finally:
            prog.close()


def send(topo, dst: str, count: int, size: int, tag: str) -> None:
    topo.run(sys.executable, "-c", SENDER, topo.peer, dst, str(count), str(size), tag)


@contextlib.contextmanager
def tapped(topo):
    tap = Tap(topo.nic)
    try:
        yield tap
    finally:
        tap.close()


def test_attach_mode_and_compile_time(env):
    topo, prog, _, compile_s = env
    assert prog.mode in ("native", "generic")
    assert link.xdp_state(topo.nic) == (prog.prog_id, prog.mode)
    info = prog_info(prog.prog_id)
    assert info["name"] == "gateway_xdp"
    assert compile_s < 15


def test_host_stack_keeps_working(env):
    topo, prog, nic_ip, _ = env
    before = prog.global_counters()
    r = topo.run(sys.executable, "-c", PINGER, nic_ip, check=False)
    assert r.returncode == 0, r.stderr
    after = prog.global_counters()
    assert after["passed"] > before["passed"]  # echo requests to the NIC's own MAC


def test_unknown_unicast_is_passed(env):
    topo, prog, _, _ = env
    before = prog.global_counters()
    with tapped(topo) as tap:
        send(topo, "02:00:00:00:99:01", 7, 100, "unknown")
        assert tap.drain(b"unknown") == 7
    assert prog.global_counters()["passed"] - before["passed"] >= 7


def test_broadcast_and_multicast_are_passed(env):
    topo, prog, _, _ = env
    before = prog.global_counters()
    with tapped(topo) as tap:
        send(topo, "ff:ff:ff:ff:ff:ff", 5, 80, "bcast")
        send(topo, "01:00:5e:01:02:03", 3, 80, "mcast")
        assert tap.drain(b"bcast", b"mcast") == [5, 3]
    after = prog.global_counters()
    assert after["broadcast"] - before["broadcast"] >= 5
    assert after["multicast"] - before["multicast"] >= 3


def test_registered_mac_without_socket(env):
    topo, prog, _, _ = env
    mac = "02:00:00:00:00:01"
    prog.set_device(1, mac, max_frame=1514, running=True)
    try:
        with tapped(topo) as tap:
            send(topo, mac, 9, 120, "nosock")
            assert tap.drain(b"nosock") == 0  # dropped in XDP, not passed
        c = prog.counters(1)
        assert c == {**dict.fromkeys(COUNTERS, 0), "drop_no_socket": 9}
    finally:
        prog.remove_device(1, mac)
    assert prog.counters(1) == dict.fromkeys(COUNTERS, 0)


def test_stopped_device(env):
    topo, prog, _, _ = env
    mac = "02:00:00:00:00:02"
    prog.set_device(2, mac, max_frame=1514, running=False)
    try:
        send(topo, mac, 4, 60, "stopped")
        assert prog.counters(2)["drop_stopped"] == 4
        assert prog.counters(2)["drop_no_socket"] == 0
        prog.set_device(2, mac, max_frame=1514, running=True)  # start: now no socket
        send(topo, mac, 2, 60, "started")
        assert prog.counters(2)["drop_stopped"] == 4
        assert prog.counters(2)["drop_no_socket"] == 2
    finally:
        prog.remove_device(2, mac)


def test_too_big(env):
    topo, prog, _, _ = env
    mac = "02:00:00:00:00:03"
    prog.set_device(3, mac, max_frame=500, running=True)
    try:
        send(topo, mac, 3, 501, "big")
        send(topo, mac, 2, 500, "fits")  # exactly max_frame: passes the size check
        c = prog.counters(3)
        assert c["drop_too_big"] == 3
        assert c["drop_no_socket"] == 2
    finally:
        prog.remove_device(3, mac)


SOL_XDP, AF_XDP = 283, 44
_libc = ctypes.CDLL(None, use_errno=True)


def bare_xsk(ifindex: int, queue: int) -> tuple[socket.socket, mmap.mmap]:
    """A minimal AF_XDP socket (copy mode, own UMEM, rings never mapped): enough to sit in
    the XSKMAP; every frame redirected to it is dropped for an empty fill ring and counted
    in its XDP_STATISTICS rx_dropped."""
    s = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
    umem = mmap.mmap(-1, 64 * 2048)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(umem))
    # struct xdp_umem_reg: addr, len, chunk_size, headroom, flags, tx_metadata_len
    s.setsockopt(SOL_XDP, 4, struct.pack("=QQIIII", addr, len(umem), 2048, 0, 0, 0))
    for opt in (5, 6, 2):  # XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING
        s.setsockopt(SOL_XDP, opt, struct.pack("=I", 64))
    sa = struct.pack("=HHIII", AF_XDP, 1 << 1, ifindex, queue, 0)  # XDP_COPY
    if _libc.bind(s.fileno(), sa, len(sa)) < 0:
        err = ctypes.get_errno()
        s.close()
        raise OSError(err, os.strerror(err))
    return s, umem


def xsk_rx_dropped(s: socket.socket) -> int:
    return struct.unpack("=6Q", s.getsockopt(SOL_XDP, 7, 48))[0]  # XDP_STATISTICS


def test_redirect_to_sockets_on_every_queue(env):
    topo, prog, _, _ = env
    mac = "02:00:00:00:00:07"
    socks = [bare_xsk(topo.nic_index, q) for q in range(2)]  # topology(queues=2)
    try:
        prog.set_device(7, mac, max_frame=1514, running=True)
        for q, (s, _) in enumerate(socks):
            prog.set_socket(7, q, s.fileno())
        with tapped(topo) as tap:
            send(topo, mac, 10, 100, "xsk")
            assert tap.drain(b"xsk") == 0  # redirected, not passed
        assert prog.counters(7) == {**dict.fromkeys(COUNTERS, 0),
                                    "rx_packets": 10, "rx_bytes": 1000}
        assert sum(xsk_rx_dropped(s) for s, _ in socks) == 10  # they did reach the sockets
        for q in range(2):
            prog.clear_socket(7, q)
        send(topo, mac, 3, 100, "xsk")
        assert prog.counters(7)["drop_no_socket"] == 3
        assert prog.counters(7)["rx_packets"] == 10
    finally:
        prog.remove_device(7, mac)
        for s, umem in socks:
            s.close()
            umem.close()


def test_map_argument_checks(env):
    _, prog, _, _ = env
    with pytest.raises(ValueError):
        prog.set_device(8, "02:00:00:00:00:04", 1514, True)  # max_devices=8
    with pytest.raises(ValueError):
        prog.set_device(0, "01:00:5e:00:00:01", 1514, True)  # multicast
    with pytest.raises(ValueError):
        prog.set_socket(0, 4, 0)  # max_queues=4
    prog.set_device(4, "02:00:00:00:00:04", 1514, True)
    try:
        with pytest.raises(XdpError, match="slot 4"):
            prog.set_device(5, "02:00:00:00:00:04", 1514, True)
        with pytest.raises(XdpError, match="AF_XDP"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                prog.set_socket(4, 0, s.fileno())
        prog.clear_socket(4, 0)  # empty: fine
    finally:
        prog.remove_device(4, "02:00:00:00:00:04")
    assert mac_key("00:11:22:33:44:aa") == 0x00112233_44AA


# ------------------------------------------------------------------ ownership of the NIC

FOREIGN = b"int foreign_xdp(struct xdp_md *ctx) { return XDP_PASS; }"


def test_foreign_program_is_refused_and_stale_own_replaced():
    _skip_without_bcc()
    from gateway.xdp.program import find_kernel_headers

    bcc = import_bcc()
    src, cflags = find_kernel_headers()
    os.environ["BCC_KERNEL_SOURCE"] = src
    with topology() as topo:
        foreign = bcc.BPF(text=FOREIGN, cflags=cflags)
        fn = foreign.load_func(b"foreign_xdp", bcc.BPF.XDP)
        bcc.BPF.attach_xdp(topo.nic.encode(), fn, 2)  # generic
        fid, _ = link.xdp_state(topo.nic)
        prog = XdpProgram(topo.nic, max_devices=2, max_queues=1)
        try:
            with pytest.raises(XdpError) as ei:
                prog.attach()
            assert str(ei.value) == (
                f"{topo.nic} already has an XDP program (id {fid}) that is not gateway's: "
                f"detach it first (ip link set dev {topo.nic} xdp off)")
            assert link.xdp_state(topo.nic)[0] == fid  # untouched
            bcc.BPF.remove_xdp(topo.nic.encode(), 2)
            foreign.cleanup()

            # a gateway that crashed: attached, then died without detaching
            code = (f"import os; from gateway.xdp.program import XdpProgram; "
                    f"p = XdpProgram({topo.nic!r}, max_devices=2, max_queues=1); p.attach(); "
                    f"print(p.prog_id, flush=True); os._exit(0)")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, timeout=60)
            stale = int(r.stdout.split()[-1])
            assert link.xdp_state(topo.nic)[0] == stale
            prog.attach()
            assert prog.replaced == stale
            assert link.xdp_state(topo.nic) == (prog.prog_id, prog.mode)
            assert prog_info(stale) is None  # the stale program and its maps are gone

            # a second instance in this process replaces the first one too
            with XdpProgram(topo.nic, max_devices=2, max_queues=1) as second:
                second.attach()
                assert second.replaced == prog.prog_id
                prog.detach()  # not on the NIC any more: must leave `second` alone
                assert link.xdp_state(topo.nic)[0] == second.prog_id
            assert link.xdp_state(topo.nic) == (None, None)
        finally:
            prog.close()
        assert link.xdp_state(topo.nic) == (None, None)


def test_detach_leaves_no_program():
    _skip_without_bcc()
    with topology() as topo:
        with XdpProgram(topo.nic, max_devices=2, max_queues=1) as prog:
            mode = prog.attach()
            assert link.xdp_state(topo.nic) == (prog.prog_id, mode)
            prog.detach()
            assert link.xdp_state(topo.nic) == (None, None)
            assert prog.attach() == mode  # attach again after detach works
        assert link.xdp_state(topo.nic) == (None, None)


# ------------------------------------------------------------------ link.py


def test_resolve_matches_the_veth():
    with topology(queues=2) as topo:
        info = link.resolve(topo.nic)
        assert (info.name, info.index, info.mac) == (topo.nic, topo.nic_index, topo.nic_mac)
        assert (info.mtu, info.state, info.rx_queues, info.tx_queues) == (1500, "up", 2, 2)
        with IPRoute() as ipr:
            ipr.link("set", index=topo.nic_index, state="down")
        with pytest.raises(LinkError, match="is down"):
            link.resolve(topo.nic)
        assert link.resolve(topo.nic, require_up=False).state == "down"
    with pytest.raises(LinkError, match="no network interface named 'gwtmissing0'"):
        link.resolve("gwtmissing0")


def _promisc(ifname: str) -> bool:
    with IPRoute() as ipr:
        (msg,) = ipr.get_links(ifname=ifname)
        return bool(msg["flags"] & 0x100)


def test_mac_filter_fdb_and_promisc_fallback(monkeypatch):
    with topology() as topo:
        before = link.fdb_entries(topo.nic)
        how = link.add_mac_filter(topo.nic, "02:00:00:00:AA:01")
        assert how == "fdb"  # veth takes unicast filter entries (dev_uc_add_excl)
        assert "02:00:00:00:aa:01" in link.fdb_entries(topo.nic)
        with pytest.raises(LinkError, match="already has"):
            link.add_mac_filter(topo.nic, "02:00:00:00:aa:01")
        link.remove_mac_filter(topo.nic, "02:00:00:00:aa:01", how)
        link.remove_mac_filter(topo.nic, "02:00:00:00:aa:01", how)  # idempotent
        assert link.fdb_entries(topo.nic) == before

        # a driver without unicast filtering: promisc, refcounted over two MACs
        import errno

        from pyroute2.netlink.exceptions import NetlinkError

        def no_fdb(ipr, command, index, mac):
            raise NetlinkError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(link, "_fdb", no_fdb)
        assert not _promisc(topo.nic)
        assert link.add_mac_filter(topo.nic, "02:00:00:00:aa:02") == "promisc"
        assert link.add_mac_filter(topo.nic, "02:00:00:00:aa:03") == "promisc"
        assert _promisc(topo.nic)
        link.remove_mac_filter(topo.nic, "02:00:00:00:aa:02", "promisc")
        assert _promisc(topo.nic)  # still needed by aa:03
        link.remove_mac_filter(topo.nic, "02:00:00:00:aa:03", "promisc")
        assert not _promisc(topo.nic)

        # promisc that someone else switched on stays on
        with IPRoute() as ipr:
            ipr.link("set", index=topo.nic_index, flags=0x100, change=0x100)
        assert link.add_mac_filter(topo.nic, "02:00:00:00:aa:04") == "promisc"
        link.remove_mac_filter(topo.nic, "02:00:00:00:aa:04", "promisc")
        assert _promisc(topo.nic)


def test_check_mtu():
    info = link.LinkInfo("gwtx", 1, "02:00:00:00:00:01", 1500, "up", 1, 1)
    assert link.check_mtu(info, 1500, 2048) == 1514
    with pytest.raises(LinkError, match="larger than the NIC MTU of gwtx \\(1500\\)"):
        link.check_mtu(info, 1600, 4096)
    big = link.LinkInfo("gwtx", 1, "02:00:00:00:00:01", 9000, "up", 1, 1)
    with pytest.raises(LinkError, match="AF_XDP frame can carry: frame size 2048 minus 256 "
                                        "headroom minus 14 Ethernet header = 1778"):
        link.check_mtu(big, 1800, 2048)
    assert link.check_mtu(big, 1778, 2048) == 1792


def test_missing_headers_and_bcc_messages(monkeypatch):
    from gateway.xdp import _compile, program

    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.delenv("GATEWAY_BPF_CFLAGS", raising=False)
    monkeypatch.setattr(_compile.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(_compile.platform, "machine", lambda: "x86_64")
    with pytest.raises(XdpError, match="^kernel headers for bcc not found: "
                                       "apt-get install linux-headers-amd64$"):
        program.find_kernel_headers()
    monkeypatch.setitem(sys.modules, "bcc", None)
    monkeypatch.setattr(_compile, "DEBIAN_BCC", "/nonexistent/bcc")
    with pytest.raises(XdpError, match="apt-get install python3-bpfcc"):
        import_bcc()
    with pytest.raises(XdpError, match="apt-get install python3-bpfcc"):
        program.bcc_available()  # the daemon's check, which imports nothing
