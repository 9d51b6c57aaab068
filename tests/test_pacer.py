"""benchmarks/pacer.py: the zero-loss search's bisection, and the paced guest on the wire."""

from __future__ import annotations

import os
import pathlib
import struct
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is a plain folder, not an installed package

from benchmarks.pacer import PacedGuest, TxRing, udp_frame, zero_loss_search  # noqa: E402
from gateway.testing.vring_driver import USED_F_NO_NOTIFY, DriverRing  # noqa: E402


def threshold_trial(threshold: float):
    """A back-end that drains exactly `threshold` pps and loses the excess."""
    return lambda rate: max(0, round(rate - threshold))


@pytest.mark.parametrize("threshold", [12_345.0, 250_000.0, 987_654.0])
def test_search_finds_the_threshold_within_precision(threshold):
    rate, trials = zero_loss_search(threshold_trial(threshold), 10_000, 1_000_000,
                                    precision=0.02)
    assert threshold * 0.98 <= rate <= threshold
    assert trials[0][0] == 1_000_000 and trials[1][0] == 10_000
    assert len(trials) <= 12
    assert all((lost == 0) == (r <= threshold) for r, lost in trials)


def test_search_stops_after_max_trials_with_the_best_passing_rate():
    rate, trials = zero_loss_search(threshold_trial(500_001), 1, 1_000_000, precision=1e-9,
                                    max_trials=5)
    assert len(trials) == 5
    assert rate == max(r for r, lost in trials if lost == 0)


def test_search_when_hi_passes_takes_one_trial():
    assert zero_loss_search(lambda rate: 0, 10, 100) == (100, [(100, 0)])


def test_search_when_lo_loses_returns_zero():
    assert zero_loss_search(lambda rate: 7, 10, 100) == (0.0, [(100, 7), (10, 7)])


def test_search_refuses_negative_loss_and_bad_bounds():
    with pytest.raises(ValueError, match="counting is off"):
        zero_loss_search(lambda rate: -1, 10, 100)
    with pytest.raises(ValueError):
        zero_loss_search(lambda rate: 0, 100, 10)
    with pytest.raises(ValueError):
        zero_loss_search(lambda rate: 0, 0, 10)


def test_frame_is_the_size_asked_and_addressed():
    f = udp_frame(64, "02:00:00:00:00:02", "02:00:00:00:00:01")
    assert len(f) == 64 and f[:12] == bytes.fromhex("020000000002020000000001")
    assert f[12:14] == b"\x08\x00" and f[23] == 17  # IPv4, UDP
    with pytest.raises(ValueError):
        udp_frame(41, "02:00:00:00:00:02")


class FakeDevice:
    """The device side, by hand: a TxRing over plain memory, used entries written raw."""

    def __init__(self, size: int = 8, event_idx: bool = False):
        self.mem = bytearray(1 << 16)
        self.ring = DriverRing(self.mem, 0, size, 8192, event_idx=event_idx)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.tx = TxRing(self.mem, self.ring, self.kick, udp_frame(60, "02:00:00:00:00:02"), 12)
        self.used = 0

    def post(self, count: int) -> tuple[int, int, int, float]:
        return self.tx.run(1e9, count, 32, 1.0, 0.0)

    def avail(self) -> list[int]:
        r = self.ring
        n = r._u16(r.avail_gpa + 2)
        return [r._u16(r.avail_gpa + 4 + 2 * (i % r.size)) for i in range(n)]

    def give_back(self, ids: list[int], used_idx: int | None = None) -> None:
        r = self.ring
        for i in ids:
            struct.pack_into("<II", self.mem, r.used_gpa + 4 + 8 * (self.used % r.size), i, 0)
            self.used += 1
        struct.pack_into("<H", self.mem, r.used_gpa + 2,
                         self.used if used_idx is None else used_idx)

    def kicks(self) -> int:
        try:
            return os.eventfd_read(self.kick)
        except BlockingIOError:
            return 0

    def close(self):
        self.tx.close()
        os.close(self.kick)


@pytest.fixture
def dev():
    d = FakeDevice()
    yield d
    d.close()


def test_tx_ring_posts_frames_and_reuses_what_comes_back(dev):
    assert dev.post(5)[:3] == (5, 0, 0) and dev.tx.in_flight == 5
    head = dev.avail()[0]
    desc = dev.ring.read_desc(head)
    assert desc[1] == 12 + 60 and desc[2] == 0  # one device-readable descriptor: header + frame
    assert bytes(dev.mem[desc[0] + 12 : desc[0] + 72]) == udp_frame(60, "02:00:00:00:00:02")
    dev.give_back(dev.avail()[::-1])  # out of order is fine
    assert dev.post(3)[:3] == (3, 0, 0) and dev.tx.in_flight == 3


def test_tx_ring_counts_frames_it_has_no_descriptor_for(dev):
    assert dev.post(20)[:3] == (8, 12, 0)
    assert dev.tx.in_flight == 8


def test_tx_ring_kicks_unless_the_device_says_not_to(dev):
    dev.post(1)
    assert dev.kicks() == 1
    struct.pack_into("<H", dev.mem, dev.ring.used_gpa, USED_F_NO_NOTIFY)
    dev.post(1)
    assert dev.kicks() == 0


def test_tx_ring_kicks_per_avail_event_with_event_idx():
    d = FakeDevice(event_idx=True)
    try:
        avail_event = d.ring.used_gpa + 4 + 8 * 8
        struct.pack_into("<H", d.mem, avail_event, 3)  # "kick when idx passes 3"
        d.post(2)
        assert d.kicks() == 0
        d.post(2)  # idx 2 -> 4 crosses 3
        assert d.kicks() == 1
    finally:
        d.close()


@pytest.mark.parametrize("lie, why", [
    (lambda d: d.give_back([0, 1, 2], used_idx=5), "moved past"),
    (lambda d: d.give_back([8]), "id >= ring size"),
    (lambda d: d.give_back([0, 0]), "not in flight"),
    (lambda d: d.give_back([7]), "not in flight"),
])
def test_tx_ring_refuses_a_lying_device(dev, lie, why):
    dev.post(3)
    assert sorted(dev.avail()) == [0, 1, 2]
    lie(dev)
    with pytest.raises(RuntimeError, match=why):
        dev.post(1)


def test_paced_guest_frames_reach_the_far_host_at_the_rate_asked():
    """Every frame sent is counted on the far veth, at the rate asked.

    The CPUs are shared with whatever else runs, and a preempted pacer skips
    bursts (or the back-end's CPU stalls and the ring overflows), so the rate
    is checked on the best of three runs, the accounting on every run. The
    pacer is not pinned: benchmarks pin their traffic sources to CPU 1, and
    this is a correctness test, not a figure.
    """
    from benchmarks.setups import serve_gateway
    from gateway.testing.netns import topology

    rate, seconds = 50_000, 0.5
    best = 0
    with topology() as topo, serve_gateway(topo) as sock:
        with PacedGuest(sock, 64, dst_mac=topo.peer_mac) as guest:
            for _ in range(3):
                before = topo.peer_stats()["rx_packets"]
                t0 = time.monotonic()
                offered, sent, dropped = guest.run(rate, seconds)
                elapsed = time.monotonic() - t0
                deadline = time.monotonic() + 5
                while (topo.peer_stats()["rx_packets"] - before < sent
                       and time.monotonic() < deadline):
                    time.sleep(0.02)
                time.sleep(0.1)  # anything beyond `sent` would show up now
                arrived = topo.peer_stats()["rx_packets"] - before
                assert guest.last["in_flight"] == 0, guest.last
                assert offered + guest.last["skipped"] == rate * seconds
                assert sent + dropped == offered
                assert arrived == sent, guest.last
                assert seconds <= elapsed < seconds + 1  # paced: not all at once, not stuck
                best = max(best, sent)
                if best >= 0.9 * rate * seconds:
                    break
    assert best >= 0.9 * rate * seconds, guest.last
