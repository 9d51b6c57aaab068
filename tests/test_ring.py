"""The C split ring against the pure-Python guest driver, over shared memory.

Every test moves real bytes through guest memory and compares them at the far
end, or checks that a lying guest gets the exact GW_E_* code and a dead queue.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from gateway.testing.vring_driver import F_INDIRECT, F_NEXT, F_WRITE, DriverRing
from gateway.virtio.ring import (
    FrameBuffer,
    RingBroken,
    VirtQueue,
    ffi,
    lib,
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
    """One guest memory, a driver on it, and a device queue on the same ring."""

    def __init__(self, size=16, *, regions=None, hdr_len=12, mem_size=MEM, **vq_kw):
        self.map = mmap.mmap(-1, mem_size)
        self.host = ffi.from_buffer("uint8_t[]", self.map)
        self.host_addr = int(ffi.cast("uintptr_t", self.host))
        self.mem = ffi.new("struct gw_mem *")
        # (gpa, size, host offset into the mmap); identity by default
        regions = regions or [(0, mem_size, 0)]
        self.mem.nregions = len(regions)
        for k, (gpa, rsize, hoff) in enumerate(regions):
            r = self.mem.regions[k]
            r.gpa, r.size, r.qva, r.host = gpa, rsize, gpa, self.host + hoff
        self.drv = DriverRing(self.map, RING_GPA, size, BUF_GPA, SLOT,
                              event_idx=vq_kw.get("event_idx", False))
        # Stale bytes in every data slot: RX must overwrite the header, not rely on zeros.
        self.map[BUF_GPA : BUF_GPA + size * SLOT] = b"\x5a" * (size * SLOT)
        self.hdr_len = hdr_len
        self.vq = self.queue(size=size, hdr_len=hdr_len, **vq_kw)

    def queue(self, **kw):
        d = self.drv
        return VirtQueue(mem=self.mem, desc=self.host_addr + d.desc_gpa,
                         avail=self.host_addr + d.avail_gpa,
                         used=self.host_addr + d.used_gpa, **kw)

    def hdr(self) -> bytes:
        return bytes(range(0xA0, 0xA0 + self.hdr_len))  # non-zero: must be skipped


def tx_all(env, nframes=8, cap=SLOT):
    buf = FrameBuffer(nframes, cap)
    n = env.vq.tx_burst(buf)
    return [buf.frame(i) for i in range(n)]


# --- geometry -----------------------------------------------------------------

def test_ring_sizes_and_valid_size():
    assert ring_sizes(256) == (4096, 518, 2054)
    assert [valid_size(s) for s in (0, 1, 3, 256, 32768, 65536)] == [
        False, True, False, True, True, False]
    assert DriverRing.ring_bytes(4) == 64 + 14 + 2 + 38  # avail padded to 4 for used


# --- TX -------------------------------------------------------------------------

@pytest.mark.parametrize("hdr_len", [10, 12])
def test_tx_header_own_descriptor(hdr_len):
    env = Env(hdr_len=hdr_len)
    frames = [frame(60, 1), frame(1500, 2), frame(1, 3)]
    heads = [env.drv.add_out([env.hdr(), f]) for f in frames]
    assert tx_all(env) == frames
    assert env.vq.last_avail == 3
    assert env.drv.poll_used() == [(h, 0) for h in heads]
    assert env.vq.stats["packets"] == 3
    assert env.vq.stats["bytes"] == sum(map(len, frames))


def test_tx_any_layout_split_header_and_frame():
    env = Env()
    f = frame(900, 5)
    h = env.hdr()
    env.drv.add_out([h[:5], h[5:] + f[:3], f[3:]])           # header split, frame starts mid-desc
    env.drv.add_out([h[:11], h[11:], f[:100], f[100:700], f[700:]])
    env.drv.add_out([h + f])                                 # all in one descriptor
    assert tx_all(env) == [f, f, f]


def test_tx_indirect():
    env = Env(indirect=True)
    f = frame(1000, 9)
    env.drv.add_out([env.hdr()[:4], env.hdr()[4:], f[:300], f[300:]], indirect=True)
    env.drv.add_out([env.hdr(), f], indirect=False)
    assert tx_all(env) == [f, f]
    assert len(env.drv.poll_used()) == 2


def test_tx_too_big_and_short_are_dropped_but_returned():
    env = Env()
    small, big = frame(100, 1), frame(300, 2)
    env.drv.add_out([env.hdr(), big])
    env.drv.add_out([env.hdr()])                 # header only
    env.drv.add_out([env.hdr()[:6]])             # not even a whole header
    env.drv.add_out([env.hdr(), small])
    assert tx_all(env, cap=256) == [small]
    st = env.vq.stats
    assert (st["drop_too_big"], st["drop_short"], st["packets"]) == (1, 2, 1)
    assert len(env.drv.poll_used()) == 4          # dropped chains still handed back
    assert env.vq.last_avail == 4


def test_tx_respects_n_and_resumes():
    env = Env()
    frames = [frame(64, i) for i in range(5)]
    for f in frames:
        env.drv.add_out([env.hdr(), f])
    buf = FrameBuffer(8, SLOT)
    assert env.vq.tx_burst(buf, 2) == 2
    assert env.vq.pending() == 3
    assert [buf.frame(i) for i in range(2)] == frames[:2]
    assert env.vq.tx_burst(buf) == 3
    assert [buf.frame(i) for i in range(3)] == frames[2:]
    assert env.vq.pending() == 0


def test_tx_wraps_ring_many_times():
    env = Env(size=4)
    for rnd in range(40):
        f = frame(50 + rnd, rnd)
        env.drv.add_out([env.hdr(), f])
        assert tx_all(env) == [f]
        env.drv.poll_used()
    assert env.vq.last_avail == 40
    assert env.drv.used_idx == 40


# --- RX -------------------------------------------------------------------------

def rx_buf(frames):
    buf = FrameBuffer(len(frames), max(4096, *map(len, frames)))
    for i, f in enumerate(frames):
        buf.put(i, f)
    return buf


@pytest.mark.parametrize("hdr_len", [10, 12])
def test_rx_single_chain(hdr_len):
    env = Env(hdr_len=hdr_len)
    frames = [frame(60, 1), frame(1400, 2)]
    heads = [env.drv.add_in() for _ in frames]
    assert env.vq.rx_burst(rx_buf(frames), 0, 2) == 2
    used = env.drv.poll_used()
    assert [h for h, _ in used] == heads
    for (head, length), f in zip(used, frames, strict=True):
        assert length == hdr_len + len(f)
        data = env.drv.read_in(head, length)
        hdr = bytearray(hdr_len)
        if hdr_len == 12:
            hdr[10] = 1          # num_buffers is 1 without MRG_RXBUF (virtio 1.x 5.1.6.4)
        assert data[:hdr_len] == hdr
        assert data[hdr_len:] == f
    assert env.vq.stats["bytes"] == 1460


def test_rx_chain_of_several_buffers_without_mrg():
    env = Env()
    f = frame(1000, 4)
    head = env.drv.add_in(nbufs=3, buflen=400)
    assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
    [(h, length)] = env.drv.poll_used()
    assert (h, length) == (head, 1012)
    assert env.drv.read_in(h, length)[12:] == f


def test_rx_mrg_rxbuf_spans_chains():
    env = Env(mrg_rxbuf=True)
    f = frame(5000, 6)
    heads = [env.drv.add_in() for _ in range(4)]
    assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
    used = env.drv.poll_used()
    assert [h for h, _ in used] == heads[:3]
    assert [n for _, n in used] == [SLOT, SLOT, 5012 - 2 * SLOT]
    data = b"".join(env.drv.read_in(h, n) for h, n in used)
    assert struct.unpack_from("<H", data, 10)[0] == 3
    assert data[:10] == bytes(10)
    assert data[12:] == f
    assert env.vq.pending() == 1


def test_rx_mrg_runs_out_mid_frame_rolls_back_and_resumes():
    env = Env(mrg_rxbuf=True)
    small, big = frame(100, 1), frame(5000, 2)
    env.drv.add_in()
    env.drv.add_in()
    env.drv.add_in()
    buf = rx_buf([small, big])
    assert env.vq.rx_burst(buf, 0, 2) == 1              # big needs 3 chains, 2 left
    assert env.vq.last_avail == 1
    assert env.drv.used_idx == 1
    assert env.vq.rx_burst(buf, 1, 1) == 0
    env.drv.add_in()
    assert env.vq.rx_burst(buf, 1, 1) == 1
    used = env.drv.poll_used()
    assert len(used) == 4
    assert env.drv.read_in(*used[0])[12:] == small
    assert struct.unpack_from("<H", env.drv.read_in(*used[0]), 10)[0] == 1
    data = b"".join(env.drv.read_in(h, n) for h, n in used[1:])
    assert struct.unpack_from("<H", data, 10)[0] == 3
    assert data[12:] == big


def test_rx_stops_without_buffers_and_resumes():
    env = Env()
    frames = [frame(200, i) for i in range(4)]
    buf = rx_buf(frames)
    assert env.vq.rx_burst(buf, 0, 4) == 0
    env.drv.add_in()
    env.drv.add_in()
    assert env.vq.rx_burst(buf, 0, 4) == 2
    env.drv.add_in()
    env.drv.add_in()
    assert env.vq.rx_burst(buf, 2, 2) == 2
    got = [env.drv.read_in(h, n)[12:] for h, n in env.drv.poll_used()]
    assert got == frames
    assert env.vq.last_avail == 4


def test_rx_too_big_without_mrg_keeps_the_chain():
    env = Env()
    big, small = frame(3000, 1), frame(64, 2)
    head = env.drv.add_in()
    assert env.vq.rx_burst(rx_buf([big, small]), 0, 2) == 2
    assert env.vq.stats["drop_too_big"] == 1
    assert env.vq.stats["packets"] == 1
    [(h, n)] = env.drv.poll_used()
    assert h == head and env.drv.read_in(h, n)[12:] == small


def guards_intact(env, head: int) -> bool:
    """Every byte of the chain's slots past its buffers' lengths is still the
    0x5a the test wrote: the device wrote nothing outside the buffers."""
    i, more = head, True
    while more:
        addr, length, flags, nxt = env.drv.read_desc(i)
        slot = addr - (addr - BUF_GPA) % SLOT
        if env.map[addr + length : slot + SLOT] != b"\x5a" * (slot + SLOT - addr - length):
            return False
        i, more = nxt, flags & F_NEXT
    return True


@pytest.mark.parametrize("size", [4, 5])
def test_rx_header_over_tiny_buffers_writes_nothing_outside(size):
    """DPDK 22.11 wrote past a 4-byte RX buffer when the header spanned three
    descriptors. A 16-byte chain of four 4-byte buffers takes a 4-byte frame
    exactly; a 5-byte frame is dropped; either way no byte beyond a buffer moves."""
    env = Env()
    head = env.drv.add_in(nbufs=4, buflen=4)
    f = frame(size, 9)
    assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
    assert guards_intact(env, head)
    if size == 4:
        [(h, n)] = env.drv.poll_used()
        assert (h, n) == (head, 16)
        assert env.drv.read_in(h, n) == bytes(10) + b"\x01\x00" + f
    else:
        assert env.vq.stats["drop_too_big"] == 1 and env.drv.poll_used() == []


def test_rx_mrg_header_split_over_three_descriptors():
    """With MRG_RXBUF the header alone fills a chain of three 4-byte buffers and
    num_buffers lands in the third; the frame goes into the next chain."""
    env = Env(mrg_rxbuf=True)
    first = env.drv.add_in(nbufs=3, buflen=4)
    second = env.drv.add_in()
    f = frame(100, 3)
    assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
    assert guards_intact(env, first) and guards_intact(env, second)
    used = env.drv.poll_used()
    assert used == [(first, 12), (second, 100)]
    assert env.drv.read_in(first, 12) == bytes(10) + b"\x02\x00"
    assert env.drv.read_in(second, 100) == f


# --- notifications -------------------------------------------------------------

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
        env.drv.add_out([env.hdr(), frame(40, i)])
    assert len(tx_all(env)) == n
    env.drv.poll_used()


def test_call_event_idx(efd):
    env = Env(event_idx=True, callfd=efd)
    send(env, 1)                                   # used 0 -> 1
    env.drv.set_used_event(0)
    assert env.vq.call() is True and read_eventfd(efd) == 1
    assert env.vq.call() is False and read_eventfd(efd) == 0   # nothing new
    env.drv.set_used_event(5)                      # guest: wake me when used passes 5
    send(env, 3)                                   # used 1 -> 4
    assert env.vq.call() is False and read_eventfd(efd) == 0
    send(env, 1)                                   # 4 -> 5: entry 5 not yet used
    assert env.vq.call() is False
    send(env, 1)                                   # 5 -> 6: crosses used_event
    assert env.vq.call() is True and read_eventfd(efd) == 1
    env.drv.set_used_event(7)
    send(env, 3)                                   # 6 -> 9: event 7 passed mid-batch
    assert env.vq.call() is True and read_eventfd(efd) == 1


def test_call_no_interrupt_flag(efd):
    env = Env(callfd=efd)
    send(env, 1)
    env.drv.set_no_interrupt(True)
    assert env.vq.call() is False and read_eventfd(efd) == 0
    send(env, 1)
    env.drv.set_no_interrupt(False)
    assert env.vq.call() is True and read_eventfd(efd) == 1
    assert env.vq.call() is False


def test_set_notify_used_flags():
    env = Env()
    env.drv.add_out([env.hdr(), frame(10)])
    assert env.vq.set_notify(False) == 1
    assert env.drv.used_flags & 1
    assert env.drv.kick_needed() is False
    assert env.vq.set_notify(True) == 1
    assert env.drv.used_flags & 1 == 0
    env.drv.add_out([env.hdr(), frame(10)])
    assert env.drv.kick_needed() is True
    assert env.drv.kick_needed() is False          # nothing published since


def test_set_notify_event_idx():
    env = Env(event_idx=True)
    send(env, 3)
    assert env.vq.set_notify(True) == 0
    assert env.drv.avail_event == 3
    env.drv.add_out([env.hdr(), frame(10)])        # avail 3 -> 4 passes avail_event 3
    assert env.drv.kick_needed() is True
    env.drv.add_out([env.hdr(), frame(10)])        # 4 -> 5: device not re-armed
    assert env.drv.kick_needed() is False
    assert env.vq.pending() == 2


def test_peek_is_a_read_only_hint():
    """gw_vq_peek: another thread's look at the ring (pumps sharing a CPU):
    has the guest made a chain available that the owner has not taken? A
    lie is left for the owner's own pass to find, never made an error here."""
    env = Env()
    assert lib.gw_vq_peek(env.vq.native) == 0
    env.drv.add_out([env.hdr(), frame(10)])
    assert lib.gw_vq_peek(env.vq.native) == 1
    assert len(tx_all(env)) == 1
    assert lib.gw_vq_peek(env.vq.native) == 0
    env.drv.set_avail_idx(env.drv.avail_idx + 100)  # more than a 16-entry ring holds
    assert lib.gw_vq_peek(env.vq.native) == 1
    assert env.vq.native.error == 0
    with pytest.raises(RingBroken):
        env.vq.pending()


def test_resume_from_ring_state():
    env = Env()
    send(env, 3)
    env.drv.add_out([env.hdr(), frame(33, 9)])
    vq2 = env.queue(size=16, last_avail=env.vq.last_avail)
    assert vq2.used_idx == 3
    buf = FrameBuffer(4, SLOT)
    assert vq2.tx_burst(buf) == 1 and buf.frame(0) == frame(33, 9)
    assert env.drv.used_idx == 4


# --- memory regions ---------------------------------------------------------------

SPLIT = 0x80000      # GPA where region B starts
B_HOST = 0xC0000     # ...and where its bytes live in the mmap (not SPLIT!)


def split_env(**kw):
    """Region A: GPA [0, SPLIT) at mmap+0; region B: GPA [SPLIT, +64K) at mmap+B_HOST.

    The host bytes right after region A (mmap+SPLIT) are poisoned, so code that
    runs past a region's end instead of re-translating gets garbage.
    """
    env = Env(regions=[(0, SPLIT, 0), (SPLIT, 0x10000, B_HOST)], **kw)
    env.map[SPLIT : SPLIT + 0x10000] = b"\xee" * 0x10000
    return env


def test_tx_buffer_crossing_two_regions():
    env = split_env()
    data = env.hdr() + frame(600, 3)
    start = SPLIT - 200
    env.map[start:SPLIT] = data[:200]
    env.map[B_HOST : B_HOST + len(data) - 200] = data[200:]
    env.drv.write_desc(0, start, len(data), 0, 0)
    env.drv.push_avail(0)
    assert tx_all(env) == [data[12:]]


def test_rx_buffer_crossing_two_regions():
    env = split_env()
    f = frame(700, 8)
    start = SPLIT - 100
    env.drv.write_desc(0, start, 1000, F_WRITE, 0)
    env.drv.push_avail(0)
    assert env.vq.rx_burst(rx_buf([f]), 0, 1) == 1
    got = bytes(env.map[start:SPLIT]) + bytes(env.map[B_HOST : B_HOST + 612])
    assert got[12:] == f
    assert env.map[SPLIT : SPLIT + 700] == b"\xee" * 700   # nothing written past region A


# --- hostile guests ----------------------------------------------------------------

def assert_broken(env, code, call=None, detail=None):
    call = call or (lambda: env.vq.tx_burst(FrameBuffer(4, SLOT)))
    with pytest.raises(RingBroken) as ei:
        call()
    assert env.vq.error == code, env.vq.error_text
    assert ei.value.code == code
    if detail is not None:
        assert ei.value.detail == detail
        if code != lib.GW_E_INDIRECT:  # that one packs a reason code into detail
            assert str(detail) in env.vq.error_text or hex(detail) in env.vq.error_text
    # sticky: every entry point now refuses
    for again in (lambda: env.vq.tx_burst(FrameBuffer(1, SLOT)),
                  lambda: env.vq.rx_burst(rx_buf([b"x"]), 0, 1),
                  env.vq.pending, env.vq.call, lambda: env.vq.set_notify(True)):
        with pytest.raises(RingBroken):
            again()
    assert env.vq.error == code


def ok_desc(env, i, flags=0, nxt=0, length=64):
    env.drv.write_desc(i, env.drv.slot_gpa(i), length, flags, nxt)


def test_bad_avail_idx():
    env = Env()
    env.drv.set_avail_idx(17)
    assert_broken(env, lib.GW_E_AVAIL_IDX, detail=17)
    assert "GW_E_AVAIL_IDX" in env.vq.error_text


def test_avail_idx_exactly_size_is_fine():
    env = Env(size=4)
    for _ in range(4):
        env.drv.add_out([env.hdr() + frame(20)])
    assert len(tx_all(env)) == 4


def test_bad_head():
    env = Env()
    env.drv.push_avail(16)
    assert_broken(env, lib.GW_E_HEAD_IDX, detail=16)


def test_bad_next():
    env = Env()
    ok_desc(env, 0, F_NEXT, 16)
    env.drv.push_avail(0)
    assert_broken(env, lib.GW_E_DESC_IDX, detail=16)


def test_descriptor_loop():
    env = Env()
    ok_desc(env, 0, F_NEXT, 1)
    ok_desc(env, 1, F_NEXT, 0)
    env.drv.push_avail(0)
    assert_broken(env, lib.GW_E_CHAIN_LOOP)


def test_full_table_chain_is_not_a_loop():
    env = Env(size=4)
    for i in range(4):
        ok_desc(env, i, F_NEXT if i < 3 else 0, i + 1, length=16)
    env.drv.push_avail(0)
    assert len(tx_all(env)) == 1


def test_address_outside_memory():
    env = Env()
    env.drv.write_desc(0, MEM + 0x1000, 64, 0, 0)
    env.drv.push_avail(0)
    assert_broken(env, lib.GW_E_DESC_ADDR, detail=MEM + 0x1000)


def test_addr_plus_len_wraps():
    # A region at the top of the GPA space makes a wrapping buffer look
    # "inside memory" piece by piece: only the overflow check stops it.
    top = 2**64 - 4096
    env = Env(regions=[(0, MEM, 0), (top, 4096, 0)])
    env.drv.write_desc(0, 2**64 - 16, 64, 0, 0)
    env.drv.push_avail(0)
    assert_broken(env, lib.GW_E_DESC_ADDR, detail=2**64 - 16)


def test_length_past_end_of_last_region():
    env = split_env()
    end = SPLIT + 0x10000
    env.drv.write_desc(0, end - 32, 64, 0, 0)
    env.drv.push_avail(0)
    assert_broken(env, lib.GW_E_DESC_ADDR)


def indirect_env(entries, table_len=None, head_flags=F_INDIRECT, indirect=True):
    """Head descriptor 0 points at a table in slot 0 holding `entries`."""
    env = Env(indirect=indirect)
    table = env.drv.slot_gpa(0)
    for k, (flags, nxt) in enumerate(entries):
        struct.pack_into("<QIHH", env.map, table + 16 * k, env.drv.slot_gpa(1), 64, flags, nxt)
    env.drv.write_desc(0, table, 16 * len(entries) if table_len is None else table_len,
                       head_flags, 1)
    ok_desc(env, 1)
    env.drv.push_avail(0)
    return env


def test_indirect_valid_table_passes():
    assert len(tx_all(indirect_env([(F_NEXT, 1), (0, 0)]))) == 1


def test_indirect_not_negotiated():
    env = indirect_env([(0, 0)], indirect=False)
    assert_broken(env, lib.GW_E_INDIRECT, detail=(1 << 32) | 16)
    assert "not negotiated" in env.vq.error_text


def test_indirect_nested():
    env = indirect_env([(F_NEXT, 1), (F_INDIRECT, 0)])
    assert_broken(env, lib.GW_E_INDIRECT, detail=(2 << 32) | 64)


def test_indirect_with_next():
    env = indirect_env([(0, 0)], head_flags=F_INDIRECT | F_NEXT)
    assert_broken(env, lib.GW_E_INDIRECT, detail=(3 << 32) | 16)


@pytest.mark.parametrize("table_len", [24, 0, 16 * 1025])
def test_indirect_bad_len(table_len):
    env = indirect_env([(0, 0)], table_len=table_len)
    assert_broken(env, lib.GW_E_INDIRECT, detail=(4 << 32) | table_len)


def test_indirect_loop():
    env = indirect_env([(F_NEXT, 1), (F_NEXT, 0)])
    assert_broken(env, lib.GW_E_CHAIN_LOOP)


def test_indirect_next_out_of_table():
    env = indirect_env([(F_NEXT, 2), (0, 0)])
    assert_broken(env, lib.GW_E_DESC_IDX, detail=2)


def test_write_descriptor_on_tx():
    env = Env()
    ok_desc(env, 0, F_NEXT, 1)
    ok_desc(env, 1, F_WRITE)
    env.drv.push_avail(0)
    assert_broken(env, lib.GW_E_DIRECTION)
    assert env.drv.used_idx == 0


def test_readonly_descriptor_on_rx():
    env = Env()
    env.drv.add_out([bytes(100)])
    assert_broken(env, lib.GW_E_DIRECTION,
                  call=lambda: env.vq.rx_burst(rx_buf([frame(50)]), 0, 1))
    assert env.drv.used_idx == 0
