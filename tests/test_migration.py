"""Live migration of a real Linux guest (QEMU 7.2, TCG) between two QEMUs,
both attached through the gateway on one NIC.

The source device logs every page it writes while QEMU migrates (LOG_SHMFD,
LOG_ALL); the destination device is attached as the source's migration twin
(same MAC, `migrate_from`) and takes the MAC's steering when the VM resumes on
it. A far host streams position-dependent bytes to the guest across the whole
migration: a page the gateway wrote but did not log would reach the
destination stale, and the md5 the guest prints at the end would differ.
The destination is started paused (-S) so its rings can be compared byte for
byte with those the stopped source left before it runs.

The same migration runs with split rings, with packed rings (used descriptors
written into the descriptor ring, logged at their own GPA) and with both
devices on VLAN 100 (the far end behind vlanhost.FarVlanTap).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing import qemu
from gateway.testing.guest import ensure_guest, make_initrd, net_up
from gateway.testing.netns import topology
from gateway.testing.qmp import Qmp
from gateway.testing.vlanhost import FarVlanTap
from gateway.vhost.transport import VhostService
from gateway.virtio.features import Net, Proto
from gateway.virtio.ring import ring_sizes
from gateway.xdp.nic import Nic

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-system-x86_64 not installed"),
]

GUEST_MAC = "52:54:00:12:34:56"
MEMORY_MB = 128  # small: TCG copies it in a few seconds
STREAM_BYTES = 256 * 16384  # what SERVER sends

# The guest connects, then reads nothing until the test types a line on the
# console (after the migration): the stream the far host sends meanwhile sits
# in the guest's TCP receive queue, in the very RX buffer pages the gateway
# wrote (virtio-net keeps payload in them, no copy) -- pages a missing log
# would leave stale on the destination. TCP checksums were checked before the
# migration, so stale bytes would reach md5sum: nothing hides them.
SCENARIO = """
ping {far} &
PING=$!
echo "GW-GUEST: receiving"
echo "GW-GUEST: md5 $(nc {far} 9000 | (read -r go < /dev/console; md5sum) | cut -d' ' -f1)"
kill $PING
"""

# The far host: after a line on stdin, streams seeded pseudo-random bytes
# (every position different, so a stale page cannot pass for a fresh one),
# then closes and prints what it sent.
SERVER = r"""
import hashlib, random, socket, sys
srv = socket.create_server((sys.argv[1], 9000))
print("listening", flush=True)
c, _ = srv.accept()
print("connected", flush=True)
sys.stdin.readline()
rng, h = random.Random(7), hashlib.md5()
for _ in range(256):  # STREAM_BYTES
    data = rng.randbytes(16384)
    c.sendall(data)
    h.update(data)
c.close()
print("sent", 256 * 16384, h.hexdigest(), flush=True)
"""

# Prints the source MAC and VLAN (0: untagged) of the first RARP frame that
# arrives on the far host's wire; the kernel hands the tag over in auxdata.
SNIFFER = r"""
import socket, sys
from gateway.testing.vlanhost import (AUXDATA, ETH_P_ALL, PACKET_AUXDATA, PACKET_OUTGOING,
                                      SOL_PACKET, vlan_of)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
s.bind((sys.argv[1], ETH_P_ALL))
print("sniffing", flush=True)
while True:
    data, anc, _, sll = s.recvmsg(65536, socket.CMSG_SPACE(AUXDATA.size))
    f, tci = vlan_of(data, anc)
    if sll[2] != PACKET_OUTGOING and f[12:14] == b"\x80\x35":
        print("rarp", f[6:12].hex(":"), "vlan", (tci or 0) & 0xFFF, flush=True)
        break
"""


def _line(proc: subprocess.Popen, want: str) -> str:
    """The next stdout line of a far-host helper, which must start with `want`."""
    line = proc.stdout.readline()
    assert line.startswith(want), f"expected {want!r}, got {line!r}"
    return line.strip()


def _wait_until(cond, timeout: float = 60.0) -> None:
    """Poll a device counter: nothing signals when the guest's TCP window fills."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _device(registry: Registry, name: str, port: XdpPort):
    return registry.create(name, port, max_mtu=port.max_mtu)


def _ring_spans(dev) -> list[tuple[int, int]]:
    """(GPA, length) of every part of the device's rings: for packed rings the
    descriptor ring (used descriptors land there) and both event areas."""
    conn = dev.conn
    packed = bool(conn.acked_features >> Net.RING_PACKED & 1)
    spans = []
    for r in conn.rings[:2]:
        for qva, n in zip((r.addr.desc, r.addr.avail, r.addr.used),
                          ring_sizes(r.size, packed), strict=True):
            spans.append((conn.memory.qva_to_gpa(qva, n), n))
    return spans


def _ring_diff(q_src: Qmp, q_dst: Qmp, spans, tmp_path) -> list[int]:
    """GPAs of the ring parts that differ between the stopped source and the
    destination that has not run yet: what the dirty log failed to carry."""
    mem = []
    for q, name in ((q_src, "src.ram"), (q_dst, "dst.ram")):
        q.execute("pmemsave", val=0, size=MEMORY_MB << 20, filename=str(tmp_path / name))
        mem.append((tmp_path / name).read_bytes())
        (tmp_path / name).unlink()
    a, b = mem
    assert len(a) == len(b) == MEMORY_MB << 20
    assert any(a[g:g + n].strip(b"\0") for g, n in spans)  # rings the guest did fill
    return [g for g, n in spans if a[g:g + n] != b[g:g + n]]


@dataclass
class Migrated:
    """What a test checks beyond what every migration must do."""

    features: tuple[int, int]  # negotiated by the source and the destination device
    rarp_vlan: int  # the VLAN the announce was seen on (0: untagged)
    dst_rx_bytes: int  # what reached the guest through the destination device


def _migrate(tmp_path, *, device_opts: str = "", vlan: int = 0) -> Migrated:
    """One guest migrated live while the far host streams to it over TCP.

    `device_opts` go to both QEMUs' virtio-net-pci (e.g. "packed=on"). With
    `vlan`, both devices are on that VLAN and the far end of the stream and
    the pings is the far kernel behind a VLAN tap (vlanhost.FarVlanTap), so
    every frame of it crosses the wire tagged."""
    image = ensure_guest()
    with topology() as topo, contextlib.ExitStack() as stack:
        subnet = topo.peer_ip.split(".")[1]
        ip, far_ip = f"10.{subnet}.{vlan}.2", f"10.{subnet}.{vlan}.1"
        if vlan:
            stack.enter_context(FarVlanTap(topo, vlan, far_ip))
        initrd = make_initrd(image, net_up(ip) + SCENARIO.format(far=far_ip),
                             tmp_path / "initrd")
        server = topo.popen(sys.executable, "-c", SERVER, far_ip, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
        sniffer = topo.popen(sys.executable, "-c", SNIFFER, topo.peer, stdout=subprocess.PIPE,
                             text=True)
        nic = Nic(topo.nic)
        service = VhostService().start()
        registry = Registry()
        ports: list[XdpPort] = []
        try:
            _line(server, "listening")
            _line(sniffer, "sniffing")
            src_port = XdpPort(nic, "src", GUEST_MAC, vlan=vlan)
            ports.append(src_port)
            src = _device(registry, "src", src_port)
            assert src.features >> Net.LOG_ALL & 1
            assert src.protocol_features >> Proto.LOG_SHMFD & 1
            service.listen(src, str(tmp_path / "src.sock"))
            common = dict(nics=[qemu.VhostUserNic(socket=tmp_path / "src.sock", mac=GUEST_MAC,
                                                  device_opts=device_opts)],
                          memory_mb=MEMORY_MB)
            with qemu.QemuGuest(image.kernel, initrd, **common, qmp=tmp_path / "src.qmp",
                                log_path=tmp_path / "src.log") as vm_src:
                vm_src.wait_for(r"GW-GUEST: receiving", 120)
                _line(server, "connected")
                vm_src.wait_for(r"64 bytes from", 30)
                src_features = src.negotiated_features

                # The destination: a twin of the source port, on its own socket.
                dst_port = XdpPort(nic, "dst", GUEST_MAC, migrate_from=src_port, vlan=vlan)
                ports.append(dst_port)
                dst = _device(registry, "dst", dst_port)
                service.listen(dst, str(tmp_path / "dst.sock"))
                dst_common = dict(common, nics=[qemu.VhostUserNic(
                    socket=tmp_path / "dst.sock", mac=GUEST_MAC, device_opts=device_opts)])
                # -S: the destination stays paused once the state is in, so its
                # memory can be compared with the source's before it runs.
                with qemu.QemuGuest(image.kernel, initrd, **dst_common,
                                    qmp=tmp_path / "dst.qmp",
                                    incoming=f"unix:{tmp_path / 'mig.sock'}",
                                    extra_args=["-S"],
                                    log_path=tmp_path / "dst.log") as vm_dst:
                    q_src, q_dst = Qmp(tmp_path / "src.qmp"), Qmp(tmp_path / "dst.qmp")
                    q_dst.execute("query-status")  # dst is up and listening
                    q_src.execute("migrate-set-capabilities", capabilities=[
                        {"capability": "events", "state": True}])
                    # QEMU switches over once the dirty pages left fit in
                    # downtime-limit at the measured bandwidth: 1 ms at <= 8 MiB/s
                    # is 2 pages, fewer than a running guest dirties, so QEMU keeps
                    # iterating until the stream is in and the limits are lifted.
                    q_src.execute("migrate-set-parameters", **{"downtime-limit": 1,
                                                               "max-bandwidth": 8 << 20})
                    q_src.execute("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
                    # Pass 2 begins once every page was copied: what the gateway
                    # writes from now on reaches the destination only if logged.
                    q_src.wait_event("MIGRATION_PASS", lambda d: d["pass"] >= 2, timeout=120)
                    before = src.stats()["rx_bytes"]
                    server.stdin.write("go\n")
                    server.stdin.flush()
                    _wait_until(lambda: src.stats()["rx_bytes"] >= before + (8 << 10))
                    q_src.execute("migrate-set-parameters", **{"downtime-limit": 10_000,
                                                               "max-bandwidth": 1 << 30})
                    ev = q_src.wait_event(
                        "MIGRATION", lambda d: d["status"] in ("completed", "failed",
                                                               "cancelled"), timeout=240)
                    assert ev["data"]["status"] == "completed", vm_src.tail()
                    assert src.stats()["log_miss"] == 0
                    # The rings reached the destination as the source left
                    # them: used entries (for packed rings, used descriptors in
                    # the descriptor ring) and event areas, all logged.
                    diff = _ring_diff(q_src, q_dst, _ring_spans(src), tmp_path)
                    assert diff == [], f"ring parts differ at {[hex(g) for g in diff]}"
                    q_dst.execute("cont")
                    q_dst.wait_event("RESUME", timeout=60)

                    # The announce reached the wire, ping replies come to the
                    # destination, and the MAC is steered there.
                    rarp = _line(sniffer, "rarp").split()
                    assert rarp[1] == GUEST_MAC
                    vm_dst.wait_for(r"64 bytes from", 30)
                    assert dst.running and dst_port.steering and not src_port.steering
                    assert _steered_slot(nic, GUEST_MAC, vlan) == dst_port.slot

                    # The source QEMU goes away and its device is detached; the
                    # guest stays reachable through the destination.
                    q_src.execute("quit")
                    vm_src.wait_exit(30)
                    q_src.close()
                    service.remove("src")
                    registry.remove("src")
                    src_port.close()
                    ports.remove(src_port)
                    assert _steered_slot(nic, GUEST_MAC, vlan) == dst_port.slot
                    vm_dst.wait_for(r"64 bytes from", 30)

                    vm_dst.send("go\n")  # the guest starts reading
                    m = vm_dst.wait_for(r"GW-GUEST: md5 (\w+)", 180)
                    sent = _line(server, "sent").split()
                    assert m.group(1) == sent[2]
                    vm_dst.wait_for(r"GW-GUEST: scenario exit 0", 30)
                    q_dst.close()
                    assert dst.broken_reason is None
                    return Migrated((src_features, dst.negotiated_features), int(rarp[3]),
                                    dst.stats()["rx_bytes"])
        finally:
            service.stop()
            for port in reversed(ports):
                port.close()
            nic.close()
            for p in (server, sniffer):
                p.kill()
                p.wait()


def test_live_migration_keeps_tcp_and_ping_and_moves_the_mac(tmp_path):
    r = _migrate(tmp_path)
    assert not any(f >> Net.RING_PACKED & 1 for f in r.features)
    assert r.rarp_vlan == 0
    assert r.dst_rx_bytes > STREAM_BYTES // 2


def test_live_migration_of_packed_rings_keeps_tcp_and_ping(tmp_path):
    """Packed rings: the device writes used descriptors into the descriptor
    ring itself, so the dirty log must carry those pages (at the ring's GPA)
    and QEMU must move both wrap counters: a used descriptor the destination
    guest does not see stalls its ring for good, and the stream never ends."""
    r = _migrate(tmp_path, device_opts="packed=on")
    assert all(f >> Net.RING_PACKED & 1 for f in r.features), [hex(f) for f in r.features]
    assert r.rarp_vlan == 0
    # The guest read nothing before the migration, so its receive window kept
    # most of the 4 MiB stream for the destination's packed ring to carry.
    assert r.dst_rx_bytes > STREAM_BYTES // 2


def test_live_migration_of_a_vlan_device_keeps_tcp_and_ping(tmp_path):
    """Both devices on VLAN 100: the stream, the pings and the announce cross
    the wire tagged, before and after the switch-over."""
    r = _migrate(tmp_path, vlan=100)
    assert r.rarp_vlan == 100
    assert r.dst_rx_bytes > STREAM_BYTES // 2


def _steered_slot(nic: Nic, mac: str, vlan: int = 0) -> int | None:
    return nic.program.steered_slot(mac, vlan)


def test_attach_migrate_from_refusals_and_the_mac_following_the_running_side(tmp_path):
    from gateway.api import Attachment, Gateway, GatewayError
    from gateway.xdp import link

    with topology() as topo:
        gw = Gateway(str(tmp_path))
        try:
            gw.attach(Attachment("src", topo.nic, GUEST_MAC))
            gw.attach(Attachment("other", topo.nic, "52:54:00:00:00:99"))
            for kw, why in [
                (dict(migrate_from="nope"), "--migrate-from nope: no such attached device"),
                (dict(migrate_from="src", mac="52:54:00:00:00:01"),
                 "src has MAC 52:54:00:12:34:56, not 52:54:00:00:00:01"),
                (dict(migrate_from="src", queues=2), "it has 1 queue pair"),
                (dict(migrate_from="src", iface="lo"), "it is on " + topo.nic + ", not lo"),
                (dict(mac=GUEST_MAC), "MAC 52:54:00:12:34:56 is already used by src"),
            ]:
                a = Attachment("dst", kw.pop("iface", topo.nic), kw.pop("mac", ""), **kw)
                with pytest.raises(GatewayError, match=why):
                    gw.attach(a)
            d = gw.attach(Attachment("dst", topo.nic, "", migrate_from="src"))
            assert d["mac"] == GUEST_MAC and d["migrate_from"] == "src"
            with pytest.raises(GatewayError, match="src: it is already paired with dst"):
                gw.attach(Attachment("dst2", topo.nic, "", migrate_from="src"))

            _, src_port, _ = gw.attached["src"]
            _, dst_port, _ = gw.attached["dst"]
            nic = src_port.nic
            # Until the VM resumes on the destination, its frames stay with the source.
            assert _steered_slot(nic, GUEST_MAC) == src_port.slot
            src_port.set_running(True)
            src_port.set_running(False)  # the source QEMU stops its rings
            assert _steered_slot(nic, GUEST_MAC) == src_port.slot
            dst_port.set_running(True)  # what the destination device does when it starts
            assert _steered_slot(nic, GUEST_MAC) == dst_port.slot
            src_port.set_running(False)  # a late stop of the source changes nothing
            assert _steered_slot(nic, GUEST_MAC) == dst_port.slot
            # Detaching the source leaves the MAC filter and steering with the destination.
            gw.detach("src")
            assert _steered_slot(nic, GUEST_MAC) == dst_port.slot
            assert GUEST_MAC in link.fdb_entries(topo.nic)
            assert gw.describe("dst")["migrate_from"] == ""
            gw.detach("dst")
            assert GUEST_MAC not in link.fdb_entries(topo.nic)

            # The other way round: the destination given up before it ran (a
            # failed migration) leaves the source as it was.
            gw.attach(Attachment("src", topo.nic, GUEST_MAC))
            gw.attach(Attachment("dst", topo.nic, "", migrate_from="src"))
            _, src_port, _ = gw.attached["src"]
            gw.detach("dst")
            assert _steered_slot(src_port.nic, GUEST_MAC) == src_port.slot
            assert GUEST_MAC in link.fdb_entries(topo.nic)
        finally:
            gw.shutdown()
