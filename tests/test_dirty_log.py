"""Dirty-page logging for live migration: the C bursts mark exactly the pages
they write, the log is mapped as carefully as guest memory, and the protocol
only takes SET_LOG_BASE / LOG_ALL in the states where they make sense."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from gateway.testing.vring_driver import DriverRing
from gateway.vhost import protocol as p
from gateway.vhost.backend import VhostConnection
from gateway.vhost.dirtylog import DirtyLog, LogError, bytes_needed, covers
from gateway.vhost.protocol import ProtocolError, Region, Request
from gateway.virtio import features as vf
from gateway.virtio.features import Net, Proto
from gateway.virtio.ring import FrameBuffer, VirtQueue, ffi

MEM = 1 << 20
RING_GPA = 0x1000
# Slots of 2048 bytes from 0x10400: slot 1 (0x10c00..0x11400) straddles pages 0x10/0x11.
BUF_GPA = 0x10400
SLOT = 2048
USED_LOG_GPA = 0x50000  # log_guest_addr: deliberately not where the used ring is
LOG_SIZE = bytes_needed(MEM)  # 32 bytes: 256 pages
FEATURES = (vf.SUPPORTED_FEATURES & ~(1 << Net.LOG_ALL) & ~vf.OFFLOADS  # acked before migrating
            & ~(1 << Net.RING_PACKED))  # split rings: the used ring is what log_guest_addr logs
PROTO = vf.SUPPORTED_PROTOCOL_FEATURES | 1 << Proto.LOG_SHMFD


def memfd(size: int) -> int:
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed + 7 * i) & 0xFF for i in range(n))


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa >> 12, ((gpa + length - 1) >> 12) + 1))


def bits(log: DirtyLog) -> set[int]:
    raw = log.mm[log.offset : log.offset + log.size]
    return {8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> b & 1}


class Env:
    def __init__(self, *, log_size=LOG_SIZE, log_offset=0, log_used=True, size=16, **vq_kw):
        self.map = mmap.mmap(-1, MEM)
        self.host = ffi.from_buffer("uint8_t[]", self.map)
        host_addr = int(ffi.cast("uintptr_t", self.host))
        self.mem = ffi.new("struct gw_mem *")
        self.mem.nregions = 1
        r = self.mem.regions[0]
        r.gpa, r.size, r.qva, r.host = 0, MEM, 0, self.host
        self.drv = DriverRing(self.map, RING_GPA, size, BUF_GPA, SLOT)
        # Guard bytes around the log: a write outside it would show there.
        self.log_fd = memfd(log_offset + log_size + 64)
        self.log = DirtyLog(self.log_fd, log_size, log_offset, log_size * 8 * 4096)
        self.vq = VirtQueue(mem=self.mem, size=size, desc=host_addr + self.drv.desc_gpa,
                            avail=host_addr + self.drv.avail_gpa,
                            used=host_addr + self.drv.used_gpa, log=self.log,
                            log_used_gpa=USED_LOG_GPA if log_used else None, **vq_kw)

    def close(self) -> None:
        self.log.close()
        os.close(self.log_fd)


def rx_buf(frames):
    buf = FrameBuffer(len(frames), 8192)
    for i, f in enumerate(frames):
        buf.put(i, f)
    return buf


def test_rx_frames_mark_exactly_their_pages_and_the_used_ring_at_log_guest_addr():
    env = Env()
    try:
        frames = [frame(60, 1), frame(2000, 2)]  # the second crosses 0x11000
        heads = [env.drv.add_in() for _ in frames]
        assert env.vq.rx_burst(rx_buf(frames), 0, 2) == 2
        used = env.drv.poll_used()
        assert [h for h, _ in used] == heads
        for (h, n), f in zip(used, frames, strict=True):
            assert env.drv.read_in(h, n)[12:] == f  # logging changed nothing written
        want = pages(env.drv.slot_gpa(heads[0]), 12 + 60)
        want |= pages(env.drv.slot_gpa(heads[1]), 12 + 2000)
        assert want == {0x10, 0x11}
        # used elements and used->idx: first bytes of the used ring, logged at USED_LOG_GPA
        want.add(USED_LOG_GPA >> 12)
        assert bits(env.log) == want
        assert env.vq.stats["log_miss"] == 0
    finally:
        env.close()


def test_mrg_rxbuf_frame_over_five_chains_marks_every_page():
    env = Env(mrg_rxbuf=True, log_used=False)
    try:
        # 1 KiB buffers in 2 KiB slots: the fifth chain alone is on page 0x12.
        heads = [env.drv.add_in(buflen=1024) for _ in range(6)]
        f = frame(5000, 3)
        assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
        used = env.drv.poll_used()
        assert [h for h, _ in used] == heads[:5]
        want = set()
        for h, n in used:
            want |= pages(env.drv.slot_gpa(h), n)
        # log_used off: the used ring is not marked, only the buffers
        assert bits(env.log) == want == {0x10, 0x11, 0x12}
    finally:
        env.close()


def test_tx_marks_only_the_used_ring():
    env = Env()
    try:
        env.drv.add_out([bytes(12), frame(100)])
        buf = FrameBuffer(4, SLOT)
        assert env.vq.tx_burst(buf) == 1
        assert bits(env.log) == {USED_LOG_GPA >> 12}
    finally:
        env.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_set_notify_marks_the_used_ring(event_idx):
    env = Env(event_idx=event_idx, size=256)
    try:
        env.vq.set_notify(True)
        # flags at offset 0, avail_event after 256 used elements: 4 + 8 * 256 = 0x804
        off = 4 + 8 * 256 if event_idx else 0
        assert bits(env.log) == {(USED_LOG_GPA + off) >> 12}
    finally:
        env.close()


def test_a_log_too_small_is_never_written_past_and_misses_are_counted():
    # 2 bytes at offset 5 cover pages 0..15; the frame goes to page 0x10.
    env = Env(log_size=2, log_offset=5, log_used=False)
    try:
        before = env.log.mm[:]
        env.drv.add_in()
        assert env.vq.rx_burst(rx_buf([frame(100)]), 0, 1) == 1
        assert env.log.mm[:] == before  # no byte of the fd changed, guards included
        # one mark for the frame's page, one for each num_buffers byte written after it
        assert env.vq.stats["log_miss"] == 3
        assert ffi.cast("uint8_t *", env.log.ptr) == ffi.cast("uint8_t *", env.log._buf) + 5
    finally:
        env.close()


def test_log_write_sets_bits_lsb_first():
    env = Env(log_used=False)
    try:
        assert env.vq._vq.log_size == LOG_SIZE
        from gateway._native import lib
        assert lib.gw_vq_log_write(env.vq.native, 9 << 12, 1) == 0
        assert lib.gw_vq_log_write(env.vq.native, (2 << 12) - 1, 2) == 0  # pages 1 and 2
        assert env.log.mm[0:2] == bytes([0b110, 0b10])
        assert lib.gw_vq_log_write(env.vq.native, LOG_SIZE * 8 << 12, 1) == -1
        assert lib.gw_vq_log_write(env.vq.native, (1 << 64) - 1, 2) == -1  # wraps
    finally:
        env.close()


# -- mapping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fd_size, size, offset, memory_end, why",
    [
        (4096, 0, 0, 0, "log size is 0"),
        (4096, 1 << 31, 0, 0, "over the"),
        (4096, 64, (1 << 64) - 8, 0, "overflows"),
        (100, 64, 40, 0, "fd holds 100 bytes, the log needs 104"),
        (4096, 32, 0, MEM + 1, "reaches 0x100001"),
    ],
)
def test_bad_logs_are_refused(fd_size, size, offset, memory_end, why):
    fd = memfd(fd_size)
    try:
        with pytest.raises(LogError, match=why):
            DirtyLog(fd, size, offset, memory_end)
    finally:
        os.close(fd)


def test_log_fd_must_be_a_file():
    r, w = os.pipe()
    try:
        with pytest.raises(LogError, match="not a file"):
            DirtyLog(r, 32, 0, 0)
    finally:
        os.close(r), os.close(w)


def test_covers_is_exact_at_the_last_byte():
    assert covers(1, 0, 8 << 12)
    assert not covers(1, 0, (8 << 12) + 1)
    assert not covers(1, (1 << 64) - 1, 2)


# -- protocol --------------------------------------------------------------------


class Device:
    name = "fake"

    def __init__(self, features=FEATURES | 1 << Net.LOG_ALL, proto=PROTO):
        self.features, self.protocol_features, self.queue_pairs = features, proto, 1
        self.calls: list[str] = []

    def pause(self, conn, qps):
        self.calls.append("pause")

    def apply(self, conn):
        self.calls.append("apply")


def msg(req, payload=b"", need_reply=False):
    return p.encode(req, payload, p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0))


def setup(c: VhostConnection, proto: int, features: int) -> None:
    c.handle(msg(Request.SET_OWNER))
    c.handle(msg(Request.SET_PROTOCOL_FEATURES, p.u64(proto)))
    c.handle(msg(Request.SET_FEATURES, p.u64(features)))
    c.handle(msg(Request.SET_MEM_TABLE, p.mem_table([Region(0, MEM, 0x7000_0000, 0)])),
             [memfd(MEM)])


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_set_log_base_maps_the_log_replies_and_lets_log_all_on_running_rings():
    c = VhostConnection(Device())
    setup(c, PROTO, FEATURES)
    for i in (0, 1):
        c.handle(msg(Request.SET_VRING_NUM, p.vring_state(i, 16)))
        c.handle(msg(Request.SET_VRING_ADDR, p.vring_addr(i, 0x7000_1000, 0x7000_1200,
                                                          0x7000_1100)))
        c.handle(msg(Request.SET_VRING_KICK, p.u64(i)), [memfd(8)])
    out = c.handle(msg(Request.SET_LOG_BASE, p.log_base(LOG_SIZE)), [memfd(LOG_SIZE)])
    assert p.HEADER.unpack_from(out) == (Request.SET_LOG_BASE, p.VERSION | p.FLAG_REPLY, 0)
    assert c.log is not None and c.log.size == LOG_SIZE
    # QEMU switches LOG_ALL on under running rings: allowed, workers rebuilt.
    c.device.calls.clear()
    out = c.handle(msg(Request.SET_FEATURES, p.u64(FEATURES | 1 << Net.LOG_ALL),
                       need_reply=True))
    assert struct.unpack_from("<Q", out, 12)[0] == 0
    assert c.device.calls == ["pause", "apply"] and c.negotiated(Net.LOG_ALL)
    c.handle(msg(Request.SET_VRING_ADDR, p.vring_addr(0, 0x7000_1000, 0x7000_1200, 0x7000_1100,
                                                      flags=p.VRING_F_LOG, log=0x1200)))
    assert c.rings[0].addr.log == 0x1200
    # ...but no other feature change.
    out = c.handle(msg(Request.SET_FEATURES, p.u64(FEATURES & ~(1 << Net.MQ)),
                       need_reply=True))
    assert struct.unpack_from("<Q", out, 12)[0] == 1
    c.close()
    assert c.log is None


def test_log_all_before_any_log_is_accepted_and_the_log_comes_later():
    # As in DPDK: a front-end that acks every offered bit at start-up (our own
    # test front-end does) is fine; writes are logged once a log exists.
    c = VhostConnection(Device())
    setup(c, PROTO, FEATURES | 1 << Net.LOG_ALL)
    assert c.negotiated(Net.LOG_ALL) and c.log is None
    v = c.log_version
    c.device.calls.clear()
    c.handle(msg(Request.SET_LOG_BASE, p.log_base(LOG_SIZE)), [memfd(LOG_SIZE)])
    assert c.log is not None and c.log_version > v
    assert c.device.calls == ["pause", "apply"]  # workers rebuilt with the log
    c.close()


def test_set_log_base_without_log_shmfd_closes_and_closes_the_fd():
    c = VhostConnection(Device())
    setup(c, PROTO & ~(1 << Proto.LOG_SHMFD), FEATURES)
    before = fd_count()
    with pytest.raises(ProtocolError, match="LOG_SHMFD, which was not negotiated"):
        c.handle(msg(Request.SET_LOG_BASE, p.log_base(LOG_SIZE)), [memfd(LOG_SIZE)])
    assert fd_count() == before
    c.close()


def test_set_log_base_when_log_all_was_never_offered_is_refused():
    c = VhostConnection(Device(features=FEATURES))
    setup(c, PROTO, FEATURES)
    with pytest.raises(ProtocolError, match="needs feature LOG_ALL"):
        c.handle(msg(Request.SET_LOG_BASE, p.log_base(LOG_SIZE)), [memfd(LOG_SIZE)])
    c.close()


@pytest.mark.parametrize(
    "fd_size, size, offset, why",
    [
        (16, LOG_SIZE, 0, "fd holds 16 bytes"),
        (4096, LOG_SIZE - 1, 0, "reaches 0x100000"),
        (4096, 0, 0, "size is 0"),
    ],
)
def test_bad_set_log_base_closes_the_connection_and_leaks_nothing(fd_size, size, offset, why):
    c = VhostConnection(Device())
    setup(c, PROTO, FEATURES)
    before = fd_count()
    with pytest.raises(ProtocolError, match=why):
        c.handle(msg(Request.SET_LOG_BASE, p.log_base(size, offset)), [memfd(fd_size)])
    assert fd_count() == before and c.log is None
    c.close()


def test_a_new_log_replaces_the_old_one():
    c = VhostConnection(Device())
    setup(c, PROTO, FEATURES)
    c.handle(msg(Request.SET_LOG_BASE, p.log_base(LOG_SIZE)), [memfd(LOG_SIZE)])
    first, v = c.log, c.log_version
    c.handle(msg(Request.SET_LOG_BASE, p.log_base(2 * LOG_SIZE, 8)), [memfd(8 + 2 * LOG_SIZE)])
    assert first.mm is None and c.log.size == 2 * LOG_SIZE and c.log_version > v
    c.close()


def test_used_ring_logged_beyond_the_log_marks_the_device_broken():
    """log_guest_addr may lie outside guest memory, but the used ring's last
    byte must have its bit in the log: otherwise the device refuses the ring."""
    from gateway.datapath.port import MemoryPort
    from gateway.vhost.device import VhostDevice

    dev = VhostDevice("vm0", port=MemoryPort(), features=FEATURES | 1 << Net.LOG_ALL,
                      protocol_features=PROTO)
    c = VhostConnection(dev)
    dev.attach(c)
    try:
        setup(c, PROTO, FEATURES | 1 << Net.LOG_ALL)
        c.handle(msg(Request.SET_LOG_BASE, p.log_base(LOG_SIZE)), [memfd(LOG_SIZE)])
        # the used ring of ring 0 is logged at the very end of what the log covers
        for i, log in ((0, MEM - 6 - 8 * 16 + 1), (1, 0x1200)):
            c.handle(msg(Request.SET_VRING_NUM, p.vring_state(i, 16)))
            c.handle(msg(Request.SET_VRING_ADDR, p.vring_addr(
                i, 0x7000_1000 + 0x1000 * i, 0x7000_1200 + 0x1000 * i,
                0x7000_1100 + 0x1000 * i, flags=p.VRING_F_LOG, log=log)))
            c.handle(msg(Request.SET_VRING_KICK, p.u64(i)), [memfd(8)])
            c.handle(msg(Request.SET_VRING_ENABLE, p.vring_state(i, 1)))
        with pytest.raises(ProtocolError, match="beyond the 32-byte log"):
            c.handle(msg(Request.SET_STATUS, p.u64(0xF)))
        assert dev.state == "broken" and "ring 0: used ring logged at 0xfff7" in dev.broken_reason
    finally:
        dev.detach(c)
