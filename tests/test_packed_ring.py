"""The C packed ring (VIRTIO_F_RING_PACKED) against the Python packed driver.

Same contract as tests/test_ring.py for the split ring, through the same
burst calls: frames intact both ways, wrap counters across many wraps (odd
ring sizes, chains across the wrap), indirect tables, MRG_RXBUF and its
rollback, event suppression both ways, resume from a GET_VRING_BASE value,
dirty logging of used descriptors by their GPA, and every lie -> its exact
GW_E_* code, a dead queue and no used descriptor written.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from gateway.testing.packed_driver import (
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_ENABLE,
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    PackedRing,
    avail_flags,
)
from gateway.vhost import protocol as p
from gateway.vhost.backend import VhostConnection
from gateway.vhost.dirtylog import DirtyLog, bytes_needed
from gateway.vhost.protocol import ProtocolError, Request
from gateway.virtio import features as vf
from gateway.virtio.features import Net
from gateway.virtio.ring import (
    FrameBuffer,
    RingBroken,
    VirtQueue,
    ffi,
    lib,
    packed_base,
    ring_aligns,
    ring_sizes,
    valid_size,
)

MEM = 1 << 20
RING_GPA = 0x1000
BUF_GPA = 0x10000
SLOT = 2048


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed + 7 * i) & 0xFF for i in range(n))


class Env:
    """One guest memory, a packed driver on it, and a device queue on the same ring."""

    def __init__(self, size=16, *, hdr_len=12, log=None, log_used_gpa=None, **vq_kw):
        self.map = mmap.mmap(-1, MEM)
        self.host = ffi.from_buffer("uint8_t[]", self.map)
        self.host_addr = int(ffi.cast("uintptr_t", self.host))
        self.mem = ffi.new("struct gw_mem *")
        self.mem.nregions = 1
        r = self.mem.regions[0]
        r.gpa, r.size, r.qva, r.host = 0, MEM, 0, self.host
        self.drv = PackedRing(self.map, RING_GPA, size, BUF_GPA, SLOT,
                              event_idx=vq_kw.get("event_idx", False))
        self.map[BUF_GPA : BUF_GPA + size * SLOT] = b"\x5a" * (size * SLOT)
        self.hdr_len = hdr_len
        self.size = size
        self.vq = self.queue(hdr_len=hdr_len, log=log, log_used_gpa=log_used_gpa, **vq_kw)

    def queue(self, **kw):
        d = self.drv
        kw.setdefault("size", self.size)
        kw.setdefault("last_avail", 1 << 15)          # a new ring: position 0, wrap counter 1
        return VirtQueue(mem=self.mem, desc=self.host_addr + d.desc_gpa,
                         avail=self.host_addr + d.driver_gpa,
                         used=self.host_addr + d.device_gpa, packed=True,
                         desc_gpa=d.desc_gpa, **kw)

    def hdr(self) -> bytes:
        return bytes(range(0xA0, 0xA0 + self.hdr_len))

    def ring(self) -> bytes:
        return bytes(self.map[RING_GPA : RING_GPA + PackedRing.ring_bytes(self.size)])


def tx_all(env, nframes=8, cap=SLOT):
    buf = FrameBuffer(nframes, cap)
    n = env.vq.tx_burst(buf)
    return [buf.frame(i) for i in range(n)]


def rx_buf(frames):
    buf = FrameBuffer(len(frames), max(4096, *map(len, frames)))
    for i, f in enumerate(frames):
        buf.put(i, f)
    return buf


def num_buffers(data: bytes) -> int:
    return struct.unpack_from("<H", data, 10)[0]


# --- geometry ----------------------------------------------------------------------

def test_packed_geometry():
    assert ring_sizes(256, packed=True) == (4096, 4, 4)
    assert ring_aligns(packed=True) == (16, 4, 4)
    # any size up to 32768: positions wrap explicitly, never by mask
    assert [valid_size(s, packed=True) for s in (0, 1, 3, 5, 32768, 32769)] == [
        False, True, True, True, True, False]
    assert packed_base(0x8003, 16) == 0x8003
    assert packed_base(0x8003_8003, 16) == 0x8003          # QEMU's used half dropped
    with pytest.raises(ValueError):
        packed_base(16, 16)                                 # position past the ring


# --- TX -----------------------------------------------------------------------------

@pytest.mark.parametrize("hdr_len", [10, 12])
def test_tx_frames_intact_and_used_in_order(hdr_len):
    env = Env(hdr_len=hdr_len)
    frames = [frame(60, 1), frame(1500, 2), frame(1, 3)]
    h = env.hdr()
    ids = [env.drv.add_out([h, frames[0]]),
           env.drv.add_out([h[:5], h[5:] + frames[1][:3], frames[1][3:]]),   # ANY_LAYOUT
           env.drv.add_out([h + frames[2]])]
    assert tx_all(env) == frames
    assert env.drv.poll_used() == [(i, 0) for i in ids]
    # positions advance by descriptors: 2 + 3 + 1
    assert env.vq.last_avail == 6 | 1 << 15
    assert env.vq.stats["packets"] == 3
    assert env.vq.stats["bytes"] == sum(map(len, frames))


def test_tx_indirect():
    env = Env(indirect=True)
    f = frame(1000, 9)
    a = env.drv.add_out([env.hdr()[:4], env.hdr()[4:], f[:300], f[300:]], indirect=True)
    b = env.drv.add_out([env.hdr(), f])
    assert tx_all(env) == [f, f]
    assert env.drv.poll_used() == [(a, 0), (b, 0)]
    assert env.vq.last_avail == 3 | 1 << 15                # the indirect chain took one slot


@pytest.mark.parametrize("size", [5, 8])
def test_tx_wraps_many_times_with_chains_across_the_wrap(size):
    env = Env(size=size)
    sent = got = 0
    for rnd in range(40):
        frames = []
        # 2- and 3-descriptor chains: positions hit the end mid-chain
        while len(env.drv._free_slots) >= 3:
            f = frame(50 + rnd + len(frames), rnd)
            if (sent + len(frames)) % 2:
                env.drv.add_out([env.hdr(), f[:20], f[20:]])
            else:
                env.drv.add_out([env.hdr(), f])
            frames.append(f)
        out = tx_all(env, nframes=size)
        assert out == frames
        assert len(env.drv.poll_used()) == len(frames)
        sent += len(frames)
        got += len(out)
    assert got == sent == env.vq.stats["packets"]
    assert env.drv.used_wrap == env.vq.last_avail >> 15 == env.drv.avail_wrap


def test_tx_respects_n_and_resumes():
    env = Env()
    frames = [frame(80, i) for i in range(5)]
    for f in frames:
        env.drv.add_out([env.hdr(), f])
    assert tx_all(env, nframes=2) == frames[:2]
    assert tx_all(env, nframes=8) == frames[2:]
    assert len(env.drv.poll_used()) == 5


def test_tx_too_big_and_short_are_dropped_but_returned():
    env = Env()
    small, big = frame(100, 1), frame(300, 2)
    ids = [env.drv.add_out([env.hdr(), big]), env.drv.add_out([env.hdr()]),
           env.drv.add_out([env.hdr(), small])]
    assert tx_all(env, cap=200) == [small]
    assert env.drv.poll_used() == [(i, 0) for i in ids]
    assert env.vq.stats["drop_too_big"] == 1 and env.vq.stats["drop_short"] == 1


# --- RX -----------------------------------------------------------------------------

@pytest.mark.parametrize("indirect", [False, True])
def test_rx_single_chain(indirect):
    env = Env(indirect=indirect)
    frames = [frame(60, 1), frame(1400, 2)]
    ids = [env.drv.add_in(indirect=indirect) for _ in frames]
    assert env.vq.rx_burst(rx_buf(frames), 0, 2) == 2
    used = env.drv.poll_used()
    assert [i for i, _ in used] == ids
    for (id_, length), f in zip(used, frames, strict=True):
        assert length == 12 + len(f)
        data = env.drv.read_in(id_, length)
        assert data[:12] == bytes(10) + b"\x01\x00"
        assert data[12:] == f
    # used descriptors carry WRITE: their len counts bytes we wrote
    assert env.drv.read_desc(0)[3] & F_WRITE


def test_rx_chain_of_several_buffers_without_mrg():
    env = Env()
    f = frame(1000, 4)
    id_ = env.drv.add_in(nbufs=3, buflen=400)
    assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
    [(i, length)] = env.drv.poll_used()
    assert (i, length) == (id_, 1012)
    assert env.drv.read_in(i, length)[12:] == f
    assert env.vq.last_avail == 3 | 1 << 15


def test_rx_mrg_rxbuf_spans_chains():
    env = Env(mrg_rxbuf=True)
    f = frame(5000, 6)
    ids = [env.drv.add_in() for _ in range(4)]
    assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
    used = env.drv.poll_used()
    assert [i for i, _ in used] == ids[:3]
    assert [n for _, n in used] == [SLOT, SLOT, 5012 - 2 * SLOT]
    data = b"".join(env.drv.read_in(i, n) for i, n in used)
    assert num_buffers(data) == 3 and data[:10] == bytes(10) and data[12:] == f
    assert env.vq.pending() == 1


def test_rx_mrg_runs_out_mid_frame_rolls_back_with_the_ring_untouched():
    env = Env(mrg_rxbuf=True)
    small, big = frame(100, 1), frame(5000, 2)
    for _ in range(3):
        env.drv.add_in()
    buf = rx_buf([small, big])
    assert env.vq.rx_burst(buf, 0, 2) == 1              # big needs 3 chains, 2 left
    assert env.vq.last_avail == 1 | 1 << 15
    [(id0, n0)] = env.drv.poll_used()
    assert env.drv.read_in(id0, n0)[12:] == small
    ring = env.ring()
    assert env.vq.rx_burst(buf, 1, 1) == 0              # still 2 chains: nothing written
    assert env.ring() == ring and env.drv.poll_used() == []
    env.drv.add_in()
    assert env.vq.rx_burst(buf, 1, 1) == 1
    used = env.drv.poll_used()
    data = b"".join(env.drv.read_in(i, n) for i, n in used)
    assert len(used) == 3 and num_buffers(data) == 3 and data[12:] == big


def test_rx_too_big_without_mrg_keeps_the_chain():
    env = Env()
    big, small = frame(3000, 1), frame(64, 2)
    id_ = env.drv.add_in()
    assert env.vq.rx_burst(rx_buf([big, small]), 0, 2) == 2
    assert env.vq.stats["drop_too_big"] == 1 and env.vq.stats["packets"] == 1
    [(i, n)] = env.drv.poll_used()
    assert i == id_ and env.drv.read_in(i, n)[12:] == small


def test_rx_wraps_with_mrg_and_odd_size():
    env = Env(size=7, mrg_rxbuf=True)
    for rnd in range(30):
        f = frame(2500 + rnd, rnd)                      # two buffers per frame
        for _ in range(2):
            env.drv.add_in()
        assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
        used = env.drv.poll_used()
        data = b"".join(env.drv.read_in(i, n) for i, n in used)
        assert num_buffers(data) == 2 and data[12:] == f
    assert env.vq.stats["packets"] == 30


# --- notifications ------------------------------------------------------------------

def read_eventfd(fd) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def efd():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def send(env, n):
    for i in range(n):
        env.drv.add_out([env.hdr() + frame(40, i)])
    assert len(tx_all(env, nframes=n)) == n
    env.drv.poll_used()


def test_call_flags_enable_disable(efd):
    env = Env(callfd=efd)
    send(env, 1)
    env.drv.set_driver_event(EVENT_DISABLE)
    assert env.vq.call() is False and read_eventfd(efd) == 0
    send(env, 1)
    env.drv.set_driver_event(EVENT_ENABLE)
    assert env.vq.call() is True and read_eventfd(efd) == 1
    assert env.vq.call() is False                      # nothing new


def test_call_event_desc_across_wraps(efd):
    env = Env(size=4, event_idx=True, callfd=efd)
    env.drv.set_driver_event(EVENT_DESC, 0, 1)
    send(env, 1)                                       # used 0 -> 1
    assert env.vq.call() is True and read_eventfd(efd) == 1     # first call always
    env.drv.set_driver_event(EVENT_DESC, 3, 1)         # wake me when desc 3 (wrap 1) is used
    send(env, 1)                                       # 1 -> 2
    assert env.vq.call() is False
    send(env, 1)                                       # 2 -> 3: desc 3 not yet used
    assert env.vq.call() is False
    send(env, 1)                                       # 3 -> 0 (wrap 0): passed it
    assert env.vq.call() is True and read_eventfd(efd) == 1
    env.drv.set_driver_event(EVENT_DESC, 1, 0)         # in the next wrap
    send(env, 2)                                       # 0 -> 2, wrap 0: passed 1
    assert env.vq.call() is True and read_eventfd(efd) == 1
    env.drv.set_driver_event(EVENT_DESC, 1, 1)         # a whole wrap ahead
    send(env, 1)
    assert env.vq.call() is False


def test_set_notify_flags():
    env = Env()
    env.drv.add_out([env.hdr() + frame(10)])
    assert env.vq.set_notify(False) == 1
    assert env.drv.device_event[1] == EVENT_DISABLE and env.drv.kick_needed() is False
    assert env.vq.set_notify(True) == 1
    assert env.drv.device_event[1] == EVENT_ENABLE
    env.drv.add_out([env.hdr() + frame(10)])
    assert env.drv.kick_needed() is True
    assert env.drv.kick_needed() is False              # nothing published since


def test_peek_is_a_read_only_hint():
    """gw_vq_peek on a packed ring: the descriptor at the owner's position
    is available (in this wrap) or not; nothing is written."""
    env = Env(size=4)
    assert lib.gw_vq_peek(env.vq.native) == 0
    env.drv.add_out([env.hdr() + frame(10)])
    assert lib.gw_vq_peek(env.vq.native) == 1
    assert len(tx_all(env)) == 1
    assert lib.gw_vq_peek(env.vq.native) == 0
    assert env.vq.native.error == 0


def test_set_notify_event_desc_names_the_next_descriptor():
    env = Env(size=4, event_idx=True)
    send(env, 3)
    assert env.vq.set_notify(True) == 0
    assert env.drv.device_event == (3 | 1 << 15, EVENT_DESC)
    env.drv.add_out([env.hdr() + frame(10)])           # makes desc 3 available: kick
    assert env.drv.kick_needed() is True
    env.drv.add_out([env.hdr() + frame(10)])           # 0 (wrap 0): device not re-armed
    assert env.drv.kick_needed() is False
    assert env.vq.pending() == 1
    assert len(tx_all(env)) == 2
    env.drv.poll_used()
    assert env.vq.set_notify(True) == 0
    assert env.drv.device_event == (1, EVENT_DESC)     # position 1 in wrap 0


# --- resume -------------------------------------------------------------------------

def test_resume_from_get_vring_base_value_across_a_wrap():
    env = Env(size=4)
    send(env, 3)
    send(env, 2)                                       # one wrap and one more
    base = env.vq.last_avail
    assert base == 1                                   # position 1, wrap counter 0
    env.drv.add_out([env.hdr(), frame(33, 9)])         # positions 1-2
    vq2 = env.queue(last_avail=base)
    buf = FrameBuffer(4, SLOT)
    assert vq2.tx_burst(buf) == 1 and buf.frame(0) == frame(33, 9)
    assert len(env.drv.poll_used()) == 1
    assert vq2.last_avail == 3


# --- dirty logging ------------------------------------------------------------------

def test_used_descriptors_logged_by_gpa_and_event_area_at_log_guest_addr():
    log_fd = os.memfd_create("log", os.MFD_CLOEXEC)
    size = bytes_needed(MEM)
    os.ftruncate(log_fd, size)
    log = DirtyLog(log_fd, size, 0, size * 8 * 4096)
    try:
        event_log_gpa = 0x50000                        # log_guest_addr, not the desc ring
        # 160 descriptors: the ring (0x1000..0x1a00) is on page 1
        env = Env(size=160, log=log, log_used_gpa=event_log_gpa, mrg_rxbuf=True)
        for _ in range(126):
            env.drv.add_out([env.hdr() + frame(20)])
        assert len(tx_all(env, nframes=126)) == 126
        env.drv.poll_used()
        raw = log.mm[:size]
        assert {8 * i + b for i, byte in enumerate(raw) for b in range(8)
                if byte >> b & 1} == {1}               # TX: descriptors 0..125 on page 1
        f = frame(3000, 3)
        ids = [env.drv.add_in() for _ in range(2)]     # descriptors 126, 127 (0x17e0..)
        assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
        env.vq.set_notify(True)
        used = env.drv.poll_used()
        assert [i for i, _ in used] == ids
        raw = log.mm[:size]
        got = {8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> b & 1}
        slots = {(BUF_GPA + s * SLOT) >> 12 for s in env.drv._done[ids[0]][1]
                 + env.drv._done[ids[1]][1]}
        assert got == {1} | slots | {event_log_gpa >> 12}
        assert env.vq.stats["log_miss"] == 0
    finally:
        log.close()
        os.close(log_fd)


# --- hostile guests -----------------------------------------------------------------

def assert_broken(env, code, call=None, detail=None):
    ring = env.ring()
    call = call or (lambda: env.vq.tx_burst(FrameBuffer(4, SLOT)))
    with pytest.raises(RingBroken) as ei:
        call()
    assert env.vq.error == code, env.vq.error_text
    assert ei.value.code == code
    if detail is not None:
        assert ei.value.detail == detail
    assert env.ring() == ring                          # no used descriptor written
    assert env.vq.last_avail == 1 << 15 and env.vq.used_idx == 0
    for again in (lambda: env.vq.tx_burst(FrameBuffer(1, SLOT)),
                  lambda: env.vq.rx_burst(rx_buf([b"x"]), 0, 1),
                  env.vq.pending, env.vq.call, lambda: env.vq.set_notify(True)):
        with pytest.raises(RingBroken):
            again()
    assert env.vq.error == code


def slot(env, i):
    return env.drv.slot_gpa(i)


def test_bad_buffer_id():
    env = Env()
    env.drv.add_out([env.hdr() + frame(10)])           # a good chain first: not published either
    env.drv.post([(slot(env, 1), 64, 16, 0)])
    assert_broken(env, lib.GW_E_BUF_ID, detail=16)
    assert "buffer id 16" in env.vq.error_text


def test_bad_buffer_id_is_the_last_descriptors():
    env = Env()
    # the head's id is in range, the last one's is not: the last one counts
    env.drv.post([(slot(env, 0), 64, 1, F_NEXT), (slot(env, 1), 64, 999, 0)])
    assert_broken(env, lib.GW_E_BUF_ID, detail=999)


def test_later_descriptor_not_available_in_the_wrap():
    env = Env()
    env.drv.post([(slot(env, 0), 64, 0, F_NEXT), (slot(env, 1), 64, 0, 0)])
    # the guest "un-publishes" the second descriptor: flags of the other wrap
    addr, length, id_, flags = env.drv.read_desc(1)
    env.drv.write_desc(1, addr, length, id_, avail_flags(0))
    assert_broken(env, lib.GW_E_WRAP, detail=avail_flags(0))


def test_chain_longer_than_the_ring():
    env = Env(size=4)
    env.drv.post([(slot(env, k), 16, 0, F_NEXT) for k in range(4)])
    assert_broken(env, lib.GW_E_CHAIN_LOOP, detail=5)


@pytest.mark.parametrize("addr,length", [(MEM - 10, 64), (2**64 - 16, 64)])
def test_address_outside_memory_or_wrapping(addr, length):
    env = Env()
    env.drv.post([(addr, length, 0, 0)])
    assert_broken(env, lib.GW_E_DESC_ADDR, detail=addr)


def indirect_env(entries, table_len=None, head_flags=F_INDIRECT, indirect=True):
    env = Env(indirect=indirect)
    table = slot(env, 0)
    for k, (addr, length, flags) in enumerate(entries):
        struct.pack_into("<QIHH", env.map, table + 16 * k, addr, length, 0, flags)
    env.drv.post([(table, 16 * len(entries) if table_len is None else table_len, 0,
                   head_flags)])
    return env


def test_indirect_valid_table_passes():
    f = frame(200, 1)
    env = indirect_env([(BUF_GPA + SLOT, 12 + 200, 0)])
    env.map[slot(env, 1) : slot(env, 1) + 212] = bytes(12) + f
    assert tx_all(env) == [f]


def test_indirect_not_negotiated():
    env = indirect_env([(BUF_GPA + SLOT, 64, 0)], indirect=False)
    assert_broken(env, lib.GW_E_INDIRECT, detail=1 << 32 | 16)


def test_indirect_nested():
    env = indirect_env([(BUF_GPA + SLOT, 16, F_INDIRECT)])
    assert_broken(env, lib.GW_E_INDIRECT, detail=2 << 32 | 16)


def test_indirect_with_next():
    env = indirect_env([(BUF_GPA + SLOT, 64, 0)], head_flags=F_INDIRECT | F_NEXT)
    env.drv.post([(slot(env, 2), 64, 0, 0)])
    assert_broken(env, lib.GW_E_INDIRECT, detail=3 << 32 | 16)


@pytest.mark.parametrize("table_len", [24, 0, 16 * 1025])
def test_indirect_bad_len(table_len):
    env = indirect_env([(BUF_GPA + SLOT, 64, 0)], table_len=table_len)
    assert_broken(env, lib.GW_E_INDIRECT, detail=4 << 32 | table_len)


def test_indirect_after_direct_descriptors_in_a_chain():
    env = Env(indirect=True)
    table = slot(env, 0)
    struct.pack_into("<QIHH", env.map, table, slot(env, 1), 64, 0, 0)
    env.drv.post([(slot(env, 2), 64, 0, F_NEXT), (table, 16, 0, F_INDIRECT)])
    assert_broken(env, lib.GW_E_INDIRECT, detail=5 << 32 | 16)
    assert "alone" in env.vq.error_text


def test_indirect_entry_outside_memory():
    env = indirect_env([(BUF_GPA + SLOT, 64, 0), (MEM, 8, 0)])
    assert_broken(env, lib.GW_E_DESC_ADDR, detail=MEM)


def test_write_descriptor_on_tx():
    env = Env()
    env.drv.post([(slot(env, 0), 64, 0, F_WRITE)])
    assert_broken(env, lib.GW_E_DIRECTION, detail=F_WRITE)


def test_readonly_descriptor_on_rx_writes_nothing():
    env = Env()
    env.drv.post([(slot(env, 0), 64, 0, F_WRITE | F_NEXT), (slot(env, 1), 64, 0, 0)])
    before = bytes(env.map)
    assert_broken(env, lib.GW_E_DIRECTION, detail=0,
                  call=lambda: env.vq.rx_burst(rx_buf([frame(100)]), 0, 1))
    # the first (writable) buffer got bytes, but nothing was made used
    changed = [i for i in range(0, MEM, 4096) if env.map[i : i + 4096] != before[i : i + 4096]]
    assert changed == [slot(env, 0) & ~4095]


def test_readonly_first_descriptor_on_rx_writes_nothing_at_all():
    env = Env()
    env.drv.post([(slot(env, 0), 64, 0, 0)])
    before = bytes(env.map)
    assert_broken(env, lib.GW_E_DIRECTION, detail=0,
                  call=lambda: env.vq.rx_burst(rx_buf([frame(100)]), 0, 1))
    assert bytes(env.map) == before


def test_base_past_the_ring_is_refused():
    env = Env(size=8)
    with pytest.raises(ValueError):
        env.queue(last_avail=8)


# --- vhost-user: SET/GET_VRING_BASE carry the wrap counter ------------------------------

class _Device:
    name = "fake"
    features = vf.SUPPORTED_FEATURES
    protocol_features = vf.SUPPORTED_PROTOCOL_FEATURES
    queue_pairs = 1

    def pause(self, conn, qps):
        pass

    def apply(self, conn):
        pass


def _msg(req, payload=b""):
    return p.encode(req, payload, p.VERSION)


def _packed_conn() -> VhostConnection:
    c = VhostConnection(_Device())
    c.handle(_msg(Request.SET_OWNER))
    c.handle(_msg(Request.SET_FEATURES, p.u64(vf.SUPPORTED_FEATURES)))
    assert c.acked_features >> Net.RING_PACKED & 1
    return c


def test_vring_base_with_wrap_counter_and_any_size():
    c = _packed_conn()
    c.handle(_msg(Request.SET_VRING_NUM, p.vring_state(0, 100)))     # not a power of two
    # QEMU's form: avail state low, used state high; both position 5, wrap 1
    c.handle(_msg(Request.SET_VRING_BASE, p.vring_state(0, 0x8005_8005)))
    assert c.rings[0].base == 0x8005
    out = c.handle(_msg(Request.GET_VRING_BASE, p.vring_state(0, 0)))
    assert out[p.HEADER.size:] == p.vring_state(0, 0x8005_8005)


def test_vring_base_past_the_ring_is_a_protocol_error():
    c = _packed_conn()
    c.handle(_msg(Request.SET_VRING_NUM, p.vring_state(0, 100)))
    with pytest.raises(ProtocolError, match="packed base 100"):
        c.handle(_msg(Request.SET_VRING_BASE, p.vring_state(0, 0x8000 | 100)))


# --- the device's ring geometry checks (device.py _vq) -------------------------------------

QVA = 0x7000_0000
GPA = 0x4000_0000


@pytest.fixture
def packed_device():
    from gateway.datapath.port import MemoryPort
    from gateway.registry import Registry

    port = MemoryPort()
    dev = Registry().create("pk0", port)
    c = VhostConnection(dev)
    c.handle(_msg(Request.SET_OWNER))
    c.handle(_msg(Request.SET_FEATURES, p.u64(dev.features)))
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    c.handle(_msg(Request.SET_MEM_TABLE, p.mem_table([p.Region(GPA, 1 << 20, QVA, 0)])), [fd])
    c.handle(_msg(Request.SET_VRING_NUM, p.vring_state(0, 100)))
    c.handle(_msg(Request.SET_VRING_BASE, p.vring_state(0, 0x8000)))
    yield dev, c
    c.close()
    port.close()


def _addr(c, desc, driver, device):
    c.handle(_msg(Request.SET_VRING_ADDR, p.vring_addr(0, desc, device, driver)))


def test_size_taken_as_packed_then_features_changed_to_split(packed_device):
    dev, c = packed_device
    _addr(c, QVA + 0x1000, QVA + 0x2000, QVA + 0x2004)
    c.handle(_msg(Request.SET_FEATURES, p.u64(dev.features & ~(1 << Net.RING_PACKED))))
    with pytest.raises(ProtocolError, match="size 100 is not a power of two"):
        dev._vq(c, 0)


def test_device_maps_packed_ring_parts_and_logs_descriptors_by_gpa(packed_device):
    dev, c = packed_device
    _addr(c, QVA + 0x1000, QVA + 0x1000 + 1600, QVA + 0x1000 + 1604)
    vq = dev._vq(c, 0)
    assert vq.native.packed == 1 and vq.native.desc_gpa == GPA + 0x1000
    assert vq.last_avail == 0x8000 and vq.pending() == 0


@pytest.mark.parametrize("desc, driver, device, why", [
    (0x1008, 0x2000, 0x2004, "desc address .* is misaligned"),
    (0x1000, 0x2002, 0x2004, "avail address .* is misaligned"),
    (0x1000, 0x2000, 0x1000 + 1596, "overlaps the desc ring"),   # device area in the ring
])
def test_device_refuses_bad_packed_geometry(packed_device, desc, driver, device, why):
    dev, c = packed_device
    _addr(c, QVA + desc, QVA + driver, QVA + device)
    with pytest.raises(ProtocolError, match=why):
        dev._vq(c, 0)


# --- offloads ride the shared burst loop -----------------------------------------------

def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, start=0, off=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, start, off, 0)


def test_tx_captures_headers_and_one_gso_frame_per_burst_in_big():
    env = Env(size=64)
    big = ffi.new("uint8_t[]", 65536 + 256)
    hdrs = ffi.new("uint8_t[]", 12 * 8)
    n = env.vq.native
    n.big, n.big_cap, n.hdrs = big, 65536 + 256, hdrs
    small, big1, big2 = frame(100, 1), frame(40000, 2), frame(50000, 3)
    for h, f in ((vnet(), small), (vnet(1, 1, 66, 1448, 34, 16), big1),
                 (vnet(1, 4, 86, 1448, 54, 16), big2), (vnet(), frame(6000, 4)),
                 (vnet(), small)):
        data = h + f
        env.drv.add_out([data[i : i + SLOT] for i in range(0, len(data), SLOT)])
    buf = FrameBuffer(8, SLOT)
    assert env.vq.tx_burst(buf) == 2                   # small, big1; then the burst stops
    assert n.big_slot == 1 and buf.lens[1] == len(big1)
    assert bytes(ffi.buffer(big, len(big1))) == big1 and buf.frame(0) == small
    assert bytes(ffi.buffer(hdrs + 12, 12)) == vnet(1, 1, 66, 1448, 34, 16)
    assert env.vq.tx_burst(buf) == 1 and n.big_slot == 0
    assert bytes(ffi.buffer(big, len(big2))) == big2
    assert bytes(ffi.buffer(hdrs, 12)) == vnet(1, 4, 86, 1448, 54, 16)
    assert env.vq.tx_burst(buf) == 1 and n.big_slot == -1 and buf.frame(0) == small
    assert n.drop_too_big == 1
    assert len(env.drv.poll_used()) == 5               # every chain returned, in order


def test_rx_writes_the_flags_byte_it_is_given():
    env = Env()
    frames = [frame(60, 1), frame(70, 2)]
    for _ in frames:
        env.drv.add_in()
    flags = ffi.new("uint8_t[]", [2, 0])               # DATA_VALID on the first only
    env.vq.native.rx_flags = flags
    assert env.vq.rx_burst(rx_buf(frames), 0, 2) == 2
    env.vq.native.rx_flags = ffi.NULL
    got = [env.drv.read_in(i, n) for i, n in env.drv.poll_used()]
    assert [g[0] for g in got] == [2, 0] and [g[12:] for g in got] == frames
