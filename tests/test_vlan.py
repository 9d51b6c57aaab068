"""Devices on 802.1Q VLANs: the Python test guest ↔ AF_XDP ↔ veth ↔ a far host with
one address on each of VLANs 100 and 200 (gateway/testing/vlanhost.py: this kernel has
no VLAN subinterfaces) and its own untagged stack."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import struct
import subprocess
import sys
import threading

import pytest
from test_offload import ACK, CWR, FIN, PSH, check_segments, l4_ok, ones_sum, pseudo, tcp
from test_offload import ipv4 as ref_ipv4

from gateway.api import Attachment, Gateway, GatewayError
from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing import qemu
from gateway.testing.daemon import Daemon
from gateway.testing.frontend import Frontend
from gateway.testing.guest import ensure_guest, make_initrd, net_up
from gateway.testing.guestnet import GuestHost, ipv4, mac_bytes, parse_arp, parse_ipv4, udp
from gateway.testing.netns import topology
from gateway.testing.vlanhost import FarVlans
from gateway.vhost.transport import VhostService
from gateway.xdp import link
from gateway.xdp.nic import Nic

MAC = "52:54:00:bb:00:01"
MAC2 = "52:54:00:bb:00:02"
BCAST_MAC = "ff:ff:ff:ff:ff:ff"
TIMEOUT = 20
N = 1000

# One UDP socket per far interface (SO_BINDTODEVICE): what the far kernel took in, where.
FAR_LISTEN = """
import select, socket, sys
timeout, want = float(sys.argv[1]), int(sys.argv[2])
socks = {}
for dev in sys.argv[3:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    s.bind(("0.0.0.0", 5000))
    socks[s.fileno()] = (s, dev)
print("ready", flush=True)
p = select.poll()
for fd in socks:
    p.register(fd, select.POLLIN)
n = 0
while n < want:
    ev = p.poll(timeout * 1000)
    if not ev:
        break
    for fd, _ in ev:
        s, dev = socks[fd]
        print(dev, s.recv(4096).decode(), flush=True)
        n += 1
print("end", flush=True)
"""

FAR_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[3].encode())
s.sendto(sys.argv[2].encode(), (sys.argv[1], 5000))
"""


def net(topo, vlan: int) -> str:
    """The subnet of a VLAN (0: the untagged one), e.g. 10.77.100."""
    return f"10.{topo.peer_ip.split('.')[1]}.{vlan}"


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, data: bytes) -> bytes:
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" \
        + ipv4(src_ip, dst_ip, 17, udp(src_ip, dst_ip, 4000, 5000, data))


def udp_data(f: bytes) -> bytes | None:
    p = parse_ipv4(f)
    return p[3][8:] if p is not None and p[2] == 17 else None


def is_udp(dst_ip: str, data: bytes):
    def match(f: bytes) -> bool:
        p = parse_ipv4(f)
        return p is not None and p[1] == dst_ip and p[2] == 17 and p[3][8:] == data
    return match


def collect(host: GuestHost, *want: bytes) -> list[bytes]:
    """Frames the guest received until it has a UDP datagram with each of `want`."""
    got, missing = [], set(want)
    while missing:
        f = host.frames.get(timeout=TIMEOUT)
        got.append(f)
        missing.discard(udp_data(f))
    return got


def drain(host: GuestHost) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(host.frames.get_nowait())
        except queue.Empty:
            return out


@pytest.fixture
def wire(tmp_path):
    with topology() as topo:
        far = FarVlans(topo, {100: f"{net(topo, 100)}.1", 200: f"{net(topo, 200)}.1"})
        nic = Nic(topo.nic)
        service = VhostService().start()
        registry = Registry()
        started: dict[str, threading.Event] = {}
        registry.register_callbacks(on_new_device=lambda d: started[d.name].set())
        ports = []

        def attach(name: str, mac: str, vlan: int):
            port = XdpPort(nic, name, mac, vlan=vlan)
            ports.append(port)
            started[name] = threading.Event()
            dev = registry.create(name, port, max_mtu=port.max_mtu)
            path = str(tmp_path / f"{name}.sock")
            service.listen(dev, path)
            return dev, port, path

        try:
            yield topo, far, attach, started
        finally:
            service.stop()
            for p in ports:
                p.close()
            nic.close()
            far.close()


@contextlib.contextmanager
def guests(wire, specs):
    """GuestHosts for (name, mac, vlan, ip) specs, each on its own connected device."""
    topo, far, attach, started = wire
    with contextlib.ExitStack() as stack:
        hosts = []
        for name, mac, vlan, ip in specs:
            _, _, path = attach(name, mac, vlan)
            fe = stack.enter_context(Frontend(path, queue_size=1024, mem_size=32 << 20))
            fe.connect().setup()
            assert started[name].wait(TIMEOUT)
            host = GuestHost(fe, mac, ip)
            stack.callback(host.stop)
            hosts.append(host)
        yield hosts


def far_popen(topo, script: str, *args) -> subprocess.Popen:
    p = topo.popen(sys.executable, "-c", script, *map(str, args), stdout=subprocess.PIPE,
                   text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def finish(p: subprocess.Popen) -> list[str]:
    try:
        out = p.communicate(timeout=TIMEOUT + 10)[0].splitlines()
    finally:
        p.kill()
    assert out and out[-1] == "end"
    return out[:-1]


def payload(i: int) -> bytes:
    return b"vlan-out %05d " % i + bytes([i % 251]) * (i % 1400)


def test_guest_frames_leave_tagged_and_intact(wire):
    topo, far, attach, started = wire
    dev, port, path = attach("vm100", MAC, 100)
    me, there = f"{net(topo, 100)}.2", f"{net(topo, 100)}.1"
    with Frontend(path, queue_size=1024, mem_size=32 << 20) as fe:
        fe.connect().setup()
        assert started["vm100"].wait(TIMEOUT)
        sent = [udp_frame(MAC, far.mac, me, there, payload(i)) for i in range(N)]
        for i in range(0, N, 250):
            fe.transmit(sent[i:i + 250])
            fe.wait_tx_done(250)
        got = [far.wait("udp", timeout=TIMEOUT) for _ in range(N)]
    # on the wire: each tagged with VID 100 and priority 0, otherwise the guest's bytes
    assert all(e["tci"] == 100 and e["vid"] == 100 for e in got)
    assert [bytes.fromhex(e["frame"]) for e in got] == sent
    assert dev.stats()["tx_packets"] == N


def test_guest_frame_too_big_for_the_tag_is_dropped(wire):
    """The tag needs 4 bytes of the AF_XDP frame: a guest frame that fills the frame
    is dropped and counted, not cut or written past the frame."""
    topo, far, attach, started = wire
    dev, port, path = attach("vm100", MAC, 100)
    me, there = f"{net(topo, 100)}.2", f"{net(topo, 100)}.1"
    with Frontend(path, queue_size=256, mem_size=32 << 20) as fe:
        fe.connect().setup()
        assert started["vm100"].wait(TIMEOUT)
        # 4094 bytes: fits the 4096-byte frame untagged, not with the tag
        big = udp_frame(MAC, far.mac, me, there, b"x")[:14] + bytes(4094 - 14)
        fe.rings[1].add_out([bytes(fe.hdr_len), big[:2048], big[2048:]])  # 2 KiB slots
        fe.transmit([udp_frame(MAC, far.mac, me, there, b"after")])  # kicks for both
        fe.wait_tx_done(2)
        e = far.wait("udp", timeout=TIMEOUT)
    assert bytes.fromhex(e["data"]) == b"after"
    assert dev.stats()["drops"]["tx_too_big"] == 1


def test_far_frames_arrive_untagged_and_intact(wire):
    topo, far, attach, started = wire
    dev, port, path = attach("vm100", MAC, 100)
    me = f"{net(topo, 100)}.2"
    with Frontend(path, queue_size=1024, mem_size=32 << 20) as fe:
        fe.connect().setup()
        assert started["vm100"].wait(TIMEOUT)
        fe.post_rx(N)  # more wait in the socket ring until buffers come back
        far.udp(100, MAC, me, b"vlan-in", count=N)
        got, every = [], []
        while len(got) < N:
            frames = fe.receive(1)
            fe.post_rx(len(frames))
            every += frames
            got += [f for f in frames if (udp_data(f) or b"").startswith(b"vlan-in ")]
    want = [udp_frame(far.mac, MAC, f"{net(topo, 100)}.1", me, b"vlan-in %05d" % i)
            for i in range(N)]
    assert got == want  # untagged, byte for byte
    c = port.stats()
    unicast = [f for f in every if f[:6] == mac_bytes(MAC)]
    assert c["rx_packets"] == len(unicast) == N
    assert c["rx_bytes"] == sum(map(len, unicast))  # counted without the tag
    assert dev.stats()["rx_packets"] == len(every)


def test_arp_and_ping_across_the_vlan(wire):
    topo, far, *_ = wire
    me, there = f"{net(topo, 100)}.2", f"{net(topo, 100)}.1"
    with guests(wire, [("vm100", MAC, 100, me)]) as (host,):
        # guest -> far: the ARP request leaves tagged, the reply comes back untagged
        assert host.resolve(there, timeout=TIMEOUT) == mac_bytes(far.mac)
        for seq in range(3):
            host.ping(there, seq, timeout=TIMEOUT)
        # far -> guest: its ARP broadcast on VLAN 100 reaches the guest through the tap
        for seq in range(3):
            assert far.ping(100, me, seq, timeout=TIMEOUT)["tci"] == 100
        assert far.resolve(100, me, timeout=TIMEOUT) == MAC


def test_same_mac_in_two_vlans_and_untagged_stay_apart(wire):
    """Three guests share one MAC: VLAN 100, VLAN 200, untagged. Each gets only its own
    network's unicast and broadcast; each far network hears only its own guest."""
    topo, far, *_ = wire
    vlans = (100, 200, 0)
    ip = {v: f"{net(topo, v)}.2" for v in vlans}
    specs = [(f"vm{v}", MAC, v, ip[v]) for v in vlans]
    with guests(wire, specs) as hosts:
        host = dict(zip(vlans, hosts, strict=True))
        # each guest resolves and pings its own side of the far host
        for v in vlans:
            there, mac = f"{net(topo, v)}.1", far.mac if v else topo.peer_mac
            assert host[v].resolve(there, timeout=TIMEOUT) == mac_bytes(mac)
            host[v].ping(there, 1, timeout=TIMEOUT)

        def far_send(v: int, unicast: bytes, broadcast: bytes) -> None:
            if v:
                far.udp(v, MAC, ip[v], unicast)
                far.udp(v, BCAST_MAC, f"{net(topo, v)}.255", broadcast)
            else:
                topo.run(sys.executable, "-c", FAR_SEND, ip[0], unicast.decode(), topo.peer)
                topo.run(sys.executable, "-c", FAR_SEND, f"{net(topo, 0)}.255",
                         broadcast.decode(), topo.peer)

        # far -> guests: unicast and broadcast on each network; then a second pair on
        # each, which arrives by the same paths after anything misdelivered from the first
        for tag in (b"unicast", b"fence"):
            for v in vlans:
                far_send(v, b"%s %d" % (tag, v), b"%s-all %d" % (tag, v))
        for v in vlans:
            got = collect(host[v], b"unicast %d" % v, b"unicast-all %d" % v,
                          b"fence %d" % v, b"fence-all %d" % v)
            foreign = [d for f in got if (d := udp_data(f)) and not d.endswith(b" %d" % v)]
            assert foreign == [], v

        # guests -> far: unicast to their far address and a broadcast, each heard on its
        # own network only: the far kernel's untagged stack hears only the untagged guest
        rx = far_popen(topo, FAR_LISTEN, TIMEOUT, 2, topo.peer)
        for v in vlans:
            host[v].send([udp_frame(MAC, far.mac if v else topo.peer_mac, ip[v],
                                    f"{net(topo, v)}.1", b"from %d" % v),
                          udp_frame(MAC, BCAST_MAC, ip[v], "255.255.255.255", b"all %d" % v)])
        for v in (100, 200):
            for data in (b"from %d" % v, b"all %d" % v):
                e = far.wait("udp", lambda e, d=data: bytes.fromhex(e["data"]) == d, TIMEOUT)
                assert e["vid"] == v and e["tci"] == v
        assert sorted(finish(rx)) == [f"{topo.peer} all 0", f"{topo.peer} from 0"]
        # nor did any guest get another's broadcast (the gateway copies those locally)
        for v in vlans:
            got = [udp_data(f) for f in drain(host[v])]
            assert not [d for d in got if d and d.startswith(b"all ")], v


def test_local_frames_stay_in_their_vlan(wire):
    """Guest-to-guest frames skip the wire: the local MAC table is keyed on (VLAN,
    MAC), so a MAC of VLAN 100 is not local to VLAN 200."""
    topo, far, *_ = wire
    a_ip, b_ip, c_ip = (f"{net(topo, 100)}.2", f"{net(topo, 100)}.3", f"{net(topo, 200)}.3")
    specs = [("a100", MAC, 100, a_ip), ("b100", MAC2, 100, b_ip), ("c200", MAC2, 200, c_ip)]
    with guests(wire, specs) as (a, b, c):
        # a finds b (its ARP broadcast copied to VLAN 100's guests only) and pings it
        assert a.resolve(b_ip, timeout=TIMEOUT) == mac_bytes(MAC2)
        for seq in range(3):
            a.ping(b_ip, seq, timeout=TIMEOUT)
        a.send([udp_frame(MAC, MAC2, a_ip, b_ip, b"a to b")])
        b.expect(is_udp(b_ip, b"a to b"))
        assert not [e for e in far.drain() if e["ev"] == "udp"]  # that stayed local
        # c (VLAN 200, b's MAC) sends to a's MAC: not local in VLAN 200, so it goes to
        # the wire tagged 200 (where nobody has that MAC); a never sees it
        c.send([udp_frame(MAC2, MAC, c_ip, a_ip, b"c to a")])
        e = far.wait("udp", lambda e: bytes.fromhex(e["data"]) == b"c to a", TIMEOUT)
        assert e["tci"] == 200
        a.send([udp_frame(MAC, MAC2, a_ip, b_ip, b"a to b again")])
        b.expect(is_udp(b_ip, b"a to b again"))
        assert not [f for f in drain(a) if udp_data(f) == b"c to a"]
        # and c saw nothing of a's: not its ARP, not its frames to b's MAC
        for f in drain(c):
            arp = parse_arp(f)
            assert arp is None or arp[2] != a_ip
            assert (p := parse_ipv4(f)) is None or p[0] != a_ip


def test_8021ad_frames_reach_no_guest(wire):
    """Frames under an 802.1ad (S-VLAN) tag belong to no device, untagged or on the
    VLAN with the same ID: unicast stays with the kernel, the tap floods no copy."""
    topo, far, *_ = wire
    ip0, ip100 = f"{net(topo, 0)}.2", f"{net(topo, 100)}.2"
    with guests(wire, [("vm0", MAC, 0, ip0), ("vm100", MAC, 100, ip100)]) as (g0, g100):
        for dst, ip in ((MAC, ip100), (BCAST_MAC, f"{net(topo, 100)}.255")):
            f = udp_frame(far.mac, dst, f"{net(topo, 100)}.1", ip, b"s-tag")
            far.raw(f[:12] + b"\x88\xa8\x00\x64" + f[12:])
        # fences, after them on the same paths: plain unicast and broadcast on each
        for v, host in ((0, g0), (100, g100)):
            uni = udp_frame(far.mac, MAC, f"{net(topo, v)}.1", f"{net(topo, v)}.2", b"fence")
            bc = udp_frame(far.mac, BCAST_MAC, f"{net(topo, v)}.1", f"{net(topo, v)}.255",
                           b"fence-all")
            if v:
                far.udp(v, MAC, f"{net(topo, v)}.2", b"fence")
                far.udp(v, BCAST_MAC, f"{net(topo, v)}.255", b"fence-all")
            else:
                far.raw(uni)
                far.raw(bc)
            got = collect(host, b"fence", b"fence-all")
            assert not [f for f in got if b"s-tag" in f], v


@pytest.mark.parametrize("vlan", [0, 100], ids=["untagged", "vlan100"])
def test_guest_frames_with_their_own_tag_are_dropped_and_counted(wire, vlan):
    """The gateway assigns VLANs: a guest that tags its frames itself (802.1Q or
    802.1ad) would reach another VLAN of the wire, so those never leave it."""
    topo, far, attach, started = wire
    dev, port, path = attach("vm", MAC, vlan)
    me, there = f"{net(topo, 100)}.2", f"{net(topo, 100)}.1"
    with Frontend(path) as fe:
        fe.connect().setup()
        assert started["vm"].wait(TIMEOUT)
        plain = udp_frame(MAC, far.mac, me, there, b"own tag")
        own = [plain[:12] + tpid + b"\x00\x64" + plain[12:] for tpid in (b"\x81\x00", b"\x88\xa8")]
        # after them, from a VLAN 100 device, one frame the far host takes: the fence
        fence = udp_frame(MAC, far.mac, me, there, b"fence")
        fe.transmit(own + ([fence] if vlan else []))
        fe.wait_tx_done(len(own) + (1 if vlan else 0))
        if vlan:
            assert bytes.fromhex(far.wait("udp", timeout=TIMEOUT)["data"]) == b"fence"
    assert port.stats()["tx_tagged"] == 2
    assert not [e for e in far.drain() if e["ev"] == "udp" and b"own tag" in
                bytes.fromhex(e["data"])]


def test_vlan_attach_refusals_and_mac_sharing(tmp_path):
    with topology() as topo:
        gw = Gateway(str(tmp_path))
        try:
            def att(name, vlan, mac=MAC):
                return gw.attach(Attachment(name=name, iface=topo.nic, mac=mac, vlan=vlan))

            for bad in (-1, 4095, 5000):
                with pytest.raises(GatewayError, match=f"--vlan {bad} is outside 1..4094"):
                    att("x", bad)
            assert att("v100", 100)["vlan"] == 100
            assert att("v200", 200)["vlan"] == 200
            assert att("v0", 0)["vlan"] == 0
            with pytest.raises(GatewayError, match="already used by v100 .in VLAN 100"):
                att("again", 100)
            with pytest.raises(GatewayError, match="already used by v0 .untagged"):
                att("again", 0)
            # one filter entry serves the MAC of all three; it goes with the last
            assert link.fdb_entries(topo.nic) == [MAC]
            gw.detach("v100")
            gw.detach("v0")
            assert link.fdb_entries(topo.nic) == [MAC]
            gw.detach("v200")
            assert link.fdb_entries(topo.nic) == []
        finally:
            gw.shutdown()


def test_cli_vlan_is_listed_saved_and_restored(tmp_path):
    with topology() as topo:
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
        try:
            r = d.cli("attach", "vm0", topo.nic, "--vlan", "4095")
            assert r.returncode == 2 and r.stderr == "gateway: --vlan 4095 is outside 1..4094\n"
            out = d.ok("attach", "vm0", topo.nic, "--mac", MAC, "--vlan", "100")
            assert f"attached to {topo.nic} VLAN 100 as {MAC}" in out
            d.ok("attach", "vm1", topo.nic, "--mac", MAC, "--vlan", "200")
            r = d.cli("attach", "vm2", topo.nic, "--mac", MAC, "--vlan", "200")
            assert r.returncode == 2 and r.stderr.count("\n") == 1
            assert "already used by vm1 (in VLAN 200)" in r.stderr
            assert f"nic {topo.nic}  vlan 100  mac {MAC}" in d.ok("list")
            assert d.stop() == 0
            saved = json.loads((tmp_path / "state" / "attachments.json").read_text())
            assert sorted((s["name"], s["vlan"]) for s in saved) == [("vm0", 100), ("vm1", 200)]
            d.start()
            devs = json.loads(d.ok("list", "--json"))["devices"]
            assert [(x["name"], x["vlan"], x["state"]) for x in devs] == [
                ("vm0", 100, "waiting"), ("vm1", 200, "waiting")]
        finally:
            if d.proc.poll() is None:
                d.stop()


QEMU_SCENARIO = """
ping -c 3 -W 2 {far} >/dev/null && echo "GW-GUEST: ping ok"
sleep 60
"""


@pytest.mark.qemu
@pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-system-x86_64 not installed")
def test_linux_guest_on_a_vlan_pings_and_is_pinged(wire, tmp_path):
    """A real virtio-net driver on VLAN 100: ARP and ping out, the far host's
    ARP broadcast and ping in."""
    topo, far, attach, started = wire
    dev, port, path = attach("vm100", MAC, 100)
    me, there = f"{net(topo, 100)}.2", f"{net(topo, 100)}.1"
    image = ensure_guest()
    initrd = make_initrd(image, net_up(me) + QEMU_SCENARIO.format(far=there),
                         tmp_path / "initrd")
    with qemu.QemuGuest(image.kernel, initrd, nics=[qemu.VhostUserNic(socket=path, mac=MAC)],
                        log_path=tmp_path / "console.log") as vm:
        vm.wait_for(r"GW-GUEST: ping ok", 120)
        for seq in range(3):
            assert far.ping(100, me, seq, timeout=TIMEOUT)["tci"] == 100
    echoes = [e for e in far.drain() if e["ev"] == "echo"]
    assert len(echoes) >= 3 and all(e["tci"] == 100 and e["ip"] == me for e in echoes)
    assert dev.stats()["rx_packets"] >= 6  # 3 echo replies + 3 echo requests, at least


def test_offloads_of_a_vlan_guest_are_done_before_the_tag(wire):
    """A GSO frame from a VLAN guest leaves as MTU-sized segments, each tagged,
    its IP/TCP headers and checksums right (checked with the offload tests'
    reference); a NEEDS_CSUM datagram leaves complete and tagged."""
    topo, far, attach, started = wire
    dev, port, path = attach("vm100", MAC, 100)
    me, there = f"{net(topo, 100)}.2", f"{net(topo, 100)}.1"
    with Frontend(path, queue_size=256, mem_size=32 << 20) as fe:
        fe.connect().setup()
        assert started["vm100"].wait(TIMEOUT)
        data = os.urandom(20000)
        frame = mac_bytes(far.mac) + mac_bytes(MAC) + b"\x08\x00" + ref_ipv4(
            tcp(data, flags=ACK | PSH | FIN | CWR))
        fe.transmit([frame], vnet_hdr=struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0))
        fe.wait_tx_done(1)
        nsegs = -(-len(data) // 1448)
        segs = [far.wait("tcp", timeout=TIMEOUT) for _ in range(nsegs)]
        assert all(e["tci"] == 100 for e in segs)
        check_segments(frame, [bytes.fromhex(e["frame"]) for e in segs], 1448, False)

        u = bytearray(udp(me, there, 4000, 5000, b"partial sum"))
        struct.pack_into("!H", u, 6, ones_sum(pseudo(bytes(map(int, me.split("."))), bytes(
            map(int, there.split("."))), 17, len(u))))
        f = mac_bytes(far.mac) + mac_bytes(MAC) + b"\x08\x00" + ipv4(me, there, 17, bytes(u))
        fe.transmit([f], vnet_hdr=struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 6, 0))
        fe.wait_tx_done(1)
        e = far.wait("udp", timeout=TIMEOUT)
    got = bytes.fromhex(e["frame"])
    assert e["tci"] == 100 and bytes.fromhex(e["data"]) == b"partial sum"
    assert l4_ok(got[26:30], got[30:34], 17, got[34:])
    off = dev.stats()["offload"]
    assert off["tx_gso"] == 1 and off["tx_gso_segs"] == nsegs and off["tx_csum"] == 1
