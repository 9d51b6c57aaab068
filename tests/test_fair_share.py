"""A fair share of each NIC queue's shared UMEM per device (issue 12).

Every device's socket on a NIC queue lives on that queue's one UMEM. A guest
that posts no RX buffers leaves its frames in its socket's RX ring: without a
share, two such guests pin every frame of the queue and nobody on the NIC
receives or sends. The XDP program stops redirecting to a socket that holds
its share (drop_over_share), so the others go on.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

from gateway._native import ffi, lib
from test_ring import Env

from gateway.datapath.xdp_port import XdpPort
from gateway.registry import Registry
from gateway.testing.frontend import Frontend, FrontendError
from gateway.testing.netns import topology
from gateway.testing.wait import until
from gateway.vhost.transport import VhostService
from gateway.xdp.nic import NFRAMES, Nic

HEALTHY = "52:54:00:fa:00:01"
STALLED = ("52:54:00:fa:00:02", "52:54:00:fa:00:03")
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental: nothing else sends it
FLOOD = 2100  # > the 2048-slot RX ring: without a share two guests pin all 4096 frames
BATCH = 250
BATCHES = 4
DEADLINE = 30

# Far host: `n` raw frames to each MAC given as MAC=n, numbered per MAC.
RAW_SENDER = """
import socket, sys
ifname, src = sys.argv[1], bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
for spec in sys.argv[3:]:
    mac, n = spec.split("=")
    for i in range(int(n)):
        s.send(bytes.fromhex(mac) + src + b"\\x88\\xb5" + b"%08d" % i + bytes(50))
"""

# Far host: count frames of our EtherType from `src` until `n` or a quiet `timeout`.
RAW_RECEIVER = """
import socket, sys
ifname, src = sys.argv[1], bytes.fromhex(sys.argv[2])
n, timeout = int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((ifname, 0))
s.settimeout(timeout)
print("ready", flush=True)
got = set()
try:
    while len(got) < n:
        f = s.recv(2048)
        if f[6:12] == src:
            got.add(f[14:22])
except socket.timeout:
    pass
print(len(got), flush=True)
"""


def hexmac(mac: str) -> str:
    return mac.replace(":", "")


def send_from_far(topo, **per_mac: int) -> None:
    topo.run(sys.executable, "-c", RAW_SENDER, topo.peer, hexmac(topo.peer_mac),
             *(f"{hexmac(m)}={n}" for m, n in per_mac.items()))


def wait_for(cond, what: str) -> None:
    until(cond, what, DEADLINE)


def ours(frames: list[bytes], peer_mac: str) -> list[bytes]:
    src = bytes.fromhex(hexmac(peer_mac))
    return [f for f in frames if f[6:12] == src and f[12:14] == ETHERTYPE]


def test_two_stalled_guests_leave_a_healthy_one_its_rx_and_tx(tmp_path):
    with topology() as topo:
        nic = Nic(topo.nic)
        service = VhostService().start()
        ports = []
        try:
            healthy = XdpPort(nic, "ok", HEALTHY)
            ports.append(healthy)
            for i, mac in enumerate(STALLED):
                p = XdpPort(nic, f"stalled{i}", mac)
                ports.append(p)
                p.set_running(True)  # steered to, but no worker ever reads its socket
            share = nic.program.share
            assert share < FLOOD
            dev = Registry().create("ok", healthy, max_mtu=healthy.max_mtu)
            path = str(tmp_path / "ok.sock")
            service.listen(dev, path)
            with Frontend(path, queue_size=1024, mem_size=32 << 20) as fe:
                fe.connect().setup()
                fe.timeout = 0.5
                # The two stalled guests: each gets exactly its share, the rest is
                # dropped by the XDP program and counted.
                send_from_far(topo, **{m: FLOOD for m in STALLED})
                stalled = ports[1:]

                def flood_seen():
                    return all(c["rx_packets"] + c["drop_over_share"] >= FLOOD
                               for c in (nic.program.counters(p.slot) for p in stalled))

                wait_for(flood_seen, "the flood to reach the XDP program")
                # The healthy guest receives every frame sent to it.
                got: list[bytes] = []
                fe.post_rx(BATCH)  # reposted as frames come (broadcasts take some too)
                for b in range(BATCHES):
                    send_from_far(topo, **{HEALTHY: BATCH})
                    deadline = time.monotonic() + DEADLINE
                    want = (b + 1) * BATCH
                    while len(got) < want and time.monotonic() < deadline:
                        with contextlib.suppress(FrontendError):
                            raw = fe.receive(1)
                            fe.post_rx(len(raw))
                            got += ours(raw, topo.peer_mac)
                    assert len(got) == want
                # ... and sends: the far host counts every frame.
                rx = topo.popen(sys.executable, "-c", RAW_RECEIVER, topo.peer, hexmac(HEALTHY),
                                str(BATCH), "5", stdout=subprocess.PIPE, text=True)
                try:
                    assert rx.stdout.readline().strip() == "ready"
                    frames = [bytes.fromhex(hexmac(topo.peer_mac)) + bytes.fromhex(hexmac(HEALTHY))
                              + ETHERTYPE + b"%08d" % i + bytes(50) for i in range(BATCH)]
                    fe.transmit(frames)
                    fe.wait_tx_done(BATCH)
                    far_got = int(rx.stdout.readline())
                finally:
                    rx.kill()
                    rx.wait()
                counters = [nic.program.counters(p.slot) for p in stalled]
                held = [nic.program.held_count(p.slot, 0) for p in stalled]
                hstats = healthy.stats()
        finally:
            service.stop()
            for p in ports:
                p.close()
            nic.close()
    assert sorted(f[14:22] for f in got) == sorted(
        b"%08d" % i for i in range(BATCH) for _ in range(BATCHES))
    assert far_got == BATCH
    for c, h in zip(counters, held, strict=True):
        assert (c["rx_packets"], c["drop_over_share"]) == (share, FLOOD - share)
        assert h == share  # nobody consumed them
    assert hstats["drop_over_share"] == 0
    assert hstats["rx_packets"] == BATCH * BATCHES


def frames_free(port: XdpPort) -> int:
    """Frames of queue 0's UMEM in the pool or lent on the fill ring (not in any RX ring)."""
    u = port.sockets[0][0].native
    fill = u.fill
    return u.npool[0] + ((fill.producer[0] - fill.consumer[0]) & 0xFFFFFFFF)


def test_closing_a_device_gives_its_rx_backlog_back_to_the_pool():
    with topology() as topo:
        nic = Nic(topo.nic)
        keeper = stalled = None
        try:
            keeper = XdpPort(nic, "keeper", HEALTHY)  # keeps the queue's UMEM alive
            stalled = XdpPort(nic, "stalled", STALLED[0])
            stalled.set_running(True)
            start = frames_free(keeper)
            assert start == NFRAMES  # nothing held, nothing sent
            n = 500
            send_from_far(topo, **{STALLED[0]: n})
            wait_for(lambda: nic.program.counters(stalled.slot)["rx_packets"] >= n, "the backlog")
            backlog = frames_free(keeper)
            held = nic.program.held_count(stalled.slot, 0)
            slot = stalled.slot
            stalled.close()
            stalled = None
            after = frames_free(keeper)
            held_after = nic.program.held_count(slot, 0)
        finally:
            for p in (stalled, keeper):
                if p is not None:
                    p.close()
            nic.close()
    assert (backlog, held) == (start - n, n)
    assert (after, held_after) == (start, 0)


# --- RX descriptors the kernel should never write -----------------------------------
#
# gw_xsk_to_guest over a fake socket RX ring in memory this test owns: the kernel
# never writes a descriptor outside the UMEM, so only a fake ring can show what the
# burst does with one. It must not deliver it, nor give any frame back for it: its
# frame is unknown, and the old code's "frame 0" already had an owner.

FS = 4096      # UMEM frame size
NFR = 8        # UMEM frames
RING = 8       # fake RX ring slots


class FakeUmem:
    """A gw_umemq over memory of ours, with an RX ring we write as the kernel would."""

    def __init__(self):
        self.ffi = ffi
        self.area = ffi.new("uint8_t[]", NFR * FS)
        self.pool = ffi.new("__u64[]", NFR)
        self.npool = ffi.new("unsigned *", 0)
        self.idx = ffi.new("__u32[8]")  # producer/consumer of rx, fill, comp, a TX ring
        self.descs = ffi.new("struct xdp_desc[]", RING)
        self.fill_ring = ffi.new("uint64_t[]", RING)
        self.comp_ring = ffi.new("uint64_t[]", RING)
        self.flags = ffi.new("__u32[4]")
        self.rx = self._ring("struct xsk_ring_cons *", 0, self.descs)
        self.fill = self._ring("struct xsk_ring_prod *", 2, self.fill_ring)
        self.fill.cached_cons = RING  # libxdp's start for a producer ring: all free
        self.comp = self._ring("struct xsk_ring_cons *", 4, self.comp_ring)
        u = self.u = ffi.new("struct gw_umemq *")
        u.area, u.frame_size, u.mask = self.area, FS, ~(FS - 1) & (2**64 - 1)
        u.fill, u.comp, u.pool, u.npool = self.fill, self.comp, self.pool, self.npool
        u.nframes, u.fill_target, u.fd = NFR, 0, -1  # fill ring left alone
        self.held = ffi.new("uint64_t *", 0)

    def _ring(self, ctype, i, ring):
        r = self.ffi.new(ctype)
        r.mask, r.size = RING - 1, RING
        r.producer, r.consumer = self.idx + i, self.idx + i + 1
        r.ring, r.flags = ring, self.flags + i // 2
        return r

    def produce(self, *descs: tuple[int, int], data: dict[int, bytes] | None = None):
        """The kernel's side: descriptors (addr, len) onto the RX ring, each counted
        as held by the XDP program's redirect."""
        for addr, length in descs:
            d = self.descs[self.idx[0] % RING]
            d.addr, d.len = addr, length
            self.idx[0] += 1
            self.held[0] += 1
        for addr, b in (data or {}).items():
            self.ffi.memmove(self.area + addr, b, len(b))

    def pooled(self) -> list[int]:
        return sorted(self.pool[i] for i in range(self.npool[0]))


def test_rx_descriptor_outside_the_umem_is_skipped_counted_and_never_pooled():
    env = Env(hdr_len=12)
    fu = FakeUmem()
    a, b = b"A" * 60, b"B" * 70
    fu.produce((1 * FS, len(a)),
               (NFR * FS + 64, 60),   # past the UMEM's last frame
               (2 * FS + 4000, 200),  # runs over the end of frame 2
               (3 * FS + 256, len(b)),
               data={1 * FS: a, 3 * FS + 256: b})
    env.drv.add_in()  # the guest has one buffer
    assert lib.gw_xsk_to_guest(env.vq.native, fu.u, fu.rx, 32, fu.held, ffi.NULL) == 1
    # consumed: A and the two bad ones behind it; B waits for a buffer
    assert (fu.idx[1], fu.held[0], fu.u.rx_bad_desc) == (3, 1, 2)
    assert fu.pooled() == [1 * FS]
    env.drv.add_in()
    env.drv.add_in()
    assert lib.gw_xsk_to_guest(env.vq.native, fu.u, fu.rx, 32, fu.held, ffi.NULL) == 1
    assert (fu.idx[1], fu.held[0], fu.u.rx_bad_desc) == (4, 0, 2)  # not counted twice
    assert fu.pooled() == [1 * FS, 3 * FS]  # frame 0 and frame 2 have other owners
    got = [env.drv.read_in(h, n)[12:] for h, n in env.drv.poll_used()]
    assert got == [a, b]  # nothing for the bad descriptors, not even an empty frame
    assert env.vq.stats["packets"] == 2

    # A closing socket's drain skips them the same way.
    fu.produce((NFR * FS, 60), (5 * FS, 60))
    assert lib.gw_xsk_rx_drain(fu.u, fu.rx) == 2
    assert fu.u.rx_bad_desc == 3
    assert fu.pooled() == [1 * FS, 3 * FS, 5 * FS]


def test_capture_holds_what_reached_the_guest_not_what_it_had_no_room_for():
    """A frame the guest's buffers cannot hold (no MRG_RXBUF) is dropped as too
    big after the socket handed it over: `gateway capture` shows the guest's
    side, so the capture must not hold it."""
    from gateway.capture import Layout, Rings

    env = Env(hdr_len=12)  # no MRG_RXBUF: a frame must fit one chain
    fu = FakeUmem()
    a, big, b = b"A" * 60, b"X" * 3000, b"B" * 70
    fu.produce((1 * FS, len(a)), (2 * FS, len(big)), (3 * FS, len(b)),
               data={1 * FS: a, 2 * FS: big, 3 * FS: b})
    for _ in range(3):
        env.drv.add_in()
    rings = Rings(Layout(1, lib.GW_CAP_MIN_RING), snaplen=65535, dirs=lib.GW_CAP_RX)
    local = ffi.new("struct gw_local *")
    try:
        lib.gw_cap_hook(local, rings.caps[0])
        assert lib.gw_xsk_to_guest(env.vq.native, fu.u, fu.rx, 32, fu.held, local) == 3
        lib.gw_cap_hook(local, ffi.NULL)
        assert env.vq.stats["drop_too_big"] == 1
        assert [env.drv.read_in(h, n)[12:] for h, n in env.drv.poll_used()] == [a, b]
        cap = rings.caps[0]
        assert (cap.frames, cap.dropped, cap.sh.frames) == (2, 0, 2)
        got, pos = [], 0
        while pos < cap.head:
            rec = ffi.cast("struct gw_cap_rec *", cap.data + pos)
            got.append(bytes(ffi.buffer(ffi.cast("uint8_t *", rec + 1), rec.caplen)))
            pos += rec.reclen
        assert got == [a, b]
    finally:
        rings.close()


def test_closing_a_device_gives_its_unsent_tx_frames_back_to_the_pool():
    """TX descriptors queued on a socket and never kicked (a worker stopped between
    submit and kick) are the pool's frames too: closing the socket must not lose them."""
    with topology() as topo:
        nic = Nic(topo.nic)
        keeper = leaver = None
        try:
            keeper = XdpPort(nic, "keeper", HEALTHY)
            leaver = XdpPort(nic, "leaver", STALLED[0])
            qu, s = leaver.sockets[0]
            u = qu.native
            start = frames_free(keeper)
            n = 100
            idx = ffi.new("__u32 *")
            assert lib.xsk_ring_prod__reserve(s.tx, n, idx) == n
            frame = bytes.fromhex(hexmac(topo.peer_mac) + hexmac(STALLED[0])) + ETHERTYPE
            for i in range(n):  # what a burst does, minus the kick
                u.npool[0] -= 1
                addr = u.pool[u.npool[0]]
                ffi.memmove(u.area + addr, frame + bytes(50), 64)
                d = lib.xsk_ring_prod__tx_desc(s.tx, idx[0] + i)
                d.addr, d.len, d.options = addr, 64, 0
            lib.xsk_ring_prod__submit(s.tx, n)
            queued = frames_free(keeper)
            leaver.close()
            leaver = None
            # sent frames come back through the completion ring: wait for the last
            kq = keeper.sockets[0][0].native

            def all_back():
                lib.gw_umemq_refill(kq)
                return frames_free(keeper) == start

            wait_for(all_back, "every frame back in the pool")
        finally:
            for p in (leaver, keeper):
                if p is not None:
                    p.close()
            nic.close()
    assert queued == start - n


def test_tx_drain_reclaims_what_the_kernel_never_took_only_in_copy_mode():
    """gw_xsk_tx_drain over a fake TX ring that no kernel reads (fd -1: every kick
    fails): with reclaim (copy mode) the frames queued on it go back to the pool,
    an address outside the UMEM excepted; without (zero-copy, where the driver may
    still read the ring) nothing does."""
    fu = FakeUmem()
    descs = ffi.new("struct xdp_desc[]", RING)
    tx = fu._ring("struct xsk_ring_prod *", 6, descs)
    for i, addr in enumerate((4 * FS, NFR * FS, 6 * FS)):
        descs[i].addr, descs[i].len = addr, 60
    fu.idx[6] = 3  # producer: three queued, none taken (consumer 0)
    assert lib.gw_xsk_tx_drain(fu.u, tx, -1, 0) == 0
    assert fu.pooled() == []
    assert lib.gw_xsk_tx_drain(fu.u, tx, -1, 1) == 2
    assert fu.pooled() == [4 * FS, 6 * FS]
