"""Bounded bursts (issue 12): a hostile guest cannot make one burst long.

The C ring directly, split and packed, at ring sizes 256, 1024 and 32768:
the descriptors a burst reads are counted by C (walked / walked_max), so the
bound is asserted by counting, never by timing. Drops are counted exactly.
"""

from __future__ import annotations

import mmap
import threading
import time

import pytest

from gateway.datapath.port import MemoryPort
from gateway.datapath.worker import QueuePairWorker, wasteful
from gateway.testing import attacker
from gateway.testing.packed_driver import PackedRing
from gateway.testing.vring_driver import DriverRing
from gateway.virtio.ring import FrameBuffer, RingBroken, VirtQueue, ffi, lib

MEM = 16 << 20
RING_GPA = 0x1000
BUF_GPA = 0x400000
SLOT = 256
SIZES = [256, 1024, 32768]
BUDGET = lib.GW_BURST_WALK
READS = lib.GW_MAX_CHAIN_READS


class Env:
    """Guest memory, a split or packed driver, and the device queue on it."""

    def __init__(self, size, *, packed=False, **vq_kw):
        self.map = mmap.mmap(-1, MEM)
        self.host = ffi.from_buffer("uint8_t[]", self.map)
        base = int(ffi.cast("uintptr_t", self.host))
        self.mem = ffi.new("struct gw_mem *")
        self.mem.nregions = 1
        r = self.mem.regions[0]
        r.gpa, r.size, r.qva, r.host = 0, MEM, 0, self.host
        self.packed = packed
        ev = vq_kw.get("event_idx", False)
        if packed:
            self.drv = PackedRing(self.map, RING_GPA, size, BUF_GPA, SLOT, event_idx=ev)
            d = self.drv
            self.vq = VirtQueue(mem=self.mem, size=size, desc=base + d.desc_gpa,
                                avail=base + d.driver_gpa, used=base + d.device_gpa,
                                packed=True, desc_gpa=d.desc_gpa, last_avail=1 << 15,
                                **vq_kw)
        else:
            self.drv = DriverRing(self.map, RING_GPA, size, BUF_GPA, SLOT, event_idx=ev)
            d = self.drv
            self.vq = VirtQueue(mem=self.mem, size=size, desc=base + d.desc_gpa,
                                avail=base + d.avail_gpa, used=base + d.used_gpa, **vq_kw)

    def arm(self, chain, *, write):
        """The attack: the whole ring offered as chains of `chain` zero-length
        descriptors (split: one chain, every avail entry naming it). Returns
        how many chains the device sees."""
        if self.packed:
            return attacker.packed_fill(self.drv, chain, write=write)
        attacker.split_chain(self.drv, chain, write=write)
        attacker.split_fill(self.drv)
        return self.drv.size


def frames(n, length=100):
    buf = FrameBuffer(n, 2048)
    for i in range(n):
        buf.put(i, bytes((i + k) & 0xFF for k in range(length)))
    return buf


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("size", SIZES)
def test_tx_zero_length_chains_bounded_and_counted(size, packed):
    env = Env(size, packed=packed)
    chain = min(size, lib.GW_MAX_CHAIN)
    nchains = env.arm(chain, write=False)
    buf = FrameBuffer(64, 2048)
    bursts = 0
    while env.vq.pending():
        assert env.vq.tx_burst(buf) == 0
        assert 0 < env.vq.walked <= BUDGET
        bursts += 1
    # Every chain was taken, dropped as short and counted toward its burst.
    assert env.vq.stats["drop_short"] == nchains
    assert env.vq.walked_max <= BUDGET
    per_burst = min(64, (BUDGET - READS) // chain + 1)
    assert bursts == -(-nchains // per_burst)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_tx_dropped_chains_count_toward_the_burst(packed):
    """n bounds the chains a burst takes, not only the frames it returns."""
    env = Env(256, packed=packed)
    nchains = env.arm(1, write=False)
    buf = FrameBuffer(16, 2048)
    assert env.vq.tx_burst(buf) == 0
    assert env.vq.stats["drop_short"] == 16
    assert env.vq.walked == 16
    assert nchains == 256


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_chain_longer_than_the_cap_is_a_lie(packed):
    env = Env(2048, packed=packed)
    env.arm(READS + 1, write=False)
    with pytest.raises(RingBroken, match="GW_E_CHAIN_LONG"):
        env.vq.tx_burst(FrameBuffer(8, 2048))
    assert env.vq.walked == READS


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chain", [1, 1024])
def test_rx_mrg_no_room_dropped_once_walked(size, chain, packed):
    """MRG_RXBUF, chains with no space: each frame is dropped for no room
    after a bounded walk; later frames against the unchanged ring cost no walk."""
    env = Env(size, packed=packed, mrg_rxbuf=True)
    chain = min(chain, size)
    nchains = env.arm(chain, write=True)
    buf = frames(64)
    assert env.vq.rx_burst(buf, 0, 64) == 64
    assert env.vq.stats["drop_no_room"] == 64
    assert env.vq.stats["packets"] == 0
    assert env.vq.walked <= READS
    # Nothing was published: the chains are still the guest's.
    assert env.drv.poll_used() == []
    assert env.vq.pending() > 0
    # The ring did not change: the next frames are dropped without a walk.
    assert env.vq.rx_burst(buf, 0, 64) == 64
    assert env.vq.walked == 0
    assert env.vq.stats["drop_no_room"] == 128
    assert env.vq.walked_max <= BUDGET
    assert nchains >= 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("size", SIZES)
def test_rx_without_mrg_too_small_chains_bounded(size, packed):
    env = Env(size, packed=packed)
    env.arm(min(size, lib.GW_MAX_CHAIN), write=True)
    buf = frames(64)
    done = 0
    while done < 64:
        k = env.vq.rx_burst(buf, done, 64 - done)
        assert k > 0                       # progress every burst
        assert env.vq.walked <= BUDGET
        done += k
    assert env.vq.stats["drop_too_big"] == 64
    assert env.vq.walked_max <= BUDGET


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rx_stall_sleeps_until_the_guest_adds_a_buffer(packed, event_idx):
    """A frame larger than the buffers posted waits; pending() says 0 (the
    worker sleeps) until the guest adds a buffer; then the frame arrives whole."""
    env = Env(256, packed=packed, mrg_rxbuf=True, event_idx=event_idx)
    env.drv.add_in(1, buflen=64)
    env.drv.add_in(1, buflen=64)
    frame = bytes((7 * k) & 0xFF for k in range(1000))
    buf = FrameBuffer(1, 2048)
    buf.put(0, frame)
    for _ in range(3):                     # retried, not spinning: pending stays 0
        assert env.vq.rx_burst(buf, 0, 1) == 0
        assert env.vq.pending() == 0
        assert env.vq.set_notify(True) == 0
    if event_idx:
        # The kick is asked for at the stall point, not at the first untaken chain.
        if packed:
            assert env.drv.device_event[0] == 2 | 1 << 15
        else:
            assert env.drv.avail_event == 2
    env.drv.add_in(1, buflen=SLOT)
    env.drv.add_in(1, buflen=SLOT)
    env.drv.add_in(1, buflen=SLOT)
    env.drv.add_in(1, buflen=SLOT)
    assert env.drv.kick_needed()
    assert env.vq.pending() > 0
    assert env.vq.rx_burst(buf, 0, 1) == 1
    assert env.vq.stats["packets"] == 1
    used = env.drv.poll_used()
    hdr = env.vq.native.hdr_len
    got = b"".join(env.drv.read_in(h, n) for h, n in used)
    assert got[hdr:] == frame
    assert sum(n for _, n in used) == hdr + len(frame)
    assert env.vq.stats["drop_no_room"] == 0


def test_worker_throttles_a_pass_that_walks_for_nothing():
    """A worker without a pump (MemoryPort) pauses after a pass that walked
    thousands of descriptors and moved nothing; stop() still returns."""
    assert wasteful(3072, 0) and not wasteful(1024, 0) and not wasteful(3072, 64)
    tx, rx = Env(1024), Env(256, mrg_rxbuf=True)
    tx.arm(1024, write=False)
    port = MemoryPort()
    broken = []
    w = QueuePairWorker("attacked", rx.vq, tx.vq, None, None, port.queue(0), broken.append)
    halt = threading.Event()

    def rearm():
        while not halt.is_set():
            attacker.split_rearm(tx.drv)
            halt.wait(0.001)

    t = threading.Thread(target=rearm, daemon=True)
    t.start()
    w.start()
    try:
        deadline = time.monotonic() + 30
        while w.throttled < 3:
            assert time.monotonic() < deadline, "never throttled"
            halt.wait(0.01)
        assert tx.vq.walked_max <= BUDGET
        assert tx.vq.stats["drop_short"] > 0 and tx.vq.stats["packets"] == 0
    finally:
        halt.set()
        t.join(10)
        w.stop()
        port.close()
    assert broken == []
